"""Small helpers over h11 header lists: case-insensitive lookups and comma-separated tokens."""

from __future__ import annotations

from collections.abc import Iterable

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


def tokens(headers: HeaderList, name: bytes) -> list[str]:
    """Comma-separated tokens of every ``name`` header, lower-cased, empties dropped."""
    found = []
    for value in values(headers, name):
        for token in value.split(b","):
            token = token.strip()
            if token:
                found.append(token.decode("latin-1").lower())
    return found


def split_host(host: str) -> tuple[str, str]:
    """Split a Host value into (lower-case name, port text); ``[::1]:80`` → (``::1``, ``80``)."""
    if host.startswith("["):
        end = host.find("]")
        if end > 0:
            rest = host[end + 1 :]
            return host[1:end].lower(), rest[1:] if rest.startswith(":") else ""
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit() and ":" not in name:
        return name.lower(), port
    return host.lower(), ""
