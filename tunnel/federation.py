"""One admin view of ``workers = N`` processes: their figures merged into one document.

Each worker serves its own admin endpoints on a private Unix socket; worker 1 also serves the
public ``[admin] listen`` address, where every answer is merged from all the workers' (its own
included, through the same socket, so every worker is read the same way). The alternative,
one scrape target per worker, would leave ``/healthz`` and the stats page per process and make
every dashboard sum by hand.

Merging rules: counters, gauges and histograms of ``tunnel_*`` add up across workers (the same
labels, the sum of values), except ``tunnel_backend_up``, which is 1 only when every worker
says 1; per-process metrics (``process_*``, CPU and memory of each
worker) keep one series per worker, labelled ``worker``. Tunnel ids become ``N-id``, so
``POST /tunnels/N-id/close`` reaches worker N.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

SUMMED_PREFIX = "tunnel_"
"""Families whose samples add up across workers; every other family is per process."""
LEAST_OF = frozenset({"tunnel_backend_up"})
"""Families that are 1 for the whole only when every worker says 1: the least value wins."""
GREATEST_OF = frozenset({"tunnel_handoff_last_duration_seconds"})
"""Families where the whole is the slowest worker: every worker of a generation times the same
hand-off, so a sum would count it once per worker."""
_STATE_RANK = {"up": 0, "draining": 1, "down": 2}
"""A backend's merged state is its worst in any worker."""


def merge_metrics(expositions: Mapping[int, str]) -> bytes:
    """The workers' ``/metrics`` bodies (by worker number) as one exposition."""
    merged: dict[str, Metric] = {}
    sums: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}
    for worker, text in sorted(expositions.items()):
        for family in text_string_to_metric_families(text):
            target = merged.setdefault(
                family.name, Metric(family.name, family.documentation, family.type)
            )
            merged_across = family.name.startswith(SUMMED_PREFIX)
            least = family.name in LEAST_OF
            greatest = family.name in GREATEST_OF
            for sample in family.samples:
                labels = dict(sample.labels)
                if not merged_across:
                    labels["worker"] = str(worker)
                key = (family.name, sample.name, tuple(sorted(labels.items())))
                if merged_across and key in sums:
                    if least:
                        sums[key] = min(sums[key], sample.value)
                    elif greatest:
                        sums[key] = max(sums[key], sample.value)
                    else:
                        sums[key] += sample.value
                else:
                    sums[key] = sample.value
                    target.samples.append(sample._replace(labels=labels))
    for family in merged.values():
        family.samples = [
            sample._replace(
                value=sums[(family.name, sample.name, tuple(sorted(sample.labels.items())))]
            )
            for sample in family.samples
        ]
    return generate_latest(_Families(merged.values()))


class _Families(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


def merge_stats(documents: Mapping[int, dict[str, Any]]) -> dict[str, Any]:
    """The workers' ``/stats.json`` documents (by worker number) as one document."""
    ordered = [documents[worker] for worker in sorted(documents)]
    if not ordered:
        return {"workers": 0, "healthy": False, "listeners": [], "routes": [], "tunnels": []}
    first = ordered[0]
    routes: dict[str, dict[str, Any]] = {}
    for document in ordered:
        for route in document["routes"]:
            merged_route = routes.setdefault(
                route["name"], {**route, "open_tunnels": 0, "backends": []}
            )
            merged_route["open_tunnels"] += route["open_tunnels"]
            backends = {b["name"]: b for b in merged_route["backends"]}
            for backend in route["backends"]:
                if backend["name"] not in backends:
                    backends[backend["name"]] = dict(backend)
                    merged_route["backends"].append(backends[backend["name"]])
                    continue
                into = backends[backend["name"]]
                for field, value in backend.items():
                    if isinstance(value, int) and not isinstance(value, bool):
                        into[field] += value
                if _STATE_RANK.get(backend["state"], 0) > _STATE_RANK.get(into["state"], 0):
                    into["state"] = backend["state"]
    return {
        **first,
        "workers": len(ordered),
        "uptime": max(document["uptime"] for document in ordered),
        "healthy": all(document["healthy"] for document in ordered),
        "routes": list(routes.values()),
        "tunnels": [
            {**tunnel, "id": f"{worker}-{tunnel['id']}"}
            for worker in sorted(documents)
            for tunnel in documents[worker]["tunnels"]
        ],
    }


def split_tunnel_id(tunnel_id: str) -> tuple[int, str] | None:
    """``"2-17"`` → (2, ``"17"``): which worker holds the tunnel, and its id there."""
    worker, sep, local = tunnel_id.partition("-")
    if not sep or not (worker.isascii() and worker.isdigit()) or not local:
        return None
    return int(worker), local
