"""The key a hash route hashes: ip, header:NAME, cookie:NAME, query:NAME."""

from __future__ import annotations

import pytest

from tunnel.core.hashkey import hash_key, parse_spec, query_value

HEADERS = [
    (b"host", b"chat.example.com"),
    (b"x-user", b" alice "),
    (b"x-user", b"bob"),
    (b"x-empty", b""),
    (b"cookie", b"theme=dark; sid=abc123"),
    (b"cookie", b"sid=second; room=%41"),
    (b"cookie", b"empty="),
]


def key(spec: str, target: bytes = b"/ws", peer_ip: str = "203.0.113.7") -> bytes | None:
    return hash_key(spec, peer_ip=peer_ip, headers=HEADERS, target=target)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("ip", b"203.0.113.7"),
        ("header:X-User", b"alice"),
        ("header:x-user", b"alice"),
        ("header:X-USER", b"alice"),
        ("header:Host", b"chat.example.com"),
        ("header:x-missing", None),
        ("header:x-empty", None),
        ("cookie:sid", b"abc123"),
        ("cookie:room", b"%41"),  # cookie values are not percent-decoded
        ("cookie:SID", None),  # cookie names are case-sensitive
        ("cookie:empty", None),
        ("cookie:missing", None),
        ("query:room", None),  # target has no query
    ],
)
def test_specs(spec: str, expected: bytes | None) -> None:
    assert key(spec) == expected


def test_ipv6_peer() -> None:
    assert key("ip", peer_ip="2001:db8::1") == b"2001:db8::1"
    assert key("ip", peer_ip="") is None


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"/ws?room=lobby", b"lobby"),
        (b"/ws?a=1&room=lobby&room=other", b"lobby"),
        (b"/ws?room=caf%C3%A9", "café".encode()),
        (b"/ws?room=a+b%20c", b"a b c"),
        (b"/ws?room=%2F%3F%26%3D", b"/?&="),
        (b"/ws?room=%zz", b"%zz"),
        (b"/ws?r%6Fom=x", b"x"),  # the name is compared decoded
        (b"/ws?ROOM=x", None),  # query names are case-sensitive
        (b"/ws?room=", None),
        (b"/ws?room", None),
        (b"/ws?room=&room=late", None),  # the first value counts, even empty
        (b"/ws?rooms=x&xroom=y", None),
        (b"/ws?", None),
        (b"/ws", None),
        (b"/ws?room=lobby#frag", b"lobby"),
        (b"/ws?room=a=b", b"a=b"),
        (b"/ws?&&room=x&&", b"x"),
    ],
)
def test_query(target: bytes, expected: bytes | None) -> None:
    assert key("query:room", target=target) == expected


def test_query_value_keeps_empty() -> None:
    assert query_value(b"/?room=", "room") == b""
    assert query_value(b"/?other=", "room") is None


def test_no_headers() -> None:
    assert hash_key("header:x-user", peer_ip="1.2.3.4", headers=[], target=b"/") is None
    assert hash_key("cookie:sid", peer_ip="1.2.3.4", headers=[], target=b"/") is None


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("ip", ("ip", "")),
        ("header:X-User", ("header", "X-User")),
        ("cookie:sid", ("cookie", "sid")),
        ("query:room", ("query", "room")),
        ("query:a:b", ("query", "a:b")),
    ],
)
def test_parse_spec(spec: str, parsed: tuple[str, str]) -> None:
    assert parse_spec(spec) == parsed


@pytest.mark.parametrize("spec", ["", "ip:x", "ip:", "header", "header:", "cookie:", "url:x", "IP"])
def test_bad_specs(spec: str) -> None:
    with pytest.raises(ValueError, match="is not one of"):
        parse_spec(spec)
    with pytest.raises(ValueError, match="is not one of"):
        key(spec)
