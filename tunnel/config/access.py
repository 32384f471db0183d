"""``[routes.access]``: address lists, browser origins and headers never forwarded."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from tunnel.config.kinds import CIDRList, Flag, TextList, setting

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_NEVER_STRIPPED = frozenset(
    {"host", "connection", "upgrade", "sec-websocket-key", "sec-websocket-version"}
)


DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
WILDCARD = "*."


@dataclass(frozen=True, slots=True)
class Origin:
    """An origin in normal form: lower-case scheme and host, the port always written."""

    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


def parse_origin(text: str) -> Origin | None:
    """``scheme://host[:port]`` (no path, query, credentials) as an ``Origin``; None for
    anything else, such as ``null`` (sandboxed frames, file:// pages)."""
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if (
        scheme not in DEFAULT_PORTS
        or not parts.hostname
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or "@" in parts.netloc
    ):
        return None
    return Origin(scheme, parts.hostname.lower().rstrip("."), port or DEFAULT_PORTS[scheme])


def origin_pattern_problem(pattern: str) -> str:
    """Why ``pattern`` cannot be in ``allowed_origins`` (``""`` when it can): an exact origin,
    or a wildcard ``scheme://*.name[:port]`` for any host below ``name``."""
    host_at = pattern.find("://") + 3
    wildcard = pattern[host_at : host_at + 2] == WILDCARD
    parsed = parse_origin(pattern.replace(WILDCARD, "x.", 1) if wildcard else pattern)
    if host_at < 3 or parsed is None:
        return (
            f"{pattern!r} is not an origin; write scheme://host[:port] like "
            '"https://app.example.com" or "https://*.example.com"'
        )
    if "*" in pattern[host_at + (2 if wildcard else 0) :]:
        return f'{pattern!r}: a wildcard is written "*." at the start of the host only'
    return ""


def _strip_problem(name: str) -> str:
    if not HEADER_NAME.fullmatch(name):
        return f"{name!r} is not a header name"
    if name in _NEVER_STRIPPED:
        return f"{name!r} is needed by the upgrade itself and cannot be stripped"
    return ""


@dataclass(frozen=True, slots=True)
class RouteAccess:
    """Who may open a tunnel on the route, checked before auth and before any backend is
    contacted; a refusal is a 403 (nginx `allow`/`deny`, HAProxy `http-request deny if`)."""

    allow: tuple[IPNetwork, ...] = setting(
        (),
        CIDRList(),
        'CIDRs (`"10.0.0.0/8"`, `"2001:db8::/32"`) whose clients may connect; empty = any. The '
        "client is the peer, or the address a trusted PROXY header carries (`X-Forwarded-For` is "
        "not used here: any client can write it).",
    )
    deny: tuple[IPNetwork, ...] = setting(
        (),
        CIDRList(),
        "CIDRs refused even when `allow` lists them: deny wins.",
    )
    allowed_origins: tuple[str, ...] = setting(
        (),
        TextList(lower=True, check=origin_pattern_problem),
        'Browser origins accepted: exact (`"https://app.example.com"`) or a wildcard '
        '(`"https://*.example.com"`: any host below example.com); scheme and port must match '
        "(`https://` means port 443). Another origin → 403. Empty = any origin. This is the "
        "defence against cross-site WebSocket hijacking, which no peer turns on by default.",
    )
    allow_missing_origin: bool = setting(
        True,
        Flag(),
        "`true` accepts requests without an `Origin` header (native clients; browsers always "
        "send one); `false` refuses them with 403.",
    )
    strip_headers: tuple[str, ...] = setting(
        (),
        TextList(lower=True, check=_strip_problem),
        'Request headers removed before forwarding (`["Cookie", "Authorization"]`), in either '
        'spelling (`X_Api_Key` too); nginx `proxy_set_header NAME ""`, HAProxy '
        "`http-request del-header`.",
    )
