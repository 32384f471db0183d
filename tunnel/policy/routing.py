"""Choosing the route for a request: first route whose hosts and path prefix match wins."""

from __future__ import annotations

from collections.abc import Sequence

from tunnel.config import RouteConfig


def match_route(routes: Sequence[RouteConfig], hostname: str, path: str) -> RouteConfig | None:
    """The first route whose ``hosts`` (empty = any) holds ``hostname`` and whose
    ``path_prefix`` starts ``path``; ``None`` when nothing matches."""
    for route in routes:
        if route.hosts and hostname not in route.hosts:
            continue
        if path.startswith(route.path_prefix):
            return route
    return None
