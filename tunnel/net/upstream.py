"""A route's upstream: the runtime state of its backends, which outlives any one connection.

A connection handler asks its route's ``Upstream`` for the backends to try, tells it which one
took the tunnel, and, through the record it got back, when the tunnel ended. Everything the
admin listener and ``/metrics`` show per route and per backend is counted here (open tunnels,
bytes of closed tunnels, answers, close reasons), so counts per backend are exact and no handler
keeps state of its own.
"""

from __future__ import annotations

import ssl
from collections import Counter
from dataclasses import dataclass, field

from tunnel.config import BackendConfig, RouteConfig
from tunnel.net.engine import Tunnel
from tunnel.net.relay import RelayStats
from tunnel.policy.balancer import RoundRobin
from tunnel.reasons import CloseReason
from tunnel.stats import BackendStatistics, TunnelStatistics, UpstreamStatistics

UP = "up"
DRAINING = "draining"
"""A backend a reload removed (or whose URL it changed), while its tunnels drain."""


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


class _Backend:
    """Counters of one backend of the route."""

    __slots__ = (
        "bytes_down",
        "bytes_up",
        "config",
        "connect_failures",
        "open",
        "retired",
        "total",
    )

    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        self.retired = False
        """Removed by a reload: no new tunnels, shown as draining until its last one ends."""
        self.open: dict[str, TunnelRecord] = {}
        self.total = 0
        self.bytes_up = 0
        """Of closed tunnels; open ones are added when a snapshot is taken."""
        self.bytes_down = 0
        self.connect_failures = 0


class Upstream:
    """The runtime state of one route: balancer, backend TLS and the tunnels of each backend."""

    def __init__(self, route: RouteConfig, tls: ssl.SSLContext | None = None) -> None:
        self.route = route
        self.tls = tls
        """Client context for the route's ``wss://`` backends; replaced by a reload."""
        self._balancer = RoundRobin(route.backends)
        self._backends = {backend.name: _Backend(backend) for backend in route.backends}
        self._retired: list[_Backend] = []
        self.removed = False
        """The route itself was removed by a reload; its tunnels are draining."""
        self.answers: Counter[int] = Counter()
        self.closes: Counter[CloseReason] = Counter()

    def reconfigure(self, route: RouteConfig, tls: ssl.SSLContext | None) -> list[TunnelRecord]:
        """Take the route's new settings (a reload). Backends with the same name and URL keep
        their tunnels and counters; the tunnels of backends that are gone or changed URL are
        returned, for the caller to drain, and those backends are shown as draining until
        their last tunnel ends. New connections see the new backends at once."""
        self.route = route
        self.tls = tls
        self._balancer = RoundRobin(route.backends)
        kept: dict[str, _Backend] = {}
        for backend in route.backends:
            entry = self._backends.get(backend.name)
            if entry is not None and entry.config.url == backend.url:
                entry.config = backend
                kept[backend.name] = entry
            else:
                kept[backend.name] = _Backend(backend)
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

    def candidates(self) -> list[BackendConfig]:
        """The backends to try for one connection, in order; the first that accepts wins."""
        return self._balancer.candidates()

    def connect_failed(self, backend: BackendConfig) -> None:
        entry = self._backends.get(backend.name)
        if entry is not None:
            entry.connect_failures += 1

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
                backend = _Backend(config)
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
                    state=DRAINING if backend.retired else UP,
                    open_tunnels=len(records),
                    tunnels_total=sum(entry.total for entry in entries),
                    bytes_up=sum(entry.bytes_up for entry in entries)
                    + sum(r.stats.bytes_up for r in records),
                    bytes_down=sum(entry.bytes_down for entry in entries)
                    + sum(r.stats.bytes_down for r in records),
                    connect_failures=sum(entry.connect_failures for entry in entries),
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
        )
