"""Merging the workers' admin answers (``tunnel.federation``): pure functions, no sockets.

The ``tunnel_*`` expositions are rendered by the project's own code (``tunnel.metrics.families``
over ``ServerStatistics`` snapshots, written by prometheus-client) and every merged result is
read back with Prometheus' parser, so the tests check what a scraper sees, not the text layout.
Per-process families are written by hand, so their values per worker are known.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from tunnel.federation import merge_metrics, merge_stats, split_tunnel_id
from tunnel.metrics import HANDSHAKE_BOUNDS, families
from tunnel.reasons import CloseReason
from tunnel.stats import (
    BackendStatistics,
    HistogramStatistics,
    ServerStatistics,
    UpstreamStatistics,
)

Key = tuple[str, tuple[tuple[str, str], ...]]

# --- expositions -----------------------------------------------------------------------------


def backend(
    name: str,
    *,
    open_tunnels: int = 0,
    total: int = 0,
    up: int = 0,
    down: int = 0,
    failures: int = 0,
    state: str = "up",
) -> BackendStatistics:
    return BackendStatistics(
        name, f"ws://10.0.0.1/{name}", state, open_tunnels, total, up, down, failures
    )


def snapshot(
    backends: tuple[BackendStatistics, ...],
    *,
    answers: dict[int, int] | None = None,
    closes: dict[CloseReason, int] | None = None,
    unrouted: dict[int, int] | None = None,
    handshakes: tuple[float, ...] = (),
) -> ServerStatistics:
    """One worker's statistics: a route ``chat`` over ``backends``."""
    counts = [0] * (len(HANDSHAKE_BOUNDS) + 1)
    for seconds in handshakes:
        counts[sum(1 for bound in HANDSHAKE_BOUNDS if bound < seconds)] += 1
    cumulative = tuple(sum(counts[: i + 1]) for i in range(len(counts)))
    route = UpstreamStatistics(
        name="chat",
        hosts=(),
        path_prefix="/",
        backends=backends,
        answers=tuple(sorted((answers or {}).items())),
        closes=tuple(sorted((closes or {}).items())),
        tunnels=(),
    )
    return ServerStatistics(
        version="0.1.0",
        uptime=1.0,
        healthy=True,
        listeners=(),
        routes=(route,),
        unrouted_answers=tuple(sorted((unrouted or {}).items())),
        handshake_seconds=HistogramStatistics(HANDSHAKE_BOUNDS, cumulative, sum(handshakes)),
    )


class _Snapshot(Collector):
    def __init__(self, statistics: ServerStatistics) -> None:
        self._statistics = statistics

    def collect(self) -> Iterable[Metric]:
        return families(self._statistics)


def process_text(cpu: float, resident: int) -> str:
    """A worker's per-process families, as prometheus-client's process collector writes them."""
    return (
        "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n"
        "# TYPE process_cpu_seconds_total counter\n"
        f"process_cpu_seconds_total {cpu}\n"
        "# HELP process_resident_memory_bytes Resident memory size in bytes.\n"
        "# TYPE process_resident_memory_bytes gauge\n"
        f"process_resident_memory_bytes {resident}\n"
    )


def exposition(statistics: ServerStatistics, cpu: float = 1.0, resident: int = 1000) -> str:
    """What one worker's ``/metrics`` says: its ``tunnel_*`` families, then process ones."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(statistics))
    return generate_latest(registry).decode() + process_text(cpu, resident)


def samples(text: str | bytes) -> dict[Key, float]:
    """Every sample, as Prometheus' parser reads it; a sample written twice fails the test."""
    if isinstance(text, bytes):
        text = text.decode()
    found: dict[Key, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in found, f"{key} written twice"
            found[key] = sample.value
    return found


def types(text: bytes) -> dict[str, str]:
    return {family.name: family.type for family in text_string_to_metric_families(text.decode())}


def key(name: str, **labels: str) -> Key:
    return name, tuple(sorted(labels.items()))


WORKER_1 = snapshot(
    (backend("a", open_tunnels=2, total=7, up=100, down=1000, failures=1), backend("b", total=1)),
    answers={101: 8, 503: 1},
    closes={CloseReason.CLIENT_EOF: 5, CloseReason.IDLE_TIMEOUT: 1},
    unrouted={404: 2},
    handshakes=(0.0003, 0.002, 0.002, 0.3),
)
WORKER_2 = snapshot(
    (backend("a", open_tunnels=3, total=4, up=250, down=30, failures=2), backend("b", total=2)),
    answers={101: 6, 502: 3},
    closes={CloseReason.CLIENT_EOF: 1, CloseReason.ADMIN: 2},
    handshakes=(0.0004, 0.02, 4.0),
)


# --- merge_metrics ---------------------------------------------------------------------------


def test_tunnel_series_with_the_same_labels_add_up_across_workers() -> None:
    first, second = exposition(WORKER_1), exposition(WORKER_2)
    merged = samples(merge_metrics({1: first, 2: second}))
    one, two = samples(first), samples(second)

    tunnel_keys = {k for k in {*one, *two} if k[0].startswith("tunnel_")}
    assert {k for k in merged if k[0].startswith("tunnel_")} == tunnel_keys
    for k in tunnel_keys:
        if k[0] != "tunnel_backend_up":  # see test_backend_up_merged_is_1_only_when_every_...
            assert merged[k] == one.get(k, 0) + two.get(k, 0), k
    # The same, spelled out for a few series a dashboard reads.
    assert merged[key("tunnel_open_tunnels", route="chat", backend="a")] == 5
    assert merged[key("tunnel_bytes_total", route="chat", backend="a", direction="up")] == 350
    assert merged[key("tunnel_bytes_total", route="chat", backend="a", direction="down")] == 1030
    assert merged[key("tunnel_tunnels_total", route="chat", backend="b")] == 3
    assert merged[key("tunnel_backend_connect_failures_total", route="chat", backend="a")] == 3
    assert merged[key("tunnel_upgrades_total", route="chat", status="101")] == 14
    assert merged[key("tunnel_closed_total", route="chat", reason="client_eof")] == 6


def test_histogram_buckets_count_and_sum_add_up_and_stay_a_histogram() -> None:
    merged_text = merge_metrics({1: exposition(WORKER_1), 2: exposition(WORKER_2)})
    merged = samples(merged_text)

    assert types(merged_text)["tunnel_handshake_seconds"] == "histogram"
    bounds = ("0.0005", "0.0025", "0.025", "0.5", "2.5", "+Inf")
    buckets = [merged[key("tunnel_handshake_seconds_bucket", le=le)] for le in bounds]
    assert buckets == [2, 4, 5, 6, 6, 7]
    assert merged[key("tunnel_handshake_seconds_count")] == 7
    assert merged[key("tunnel_handshake_seconds_sum")] == pytest.approx(4.3247)


def test_a_series_only_one_worker_has_is_kept_with_its_value() -> None:
    merged = samples(merge_metrics({1: exposition(WORKER_1), 2: exposition(WORKER_2)}))

    assert merged[key("tunnel_upgrades_total", route="chat", status="503")] == 1  # worker 1
    assert merged[key("tunnel_upgrades_total", route="chat", status="502")] == 3  # worker 2
    assert merged[key("tunnel_upgrades_total", route="", status="404")] == 2  # worker 1
    assert merged[key("tunnel_closed_total", route="chat", reason="idle_timeout")] == 1
    assert merged[key("tunnel_closed_total", route="chat", reason="admin")] == 2


def test_process_series_stay_one_per_worker_labelled_worker() -> None:
    merged = samples(
        merge_metrics(
            {
                1: exposition(WORKER_1, cpu=1.5, resident=1000),
                2: exposition(WORKER_2, cpu=2.25, resident=3000),
                3: exposition(WORKER_2, cpu=0.5, resident=1000),
            }
        )
    )

    process = {k: v for k, v in merged.items() if k[0].startswith("process_")}
    assert process == {
        key("process_cpu_seconds_total", worker="1"): 1.5,
        key("process_cpu_seconds_total", worker="2"): 2.25,
        key("process_cpu_seconds_total", worker="3"): 0.5,
        key("process_resident_memory_bytes", worker="1"): 1000,
        key("process_resident_memory_bytes", worker="2"): 3000,
        key("process_resident_memory_bytes", worker="3"): 1000,
    }, "equal values of two workers are not summed either"


def test_every_family_is_described_once_with_its_help_and_type() -> None:
    text = merge_metrics({1: exposition(WORKER_1), 2: exposition(WORKER_2)}).decode()
    lines = text.splitlines()

    helps = Counter(line.split()[2] for line in lines if line.startswith("# HELP "))
    kinds = Counter(line.split()[2] for line in lines if line.startswith("# TYPE "))
    assert helps == kinds
    assert set(helps.values()) == {1}, helps
    assert "# TYPE tunnel_bytes_total counter" in lines
    assert "# TYPE tunnel_open_tunnels gauge" in lines
    assert "# TYPE process_cpu_seconds_total counter" in lines
    assert "# HELP tunnel_open_tunnels Tunnels open now." in lines
    assert (
        "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds." in lines
    )


def test_one_worker_is_passed_through_but_for_the_worker_label() -> None:
    text = exposition(WORKER_1, cpu=0.75)
    alone, merged = samples(text), samples(merge_metrics({4: text}))

    assert {k: v for k, v in merged.items() if k[0].startswith("tunnel_")} == {
        k: v for k, v in alone.items() if k[0].startswith("tunnel_")
    }
    assert merged[key("process_cpu_seconds_total", worker="4")] == 0.75
    assert key("process_cpu_seconds_total") not in merged


def test_the_order_the_workers_answered_in_does_not_matter() -> None:
    first, second = exposition(WORKER_1, cpu=1.0), exposition(WORKER_2, cpu=2.0)
    assert merge_metrics({2: second, 1: first}) == merge_metrics({1: first, 2: second})


def test_no_workers_no_metrics() -> None:
    assert merge_metrics({}) == b""


def test_backend_up_merged_is_1_only_when_every_worker_says_1() -> None:
    down_in_2 = snapshot((backend("a", state="down"), backend("b")))
    merged = samples(merge_metrics({1: exposition(WORKER_1), 2: exposition(down_in_2)}))

    assert merged[key("tunnel_backend_up", route="chat", backend="b")] == 1
    assert merged[key("tunnel_backend_up", route="chat", backend="a")] == 0


def test_a_hand_off_takes_as_long_as_its_slowest_worker_and_its_tunnels_add_up() -> None:
    """Every worker of a generation times the same hand-off: summing the gauge would count it
    once per worker."""
    first = dataclasses.replace(WORKER_1, handoff_seconds=1.5, handoff_tunnels=(("received", 700),))
    second = dataclasses.replace(
        WORKER_2, handoff_seconds=2.25, handoff_tunnels=(("received", 300),)
    )
    merged = samples(merge_metrics({1: exposition(first), 2: exposition(second)}))

    assert merged[key("tunnel_handoff_last_duration_seconds")] == 2.25
    assert merged[key("tunnel_handoff_tunnels_total", direction="received")] == 1000


# --- merge_stats -----------------------------------------------------------------------------


def stats_backend(name: str, **counts: Any) -> dict[str, Any]:
    document = {
        "name": name,
        "url": f"ws://10.0.0.1/{name}",
        "state": "up",
        "open_tunnels": 0,
        "tunnels_total": 0,
        "bytes_up": 0,
        "bytes_down": 0,
        "connect_failures": 0,
    }
    document.update(counts)
    return document


def stats_document(
    routes: list[dict[str, Any]],
    tunnel_ids: Sequence[str] = (),
    *,
    uptime: float = 10.0,
    healthy: bool = True,
    listen: str = "127.0.0.1:8080",
) -> dict[str, Any]:
    return {
        "version": "0.1.0",
        "uptime": uptime,
        "healthy": healthy,
        "listeners": [{"address": listen, "tls": False, "redirect_https": False}],
        "routes": routes,
        "tunnels": [
            {
                "id": tunnel_id,
                "client": f"127.0.0.1:{40000 + i}",
                "route": "chat",
                "backend": "a",
                "age": 1.5,
                "idle": 0.5,
                "bytes_up": 10,
                "bytes_down": 20,
            }
            for i, tunnel_id in enumerate(tunnel_ids)
        ],
    }


def route(name: str, *backends: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "hosts": ["chat.example.com"],
        "path_prefix": "/",
        "open_tunnels": sum(b["open_tunnels"] for b in backends),
        "backends": list(backends),
    }


def two_workers() -> dict[int, dict[str, Any]]:
    return {
        1: stats_document(
            [
                route(
                    "chat",
                    stats_backend(
                        "a",
                        open_tunnels=2,
                        tunnels_total=5,
                        bytes_up=100,
                        bytes_down=1000,
                        connect_failures=1,
                    ),
                    stats_backend("b", open_tunnels=1, tunnels_total=1),
                ),
                route("feed", stats_backend("f", tunnels_total=9, bytes_up=7)),
            ],
            ["1", "2", "4"],
            uptime=30.5,
        ),
        2: stats_document(
            [
                route(
                    "chat",
                    stats_backend(
                        "a",
                        open_tunnels=3,
                        tunnels_total=4,
                        bytes_up=250,
                        bytes_down=30,
                        connect_failures=2,
                    ),
                    stats_backend("b", open_tunnels=0, tunnels_total=2),
                ),
                route("feed", stats_backend("f", tunnels_total=1, bytes_up=3)),
            ],
            ["1", "3"],
            uptime=12.25,
            listen="127.0.0.1:9999",
        ),
    }


def test_backend_counts_and_open_tunnels_per_route_add_up() -> None:
    merged = merge_stats(two_workers())

    chat, feed = merged["routes"]
    assert (chat["name"], feed["name"]) == ("chat", "feed")
    assert (chat["open_tunnels"], feed["open_tunnels"]) == (6, 0)
    a, b = chat["backends"]
    assert a == stats_backend(
        "a", open_tunnels=5, tunnels_total=9, bytes_up=350, bytes_down=1030, connect_failures=3
    )
    assert b == stats_backend("b", open_tunnels=1, tunnels_total=3)
    assert feed["backends"] == [stats_backend("f", tunnels_total=10, bytes_up=10)]
    assert chat["hosts"] == ["chat.example.com"]


def test_tunnel_ids_name_their_worker_and_keep_the_rest() -> None:
    workers = two_workers()
    merged = merge_stats({2: workers[2], 1: workers[1]})

    assert [t["id"] for t in merged["tunnels"]] == ["1-1", "1-2", "1-4", "2-1", "2-3"]
    assert merged["tunnels"][3] == {**workers[2]["tunnels"][0], "id": "2-1"}


def test_workers_uptime_version_and_listeners() -> None:
    merged = merge_stats(two_workers())

    assert merged["workers"] == 2
    assert merged["uptime"] == 30.5, "the longest-running worker's"
    assert merged["version"] == "0.1.0"
    assert merged["listeners"] == two_workers()[1]["listeners"], "the lowest worker's"
    assert merged["healthy"] is True


@pytest.mark.parametrize("unhealthy", [1, 2])
def test_one_unhealthy_worker_makes_the_whole_unhealthy(unhealthy: int) -> None:
    workers = two_workers()
    workers[unhealthy]["healthy"] = False
    assert merge_stats(workers)["healthy"] is False


@pytest.mark.parametrize("worker", [1, 2])
@pytest.mark.parametrize("state", ["down", "draining"])
def test_a_backend_not_up_in_one_worker_is_not_up_merged(worker: int, state: str) -> None:
    workers = two_workers()
    workers[worker]["routes"][0]["backends"][0]["state"] = state

    chat = merge_stats(workers)["routes"][0]
    assert [b["state"] for b in chat["backends"]] == [state, "up"]
    assert chat["backends"][0]["open_tunnels"] == 5, "its counts still add up"


def test_down_in_any_worker_wins_over_draining_in_another() -> None:
    for down, draining in ((1, 2), (2, 1)):
        workers = two_workers()
        workers[down]["routes"][0]["backends"][0]["state"] = "down"
        workers[draining]["routes"][0]["backends"][0]["state"] = "draining"
        assert merge_stats(workers)["routes"][0]["backends"][0]["state"] == "down", (down,)


def test_routes_and_backends_of_one_worker_only_are_kept() -> None:
    workers = two_workers()
    workers[2]["routes"][0]["backends"].append(stats_backend("c", open_tunnels=4))
    workers[2]["routes"][0]["open_tunnels"] += 4
    workers[2]["routes"].append(route("extra", stats_backend("x", tunnels_total=1)))

    merged = merge_stats(workers)
    names = {r["name"]: [b["name"] for b in r["backends"]] for r in merged["routes"]}
    assert names == {"chat": ["a", "b", "c"], "feed": ["f"], "extra": ["x"]}
    assert merged["routes"][0]["backends"][2] == stats_backend("c", open_tunnels=4)
    assert merged["routes"][0]["open_tunnels"] == 10


def test_the_workers_documents_are_left_as_they_were() -> None:
    workers = two_workers()
    before = copy.deepcopy(workers)
    merge_stats(workers)
    merge_stats(workers)
    assert workers == before


def test_one_worker_is_itself_with_prefixed_ids() -> None:
    document = two_workers()[2]
    merged = merge_stats({2: document})

    assert merged["workers"] == 1
    assert merged["routes"] == document["routes"]
    assert [t["id"] for t in merged["tunnels"]] == ["2-1", "2-3"]


def test_no_workers_is_an_empty_unhealthy_document() -> None:
    assert merge_stats({}) == {
        "workers": 0,
        "healthy": False,
        "listeners": [],
        "routes": [],
        "tunnels": [],
    }


# --- split_tunnel_id -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tunnel_id", "where"),
    [
        ("2-17", (2, "17")),
        ("1-1", (1, "1")),
        ("12-345", (12, "345")),
        ("2-1-3", (2, "1-3")),  # the first dash divides; the rest is the worker's own id
        ("0-5", (0, "5")),  # parsed; WorkersView then finds no worker 0
        ("02-7", (2, "7")),
        ("17", None),
        ("-1", None),
        ("a-1", None),
        ("2-", None),
        ("-", None),
        ("", None),
        (" 2-1", None),
        ("+2-1", None),
        ("2_1", None),
    ],
)
def test_split_tunnel_id(tunnel_id: str, where: tuple[int, str] | None) -> None:
    assert split_tunnel_id(tunnel_id) == where


def test_split_tunnel_id_refuses_a_superscript_digit() -> None:
    assert split_tunnel_id("²-1") is None
