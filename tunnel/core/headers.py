"""Small helpers over h11 header lists: case-insensitive lookups and comma-separated tokens."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from tunnel.errors import HandshakeError

HeaderList = Iterable[tuple[bytes, bytes]]

# RFC 9110 §7.6.1 plus the legacy names proxies have always stripped.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)


def values(headers: HeaderList, name: bytes) -> list[bytes]:
    """Every value of header ``name`` (lower-case bytes), in order."""
    return [value for key, value in headers if key.lower() == name]


def lowered_values(fields: HeaderList, name: bytes) -> list[bytes]:
    """``values`` of fields whose names are lower-case already (h11's header views,
    ``UpgradeRequest.fields``): a handshake looks a dozen names up, and lower-casing every
    field's name for each lookup cost more than the comparisons."""
    return [value for key, value in fields if key == name]


def tokens(headers: HeaderList, name: bytes, *, lowered: bool = False) -> list[str]:
    """Comma-separated tokens of every ``name`` header, lower-cased, empties dropped;
    ``lowered``: the names are lower-case already (``lowered_values``)."""
    found = []
    for value in (lowered_values if lowered else values)(headers, name):
        for token in value.split(b","):
            token = token.strip()
            if token:
                found.append(token.decode("latin-1").lower())
    return found


_REG_NAME = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?")
_PORT = re.compile(r"[0-9]{1,5}")
MAX_HOST_NAME = 253


def parse_host(host: str) -> tuple[str, str]:
    """Split a Host value into (lower-case name, port text): ``[::1]:80`` → (``::1``, ``80``).

    The name is an IP literal (IPv6 in brackets, no zone) or a DNS-style name of letters,
    digits, ``-``, ``_`` and dots (one trailing dot allowed and dropped, as for a fully qualified
    name); the port, when present, is a number from 1 to 65535. This is stricter than RFC 3986's
    reg-name on purpose: a Host is copied into ``X-Forwarded-Host`` and into URLs that backends
    build, so ``@``, ``/``, ``?``, ``#``, ``%``, spaces and sub-delimiters have no business there.

    Raises:
        HandshakeError: 400, naming what is wrong.
    """
    if host.startswith("["):
        end = host.find("]")
        literal = host[1:end] if end > 0 else ""
        if end < 0 or not _is_ipv6(literal):
            raise HandshakeError(f"Host {host!r} is not a valid bracketed IPv6 address")
        name, rest = literal.lower(), host[end + 1 :]
        if rest and not rest.startswith(":"):
            raise HandshakeError(f"Host {host!r} has text after the IPv6 address")
        port = rest[1:] if rest else None
    else:
        name, sep, port_text = host.partition(":")
        port = port_text if sep else None
        if not name:
            raise HandshakeError(f"Host {host!r} names no host" if host else "Host is empty")
        if len(name) > MAX_HOST_NAME or not _REG_NAME.fullmatch(name):
            raise HandshakeError(
                f"Host {host!r} is not a host name (letters, digits, '-', '_' and dots), "
                "an IP address or [IPv6]"
            )
        name = name.removesuffix(".").lower()
    if port is not None and (not _PORT.fullmatch(port) or not 0 < int(port) < 65536):
        raise HandshakeError(f"Host {host!r} has a port that is not a number from 1 to 65535")
    return name, port or ""


def _is_ipv6(literal: str) -> bool:
    if "%" in literal:  # a zone names an interface of the sender, not a host of ours
        return False
    try:
        ipaddress.IPv6Address(literal)
    except ValueError:
        return False
    return True
