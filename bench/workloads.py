"""The workloads: one run of the C load generator against one peer, measured from outside.

Each run goes: the load generator opens its tunnels and says ``ready``; the harness samples the
proxy's CPU time (and RSS); it says ``go``; the load generator measures and prints its result;
the harness samples again before the load generator closes its connections. So set-up and
tear-down of the tunnels never count in the per-message or per-byte figures.

Against a peer that terminates TLS (``Running.tls``) the load generator runs with ``--tls``: every
connection starts with a full TLS handshake, which the upgrade workload therefore includes.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import procs
from bench.peers import Running

WORKLOADS = ("upgrade", "echo", "latency", "latency10", "bulk", "bulk1", "idle")
LOADGEN_BUSY = 0.90
"""Above this fraction of one core, the load generator (not the proxy) may be the limit."""
GRACE_SECONDS = 20.0
MiB = 1024 * 1024
GiB = 1024 * MiB


@dataclass(frozen=True)
class Plan:
    """How big each workload is. ``seconds`` bound every run; counts bound them too."""

    name: str
    repeat: int
    upgrade_conns: int
    upgrade_seconds: float
    echo_conns: int
    echo_seconds: float
    latency_rate: float
    latency_seconds: float
    bulk_conns: int
    bulk_chunk: int
    bulk_bytes: int
    bulk_seconds: float
    idle_tunnels: int
    idle_setup_seconds: float
    settle_seconds: float
    message_size: int = 64
    latency10_conns: int = 10
    """``latency10``: the same total rate as ``latency`` over fewer connections (200 msg/s each
    at 2,000 msg/s), so each wake-up of the proxy finds about one message."""
    bulk1_conns: int = 1
    """``bulk1``: one connection, so a relay's per-connection choices (copy or splice, pipe
    sizes) are measured on their own, without other flows to batch with."""


PLANS = {
    "full": Plan(
        name="full",
        repeat=3,
        upgrade_conns=32,
        upgrade_seconds=5.0,
        echo_conns=50,
        echo_seconds=5.0,
        latency_rate=2000.0,
        latency_seconds=5.0,
        bulk_conns=4,
        bulk_chunk=64 * 1024,
        bulk_bytes=8 * GiB,
        bulk_seconds=5.0,
        idle_tunnels=5000,
        idle_setup_seconds=60.0,
        settle_seconds=1.0,
    ),
    "quick": Plan(
        name="quick",
        repeat=1,
        upgrade_conns=32,
        upgrade_seconds=2.0,
        echo_conns=50,
        echo_seconds=2.0,
        latency_rate=2000.0,
        latency_seconds=2.0,
        bulk_conns=4,
        bulk_chunk=64 * 1024,
        bulk_bytes=2 * GiB,
        bulk_seconds=2.0,
        idle_tunnels=1000,
        idle_setup_seconds=30.0,
        settle_seconds=0.5,
    ),
    # Tiny, for tests/test_bench.py; still long enough (0.3 s) for the proxies' CPU time, which
    # /proc counts in 10 ms ticks, to be well above zero.
    "smoke": Plan(
        name="smoke",
        repeat=1,
        upgrade_conns=8,
        upgrade_seconds=0.3,
        echo_conns=10,
        echo_seconds=0.3,
        latency_rate=2000.0,
        latency_seconds=0.3,
        bulk_conns=2,
        bulk_chunk=64 * 1024,
        bulk_bytes=1 * GiB,
        bulk_seconds=0.3,
        idle_tunnels=200,
        idle_setup_seconds=15.0,
        settle_seconds=0.2,
        latency10_conns=4,  # fewer than echo_conns, so the two latency rows stay distinct
    ),
}


@dataclass
class Sample:
    """One run of one workload against one peer."""

    peer: str
    workload: str
    repetition: int
    metrics: dict[str, float] = field(default_factory=dict)
    loadgen: dict[str, Any] = field(default_factory=dict)
    proxy_cpu_seconds: float | None = None
    backend_cpu_seconds: float = 0.0
    machine_cpu_seconds: float | None = None
    """Busy core-seconds of the whole machine over the measured phase (/proc/stat): the proxy,
    the load generator, the backend, the kernel's softirq work, and anything else running."""
    unattributed_cpu_seconds: float | None = None
    """The machine's busy time that none of the proxy, the backend and the load generator was
    charged with (kernel threads, interrupts charged to no process, other jobs): a diagnostic,
    never subtracted."""
    loadgen_cpu: float = 0.0
    """The load generator's CPU time over the measured phase, as a fraction of one core."""
    errors: int = 0
    mismatches: int = 0
    problems: list[str] = field(default_factory=list)
    failure: str | None = None

    @property
    def loadgen_busy(self) -> bool:
        return self.loadgen_cpu > LOADGEN_BUSY


class WorkloadError(RuntimeError):
    """The load generator failed or did not answer in time."""


@dataclass
class Target:
    """What a run needs: the loadgen binary, the peer under test and the backend process."""

    loadgen: Path
    peer: Running
    backend: procs.Managed


def _parse(line: str | None, what: str, popen: subprocess.Popen[bytes]) -> dict[str, Any]:
    if line is None:
        raise WorkloadError(f"load generator gave no {what} line (exit status {popen.poll()})")
    try:
        value: dict[str, Any] = json.loads(line)
    except json.JSONDecodeError as error:
        raise WorkloadError(f"load generator printed {line!r} instead of JSON") from error
    return value


def drive(
    target: Target,
    mode: str,
    flags: list[str],
    *,
    setup_seconds: float,
    seconds: float,
    on_ready: Callable[[dict[str, Any]], None],
    on_result: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """Run the load generator in ``--sync`` mode: ready → on_ready → go → result → on_result →
    close. Every wait has a deadline; on failure the load generator (our child) is killed."""
    argv = [str(target.loadgen), mode, "--port", str(target.peer.port), "--sync", *flags]
    if target.peer.tls:
        argv.append("--tls")
    popen = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert popen.stdin is not None
    assert popen.stdout is not None
    reader = procs.LineReader(popen.stdout.fileno())
    try:
        ready = _parse(reader.readline(setup_seconds + GRACE_SECONDS), "ready", popen)
        on_ready(ready)
        if mode == "idle":
            popen.stdin.close()  # ends the hold
        else:
            popen.stdin.write(b"go\n")
            popen.stdin.flush()
        result = _parse(reader.readline(seconds + GRACE_SECONDS), "result", popen)
        result["ready"] = ready
        on_result(result)
        return result
    finally:
        with contextlib.suppress(BrokenPipeError):
            popen.stdin.close()
        try:
            popen.wait(GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            popen.send_signal(signal.SIGKILL)  # our own child, by its Popen PID
            popen.wait()
        reader.close()
        if popen.stderr is not None:
            popen.stderr.close()


def _counts(sample: Sample, result: dict[str, Any]) -> None:
    ready = result.get("ready", {})
    sample.errors = int(result.get("errors", 0)) + int(ready.get("errors", 0))
    sample.errors += int(result.get("dropped", 0)) + int(result.get("lost", 0))
    sample.mismatches = int(result.get("mismatches", 0))
    sample.loadgen_cpu = float(result.get("cpu_frac", 0.0))
    sample.loadgen = result


def measured(
    target: Target,
    sample: Sample,
    mode: str,
    flags: list[str],
    *,
    setup_seconds: float,
    seconds: float,
) -> dict[str, Any]:
    """``drive`` with the proxy's and the backend's CPU time sampled around the measured phase."""
    before: dict[str, float] = {}

    def on_ready(_: dict[str, Any]) -> None:
        before["proxy"] = procs.cpu_seconds(target.peer.pids())
        before["backend"] = procs.cpu_seconds([target.backend.pid])
        before["machine"] = procs.machine_cpu_seconds()

    def on_result(_: dict[str, Any]) -> None:
        sample.machine_cpu_seconds = procs.machine_cpu_seconds() - before["machine"]
        if target.peer.process is not None:
            sample.proxy_cpu_seconds = procs.cpu_seconds(target.peer.pids()) - before["proxy"]
        sample.backend_cpu_seconds = procs.cpu_seconds([target.backend.pid]) - before["backend"]

    result = drive(
        target,
        mode,
        flags,
        setup_seconds=setup_seconds,
        seconds=seconds,
        on_ready=on_ready,
        on_result=on_result,
    )
    _counts(sample, result)
    if sample.machine_cpu_seconds is not None:
        charged = (sample.proxy_cpu_seconds or 0.0) + sample.backend_cpu_seconds
        charged += float(result.get("cpu_seconds", 0.0))
        sample.unattributed_cpu_seconds = sample.machine_cpu_seconds - charged
    return result


def _per(total: float | None, count: float, scale: float) -> float | None:
    if total is None or count <= 0:
        return None
    return total / count * scale


def _per_unit(sample: Sample, proxy_key: str, machine_key: str, count: float, scale: float) -> None:
    """The proxy's CPU and the whole machine's, each divided by the units of work done."""
    for key, total in (
        (proxy_key, sample.proxy_cpu_seconds),
        (machine_key, sample.machine_cpu_seconds),
    ):
        value = _per(total, count, scale)
        if value is not None:
            sample.metrics[key] = value


def run_upgrade(target: Target, plan: Plan, sample: Sample) -> None:
    flags = ["--conns", str(plan.upgrade_conns), "--seconds", str(plan.upgrade_seconds)]
    result = measured(
        target, sample, "upgrade", flags, setup_seconds=0, seconds=plan.upgrade_seconds
    )
    count = float(result["count"])
    sample.metrics["upgrade_rate"] = float(result["rate"])
    sample.metrics["upgrade_p50_us"] = float(result["p50_us"])
    sample.metrics["upgrade_p99_us"] = float(result["p99_us"])
    _per_unit(sample, "upgrade_cpu_us", "upgrade_machine_cpu_us", count, 1e6)


def _echo_flags(plan: Plan, seconds: float, conns: int | None = None) -> list[str]:
    return [
        "--conns",
        str(plan.echo_conns if conns is None else conns),
        "--size",
        str(plan.message_size),
        "--seconds",
        str(seconds),
        "--setup-seconds",
        str(plan.idle_setup_seconds),
    ]


def run_echo(target: Target, plan: Plan, sample: Sample) -> None:
    flags = _echo_flags(plan, plan.echo_seconds)
    result = measured(
        target,
        sample,
        "echo",
        flags,
        setup_seconds=plan.idle_setup_seconds,
        seconds=plan.echo_seconds,
    )
    sample.metrics["echo_rate"] = float(result["rate"])
    _per_unit(sample, "echo_cpu_us", "echo_machine_cpu_us", float(result["count"]), 1e6)


def run_latency(
    target: Target, plan: Plan, sample: Sample, conns: int | None = None, prefix: str = "latency"
) -> None:
    """Open loop at ``latency_rate`` messages/s in total, over ``echo_conns`` connections (or
    ``conns``); metrics are named ``<prefix>_*``."""
    flags = [*_echo_flags(plan, plan.latency_seconds, conns), "--rate", str(plan.latency_rate)]
    result = measured(
        target,
        sample,
        "echo",
        flags,
        setup_seconds=plan.idle_setup_seconds,
        seconds=plan.latency_seconds + 2.0,  # the load generator waits up to 2 s for stragglers
    )
    sample.metrics[f"{prefix}_p50_us"] = float(result["p50_us"])
    sample.metrics[f"{prefix}_p99_us"] = float(result["p99_us"])
    sample.metrics[f"{prefix}_rate"] = float(result["rate"])
    count = float(result["count"])
    _per_unit(sample, f"{prefix}_cpu_us", f"{prefix}_machine_cpu_us", count, 1e6)


def run_latency10(target: Target, plan: Plan, sample: Sample) -> None:
    run_latency(target, plan, sample, plan.latency10_conns, "latency10")


def run_bulk(
    target: Target, plan: Plan, sample: Sample, conns: int | None = None, prefix: str = "bulk"
) -> None:
    """Chunks echoed over ``bulk_conns`` connections (or ``conns``); metrics ``<prefix>_*``."""
    flags = [
        "--conns",
        str(plan.bulk_conns if conns is None else conns),
        "--chunk",
        str(plan.bulk_chunk),
        "--window",
        str(4 * plan.bulk_chunk),
        "--bytes",
        str(plan.bulk_bytes),
        "--seconds",
        str(plan.bulk_seconds),
    ]
    result = measured(
        target,
        sample,
        "bulk",
        flags,
        setup_seconds=plan.idle_setup_seconds,
        seconds=plan.bulk_seconds,
    )
    sample.metrics[f"{prefix}_mb_s"] = float(result["mb_per_s"])
    sample.metrics[f"{prefix}_bytes"] = float(result["bytes"])
    sent = float(result["bytes"])
    _per_unit(sample, f"{prefix}_cpu_s_per_gib", f"{prefix}_machine_cpu_s_per_gib", sent, GiB)


def run_bulk1(target: Target, plan: Plan, sample: Sample) -> None:
    run_bulk(target, plan, sample, plan.bulk1_conns, "bulk1")


def run_idle(target: Target, plan: Plan, sample: Sample) -> None:
    """RSS of the proxy with ``idle_tunnels`` open minus its RSS just before, per tunnel."""
    rss: dict[str, int] = {}

    def on_ready(ready: dict[str, Any]) -> None:
        time.sleep(plan.settle_seconds)  # let the proxy finish its bookkeeping
        rss["with"] = procs.rss_kib(target.peer.pids())

    rss["before"] = procs.rss_kib(target.peer.pids())
    flags = [
        "--conns",
        str(plan.idle_tunnels),
        "--seconds",
        str(plan.idle_setup_seconds),
        "--parallel",
        "128",
    ]
    result = drive(
        target,
        "idle",
        flags,
        setup_seconds=plan.idle_setup_seconds,
        seconds=plan.idle_setup_seconds,
        on_ready=on_ready,
        on_result=lambda _: None,
    )
    _counts(sample, result)
    opened = int(result["ready"]["open"])
    if opened < plan.idle_tunnels:
        sample.errors += plan.idle_tunnels - opened
    sample.metrics["idle_open"] = float(opened)
    sample.metrics["idle_setup_seconds"] = float(result["ready"]["setup_seconds"])
    sample.metrics["idle_rss_before_kib"] = float(rss["before"])
    sample.metrics["idle_rss_with_kib"] = float(rss["with"])
    if opened > 0:
        sample.metrics["idle_rss_kib"] = (rss["with"] - rss["before"]) / opened


RUNNERS: dict[str, Callable[[Target, Plan, Sample], None]] = {
    "upgrade": run_upgrade,
    "echo": run_echo,
    "latency": run_latency,
    "latency10": run_latency10,
    "bulk": run_bulk,
    "bulk1": run_bulk1,
    "idle": run_idle,
}


def run(target: Target, plan: Plan, workload: str, repetition: int) -> Sample:
    """One measured run; a failure is recorded in the sample, never raised."""
    sample = Sample(target.peer.name, workload, repetition)
    try:
        RUNNERS[workload](target, plan, sample)
    except (WorkloadError, OSError, KeyError, ValueError) as error:
        sample.failure = f"{type(error).__name__}: {error}"
    sample.problems = target.peer.problems()
    return sample


def warm_up(loadgen: Path, port: int, tls: bool = False) -> None:
    """A few upgrades and messages, so that first-use costs (imports, caches) are not measured."""
    for argv in (
        ["upgrade", "--conns", "8", "--count", "64", "--seconds", "5"],
        ["echo", "--conns", "8", "--count", "400", "--seconds", "5", "--setup-seconds", "5"],
    ):
        subprocess.run(
            [str(loadgen), argv[0], "--port", str(port), *argv[1:], *(["--tls"] if tls else [])],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
            check=False,
        )
