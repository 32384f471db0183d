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
"""The only backend state until health checks exist; ``down`` and ``draining`` come later."""


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


class _Backend:
    """Counters of one backend of the route."""

    __slots__ = ("bytes_down", "bytes_up", "config", "connect_failures", "open", "total")

    def __init__(self, config: BackendConfig) -> None:
        self.config = config
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
        self.answers: Counter[int] = Counter()
        self.closes: Counter[CloseReason] = Counter()

    @property
    def name(self) -> str:
        return self.route.name

    def candidates(self) -> list[BackendConfig]:
        """The backends to try for one connection, in order; the first that accepts wins."""
        return self._balancer.candidates()

    def connect_failed(self, backend: BackendConfig) -> None:
        self._backends[backend.name].connect_failures += 1

    def answered(self, status: int) -> None:
        """Count one answer to a client of this route (the 101, or a refusal)."""
        self.answers[status] += 1

    def opened(self, record: TunnelRecord) -> None:
        """``record``'s tunnel was handed to the engine by its backend."""
        backend = self._backends[record.backend]
        backend.open[record.id] = record
        backend.total += 1

    def closed(self, record: TunnelRecord) -> None:
        """The engine closed ``record``'s tunnel: its bytes move to the backend's totals."""
        backend = self._backends[record.backend]
        if backend.open.pop(record.id, None) is None:
            return
        stats = record.stats
        backend.bytes_up += stats.bytes_up
        backend.bytes_down += stats.bytes_down
        self.closes[stats.close_reason or CloseReason.ERROR] += 1

    def find(self, tunnel_id: str) -> TunnelRecord | None:
        for backend in self._backends.values():
            record = backend.open.get(tunnel_id)
            if record is not None:
                return record
        return None

    def statistics(self, now: float) -> UpstreamStatistics:
        """A frozen snapshot; ``now`` (trio's clock) gives the tunnels' ages."""
        backends = []
        tunnels: list[TunnelStatistics] = []
        for name, backend in self._backends.items():
            records = tuple(backend.open.values())
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
                    state=UP,
                    open_tunnels=len(records),
                    tunnels_total=backend.total,
                    bytes_up=backend.bytes_up + sum(r.stats.bytes_up for r in records),
                    bytes_down=backend.bytes_down + sum(r.stats.bytes_down for r in records),
                    connect_failures=backend.connect_failures,
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
