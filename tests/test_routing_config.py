"""The routing keys (issue 12): backend weight, caps and slow start; balance, hash_key, on_down,
passive_failures, ``[routes.sticky_cookie]``, ``[routes.health]`` and wildcard hosts. Build a
valid file, change one key, check the value or that the error names that key."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tunnel.cli import main
from tunnel.config import BackendConfig, Config, RouteConfig
from tunnel.config.routes import BALANCE_METHODS, HealthCheck, StickyCookie
from tunnel.errors import ConfigError

SECRET = "0123456789abcdef"
"""Sixteen characters: the shortest secret ``balance = "cookie"`` takes."""


def doc(
    route: str = "",
    backend: str = "",
    more: str = "",
) -> str:
    """A valid file with one route; ``route`` adds keys to it, ``backend`` to its one backend,
    ``more`` tables after it."""
    extra = f", {backend}" if backend else ""
    return (
        '[[listeners]]\nlisten = "127.0.0.1:8080"\n\n[[routes]]\nname = "r"\n'
        f'{route}\nbackends = [{{ name = "a", url = "ws://127.0.0.1:9000"{extra} }}]\n{more}\n'
    )


def route_of(text: str) -> RouteConfig:
    (route,) = Config.from_toml(text).routes
    return route


def refused(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        Config.from_toml(text)
    return caught.value


# --- defaults ----------------------------------------------------------------------------------


def test_defaults() -> None:
    route = route_of(doc())
    (backend,) = route.backends
    assert (backend.weight, backend.max_tunnels, backend.slow_start) == (1, 0, 0.0)
    assert route.balance == "round-robin"
    assert route.hash_key == "ip"
    assert route.on_down == "keep"
    assert route.passive_failures == 3
    assert route.sticky_cookie == StickyCookie("tunnel_backend", "", 0.0, strip=False)
    assert route.health == HealthCheck("none", "/", 2.0, 1.0, 2, 3)
    assert BALANCE_METHODS == ("round-robin", "least-conn", "hash", "cookie")


def test_backend_flags_get_the_defaults() -> None:
    config = Config.from_toml(doc()).with_overrides(backends=["127.0.0.1:9001", "ws://h:1/p"])
    (route,) = config.routes
    assert [(b.weight, b.max_tunnels, b.slow_start) for b in route.backends] == [(1, 0, 0.0)] * 2
    assert BackendConfig.parse_url("wss://h", "k") == BackendConfig("h:443", "h", 443, "", "wss")


def test_the_secret_is_not_in_the_repr() -> None:
    cookie = StickyCookie(secret=SECRET)
    assert SECRET not in repr(cookie)


# --- valid values ------------------------------------------------------------------------------

VALID: list[Any] = [
    pytest.param(doc(backend="weight = 256"), "backends[0].weight", 256, id="weight-max"),
    pytest.param(doc(backend="weight = 1"), "backends[0].weight", 1, id="weight-min"),
    pytest.param(doc(backend="max_tunnels = 0"), "backends[0].max_tunnels", 0, id="cap-off"),
    pytest.param(doc(backend="max_tunnels = 500"), "backends[0].max_tunnels", 500, id="cap"),
    pytest.param(doc(backend='slow_start = "30s"'), "backends[0].slow_start", 30.0, id="slow"),
    pytest.param(doc(backend='slow_start = "0s"'), "backends[0].slow_start", 0.0, id="slow-off"),
    *(
        pytest.param(doc(f'balance = "{m}"'), "balance", m, id=f"balance-{m}")
        for m in ("round-robin", "least-conn", "hash")
    ),
    pytest.param(
        doc('balance = "cookie"', more=f'[routes.sticky_cookie]\nsecret = "{SECRET}"'),
        "balance",
        "cookie",
        id="balance-cookie",
    ),
    *(
        pytest.param(doc(f'balance = "hash"\nhash_key = "{k}"'), "hash_key", k, id=f"hash-{k}")
        for k in ("ip", "header:X-User-Id", "cookie:sid", "query:room", "header:x_y.z~1")
    ),
    pytest.param(doc('on_down = "close"'), "on_down", "close", id="on-down-close"),
    pytest.param(doc('on_down = "keep"'), "on_down", "keep", id="on-down-keep"),
    pytest.param(doc("passive_failures = 0"), "passive_failures", 0, id="passive-off"),
    pytest.param(doc("passive_failures = 10"), "passive_failures", 10, id="passive"),
    pytest.param(
        doc(
            'balance = "cookie"',
            more=f'[routes.sticky_cookie]\nname = "SRV-id"\nsecret = "{SECRET}x"\n'
            'max_age = "1d"\nstrip = true',
        ),
        "sticky_cookie",
        StickyCookie("SRV-id", SECRET + "x", 86400.0, strip=True),
        id="sticky-every-key",
    ),
    pytest.param(
        doc('balance = "cookie"', more=f'sticky_cookie = {{ secret = "{SECRET}" }}'),
        "sticky_cookie",
        StickyCookie(secret=SECRET),
        id="sticky-inline",
    ),
    *(
        pytest.param(
            doc(more=f'[routes.health]\nkind = "{kind}"'),
            "health.kind",
            kind,
            id=f"health-{kind}",
        )
        for kind in ("none", "websocket", "tcp")
    ),
    pytest.param(
        doc(
            more='[routes.health]\nkind = "websocket"\npath = "/healthz?deep=1"\n'
            'interval = "10s"\ntimeout = "9.5s"\nrise = 1\nfall = 1'
        ),
        "health",
        HealthCheck("websocket", "/healthz?deep=1", 10.0, 9.5, 1, 1),
        id="health-every-key",
    ),
    pytest.param(
        doc('hosts = ["*.Example.ORG", "a.example.org", "*.localhost", "*.a-b_c.d1.example"]'),
        "hosts",
        ("*.example.org", "a.example.org", "*.localhost", "*.a-b_c.d1.example"),
        id="wildcard-hosts",
    ),
]


def _get(route: RouteConfig, dotted: str) -> object:
    value: object = route
    for part in dotted.replace("[0]", ".0").split("."):
        value = value[int(part)] if part.isdigit() else getattr(value, part)  # type: ignore[index]
    return value


@pytest.mark.parametrize(("text", "field", "expected"), VALID)
def test_valid_values(text: str, field: str, expected: object) -> None:
    config = Config.from_toml(text)
    assert _get(config.routes[0], field) == expected
    assert Config.from_toml(config.to_toml()) == config


# --- invalid values, one key at a time ---------------------------------------------------------

BAD: list[Any] = [
    pytest.param(doc(backend="weight = 0"), "backends[0].weight", "between 1 and 256", id="w0"),
    pytest.param(doc(backend="weight = 257"), "backends[0].weight", "between 1 and 256", id="w+"),
    pytest.param(doc(backend='weight = "2"'), "backends[0].weight", "expected int", id="w-str"),
    pytest.param(doc(backend="weight = true"), "backends[0].weight", "an integer", id="w-bool"),
    pytest.param(doc(backend="weight = 1.5"), "backends[0].weight", "expected int", id="w-float"),
    pytest.param(
        doc(backend="max_tunnels = -1"), "backends[0].max_tunnels", "0 (no cap) or more", id="cap"
    ),
    pytest.param(
        doc(backend='max_tunnels = "10"'), "backends[0].max_tunnels", "expected int", id="cap-str"
    ),
    pytest.param(
        doc(backend="slow_start = 30"), "backends[0].slow_start", "duration", id="slow-number"
    ),
    pytest.param(
        doc(backend='slow_start = "30"'), "backends[0].slow_start", "duration", id="slow-no-unit"
    ),
    pytest.param(
        doc(backend='slow_start = "-1s"'), "backends[0].slow_start", "duration", id="slow-neg"
    ),
    pytest.param(doc('balance = "random"'), "balance", "must be one of round-robin", id="bal"),
    pytest.param(doc('balance = "leastconn"'), "balance", "least-conn, hash, cookie", id="bal2"),
    pytest.param(doc('balance = "Hash"'), "balance", "must be one of", id="bal-case"),
    *(
        pytest.param(
            doc(f'balance = "hash"\nhash_key = "{k}"'),
            "hash_key",
            "is not ip, header:NAME, cookie:NAME or query:NAME",
            id=f"hash-key-{k or 'empty'}",
        )
        for k in (
            "",
            "IP",
            "source",
            "header:",
            "header",
            "header:X User",
            "header:X:Y",
            "cookie:a=b",
            "query:",
            "path:x",
            "Header:X",
            "header:caf\u00e9",
        )
    ),
    pytest.param(doc('balance = "hash"\nhash_key = 1'), "hash_key", "expected str", id="hk-int"),
    pytest.param(doc('on_down = "shutdown"'), "on_down", "must be one of keep, close", id="down"),
    pytest.param(doc("on_down = true"), "on_down", "expected str", id="down-bool"),
    pytest.param(doc("passive_failures = -1"), "passive_failures", "0 (off) or more", id="pf"),
    pytest.param(doc('passive_failures = "3"'), "passive_failures", "expected int", id="pf-str"),
    pytest.param(
        doc('balance = "cookie"', more=f'[routes.sticky_cookie]\nsecret = "{SECRET}"\nname = ""'),
        "sticky_cookie.name",
        "is not a cookie name",
        id="cookie-name-empty",
    ),
    *(
        pytest.param(
            doc(
                'balance = "cookie"',
                more=f'[routes.sticky_cookie]\nsecret = "{SECRET}"\nname = "{name}"',
            ),
            "sticky_cookie.name",
            "is not a cookie name",
            id=f"cookie-name-{name}",
        )
        for name in ("a b", "a=b", "a;b", "a,b", "(x)", "caf\u00e9")
    ),
    pytest.param(
        doc('balance = "cookie"', more=f'[routes.sticky_cookie]\nsecret = "{SECRET}"\nmax_age = 1'),
        "sticky_cookie.max_age",
        "duration",
        id="cookie-max-age",
    ),
    pytest.param(
        doc('balance = "cookie"', more=f'[routes.sticky_cookie]\nsecret = "{SECRET}"\nstrip = 1'),
        "sticky_cookie.strip",
        "expected bool",
        id="cookie-strip",
    ),
    pytest.param(
        doc('balance = "cookie"', more="[routes.sticky_cookie]\nsecret = 1234567890123456"),
        "sticky_cookie.secret",
        "expected str",
        id="cookie-secret-int",
    ),
    pytest.param(
        doc('balance = "cookie"', more='[routes.sticky_cookie]\ndomain = "x"'),
        "sticky_cookie.domain",
        "unknown key",
        id="cookie-unknown-key",
    ),
    pytest.param(
        doc(more='sticky_cookie = "tunnel_backend"'),
        "sticky_cookie",
        "expected a table",
        id="cookie-not-table",
    ),
    pytest.param(
        doc(more='[routes.health]\nkind = "http"'),
        "health.kind",
        "must be one of none, websocket, tcp",
        id="health-kind",
    ),
    *(
        pytest.param(
            doc(more=f'[routes.health]\nkind = "websocket"\npath = "{path}"'),
            "health.path",
            "must start with /",
            id=f"health-path-{path!r}",
        )
        for path in ("", "health", "/a b", "/a\\r\\nX: y", "/caf\u00e9", "http://h/")
    ),
    pytest.param(
        doc(more='[routes.health]\ninterval = "0s"'),
        "health.interval",
        "more than 0s",
        id="health-interval-zero",
    ),
    pytest.param(
        doc(more='[routes.health]\ntimeout = "0s"'),
        "health.timeout",
        "more than 0s",
        id="health-timeout-zero",
    ),
    pytest.param(
        doc(more="[routes.health]\nrise = 0"), "health.rise", "1 or more", id="health-rise"
    ),
    pytest.param(
        doc(more="[routes.health]\nfall = 0"), "health.fall", "1 or more", id="health-fall"
    ),
    pytest.param(
        doc(more='[routes.health]\nfall = "3"'), "health.fall", "expected int", id="health-fall-s"
    ),
    pytest.param(
        doc(more="[routes.health]\nport = 81"), "health.port", "unknown key", id="health-unknown"
    ),
]


@pytest.mark.parametrize(("text", "key", "message"), BAD)
def test_bad_values_name_their_key(text: str, key: str, message: str) -> None:
    error = refused(text)
    assert error.key == f"routes[0].{key}"
    assert message in error.problem


# --- keys that only work together --------------------------------------------------------------

TOGETHER: list[Any] = [
    pytest.param(
        doc('balance = "cookie"'),
        "sticky_cookie.secret",
        'balance = "cookie" needs a secret of at least 16 characters and this one is missing: '
        "a short secret can be brute-forced",
        id="cookie-without-secret",
    ),
    pytest.param(
        doc('balance = "cookie"', more=f'[routes.sticky_cookie]\nsecret = "{SECRET[:-1]}"'),
        "sticky_cookie.secret",
        "this one is 15 characters: a short secret can be brute-forced",
        id="cookie-short-secret",
    ),
    *(
        pytest.param(
            doc(f'balance = "{m}"\nhash_key = "header:X-User"'),
            "hash_key",
            f'hash_key applies to balance = "hash", and this route has balance = "{m}"',
            id=f"hash-key-with-{m}",
        )
        for m in ("round-robin", "least-conn")
    ),
    pytest.param(
        doc('hash_key = "query:room"'),
        "hash_key",
        'hash_key applies to balance = "hash"',
        id="hash-key-with-the-default-balance",
    ),
    *(
        pytest.param(
            doc(f'balance = "{m}"', more=f"[routes.sticky_cookie]\n{line}"),
            "sticky_cookie",
            f'applies to balance = "cookie", and this route has balance = "{m}"',
            id=f"sticky-with-{m}-{line.split()[0]}",
        )
        for m in ("round-robin", "hash")
        for line in (f'secret = "{SECRET}"', 'name = "x"', 'max_age = "1h"', "strip = true")
    ),
    pytest.param(
        doc(more='[routes.health]\ninterval = "1s"'),
        "health.timeout",
        "must be less than interval (1s)",
        id="timeout-equals-interval",
    ),
    pytest.param(
        doc(more='[routes.health]\nkind = "tcp"\ntimeout = "5s"'),
        "health.timeout",
        "must be less than interval (2s)",
        id="timeout-above-interval",
    ),
]


@pytest.mark.parametrize(("text", "key", "message"), TOGETHER)
def test_keys_that_only_work_together(text: str, key: str, message: str) -> None:
    error = refused(text)
    assert error.key == f"routes[0].{key}"
    assert message in error.problem
    assert str(error).startswith(f"routes[0].{key}: ")


def test_the_second_route_is_named() -> None:
    text = doc() + '[[routes]]\nname = "s"\nbalance = "cookie"\nbackends = [{ url = "h:1" }]\n'
    assert refused(text).key == "routes[1].sticky_cookie.secret"


def test_the_default_sticky_cookie_table_written_out_is_not_refused() -> None:
    text = doc(more='[routes.sticky_cookie]\nname = "tunnel_backend"\nsecret = ""')
    assert route_of(text).sticky_cookie == StickyCookie()


def test_validate_checks_a_route_built_in_python() -> None:
    config = Config.from_toml(doc())
    route = RouteConfig("r", (BackendConfig("a", "h", 1),), balance="cookie")
    broken = Config(listeners=config.listeners, routes=(route,))
    with pytest.raises(ConfigError) as caught:
        broken.validate()
    assert caught.value.key == "routes[0].sticky_cookie.secret"


# --- wildcard hosts ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "message"),
    [
        ("*", 'a wildcard is written "*." before a host name'),
        ("*example.org", 'a wildcard is written "*." before a host name'),
        ("a.*.org", 'a wildcard is written "*." before a host name'),
        ("a.example.*", 'a wildcard is written "*." before a host name'),
        ("**.example.org", 'a wildcard is written "*." before a host name'),
        ("*.*.example.org", "'*.*.example.org' is not a wildcard host: '*' is not allowed"),
        ("*.", "is not a wildcard host: it has an empty label"),
        ("*..example.org", "is not a wildcard host: it has an empty label"),
        ("*.example.org.", "is not a wildcard host: it ends with a dot"),
        ("*.exa mple.org", "is not a wildcard host: ' ' is not allowed"),
        ("*.-a.org", "is not a wildcard host: the label '-a' starts or ends with '-'"),
        ("*.example.org:443", "is not a wildcard host: ':' is not allowed"),
        ("*.10.0.0", "is not a wildcard host: it looks like an IPv4 address"),
        ("*.caf\u00e9.org", "is not a wildcard host"),
        ("", "not an exact host name"),
    ],
)
def test_bad_wildcard_hosts_are_refused(host: str, message: str) -> None:
    error = refused(doc(f'hosts = ["a.example.com", "{host}"]'))
    assert error.key == "routes[0].hosts"
    assert message in error.problem


# --- tunnel check ------------------------------------------------------------------------------

EVERY_ROUTING_KEY = f"""\
[[listeners]]
listen = "127.0.0.1:8080"

[[routes]]
name = "sticky"
hosts = ["*.Example.org", "chat.example.com"]
balance = "cookie"
on_down = "close"
passive_failures = 0
backends = [
  {{ name = "a", url = "ws://10.0.0.5:8080", weight = 3, max_tunnels = 100, slow_start = "1m" }},
  {{ name = "b", url = "10.0.0.6:9000" }},
]
[routes.sticky_cookie]
name = "srv"
secret = "{SECRET}"
max_age = "12h"
strip = true
[routes.health]
kind = "websocket"
path = "/health"
interval = "5s"
timeout = "2s"
rise = 1
fall = 2

[[routes]]
name = "hashed"
balance = "hash"
hash_key = "header:X-User"
backends = [{{ url = "10.0.0.7:9000" }}]
"""


def invoke(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_check_prints_every_routing_key(tmp_path: Path) -> None:
    path = tmp_path / "tunnel.toml"
    path.write_text(EVERY_ROUTING_KEY, encoding="utf-8")
    result = invoke("check", "--config", str(path))

    assert result.exit_code == 0, result.output
    assert result.stderr.endswith("configuration is valid\n")
    sticky, hashed = tomllib.loads(result.stdout)["routes"]
    assert sticky["hosts"] == ["*.example.org", "chat.example.com"]
    assert (sticky["balance"], sticky["on_down"], sticky["passive_failures"]) == (
        "cookie",
        "close",
        0,
    )
    assert sticky["backends"] == [
        {
            "name": "a",
            "url": "ws://10.0.0.5:8080",
            "weight": 3,
            "max_tunnels": 100,
            "slow_start": "1m",
        },
        {"name": "b", "url": "ws://10.0.0.6:9000"},  # defaults are left out of inline backends
    ]
    assert sticky["sticky_cookie"] == {
        "name": "srv",
        "secret": SECRET,
        "max_age": "12h",
        "strip": True,
    }
    assert sticky["health"] == {
        "kind": "websocket",
        "path": "/health",
        "interval": "5s",
        "timeout": "2s",
        "rise": 1,
        "fall": 2,
    }
    assert (hashed["balance"], hashed["hash_key"], hashed["on_down"]) == (
        "hash",
        "header:X-User",
        "keep",
    )
    assert hashed["health"]["kind"] == "none"
    assert hashed["sticky_cookie"] == {
        "name": "tunnel_backend",
        "secret": "",
        "max_age": "0s",
        "strip": False,
    }
    assert Config.from_toml(result.stdout) == Config.from_file(path)
    again = tmp_path / "again.toml"
    again.write_text(result.stdout, encoding="utf-8")
    assert invoke("check", "--config", str(again)).stdout == result.stdout


@pytest.mark.parametrize(
    ("change", "key", "why"),
    [
        (('secret = "', 'secret = "short'), "routes[0].sticky_cookie.secret", "brute-forced"),
        (('hash_key = "header:X-User"', 'hash_key = "hdr(x)"'), "routes[1].hash_key", "is not"),
        (('"*.Example.org"', '"a.*.org"'), "routes[0].hosts", "a wildcard is written"),
        (('timeout = "2s"', 'timeout = "5s"'), "routes[0].health.timeout", "less than interval"),
        (("weight = 3", "weight = 300"), "routes[0].backends[0].weight", "between 1 and 256"),
    ],
)
def test_check_refuses_a_bad_routing_key(
    tmp_path: Path, change: tuple[str, str], key: str, why: str
) -> None:
    text = EVERY_ROUTING_KEY.replace(*change, 1)
    if change[0] == 'secret = "':
        text = text.replace(f'"short{SECRET}"', '"short"')
    path = tmp_path / "tunnel.toml"
    path.write_text(text, encoding="utf-8")
    result = invoke("check", "--config", str(path))

    assert result.exit_code == 1
    assert result.stdout == ""
    assert f"{key}: " in result.stderr
    assert why in result.stderr
