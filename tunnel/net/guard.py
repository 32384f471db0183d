"""The checks between routing and the backend: access rules, per-client rates, auth, and the
per-client caps whose slots a tunnel holds until it ends (``[routes.access]``,
``[routes.limits]``, ``[routes.auth]``).

The order is the cheapest refusal first, and nothing a client sends can buy work before the
checks that bound it: address lists (a set lookup), ``Origin`` (a string compare), the per-IP
rate (one bucket), then the credential (an HMAC or a signature), and last the caps, which need
the verified identity and hold a slot in the store.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import count

import trio

from tunnel.config import Config, RouteConfig
from tunnel.config.kinds import RATE_OFF
from tunnel.core.handshake import UpgradeRequest
from tunnel.core.headers import lowered_values
from tunnel.errors import ConfigError, ServiceUnavailable, TooManyRequests, TunnelError
from tunnel.logs import LOGGER_NAME, Throttle, fields
from tunnel.net.auth_files import TokenFile, auth_rules
from tunnel.policy.access import AccessRules
from tunnel.policy.auth import AuthRules, Identity, authenticate
from tunnel.policy.limits import (
    Admission,
    LimitStore,
    MemoryStore,
    StoreUnavailable,
    client_key,
    retry_after,
)

log = logging.getLogger(LOGGER_NAME)

HELD_ANYWAY = 1 << 62
"""The cap a handed-over tunnel is counted under: it is open already, so it is never
refused, but it counts against new ones."""
PASSES_REMEMBERED = 1024
"""Client addresses and ``Origin`` values a route's guard remembers as let through (per
configuration): the same clients come back, and checking one again cost a tenth of an upgrade's
guard. Refusals are not remembered, and the bound keeps a client that cycles addresses or
origins from growing it."""
LONGEST_REMEMBERED_ORIGIN = 256
"""Longer ``Origin`` values are checked each time instead (a remembered one is kept whole)."""
STORE_ERROR_LOG_EVERY = 10.0
"""Seconds between two log lines about an unavailable limit store (one per refusal would
flood the log exactly when it matters)."""


class Rule:
    """Names of the checks, as the metric label ``rule`` shows them."""

    ACCESS = "access"
    ORIGIN = "origin"
    RATE = "per_ip_rate"
    AUTH = "auth"
    PER_IP = "per_ip_tunnels"
    PER_IDENTITY = "per_identity_tunnels"
    STORE = "limit_store"
    ADMISSION = "admission_rate"


class Refused(Exception):
    """A check failed: ``error`` is the answer, ``rule`` the metric label."""

    def __init__(self, error: TunnelError, rule: str) -> None:
        super().__init__(str(error))
        self.error = error
        self.rule = rule


@dataclass(frozen=True, slots=True)
class Pass:
    """A request the guard let through: the request to forward (the credential removed), the
    verified identity, and the slots the tunnel holds until ``release``."""

    request: UpgradeRequest
    identity: Identity | None = None
    holder: str = ""
    keys: tuple[str, ...] = ()


class StoreHealth:
    """Logs an unavailable limit store at most once per ``STORE_ERROR_LOG_EVERY``."""

    def __init__(self, url: str, on_error: str) -> None:
        self.url = url
        self.on_error = on_error
        self._lines = Throttle(STORE_ERROR_LOG_EVERY)

    def failed(self, error: StoreUnavailable, route: str) -> None:
        """Raises ``Refused`` (503) when ``on_store_error = "closed"``; logs either way."""
        missed = self._lines.count(trio.current_time())
        if missed is not None:
            admitted = self.on_error == "open"
            log.error(
                "limit store unavailable; "
                + (
                    "admitting without limits (on_store_error = open)"
                    if admitted
                    else "refusing limited upgrades with 503 (on_store_error = closed)"
                )
                + "; check the Redis server",
                extra=fields(store=self.url, route=route, error=str(error), missed=missed),
            )
        if self.on_error == "closed":
            raise Refused(
                ServiceUnavailable(
                    f"the limit store {self.url} is unavailable (on_store_error = closed)",
                    retry_after=5,
                ),
                Rule.STORE,
            )


class RouteGuard:
    """One route's checks, compiled once per configuration; ``active`` is false when the
    route has none, and the handler then skips the guard altogether."""

    def __init__(
        self,
        route: RouteConfig,
        store: LimitStore,
        health: StoreHealth,
        auth: AuthRules | None,
        release: Callable[[str, tuple[str, ...]], None],
        instance: str = "",
    ) -> None:
        self.route = route
        self.name = route.name
        self.access = AccessRules.build(route.access)
        self.limits = route.limits
        self.store = store
        self.health = health
        self.auth = auth
        self._release = release
        self.instance = instance
        self._ids = count(1)
        limits = route.limits
        self._rate = None if limits.per_ip_rate.off else limits.per_ip_rate
        self.counts = limits.per_ip_tunnels > 0 or limits.per_identity_tunnels > 0
        """Caps are on: the tunnel takes slots in the store."""
        self._address_passes = functools.lru_cache(maxsize=PASSES_REMEMBERED)(
            self.access.check_address
        )
        self._origin_passes = functools.lru_cache(maxsize=PASSES_REMEMBERED)(self._one_origin)
        self.active = bool(
            self.access.checks_address
            or self.access.origins is not None
            or not self.access.allow_missing_origin
            or self.access.strip
            or limits.active
            or auth is not None
        )

    async def admit(self, upgrade: UpgradeRequest, ip: str) -> Pass:
        """Raises ``Refused`` with the answer, in the order of the module's docstring."""
        access = self.access
        try:
            if access.checks_address:
                self._address_passes(ip)
        except TunnelError as error:
            raise Refused(error, Rule.ACCESS) from None
        try:
            origins = lowered_values(upgrade.fields, b"origin")
            if (
                access.origins is not None
                and len(origins) == 1
                and len(origins[0]) <= LONGEST_REMEMBERED_ORIGIN
            ):
                self._origin_passes(origins[0])
            else:
                access.check_origin(origins)
        except TunnelError as error:
            raise Refused(error, Rule.ORIGIN) from None
        limits = self.limits
        key = client_key(ip, limits.ipv6_prefix) if limits.active else ""
        if self._rate is not None:
            await self._take(key)
        identity: Identity | None = None
        if self.auth is not None:
            try:
                # Unix time, as JWT claims count it (trio's clock only measures intervals).
                upgrade, identity = authenticate(upgrade, self.auth, time.time())
            except TunnelError as error:
                raise Refused(error, Rule.AUTH) from None
        if not self.counts:
            return Pass(upgrade, identity)
        counters: list[tuple[str, int]] = []
        if limits.per_ip_tunnels > 0:
            counters.append((f"{self.name}|ip|{key}", limits.per_ip_tunnels))
        if limits.per_identity_tunnels > 0 and identity is not None:
            counters.append((f"{self.name}|id|{identity.subject}", limits.per_identity_tunnels))
        holder = f"{self.instance}:{next(self._ids)}"
        try:
            full = await self.store.acquire(holder, counters)
        except StoreUnavailable as error:
            self.health.failed(error, self.name)
            return Pass(upgrade, identity)
        if full is not None:
            if full.startswith(f"{self.name}|ip|"):
                raise Refused(
                    TooManyRequests(
                        f"client {key} holds per_ip_tunnels ({limits.per_ip_tunnels}) tunnels "
                        "on this route"
                    ),
                    Rule.PER_IP,
                )
            raise Refused(
                TooManyRequests(
                    f"identity {_shown(identity)} holds per_identity_tunnels "
                    f"({limits.per_identity_tunnels}) tunnels on this route"
                ),
                Rule.PER_IDENTITY,
            )
        return Pass(upgrade, identity, holder, tuple(key for key, _ in counters))

    def _one_origin(self, origin: bytes) -> None:
        self.access.check_origin((origin,))

    async def _take(self, key: str) -> None:
        limits = self.limits
        rate = limits.per_ip_rate
        try:
            wait = await self.store.take(
                f"{self.name}|rate|{key}", rate, limits.burst, trio.current_time()
            )
        except StoreUnavailable as error:
            self.health.failed(error, self.name)
            return
        if wait > 0:
            raise Refused(
                TooManyRequests(
                    f"client {key} is over per_ip_rate ({rate}, burst {limits.burst}) "
                    "on this route",
                    retry_after=retry_after(wait),
                ),
                Rule.RATE,
            )

    def release(self, admitted: Pass) -> None:
        """Give back the slots of a tunnel that ended, or of a handshake that failed after
        the guard let it through; queued, so the engine's close path never waits on a store."""
        self._release(admitted.holder, admitted.keys)


def _shown(identity: Identity | None) -> str:
    return "?" if identity is None else identity.subject[:80]


class Guarding:
    """What the guard keeps for the life of the process, across reloads: the limit store,
    the global admission pace, the watched token files, and the queue of slots to give back.

    Run ``run`` as a service task; ``guards(config)`` compiles each configuration's routes.
    """

    def __init__(self, config: Config, *, instance: str = "") -> None:
        limits = config.limits
        self.instance = instance or f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        """Unique among the processes sharing a store (two ``serve`` in one process too)."""
        self.store: LimitStore = open_store(limits.store, self.instance)
        self.health = StoreHealth(limits.store, limits.on_store_error)
        self.admission: Admission | None = None
        self._admission_rate = RATE_OFF
        self._token_files: dict[str, TokenFile] = {}
        self._watching: dict[str, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None
        self._send, self._receive = trio.open_memory_channel[tuple[bool, str, tuple[str, ...]]](
            math.inf
        )
        self.configure(config)

    def configure(self, config: Config) -> None:
        """Take ``config``'s admission rate (a changed rate starts a full bucket)."""
        rate = config.server.admission_rate
        if rate != self._admission_rate:
            self._admission_rate = rate
            self.admission = None if rate.off else Admission(rate, trio.current_time())
        self._interval = config.server.cert_check_interval

    def admit(self) -> None:
        """The global pace of new upgrades (``admission_rate``).

        Raises:
            Refused: 503 with a ``Retry-After`` spread over clients.
        """
        assert self.admission is not None
        retry_after = self.admission.admit(trio.current_time(), random.random())
        if retry_after is not None:
            raise Refused(
                ServiceUnavailable(
                    f"new upgrades are over admission_rate ({self._admission_rate}); paced",
                    retry_after=retry_after,
                ),
                Rule.ADMISSION,
            )

    def guards(self, config: Config) -> dict[str, RouteGuard]:
        """The active guard of each route of ``config`` that has one.

        Raises ``ConfigError`` when a route's tokens file or key cannot be read."""
        self.configure(config)
        guards: dict[str, RouteGuard] = {}
        files: dict[str, TokenFile] = {}
        for i, route in enumerate(config.routes):
            auth: AuthRules | None = None
            if route.auth.kind != "none":
                key = f"routes[{i}].auth"
                path = route.auth.tokens_file
                if path:
                    known = self._token_files.get(path)
                    files[path] = known or TokenFile.load(path, f"{key}.tokens_file")
                auth = auth_rules(route.auth, files.get(path), key=key)
            guard = RouteGuard(route, self.store, self.health, auth, self.release, self.instance)
            if guard.active:
                guards[route.name] = guard
        self._token_files = files
        if self._nursery is not None:
            self._watch_files()
        return guards

    def hold(self, holder: str, keys: tuple[str, ...]) -> None:
        """Count a tunnel another process handed over against the caps it was counted
        against there (never refused: it is open already); ``release`` gives it back."""
        if keys:
            self._send.send_nowait((True, holder, keys))

    def release(self, holder: str, keys: tuple[str, ...]) -> None:
        """Give ``holder``'s slots back; queued, so a close never waits on the store."""
        if keys:
            self._send.send_nowait((False, holder, keys))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Give back released slots, keep this instance's slots alive in a shared store, and
        re-read token files that change."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            keep_alive = getattr(self.store, "keep_alive", None)
            if keep_alive is not None:
                nursery.start_soon(keep_alive)
            self._watch_files()
            task_status.started()
            async for taking, holder, keys in self._receive:
                try:
                    if taking:
                        await self.store.acquire(holder, [(key, HELD_ANYWAY) for key in keys])
                    else:
                        await self.store.release(holder, keys)
                except StoreUnavailable as error:
                    # The shared store's TTL frees the slot; nothing else can be done.
                    log.warning(
                        "could not give a slot back to the limit store; it expires on its own",
                        extra=fields(store=self.health.url, error=str(error)),
                    )

    def _watch_files(self) -> None:
        assert self._nursery is not None
        for path, scope in list(self._watching.items()):
            if path not in self._token_files:
                scope.cancel()
                del self._watching[path]
        for path, tokens in self._token_files.items():
            if path not in self._watching:
                scope = trio.CancelScope()
                self._watching[path] = scope
                self._nursery.start_soon(_watch, scope, tokens, self._interval)

    async def aclose(self) -> None:
        close = getattr(self.store, "aclose", None)
        if close is not None:
            await close()


async def _watch(scope: trio.CancelScope, tokens: TokenFile, interval: float) -> None:
    with scope:
        await tokens.watch(interval)


def open_store(url: str, instance: str) -> LimitStore:
    """The ``[limits] store``: this process's memory, or a Redis server shared by a fleet."""
    if url == "memory":
        return MemoryStore()
    try:
        from tunnel.net.redis_store import RedisStore
    except ImportError as error:
        raise ConfigError(
            "limits.store",
            f"names a Redis server and the redis package cannot be imported ({error}); "
            "pip install 'tunnel[redis]'",
        ) from error
    return RedisStore(url, instance=instance)
