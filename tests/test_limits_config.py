"""The guard issue's limit keys: the ``Rate`` kind, ``[routes.limits]`` (``RouteLimits``) and
``[limits]`` (``LimitsConfig``), read through the table machinery from TOML snippets. Build a
valid table, change one key, check the value or that the error names that key."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest

from tunnel.config.kinds import Context, RateKind
from tunnel.config.limits import (
    DEFAULT_IPV6_PREFIX,
    LimitsConfig,
    RedisAddress,
    RouteLimits,
    parse_store,
)
from tunnel.config.tables import Table, dump_table, keys_of, render_table
from tunnel.errors import ConfigError
from tunnel.policy.limits import OFF, Rate

ROUTE_KEY = "routes[0].limits"


def route_limits(text: str) -> RouteLimits:
    limits: RouteLimits = Table(RouteLimits).parse(tomllib.loads(text), ROUTE_KEY, Context())
    return limits


def limits_config(text: str) -> LimitsConfig:
    config: LimitsConfig = Table(LimitsConfig).parse(tomllib.loads(text), "limits", Context())
    return config


def refused(table: type[Any], text: str, key: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        Table(table).parse(tomllib.loads(text), key, Context())
    return caught.value


# --- the Rate kind -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "rate"),
    [("10/s", Rate(10.0, 1.0)), ("600/m", Rate(600.0, 60.0)), ("0.5/s", Rate(0.5, 1.0))],
)
def test_rate_kind_reads_and_writes_back(raw: str, rate: Rate) -> None:
    kind = RateKind()
    assert kind.parse(raw, "k", Context()) == rate
    assert kind.dump(rate) == raw


def test_rate_kind_takes_zero_only_when_allowed() -> None:
    assert RateKind(allow_zero=True).parse("0/s", "k", Context()) == OFF
    assert RateKind(allow_zero=True).dump(OFF) == "0/s"
    with pytest.raises(ConfigError) as caught:
        RateKind().parse("0/m", "server.admission_rate", Context())
    assert caught.value.key == "server.admission_rate"
    assert "must be more than 0/s" in caught.value.problem
    assert '"10/s"' in caught.value.problem


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (10, 'expected a rate such as "10/s" or "600/m", got 10'),
        (True, "expected a rate"),
        ("10", "'10' is not a rate"),
        ("10/h", '"10/s" or "600/m"'),
        ("fast", "'fast' is not a rate"),
        ("9" * 400 + "/s", "too large"),
    ],
)
def test_rate_kind_names_the_key_and_shows_an_example(raw: object, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        RateKind().parse(raw, "routes[0].limits.per_ip_rate", Context())
    assert caught.value.key == "routes[0].limits.per_ip_rate"
    assert problem in caught.value.problem
    assert str(caught.value).startswith("routes[0].limits.per_ip_rate: ")


# --- [routes.limits] ---------------------------------------------------------------------------


def test_route_limits_default_to_off() -> None:
    limits = route_limits("")
    assert limits == RouteLimits(0, OFF, 0, DEFAULT_IPV6_PREFIX, 0)
    assert limits.ipv6_prefix == 64
    assert not limits.active
    assert dump_table(limits) == {
        "per_ip_tunnels": 0,
        "per_ip_rate": "0/s",
        "per_ip_burst": 0,
        "ipv6_prefix": 64,
        "per_identity_tunnels": 0,
    }


def test_every_route_limit_has_a_doc_naming_a_peer() -> None:
    names = [key.name for key in keys_of(RouteLimits)]
    assert names == [
        "per_ip_tunnels",
        "per_ip_rate",
        "per_ip_burst",
        "ipv6_prefix",
        "per_identity_tunnels",
    ]
    for key in keys_of(RouteLimits):
        assert "nginx" in key.doc or "HAProxy" in key.doc, key.name
        assert key.issue == "now"


VALID = [
    pytest.param("per_ip_tunnels = 5", "per_ip_tunnels", 5, id="tunnels"),
    pytest.param('per_ip_rate = "10/s"', "per_ip_rate", Rate(10.0, 1.0), id="rate-s"),
    pytest.param('per_ip_rate = "600/m"', "per_ip_rate", Rate(600.0, 60.0), id="rate-m"),
    pytest.param('per_ip_rate = "10/s"\nper_ip_burst = 1', "per_ip_burst", 1, id="burst-with-rate"),
    pytest.param("per_ip_tunnels = 1\nipv6_prefix = 48", "ipv6_prefix", 48, id="prefix-48"),
    pytest.param("per_ip_tunnels = 1\nipv6_prefix = 128", "ipv6_prefix", 128, id="prefix-128"),
    pytest.param('per_ip_rate = "1/s"\nipv6_prefix = 1', "ipv6_prefix", 1, id="prefix-1"),
    pytest.param("per_identity_tunnels = 100", "per_identity_tunnels", 100, id="identity"),
]


@pytest.mark.parametrize(("text", "name", "value"), VALID)
def test_route_limits_read(text: str, name: str, value: object) -> None:
    limits = route_limits(text)
    assert getattr(limits, name) == value
    assert limits.active
    assert Table(RouteLimits).parse(dump_table(limits), ROUTE_KEY, Context()) == limits


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("per_ip_tunnels = -1", "per_ip_tunnels", "must be 0 (no limit) or more"),
        ('per_ip_tunnels = "5"', "per_ip_tunnels", "expected int"),
        ('per_ip_rate = "10/hour"', "per_ip_rate", "is not a rate"),
        ("per_ip_rate = 10", "per_ip_rate", 'expected a rate such as "10/s"'),
        (
            'per_ip_rate = "1/s"\nper_ip_burst = -1',
            "per_ip_burst",
            "must be 0 (one second of per_ip_rate) or more",
        ),
        ("per_ip_tunnels = 1\nipv6_prefix = 0", "ipv6_prefix", "between 1 and 128"),
        ("per_ip_tunnels = 1\nipv6_prefix = 129", "ipv6_prefix", "between 1 and 128"),
        ("per_identity_tunnels = true", "per_identity_tunnels", "expected an integer"),
        ("per_ip_conns = 1", "per_ip_conns", "unknown key; known keys here: per_ip_tunnels"),
    ],
)
def test_route_limits_refuse(text: str, key: str, problem: str) -> None:
    error = refused(RouteLimits, text, ROUTE_KEY)
    assert error.key == f"{ROUTE_KEY}.{key}"
    assert problem in error.problem


def test_a_burst_without_a_rate_is_refused() -> None:
    error = refused(RouteLimits, "per_ip_burst = 20", ROUTE_KEY)
    assert error.key == "routes[0].limits.per_ip_burst"
    assert 'per_ip_rate, which is off ("0/s")' in error.problem
    assert 'per_ip_rate = "10/s"' in error.problem
    assert "remove per_ip_burst" in error.problem


def test_a_prefix_without_a_per_ip_limit_is_refused() -> None:
    error = refused(RouteLimits, "per_identity_tunnels = 3\nipv6_prefix = 56", ROUTE_KEY)
    assert error.key == "routes[0].limits.ipv6_prefix"
    assert "per_ip_tunnels and per_ip_rate, which are both off" in error.problem
    # the default written out is fine, like any default
    assert route_limits("ipv6_prefix = 64") == RouteLimits()


@pytest.mark.parametrize(
    ("text", "burst"),
    [
        ('per_ip_rate = "10/s"', 10),
        ('per_ip_rate = "600/m"', 10),
        ('per_ip_rate = "0.5/s"', 1),
        ('per_ip_rate = "1/m"', 1),
        ('per_ip_rate = "2.5/s"', 3),
        ('per_ip_rate = "10/s"\nper_ip_burst = 4', 4),
        ('per_ip_rate = "1/m"\nper_ip_burst = 30', 30),
    ],
)
def test_the_burst_is_one_second_of_the_rate_unless_written(text: str, burst: int) -> None:
    assert route_limits(text).burst == burst


@pytest.mark.parametrize(
    ("limits", "active"),
    [
        (RouteLimits(), False),
        (RouteLimits(per_ip_tunnels=1), True),
        (RouteLimits(per_ip_rate=Rate(1.0, 60.0)), True),
        (RouteLimits(per_identity_tunnels=1), True),
    ],
)
def test_active_says_whether_any_limit_is_on(limits: RouteLimits, active: bool) -> None:
    assert limits.active is active


# --- [limits] ----------------------------------------------------------------------------------


def test_limits_default_to_memory_and_open() -> None:
    config = limits_config("")
    assert config == LimitsConfig("memory", "open")
    assert config.redis is None
    assert render_table(config, "limits") == ['store = "memory"', 'on_store_error = "open"']


@pytest.mark.parametrize(
    ("store", "address"),
    [
        ("redis://127.0.0.1:6379/0", RedisAddress(False, "127.0.0.1", 6379, 0)),
        ("redis://127.0.0.1", RedisAddress(False, "127.0.0.1", 6379, 0)),
        ("redis://127.0.0.1/", RedisAddress(False, "127.0.0.1", 6379, 0)),
        ("redis://Redis.Internal:6380/15", RedisAddress(False, "redis.internal", 6380, 15)),
        ("rediss://cache.example.com:6380/2", RedisAddress(True, "cache.example.com", 6380, 2)),
        ("redis://[::1]:7000/1", RedisAddress(False, "::1", 7000, 1)),
    ],
)
def test_redis_stores_read(store: str, address: RedisAddress) -> None:
    config = limits_config(f'store = "{store}"\non_store_error = "closed"')
    assert config.store == store
    assert config.on_store_error == "closed"
    assert config.redis == address
    assert Table(LimitsConfig).parse(dump_table(config), "limits", Context()) == config


@pytest.mark.parametrize(
    ("store", "problem"),
    [
        ("Memory", 'is not a store; write "memory" or "redis://127.0.0.1:6379/0"'),
        ("", "is not a store"),
        ("127.0.0.1:6379", "is not a store"),
        ("http://127.0.0.1:6379/0", "is not a store"),
        ("unix:///run/redis.sock", "is not a store"),
        ("redis://:6379/0", "names no host"),
        ("redis://0.0.0.0:6379/0", "every interface"),
        ("redis://127.0.0.1:0/0", "is not a number from 1 to 65535"),
        ("redis://127.0.0.1:70000/0", "is not a number from 1 to 65535"),
        ("redis://127.0.0.1:port/0", "is not a number from 1 to 65535"),
        ("redis://127.0.0.1:6379/x", "the path must be a database number like /0, not '/x'"),
        ("redis://127.0.0.1:6379/0/1", "the path must be a database number"),
        ("redis://127.0.0.1:6379/-1", "the path must be a database number"),
        ("redis://127.0.0.1:6379/123456", "the path must be a database number"),
        ("redis://:secret@127.0.0.1:6379/0", "credentials, query and fragment"),
        ("redis://127.0.0.1:6379/0?timeout=1", "credentials, query and fragment"),
        ("redis://127.0.0.1:6379/0#x", "credentials, query and fragment"),
        ("redis://127.0.0.1 :6379/0", "space or control character"),
        ("redis://::1:6379/0", "write IPv6 addresses in brackets"),
        ("redis://bad_host!/0", "is not a host"),
    ],
)
def test_bad_stores_are_refused(store: str, problem: str) -> None:
    error = refused(LimitsConfig, f"store = {tomllib_str(store)}", "limits")
    assert error.key == "limits.store"
    assert problem in error.problem


def tomllib_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def test_a_store_must_be_a_string() -> None:
    error = refused(LimitsConfig, "store = 6379", "limits")
    assert error.key == "limits.store"
    assert 'expected "memory" or "redis://127.0.0.1:6379/0", got 6379' in error.problem
    with pytest.raises(ConfigError, match=r"limits\.store: expected"):
        parse_store(None, "limits.store")


def test_on_store_error_is_open_or_closed() -> None:
    error = refused(LimitsConfig, 'store = "redis://127.0.0.1"\non_store_error = "fail"', "limits")
    assert error.key == "limits.on_store_error"
    assert "must be one of open, closed" in error.problem


def test_closed_needs_a_store_that_can_fail() -> None:
    error = refused(LimitsConfig, 'on_store_error = "closed"', "limits")
    assert error.key == "limits.on_store_error"
    assert "the memory store never fails" in error.problem
    assert 'store = "redis://127.0.0.1:6379/0"' in error.problem
    assert limits_config('on_store_error = "open"') == LimitsConfig()


def test_the_limits_tables_render_as_toml_that_reads_back() -> None:
    limits = route_limits('per_ip_tunnels = 3\nper_ip_rate = "600/m"\nper_ip_burst = 5')
    text = "\n".join(render_table(limits, ""))
    assert 'per_ip_rate = "600/m"' in text
    assert route_limits(text) == limits
    config = limits_config('store = "rediss://h:1/2"\non_store_error = "closed"')
    assert limits_config("\n".join(render_table(config, ""))) == config
