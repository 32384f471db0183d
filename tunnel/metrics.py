"""``/metrics``: the Prometheus text format of a ``ServerStatistics`` snapshot.

Counters are kept as plain integers where the work happens (upstreams, the engine's per-tunnel
counters) and turned into metric families only when scraped: nothing on the hot path touches
prometheus-client, and a tunnel's bytes show up while it is open, not only when it ends.
Labels are route, backend, status, reason and direction: bounded by the configuration and the
vocabularies, never by clients.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from tunnel.stats import HistogramStatistics, ServerStatistics

HANDSHAKE_BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
"""Seconds from accept to the 101: a loopback upgrade takes a fraction of a millisecond, a
backend across a WAN tens of milliseconds, a slow one seconds."""


class LatencyHistogram:
    """Counts per bucket, observed in O(log buckets) with no allocation."""

    __slots__ = ("_bounds", "_counts", "_total")

    def __init__(self, bounds: tuple[float, ...] = HANDSHAKE_BOUNDS) -> None:
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self._total = 0.0

    def observe(self, seconds: float) -> None:
        self._counts[bisect_left(self._bounds, seconds)] += 1
        self._total += seconds

    def statistics(self) -> HistogramStatistics:
        cumulative = []
        running = 0
        for count in self._counts:
            running += count
            cumulative.append(running)
        return HistogramStatistics(self._bounds, tuple(cumulative), self._total)


def families(snapshot: ServerStatistics) -> Iterator[Metric]:
    """The ``tunnel_*`` metric families of one snapshot."""
    open_tunnels = GaugeMetricFamily(
        "tunnel_open_tunnels", "Tunnels open now.", labels=["route", "backend"]
    )
    bytes_total = CounterMetricFamily(
        "tunnel_bytes",
        "Bytes relayed, open tunnels included (up: client to backend).",
        labels=["route", "backend", "direction"],
    )
    tunnels_total = CounterMetricFamily(
        "tunnel_tunnels", "Tunnels opened.", labels=["route", "backend"]
    )
    backend_up = GaugeMetricFamily(
        "tunnel_backend_up",
        "1 when the backend is up and takes new tunnels; 0 when down or draining.",
        labels=["route", "backend"],
    )
    connect_failures = CounterMetricFamily(
        "tunnel_backend_connect_failures",
        "Connects to the backend that failed (refused, unreachable, timed out, TLS).",
        labels=["route", "backend"],
    )
    health_changes = CounterMetricFamily(
        "tunnel_backend_health_changes",
        "Times the backend was marked down (health checks or failed connects) or back up.",
        labels=["route", "backend", "to"],
    )
    upgrades = CounterMetricFamily(
        "tunnel_upgrades",
        "Answers to upgrade requests by status: 101 and every refusal (route empty when the "
        "request was refused before a route was known).",
        labels=["route", "status"],
    )
    closed = CounterMetricFamily(
        "tunnel_closed", "Tunnels closed, by reason.", labels=["route", "reason"]
    )
    refusals = CounterMetricFamily(
        "tunnel_refusals",
        "Upgrades refused by the route's guard, by rule: access, origin, per_ip_rate, auth, "
        "per_ip_tunnels, per_identity_tunnels, limit_store, admission_rate (each also counted "
        "in tunnel_upgrades_total by status).",
        labels=["route", "rule"],
    )
    proxy_refused = CounterMetricFamily(
        "tunnel_proxy_header_refusals",
        "Connections closed unanswered for a missing, malformed or untrusted PROXY header.",
    )
    proxy_refused.add_metric([], snapshot.proxy_refused)
    handshakes = GaugeMetricFamily(
        "tunnel_handshakes",
        "Connections accepted and not yet tunnels (TLS handshake, request head, backend "
        "answer), bounded by max_handshakes.",
        value=snapshot.handshakes_open,
    )
    shed = CounterMetricFamily(
        "tunnel_handshakes_shed",
        "Connections closed to stay within max_handshakes (the one waiting longest for its "
        "client, or the new one).",
        value=snapshot.handshakes_shed,
    )
    left_early = CounterMetricFamily(
        "tunnel_clients_left_early",
        "Clients that closed while their backend was answering the upgrade (the backend "
        "connection is closed at once).",
        value=snapshot.left_early,
    )
    for route in snapshot.routes:
        for backend in route.backends:
            labels = [route.name, backend.name]
            open_tunnels.add_metric(labels, backend.open_tunnels)
            tunnels_total.add_metric(labels, backend.tunnels_total)
            bytes_total.add_metric([*labels, "up"], backend.bytes_up)
            bytes_total.add_metric([*labels, "down"], backend.bytes_down)
            backend_up.add_metric(labels, 1 if backend.state == "up" else 0)
            connect_failures.add_metric(labels, backend.connect_failures)
            health_changes.add_metric([*labels, "down"], backend.went_down)
            health_changes.add_metric([*labels, "up"], backend.went_up)
        for status, count in route.answers:
            upgrades.add_metric([route.name, str(status)], count)
        for reason, count in route.closes:
            closed.add_metric([route.name, reason.value], count)
        for rule, count in route.refusals:
            refusals.add_metric([route.name, rule], count)
    for status, count in snapshot.unrouted_answers:
        upgrades.add_metric(["", str(status)], count)
    yield from (open_tunnels, bytes_total, tunnels_total, backend_up, connect_failures)
    yield health_changes
    handoffs = CounterMetricFamily(
        "tunnel_handoffs",
        "Live hand-offs this process began (SIGUSR2, POST /upgrade), by outcome: done, refused "
        "(the configuration did not load), failed (the new process did not take over). With "
        "workers, the supervisor's refused and failed ones, counted once.",
        labels=["outcome"],
    )
    for outcome, count in snapshot.handoffs:
        handoffs.add_metric([outcome], count)
    handoff_tunnels = CounterMetricFamily(
        "tunnel_handoff_tunnels",
        "Tunnels moved by live hand-offs: sent to a new process, received from an old one, or "
        "kept (TLS or closing: they drain in the old process).",
        labels=["direction"],
    )
    for direction, count in snapshot.handoff_tunnels:
        handoff_tunnels.add_metric([direction], count)
    handoff_seconds = GaugeMetricFamily(
        "tunnel_handoff_last_duration_seconds",
        "How long the last live hand-off took, from SIGUSR2 (or POST /upgrade) to the last "
        "tunnel taken: one this process began, or the one that started it.",
        value=snapshot.handoff_seconds,
    )
    yield from (upgrades, closed, refusals, proxy_refused, handshakes, shed, left_early)
    yield from (handoffs, handoff_tunnels, handoff_seconds)
    yield _histogram(snapshot.handshake_seconds)


def _histogram(handshake: HistogramStatistics) -> HistogramMetricFamily:
    buckets = [
        (_bound(bound), count)
        for bound, count in zip(
            (*handshake.bounds, float("inf")), handshake.cumulative, strict=True
        )
    ]
    return HistogramMetricFamily(
        "tunnel_handshake_seconds",
        "Time from accept to the 101 sent on to the client.",
        buckets=buckets,
        sum_value=handshake.total,
    )


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


class _Snapshots(Collector):
    def __init__(self, snapshot: Callable[[], ServerStatistics]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        return families(self._snapshot())


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The classic text format ``generate_latest`` writes, which every Prometheus reads."""


class Exposition:
    """The ``/metrics`` body of one process: its ``tunnel_*`` families and process metrics."""

    content_type = CONTENT_TYPE

    def __init__(self, snapshot: Callable[[], ServerStatistics]) -> None:
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_Snapshots(snapshot))
        self._registry.register(ProcessCollector(registry=None))

    def render(self) -> bytes:
        return generate_latest(self._registry)
