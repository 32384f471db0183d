"""``[routes.access]``: address lists, origins and stripped headers, as the policy and the
config see them (the end-to-end refusals are in test_guard_e2e.py)."""

from __future__ import annotations

import pytest

from tunnel.config import Config
from tunnel.config.access import RouteAccess, origin_pattern_problem, parse_origin
from tunnel.core.rewrite import ForwardRequest
from tunnel.errors import ConfigError, Forbidden
from tunnel.policy.access import AccessRules


def rules(**keys: object) -> AccessRules:
    text = "\n".join(f"{name} = {_toml(value)}" for name, value in keys.items())
    config = Config.from_toml(
        f"""
[[listeners]]
listen = "127.0.0.1:0"
[[routes]]
backends = [{{ url = "ws://127.0.0.1:9000" }}]
[routes.access]
{text}
"""
    )
    return AccessRules.build(config.routes[0].access)


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(f'"{item}"' for item in value) + "]"
    return f'"{value}"'


def test_no_rules_let_everyone_through() -> None:
    access = AccessRules.build(RouteAccess())
    assert not access.checks_address
    access.check_origin([])
    access.check_origin([b"https://evil.example"])
    access.check_origin([b"https://a.example", b"https://b.example"])


@pytest.mark.parametrize(
    ("ip", "allowed"),
    [
        ("10.1.2.3", True),
        ("10.9.0.1", False),  # deny wins over allow
        ("192.168.1.1", False),  # not in allow
        ("::ffff:10.1.2.3", True),  # an IPv4 client on a dual-stack socket
        ("::ffff:10.9.0.1", False),
        ("2001:db8::5", True),
        ("2001:db9::5", False),
    ],
)
def test_deny_wins_and_allow_is_exclusive(ip: str, allowed: bool) -> None:
    access = rules(allow=["10.0.0.0/8", "2001:db8::/32"], deny=["10.9.0.0/16"])
    if allowed:
        access.check_address(ip)
    else:
        with pytest.raises(Forbidden) as refused:
            access.check_address(ip)
        assert ip in refused.value.message


def test_deny_alone_admits_the_rest() -> None:
    access = rules(deny=["203.0.113.7"])
    access.check_address("203.0.113.8")
    with pytest.raises(Forbidden, match="deny"):
        access.check_address("203.0.113.7")


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        (b"https://app.example.com", True),
        (b"https://APP.Example.com", True),
        (b"https://app.example.com:443", True),
        (b"https://app.example.com.", True),
        (b"https://app.example.com/", True),
        (b"http://app.example.com", False),  # scheme must match
        (b"https://app.example.com:8443", False),  # port must match
        (b"https://a.b.example.org", True),  # wildcard, any depth
        (b"https://example.org", False),  # the wildcard's own name is not below it
        (b"https://evil-example.org", False),
        (b"https://example.org.evil.com", False),
        (b"http://x.example.org", False),
        (b"https://x.example.org:444", False),
        (b"null", False),
        (b"https://user@app.example.com", False),
        (b"https://app.example.com/path", False),
        (b"", False),
        (b"\xff\xfe", False),
    ],
)
def test_origins(origin: bytes, allowed: bool) -> None:
    access = rules(allowed_origins=["https://app.example.com", "https://*.example.org"])
    if allowed:
        access.check_origin([origin])
    else:
        with pytest.raises(Forbidden, match="allowed_origins"):
            access.check_origin([origin])


def test_several_origins_are_refused_when_origins_are_checked() -> None:
    access = rules(allowed_origins=["https://app.example.com"])
    with pytest.raises(Forbidden, match="several"):
        access.check_origin([b"https://app.example.com", b"https://evil.example"])


def test_missing_origin_follows_allow_missing_origin() -> None:
    rules(allowed_origins=["https://app.example.com"]).check_origin([])
    strict = rules(allowed_origins=["https://app.example.com"], allow_missing_origin=False)
    with pytest.raises(Forbidden, match="no Origin"):
        strict.check_origin([])
    with pytest.raises(Forbidden, match="no Origin"):
        rules(allow_missing_origin=False).check_origin([])


def test_strip_headers_drops_every_spelling_and_keeps_order() -> None:
    access = rules(strip_headers=["Cookie", "X-Api-Key"])
    forward = ForwardRequest(
        b"/",
        [
            (b"Host", b"a"),
            (b"cookie", b"s=1"),
            (b"X-API-KEY", b"k"),
            (b"X_Api_Key", b"k2"),
            (b"X-Other", b"1"),
            (b"COOKIE", b"t=2"),
        ],
    )
    assert access.strip_headers(forward).fields == [(b"Host", b"a"), (b"X-Other", b"1")]
    assert AccessRules.build(RouteAccess()).strip_headers(forward) is forward


@pytest.mark.parametrize(
    "pattern",
    [
        "app.example.com",
        "https://",
        "https://a.*.com",
        "https://*example.com",
        "ftp://a.com",
        "https://a.com/path",
        "https://*.*.com",
        "*",
    ],
)
def test_bad_origin_patterns_are_refused_at_load(pattern: str) -> None:
    assert origin_pattern_problem(pattern)
    with pytest.raises(ConfigError, match="allowed_origins"):
        rules(allowed_origins=[pattern])


@pytest.mark.parametrize("name", ["Host", "Upgrade", "sec-websocket-key", "bad name", ""])
def test_headers_the_upgrade_needs_cannot_be_stripped(name: str) -> None:
    with pytest.raises(ConfigError, match="strip_headers"):
        rules(strip_headers=[name])


def test_bad_cidr_is_refused() -> None:
    with pytest.raises(ConfigError, match="allow"):
        rules(allow=["10.0.0.0/33"])


def test_parse_origin_normal_form() -> None:
    origin = parse_origin("HTTPS://Chat.Example.com")
    assert origin is not None
    assert str(origin) == "https://chat.example.com:443"
    assert parse_origin("ws://[::1]:8080") is not None
    assert parse_origin("https://a.com:99999") is None
