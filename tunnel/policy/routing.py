"""Choosing the route for a request by its host name and path.

A route's ``hosts`` hold exact names (``chat.example.com``) and wildcards (``*.example.org``,
any name below ``example.org`` at any depth, not ``example.org`` itself); empty ``hosts`` is
any host. Among the routes whose ``path_prefix`` starts the path, the best host match wins: an
exact name beats a wildcard, a longer wildcard (more labels) beats a shorter one, and a route
for any host comes last. Between routes that match equally well, the first one in the file
wins, as nginx picks among ``server_name`` forms (without its regular expressions).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tunnel.config import RouteConfig

WILDCARD = "*."


@dataclass(frozen=True, slots=True)
class RouteTable:
    """``routes`` indexed by host for ``match``: build it once per configuration with
    ``RouteTable.build``; matching then costs one lookup per label of the host name."""

    routes: tuple[RouteConfig, ...]
    exact: dict[str, tuple[RouteConfig, ...]]
    """Exact host name → the routes naming it, in file order."""
    wildcard: dict[str, tuple[RouteConfig, ...]]
    """The name after ``*.`` → the routes with that wildcard, in file order."""
    anywhere: tuple[RouteConfig, ...]
    """The routes with empty ``hosts``, in file order."""

    @classmethod
    def build(cls, routes: Sequence[RouteConfig]) -> RouteTable:
        exact: dict[str, list[RouteConfig]] = {}
        wildcard: dict[str, list[RouteConfig]] = {}
        for route in routes:
            for host in dict.fromkeys(written.lower() for written in route.hosts):
                if host.startswith(WILDCARD):
                    wildcard.setdefault(host[len(WILDCARD) :], []).append(route)
                else:
                    exact.setdefault(host, []).append(route)
        return cls(
            tuple(routes),
            {host: tuple(found) for host, found in exact.items()},
            {suffix: tuple(found) for suffix, found in wildcard.items()},
            tuple(route for route in routes if not route.hosts),
        )

    def match(self, hostname: str, path: str) -> RouteConfig | None:
        """The route for ``hostname`` (without the port; any letter case, a trailing dot
        ignored) and ``path``, ranked as the module says; ``None`` when nothing matches.

        Not checked here: that ``hostname`` is a valid name (``core.handshake`` did that).
        """
        name = hostname.lower().removesuffix(".")
        found = _first_for(self.exact.get(name, ()), path)
        if found is not None:
            return found
        if self.wildcard:
            dot = name.find(".")
            while dot >= 0:  # the longest suffix first: more labels rank higher
                suffix = name[dot + 1 :]
                found = _first_for(self.wildcard.get(suffix, ()), path)
                if found is not None:
                    return found
                dot = name.find(".", dot + 1)
        return _first_for(self.anywhere, path)


def _first_for(routes: tuple[RouteConfig, ...], path: str) -> RouteConfig | None:
    for route in routes:
        if path.startswith(route.path_prefix):
            return route
    return None


def match_route(
    routes: Sequence[RouteConfig] | RouteTable, hostname: str, path: str
) -> RouteConfig | None:
    """The route for ``hostname`` and ``path`` (see ``RouteTable.match``), or ``None``.

    Builds the table on each call when given the routes themselves: a server builds its
    ``RouteTable`` once per configuration instead."""
    table = routes if isinstance(routes, RouteTable) else RouteTable.build(routes)
    return table.match(hostname, path)
