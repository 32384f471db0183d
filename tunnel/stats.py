"""Frozen snapshots of the running server, for the admin pages and ``/metrics``.

The running objects (upstreams, the engine, the generation) build these on request; readers
never touch live internals. Plain data only, so the exposition code (``tunnel.metrics``) and
the JSON of ``/stats.json`` depend on nothing that does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunnel.reasons import CloseReason


@dataclass(frozen=True, slots=True)
class TunnelStatistics:
    """One open tunnel at the moment of the snapshot (ages and idle times in seconds)."""

    id: str
    client: str
    route: str
    backend: str
    age: float
    idle: float
    bytes_up: int
    bytes_down: int


@dataclass(frozen=True, slots=True)
class BackendStatistics:
    name: str
    url: str
    state: str
    open_tunnels: int
    tunnels_total: int
    """Tunnels this backend has taken since start, open ones included."""
    bytes_up: int
    """Client → backend bytes since start: closed tunnels' totals plus open ones' so far."""
    bytes_down: int
    connect_failures: int
    went_up: int = 0
    """Health changes since start: times it came back up, and times it was marked down."""
    went_down: int = 0


@dataclass(frozen=True, slots=True)
class UpstreamStatistics:
    name: str
    hosts: tuple[str, ...]
    path_prefix: str
    backends: tuple[BackendStatistics, ...]
    answers: tuple[tuple[int, int], ...]
    """(status, count) of every answer clients got on this route: 101s and refusals."""
    closes: tuple[tuple[CloseReason, int], ...]
    tunnels: tuple[TunnelStatistics, ...]
    refusals: tuple[tuple[str, int], ...] = ()
    """(rule, count) of upgrades refused by access rules, limits, auth or admission."""

    @property
    def open_tunnels(self) -> int:
        return sum(backend.open_tunnels for backend in self.backends)


@dataclass(frozen=True, slots=True)
class HistogramStatistics:
    """Cumulative counts per upper bound (seconds), as Prometheus histograms are exposed."""

    bounds: tuple[float, ...]
    cumulative: tuple[int, ...]
    """Observations at or below each bound; the last entry counts all (``+Inf``)."""
    total: float

    @property
    def count(self) -> int:
        return self.cumulative[-1]


@dataclass(frozen=True, slots=True)
class ListenerStatistics:
    address: str
    tls: bool
    redirect_https: bool


@dataclass(frozen=True, slots=True)
class ServerStatistics:
    """Everything one process serves, at one moment."""

    version: str
    uptime: float
    healthy: bool
    listeners: tuple[ListenerStatistics, ...]
    routes: tuple[UpstreamStatistics, ...]
    unrouted_answers: tuple[tuple[int, int], ...]
    """(status, count) of refusals given before a route was known (400, 404, 408, ...)."""
    handshake_seconds: HistogramStatistics
    """From accept to the 101 sent on, for every tunnel opened."""
    proxy_refused: int = 0
    """Connections closed for a missing, malformed or untrusted PROXY header."""
    handshakes_open: int = 0
    """Connections accepted and not yet tunnels, now."""
    handshakes_shed: int = 0
    """Connections closed to stay within max_handshakes."""
    left_early: int = 0
    """Clients that left while their backend was answering the upgrade."""
    handoffs: tuple[tuple[str, int], ...] = ()
    """(outcome, count) of live hand-offs this process began: ``done``, ``refused`` (the
    configuration), ``failed`` (the new process)."""
    handoff_tunnels: tuple[tuple[str, int], ...] = ()
    """(direction, count): tunnels ``sent`` to a new process, ``received`` from an old one,
    ``kept`` (could not move)."""
    handoff_seconds: float = 0.0
    """How long the last hand-off took, from the signal to the last tunnel taken."""
