"""A route's upstream: the runtime state of its backends, which outlives any one connection.

A connection handler asks its route's ``Upstream`` for the backends to try, tells it which one
took the tunnel, and, through the record it got back, when the tunnel ended. Everything the
admin listener and ``/metrics`` show per route and per backend is counted here (open tunnels,
bytes of closed tunnels, answers, close reasons, health changes), so counts per backend are
exact and no handler keeps state of its own.

Each backend is ``up``, ``down`` (active checks failed ``fall`` times, or ``passive_failures``
connects in a row failed) or ``draining`` (an operator asked: no new tunnels, open ones stay).
Only up backends are offered to the balancer; a backend marked down by failed connects on a
route without checks is offered again after ``health.interval``, and its next connect decides.
"""

from __future__ import annotations

import logging
import math
import ssl
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from tunnel.config import BackendConfig, RouteConfig
from tunnel.errors import NoHealthyBackend
from tunnel.logs import LOGGER_NAME, fields
from tunnel.net.engine import Tunnel
from tunnel.net.relay import RelayStats
from tunnel.policy.balance import BackendState, Balancer, why_none
from tunnel.policy.health import HealthState, PassiveFailures
from tunnel.reasons import CloseReason
from tunnel.stats import BackendStatistics, TunnelStatistics, UpstreamStatistics

log = logging.getLogger(LOGGER_NAME)

UP = "up"
DOWN = "down"
DRAINING = "draining"
"""Draining: an operator's drain, or a backend a reload removed (or whose URL it changed)."""
RETRY_AFTER_SECONDS = 5


@dataclass(slots=True, eq=False)
class TunnelRecord:
    """One open tunnel: who, where, since when, and the engine's live counters and handle."""

    id: str
    client: str
    route: str
    backend: str
    opened_at: float
    stats: RelayStats = field(default_factory=RelayStats)
    handle: Tunnel | None = None
    """The engine's tunnel, set once adopted: what ``Engine.close`` takes."""
    home: _Backend | None = None
    """The backend entry that counts this tunnel (set by ``Upstream.opened``)."""
    slots: tuple[str, ...] = ()
    """The guard's counters this tunnel holds (per-IP, per-identity keys)."""
    on_leave: Callable[[], None] | None = None
    """Gives back what the tunnel held in this process (its ``max_tunnels`` slot, the
    guard's slots) when it is handed to another process instead of closing."""


class _Backend:
    """Counters of one backend of the route."""

    __slots__ = (
        "bytes_down",
        "bytes_up",
        "changes",
        "config",
        "connect_failures",
        "down",
        "draining",
        "health",
        "open",
        "passive",
        "retired",
        "retry_at",
        "total",
        "up_since",
    )

    def __init__(self, config: BackendConfig, route: RouteConfig) -> None:
        self.config = config
        self.retired = False
        """Removed by a reload: no new tunnels, shown as draining until its last one ends."""
        self.draining = False
        """An operator's drain (``POST /backends/<route>/<backend>/drain``)."""
        self.down = False
        self.health = HealthState(route.health.rise, route.health.fall)
        self.passive = PassiveFailures(route.passive_failures)
        self.retry_at = math.inf
        """Marked down by failed connects on a route without checks: offered again then."""
        self.up_since = -math.inf
        """When it last came up (slow start); -inf: up from the start, at full weight."""
        self.changes: Counter[str] = Counter()
        """Health transitions, by the state reached (``up`` or ``down``)."""
        self.open: dict[str, TunnelRecord] = {}
        self.total = 0
        self.bytes_up = 0
        """Of closed tunnels; open ones are added when a snapshot is taken."""
        self.bytes_down = 0
        self.connect_failures = 0

    @property
    def state(self) -> str:
        if self.retired or self.draining:
            return DRAINING
        return DOWN if self.down else UP

    def eligible(self, now: float) -> bool:
        """Offered new tunnels: up and not draining, or down by failed connects and due for
        its retry."""
        if self.retired or self.draining:
            return False
        return not self.down or self.retry_at <= now


def _plain(route: RouteConfig) -> bool:
    """Round-robin over backends that all count the same (see ``Upstream.candidates``)."""
    return route.balance in ("round-robin", "cookie") and all(
        b.weight == route.backends[0].weight and not b.max_tunnels and not b.slow_start
        for b in route.backends
    )


class Upstream:
    """The runtime state of one route: balancer, backend TLS and the tunnels of each backend."""

    def __init__(
        self,
        route: RouteConfig,
        tls: ssl.SSLContext | None = None,
        close: Callable[[TunnelRecord, CloseReason], None] | None = None,
    ) -> None:
        """``close`` ends one open tunnel (``on_down = "close"``)."""
        self.route = route
        self.tls = tls
        """Client context for the route's ``wss://`` backends; replaced by a reload."""
        self._close = close
        self._balancer = Balancer(route.balance, [b.name for b in route.backends])
        self._turn = 0
        self._plain = _plain(route)
        self._backends = {backend.name: _Backend(backend, route) for backend in route.backends}
        self._retired: list[_Backend] = []
        self.removed = False
        """The route itself was removed by a reload; its tunnels are draining."""
        self.answers: Counter[int] = Counter()
        self.handed_off = 0
        """Tunnels given to a new process by a live hand-off."""
        self.refusals: Counter[str] = Counter()
        """Upgrades the guard refused, by rule (``net.guard.Rule``)."""
        self.closes: Counter[CloseReason] = Counter()

    def reconfigure(self, route: RouteConfig, tls: ssl.SSLContext | None) -> list[TunnelRecord]:
        """Take the route's new settings (a reload). Backends with the same name and URL keep
        their tunnels and counters; the tunnels of backends that are gone or changed URL are
        returned, for the caller to drain, and those backends are shown as draining until
        their last tunnel ends. New connections see the new backends at once."""
        self.route = route
        self.tls = tls
        self._balancer = Balancer(route.balance, [b.name for b in route.backends])
        self._turn = 0
        self._plain = _plain(route)
        kept: dict[str, _Backend] = {}
        for backend in route.backends:
            entry = self._backends.get(backend.name)
            if entry is not None and entry.config.url == backend.url:
                entry.config = backend
                if (entry.health.rise, entry.health.fall) != (route.health.rise, route.health.fall):
                    entry.health = HealthState(route.health.rise, route.health.fall, not entry.down)
                entry.passive = PassiveFailures(route.passive_failures)
                kept[backend.name] = entry
            else:
                kept[backend.name] = _Backend(backend, route)
        leaving = [entry for name, entry in self._backends.items() if kept.get(name) is not entry]
        self._backends = kept
        return self._retire(leaving)

    def remove(self) -> list[TunnelRecord]:
        """The route is gone (a reload): every open tunnel is returned, to be drained."""
        self.removed = True
        leaving = list(self._backends.values())
        self._backends = {}
        return self._retire(leaving)

    def _retire(self, leaving: list[_Backend]) -> list[TunnelRecord]:
        for entry in leaving:
            entry.retired = True
            if entry.open:
                self._retired.append(entry)
        return [record for entry in leaving for record in entry.open.values()]

    def serves(self, backend: BackendConfig) -> bool:
        """Whether ``backend`` is still one of this route's backends as configured now (a
        handshake that began before a reload may finish on one that is gone)."""
        entry = None if self.removed else self._backends.get(backend.name)
        return entry is not None and (entry.config is backend or entry.config.url == backend.url)

    @property
    def open_tunnels(self) -> int:
        return sum(len(entry.open) for entry in (*self._backends.values(), *self._retired))

    @property
    def name(self) -> str:
        return self.route.name

    def candidates(
        self, now: float, *, key: bytes | None = None, preferred: str | None = None
    ) -> list[BackendConfig]:
        """The backends to try for one connection, in order; the first that accepts wins.

        ``key`` is the hash key (``balance = "hash"``); ``preferred`` the backend a valid
        sticky cookie names, tried first while it is eligible.

        Raises:
            NoHealthyBackend: 503 when every backend is down or draining, or full
                (``max_tunnels``; then with ``Retry-After``).
        """
        order = self._rotation(now) if self._plain else []
        if not order:
            states = [
                BackendState(
                    name=name,
                    weight=entry.config.weight,
                    open_tunnels=len(entry.open),
                    max_tunnels=entry.config.max_tunnels,
                    eligible=entry.eligible(now),
                    up_since=entry.up_since,
                    slow_start=entry.config.slow_start,
                )
                for name, entry in self._backends.items()
            ]
            order = self._balancer.order(states, now=now, key=key)
            if not order:
                if why_none(states) == "full":
                    raise NoHealthyBackend(
                        f"every backend of route {self.name} holds its max_tunnels",
                        headers=[("Retry-After", str(RETRY_AFTER_SECONDS))],
                    )
                raise NoHealthyBackend(
                    f"no backend of route {self.name} is up (all down or draining)"
                )
        if preferred is not None and preferred in order and order[0] != preferred:
            order.remove(preferred)
            order.insert(0, preferred)
        return [self._backends[name].config for name in order]

    def _rotation(self, now: float) -> list[str]:
        """Equal weights, no caps, no slow start: the smooth weighted round-robin is a plain
        rotation over the eligible backends, at a tenth of its cost (empty when none is)."""
        ring = [name for name, entry in self._backends.items() if entry.eligible(now)]
        if not ring:
            return ring
        start = self._turn % len(ring)
        self._turn = start + 1
        return ring[start:] + ring[:start]

    def connect_failed(self, backend: BackendConfig, now: float) -> None:
        """A connect to ``backend`` failed: counted, and ``passive_failures`` in a row mark it
        down."""
        entry = self._backends.get(backend.name)
        if entry is None:
            return
        entry.connect_failures += 1
        if entry.passive.failed() or (entry.down and entry.retry_at <= now):
            checks = self.route.health.kind != "none"
            entry.retry_at = math.inf if checks else now + self.route.health.interval
            if not entry.down:
                self._mark(
                    entry,
                    down=True,
                    now=now,
                    why=f"{self.route.passive_failures} connects in a row failed",
                )

    def connected(self, backend: BackendConfig, now: float) -> None:
        """A connect to ``backend`` succeeded: the failure count restarts; a backend down by
        failed connects on a route without checks is up again."""
        entry = self._backends.get(backend.name)
        if entry is None:
            return
        entry.passive.succeeded()
        if entry.down and self.route.health.kind == "none":
            self._mark(entry, down=False, now=now, why="a connect succeeded")

    def check_result(self, name: str, ok: bool, detail: str, now: float) -> None:
        """One active health check's result (``net.health_probe``)."""
        entry = self._backends.get(name)
        if entry is None:
            return
        if entry.health.observe(ok):
            rule = self.route.health
            why = (
                f"{rule.rise} checks in a row passed"
                if ok
                else f"{rule.fall} checks in a row failed: {detail}"
            )
            self._mark(entry, down=not ok, now=now, why=why)

    def _mark(self, entry: _Backend, *, down: bool, now: float, why: str) -> None:
        entry.down = down
        state = DOWN if down else UP
        entry.changes[state] += 1
        # A fresh run: checks must pass ``rise`` times to undo a passive mark, and so on.
        entry.health = HealthState(self.route.health.rise, self.route.health.fall, up=not down)
        if not down:
            entry.up_since = now
            entry.retry_at = math.inf
        (log.warning if down else log.info)(
            f"backend marked {state}",
            extra=fields(
                route=self.name,
                backend=entry.config.name,
                reason=why,
                open_tunnels=len(entry.open),
            ),
        )
        if down and self.route.on_down == "close" and self._close is not None:
            for record in list(entry.open.values()):
                self._close(record, CloseReason.BACKEND_DOWN)

    def set_draining(self, name: str, draining: bool, now: float = -math.inf) -> _Backend | None:
        """An operator's drain (or its end, at ``now``: a backend enabled again ramps up
        over its ``slow_start`` like one that came up); None when the route has no such
        backend."""
        entry = self._backends.get(name)
        if entry is None:
            return None
        if entry.draining != draining:
            entry.draining = draining
            if not draining:
                entry.up_since = now
            log.info(
                "backend draining" if draining else "backend enabled",
                extra=fields(route=self.name, backend=name, open_tunnels=len(entry.open)),
            )
        return entry

    def refused(self, rule: str) -> None:
        self.refusals[rule] += 1

    def answered(self, status: int) -> None:
        """Count one answer to a client of this route (the 101, or a refusal)."""
        self.answers[status] += 1

    def opened(self, record: TunnelRecord, config: BackendConfig) -> None:
        """``record``'s tunnel was handed to the engine by backend ``config``."""
        backend = self._backends.get(config.name)
        if backend is None or (backend.config is not config and backend.config.url != config.url):
            # Gone in a reload while this handshake ran: counted apart, and drained.
            backend = next((b for b in self._retired if b.config.url == config.url), None)
            if backend is None:
                backend = _Backend(config, self.route)
                backend.retired = True
                self._retired.append(backend)
        backend.open[record.id] = record
        backend.total += 1
        record.home = backend

    def closed(self, record: TunnelRecord) -> None:
        """The engine closed ``record``'s tunnel: its bytes move to the backend's totals."""
        backend = record.home
        if backend is None or backend.open.pop(record.id, None) is None:
            return
        stats = record.stats
        backend.bytes_up += stats.bytes_up
        backend.bytes_down += stats.bytes_down
        self.closes[stats.close_reason or CloseReason.ERROR] += 1
        if backend.retired and not backend.open and backend in self._retired:
            self._retired.remove(backend)

    def left(self, record: TunnelRecord) -> None:
        """``record``'s tunnel moved to another process: no longer counted here, and not a
        close (its bytes go on being counted there)."""
        backend = record.home
        if backend is None or backend.open.pop(record.id, None) is None:
            return
        self.handed_off += 1
        if backend.retired and not backend.open and backend in self._retired:
            self._retired.remove(backend)

    def backend_named(self, name: str) -> BackendConfig | None:
        """The configuration of the backend called ``name``, if the route still has it."""
        entry = None if self.removed else self._backends.get(name)
        return None if entry is None else entry.config

    def records(self) -> list[TunnelRecord]:
        """Every open tunnel of the route."""
        return [
            record
            for backend in (*self._backends.values(), *self._retired)
            for record in backend.open.values()
        ]

    def find(self, tunnel_id: str) -> TunnelRecord | None:
        for backend in (*self._backends.values(), *self._retired):
            record = backend.open.get(tunnel_id)
            if record is not None:
                return record
        return None

    def statistics(self, now: float) -> UpstreamStatistics:
        """A frozen snapshot; ``now`` (trio's clock) gives the tunnels' ages."""
        backends = []
        tunnels: list[TunnelStatistics] = []
        shown = dict(self._backends)
        for backend in self._retired:
            # A retired backend whose name came back (with another URL) is shown under it.
            shown.setdefault(backend.config.name, backend)
        for name, backend in shown.items():
            entries = [backend, *(b for b in self._retired if b.config.name == name)]
            entries = list(dict.fromkeys(entries))
            records = tuple(record for entry in entries for record in entry.open.values())
            tunnels += (
                TunnelStatistics(
                    id=r.id,
                    client=r.client,
                    route=r.route,
                    backend=r.backend,
                    age=now - r.opened_at,
                    idle=max(0.0, now - r.stats.last_activity),
                    bytes_up=r.stats.bytes_up,
                    bytes_down=r.stats.bytes_down,
                )
                for r in records
            )
            backends.append(
                BackendStatistics(
                    name=name,
                    url=backend.config.url,
                    state=backend.state,
                    open_tunnels=len(records),
                    tunnels_total=sum(entry.total for entry in entries),
                    bytes_up=sum(entry.bytes_up for entry in entries)
                    + sum(r.stats.bytes_up for r in records),
                    bytes_down=sum(entry.bytes_down for entry in entries)
                    + sum(r.stats.bytes_down for r in records),
                    connect_failures=sum(entry.connect_failures for entry in entries),
                    went_up=backend.changes[UP],
                    went_down=backend.changes[DOWN],
                )
            )
        return UpstreamStatistics(
            name=self.name,
            hosts=self.route.hosts,
            path_prefix=self.route.path_prefix,
            backends=tuple(backends),
            answers=tuple(sorted(self.answers.items())),
            closes=tuple(sorted(self.closes.items())),
            tunnels=tuple(tunnels),
            refusals=tuple(sorted(self.refusals.items())),
        )
