"""Who may open a tunnel on a route: client address lists and browser origins
(``[routes.access]``), and the request headers never forwarded.

``Origin`` is how a server tells a page's script from a native client: a browser always sends
it on a WebSocket handshake and a page cannot forge it, so checking it is the defence against
cross-site WebSocket hijacking (a page on another site opening a socket with the user's
cookies). Native clients usually send none; ``allow_missing_origin`` says whether that is
accepted.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tunnel.config.access import WILDCARD, Origin, parse_origin
from tunnel.core.rewrite import ForwardRequest, IPNetwork
from tunnel.errors import Forbidden

if TYPE_CHECKING:
    from tunnel.config.access import RouteAccess


@dataclass(frozen=True, slots=True)
class OriginRules:
    """``allowed_origins`` compiled: exact origins in a set, wildcards as (scheme, port,
    ".name") suffixes."""

    exact: frozenset[Origin]
    wildcards: tuple[tuple[str, int, str], ...]

    @classmethod
    def build(cls, patterns: Sequence[str]) -> OriginRules:
        exact: set[Origin] = set()
        wildcards: list[tuple[str, int, str]] = []
        for pattern in patterns:
            host_at = pattern.find("://") + 3
            if pattern[host_at : host_at + 2] == WILDCARD:
                origin = parse_origin(pattern.replace(WILDCARD, "x.", 1))
                assert origin is not None  # checked at load
                wildcards.append((origin.scheme, origin.port, origin.host[1:]))
            else:
                origin = parse_origin(pattern)
                assert origin is not None
                exact.add(origin)
        return cls(frozenset(exact), tuple(wildcards))

    def allows(self, origin: Origin) -> bool:
        if origin in self.exact:
            return True
        return any(
            origin.scheme == scheme and origin.port == port and origin.host.endswith(suffix)
            for scheme, port, suffix in self.wildcards
        )


@dataclass(frozen=True, slots=True)
class AccessRules:
    """One route's ``[routes.access]``, compiled once per configuration."""

    allow: tuple[IPNetwork, ...] = ()
    deny: tuple[IPNetwork, ...] = ()
    origins: OriginRules | None = None
    """None: any origin (``allowed_origins`` empty)."""
    allow_missing_origin: bool = True
    strip: frozenset[bytes] = frozenset()
    """Lower-case names of headers removed before forwarding."""

    @classmethod
    def build(cls, access: RouteAccess) -> AccessRules:
        """The compiled form the handler checks per request."""
        return cls(
            allow=access.allow,
            deny=access.deny,
            origins=OriginRules.build(access.allowed_origins) if access.allowed_origins else None,
            allow_missing_origin=access.allow_missing_origin,
            strip=frozenset(name.encode("latin-1") for name in access.strip_headers),
        )

    @property
    def checks_address(self) -> bool:
        return bool(self.allow or self.deny)

    def check_address(self, ip: str) -> None:
        """Raises:
        Forbidden: 403, the address is in ``deny``, or ``allow`` is set and it is not in it.
        """
        address = ipaddress.ip_address(ip)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in network for network in self.deny):
            raise Forbidden(f"client address {ip} is in the route's access.deny list")
        if self.allow and not any(address in network for network in self.allow):
            raise Forbidden(f"client address {ip} is not in the route's access.allow list")

    def check_origin(self, origins: Sequence[bytes]) -> None:
        """``origins``: every ``Origin`` value the request carries.

        Raises:
            Forbidden: 403, an origin outside ``allowed_origins``, several ``Origin`` headers,
                or none when ``allow_missing_origin`` is false.
        """
        if not origins:
            if not self.allow_missing_origin:
                raise Forbidden(
                    "the request has no Origin header and the route's access.allow_missing_origin "
                    "is false"
                )
            return
        if self.origins is None:
            return
        if len(origins) > 1:
            raise Forbidden("the request has several Origin headers")
        text = origins[0].decode("latin-1").strip()
        origin = parse_origin(text)
        if origin is None or not self.origins.allows(origin):
            raise Forbidden(f"origin {text[:200]!r} is not in the route's access.allowed_origins")

    def strip_headers(self, forward: ForwardRequest) -> ForwardRequest:
        """``forward`` without the ``strip_headers`` fields, in either spelling (``_`` for
        ``-``: some backends read ``X_Api_Key`` as ``X-Api-Key``)."""
        if not self.strip:
            return forward
        strip = self.strip
        fields = [
            (name, value)
            for name, value in forward.fields
            if (lower := name.lower()) not in strip
            and not (b"_" in lower and lower.replace(b"_", b"-") in strip)
        ]
        return ForwardRequest(forward.target, fields, forward.method, forward.http_version)
