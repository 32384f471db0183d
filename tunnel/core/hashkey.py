"""What a ``hash`` route hashes on: the key taken from one request, and Cookie header parsing.

The cookie parsing lives here (not in ``policy.sticky``, which re-exports it) because the core
may not import the policy layer, and ``cookie:NAME`` keys need it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from urllib.parse import unquote_to_bytes

from tunnel.core.headers import values as header_values

KINDS = ("ip", "header", "cookie", "query")


def parse_spec(spec: str) -> tuple[str, str]:
    """Split a ``hash_key`` value into (kind, name): ``"header:X-User"`` → (``header``, ``X-User``).

    ``ip`` has no name; the others need one.

    Raises:
        ValueError: an unknown kind, a name after ``ip``, or a missing name.
    """
    kind, sep, name = spec.partition(":")
    if kind == "ip" and not sep:
        return kind, ""
    if kind not in KINDS or kind == "ip" or not name:
        raise ValueError(
            f"hash_key {spec!r} is not one of ip, header:NAME, cookie:NAME, query:NAME"
        )
    return kind, name


def hash_key(
    spec: str, *, peer_ip: str, headers: Sequence[tuple[bytes, bytes]], target: bytes
) -> bytes | None:
    """The bytes a ``hash`` route hashes for one request, or None to balance it round-robin.

    ``ip``: the peer address (after PROXY / trusted ``X-Forwarded-For`` handling by the caller).
    ``header:NAME``: the first field line of that header, name case-insensitive, value
    stripped. ``cookie:NAME``: the first value of that cookie (name case-sensitive, RFC 6265).
    ``query:NAME``: the first value of that query parameter of ``target``, percent-decoded
    (``+`` is a space), name compared after decoding. An absent or empty value gives None in
    every case, so clients without a key spread out instead of all landing on one backend.

    Raises:
        ValueError: ``spec`` is malformed (see ``parse_spec``).
    """
    kind, name = parse_spec(spec)
    found: bytes | None
    if kind == "ip":
        found = peer_ip.encode("utf-8")
    elif kind == "header":
        lines = header_values(headers, name.lower().encode("latin-1", "replace"))
        found = lines[0].strip(b" \t") if lines else None
    elif kind == "cookie":
        cookies = cookie_values(header_values(headers, b"cookie"), name)
        found = cookies[0].encode("latin-1") if cookies else None
    else:
        found = query_value(target, name)
    return found or None


def query_value(target: bytes, name: str) -> bytes | None:
    """The first value of query parameter ``name`` in a request target, percent-decoded."""
    query = target.partition(b"?")[2].partition(b"#")[0]
    wanted = name.encode("utf-8")
    for pair in query.split(b"&"):
        key, _, value = pair.partition(b"=")
        if _unquote(key) == wanted:
            return _unquote(value)
    return None


def _unquote(text: bytes) -> bytes:
    return unquote_to_bytes(text.replace(b"+", b" "))


def cookie_pairs(cookie_header: bytes) -> list[tuple[bytes, bytes, bytes]]:
    """(name, value, the whole pair as sent) for each ``name=value`` in one Cookie header.

    Pairs are split on ``;`` and stripped of spaces and tabs; a value in double quotes loses its
    quotes; pieces without ``=`` or with an empty name are skipped.
    """
    pairs = []
    for piece in cookie_header.split(b";"):
        piece = piece.strip(b" \t")
        key, sep, value = piece.partition(b"=")
        key = key.strip(b" \t")
        if not sep or not key:
            continue
        value = value.strip(b" \t")
        if len(value) >= 2 and value.startswith(b'"') and value.endswith(b'"'):
            value = value[1:-1]
        pairs.append((key, value, piece))
    return pairs


def cookie_values(cookie_headers: Iterable[bytes], name: str) -> list[str]:
    """Every value of cookie ``name`` across Cookie headers, in order, duplicates kept.

    Names are compared case-sensitively (RFC 6265); values are decoded as latin-1.
    """
    wanted = name.encode("latin-1", "replace")
    return [
        value.decode("latin-1")
        for header in cookie_headers
        for key, value, _ in cookie_pairs(header)
        if key == wanted
    ]
