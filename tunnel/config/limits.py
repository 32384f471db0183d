"""``[routes.limits]`` (per-client caps and rates of one route) and ``[limits]`` (where the
counts live), each key declared once; the counting itself is ``policy.limits``."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from tunnel.config.hosts import check_backend_host, check_characters, split_host_port
from tunnel.config.kinds import (
    RATE_OFF,
    Choice,
    Context,
    Integer,
    Kind,
    Rate,
    RateKind,
    declare,
    setting,
)
from tunnel.errors import ConfigError

MEMORY = "memory"
ON_STORE_ERROR = ("open", "closed")
REDIS_PORT = 6379
DEFAULT_IPV6_PREFIX = 64
_REDIS = re.compile(r"(rediss?)://([^/]*)(?:/(.*))?", re.DOTALL)
_DB = re.compile(r"[0-9]{1,5}", re.ASCII)
_STORE_EXAMPLE = '"memory" or "redis://127.0.0.1:6379/0"'


@dataclass(frozen=True, slots=True)
class RedisAddress:
    """A ``store`` URL taken apart: ``rediss://`` is ``tls``."""

    tls: bool
    host: str
    port: int
    db: int


def parse_store(text: object, key: str) -> RedisAddress | None:
    """None for ``"memory"``; the address of ``redis://host[:port][/db]`` or ``rediss://...``
    (port 6379 and database 0 when left out). Refused: other schemes, no host, a port outside
    1..65535, a database that is not a number, and credentials, query or fragment (a password
    would be shown by ``tunnel check`` and in logs)."""
    if not isinstance(text, str):
        raise ConfigError(key, f"expected {_STORE_EXAMPLE}, got {text!r}")
    if text == MEMORY:
        return None
    match = _REDIS.fullmatch(text)
    if match is None:
        raise ConfigError(key, f"{text!r} is not a store; write {_STORE_EXAMPLE}")
    check_characters(text, key, url=True)
    scheme, netloc, path = match.groups()
    if any(mark in text for mark in "@?#"):
        raise ConfigError(
            key, f"{text!r}: credentials, query and fragment are not supported in the store URL"
        )
    host, port = split_host_port(netloc, key, default_port=REDIS_PORT, min_port=1)
    check_backend_host(host, text, key)
    if path is None or path == "":
        db = 0
    elif _DB.fullmatch(path):
        db = int(path)
    else:
        raise ConfigError(
            key, f"{text!r}: the path must be a database number like /0, not {'/' + path!r}"
        )
    return RedisAddress(scheme == "rediss", host, port, db)


@dataclass(frozen=True, slots=True)
class Store(Kind[str]):
    """``"memory"`` or a Redis URL (see ``parse_store``), kept as written."""

    def parse(self, raw: object, key: str, ctx: Context) -> str:
        parse_store(raw, key)
        assert isinstance(raw, str)  # parse_store refuses anything else
        return raw

    def dump(self, value: str) -> object:
        return value


@dataclass(frozen=True, slots=True)
class RouteLimits:
    """Per-client limits of one route (``[routes.limits]``), checked before auth and before any
    backend is contacted; every limit is off by default. A client is its address (the peer, or
    what a trusted PROXY header carries); IPv6 clients count by ``ipv6_prefix`` network."""

    per_ip_tunnels: int = setting(
        0,
        Integer(0, zero="no limit"),
        "Open tunnels one client may hold on this route at once; one more gets 429. Slots are "
        "freed when a tunnel ends, for whatever reason. 0 = no limit (nginx `limit_conn`, "
        "HAProxy `stick-table` with `sc_conn_cur`).",
    )
    per_ip_rate: Rate = field(
        default=RATE_OFF,
        metadata=declare(
            RateKind(allow_zero=True),
            'Upgrade attempts one client may make on this route, `"10/s"` or `"600/m"`, paced '
            "by a token bucket of `per_ip_burst` tokens; beyond it gets 429 with `Retry-After`. "
            '`"0/s"` = no limit (nginx `limit_req rate=`, HAProxy `stick-table` with '
            "`http_req_rate`).",
        ),
    )
    per_ip_burst: int = setting(
        0,
        Integer(0, zero="one second of per_ip_rate"),
        "Attempts a client may make at once before `per_ip_rate` paces it (the bucket's size). "
        "0 = one second's worth of `per_ip_rate`, at least 1: a page that opens a few sockets "
        "together passes while the long-run rate still holds (nginx `limit_req burst=N "
        "nodelay` admits N + 1 at once; HAProxy counts its rate over a sliding period).",
        shown="one second of `per_ip_rate`",
    )
    ipv6_prefix: int = setting(
        DEFAULT_IPV6_PREFIX,
        Integer(1, 128),
        "IPv6 clients are counted by their network of this many bits, 1 to 128: a subscriber "
        "usually holds a whole /64 and could take a fresh address for every connection "
        "(HAProxy `ipmask(32,64)` on the stick-table key).",
    )
    per_identity_tunnels: int = setting(
        0,
        Integer(0, zero="no limit"),
        "Open tunnels one authenticated subject (the identity `[routes.auth]` verified) may "
        "hold on this route at once, from any address; one more gets 429. 0 = no limit "
        "(HAProxy `stick-table` keyed by the identity with `sc_conn_cur`, nginx `limit_conn` "
        "on a variable holding it).",
    )

    @classmethod
    def from_keys(cls, values: dict[str, Any], key: str) -> RouteLimits:
        """``per_ip_burst`` sizes ``per_ip_rate``'s bucket and ``ipv6_prefix`` groups clients of
        the per-IP limits: neither does anything alone."""
        limits = cls(**values)
        if limits.per_ip_burst and limits.per_ip_rate.off:
            raise ConfigError(
                f"{key}.per_ip_burst",
                'sizes the bucket of per_ip_rate, which is off ("0/s"); set per_ip_rate, '
                'like per_ip_rate = "10/s", or remove per_ip_burst',
            )
        if (
            limits.ipv6_prefix != DEFAULT_IPV6_PREFIX
            and not limits.per_ip_tunnels
            and limits.per_ip_rate.off
        ):
            raise ConfigError(
                f"{key}.ipv6_prefix",
                "groups IPv6 clients for per_ip_tunnels and per_ip_rate, which are both off; "
                "set one of them or remove ipv6_prefix",
            )
        return limits

    @property
    def burst(self) -> int:
        """The size of the ``per_ip_rate`` bucket: ``per_ip_burst``, or one second's worth."""
        return self.per_ip_burst or max(1, math.ceil(self.per_ip_rate.per_second))

    @property
    def active(self) -> bool:
        """Some limit is on: without one, an upgrade needs no store at all."""
        return bool(self.per_ip_tunnels or self.per_identity_tunnels or not self.per_ip_rate.off)


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """Where the counts of ``[routes.limits]`` live (``[limits]``)."""

    store: str = setting(
        MEMORY,
        Store(),
        '`"memory"`: each worker process counts on its own, so with `workers = N` or several '
        "instances every limit holds per process, not in total; "
        '`"redis://host:port/db"` (`"rediss://"` for TLS): counted in Redis, shared by every '
        "process and instance that names it, so one limit holds across the fleet (HAProxy "
        "`peers` syncing stick-tables, nginx Plus `zone_sync`).",
    )
    on_store_error: str = setting(
        "open",
        Choice(ON_STORE_ERROR),
        '`"open"`: when the store cannot answer, the upgrade goes ahead and an error is logged '
        '(the service stays up); `"closed"`: it is refused with 503. For a Redis store; the '
        "memory store never fails.",
    )

    @classmethod
    def from_keys(cls, values: dict[str, Any], key: str) -> LimitsConfig:
        """``on_store_error`` only means something for a store that can fail."""
        config = cls(**values)
        if config.on_store_error != "open" and config.redis is None:
            raise ConfigError(
                f"{key}.on_store_error",
                "applies to a Redis store, and the memory store never fails; remove it or set "
                'store = "redis://127.0.0.1:6379/0"',
            )
        return config

    @property
    def redis(self) -> RedisAddress | None:
        """The Redis store's address; None for the memory store."""
        return parse_store(self.store, "limits.store")
