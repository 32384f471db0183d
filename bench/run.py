"""One benchmark session: build, start the backend and the peers, run every workload K times,
stop everything. Returns the samples; ``bench.report`` turns them into the table."""

from __future__ import annotations

import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

from bench import build, peers, procs, workloads
from bench.workloads import PLANS, WORKLOADS, Plan, Sample, Target

RESULTS_DIR = Path(__file__).resolve().parent / "results"
Say = Callable[[str], None]


def say_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Options:
    against: tuple[str, ...] = ("nginx", "haproxy", "haproxy-splice")
    relay: str = "auto"
    workers: int = 1
    plan: str = "full"
    repeat: int | None = None
    only: tuple[str, ...] = WORKLOADS
    out: Path = RESULTS_DIR
    scaling: bool = False
    tls: bool = False
    """Clients reach every proxy over TLS (wss://); the backend side stays plain."""
    haproxy_pipesize: int = peers.HAPROXY_PIPESIZE
    """``tune.pipesize`` of the ``haproxy-splice`` peer (0: HAProxy's default)."""

    def effective_plan(self) -> Plan:
        plan = PLANS[self.plan]
        return replace(plan, repeat=self.repeat) if self.repeat is not None else plan


@dataclass
class Session:
    """Everything a session measured, plus what it could not."""

    options: Options
    plan: Plan
    started: float
    finished: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    peers: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    configs: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    binaries: build.Binaries | None = None
    scaling: dict[str, Any] = field(default_factory=dict)
    source_at_start: dict[str, str | bool] = field(default_factory=dict)
    background_cores: float | None = None
    """How many cores the machine kept busy just before the session, with none of the session's
    processes running: other jobs, whose CPU the machine-wide rows cannot tell apart."""


@contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C: unwind, so every process started here gets stopped."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


BACKGROUND_SECONDS = {"full": 2.0, "quick": 1.0, "smoke": 0.2}


def background_cores(seconds: float) -> float:
    """Busy cores of the whole machine over ``seconds`` (/proc/stat), measured while this session
    runs nothing."""
    before, started = procs.machine_cpu_seconds(), time.monotonic()
    time.sleep(seconds)
    return (procs.machine_cpu_seconds() - before) / (time.monotonic() - started)


def start_backend(binary: Path, workdir: Path) -> tuple[procs.Managed, int]:
    backend = procs.start(
        "echo_backend", [str(binary), "--port", "0"], workdir / "backend.log", capture_stdout=True
    )
    assert backend.stdout is not None
    line = backend.stdout.readline(10.0)
    if line is None or not line.startswith("listening "):
        backend.stop()
        raise procs.ProcessError(f"echo_backend did not start: {line!r} {backend.log_tail()}")
    return backend, int(line.split()[1])


def _start_peer(
    name: str, workdir: Path, settings: peers.Settings, session: Session, loadgen: Path
) -> peers.Running | None:
    try:
        running = peers.start(name, workdir, settings)
    except procs.ProcessError as error:
        session.skipped[name] = "failed to start: " + " / ".join(str(error).splitlines())
        return None
    try:
        workloads.warm_up(loadgen, running.port, running.tls)
    except BaseException:
        # Not yet in the caller's list of started peers: stop it here, or it outlives the run.
        running.stop()
        raise
    return running


def run(options: Options, say: Say = say_to_stderr) -> Session:
    """Run the session ``options`` describe; every process started here is stopped on return."""
    plan = options.effective_plan()
    session = Session(options, plan, time.time(), source_at_start=peers.tunnel_source())
    hard = procs.raise_nofile_limit()[1]
    session.background_cores = background_cores(BACKGROUND_SECONDS[plan.name])
    session.binaries = binaries = build.build()
    if options.tls and binaries.tls_missing is not None:
        session.skipped["tls"] = binaries.tls_missing
        say(f"bench: skipped: {binaries.tls_missing}")
        session.finished = time.time()
        return session
    workdir = Path(tempfile.mkdtemp(prefix="tunnel-bench-"))
    started: list[peers.Running] = []
    backend: procs.Managed | None = None
    try:
        with _stop_on_sigterm():
            backend, backend_port = start_backend(binaries.echo_backend, workdir)
            settings = peers.Settings(
                backend_port=backend_port,
                workers=options.workers,
                relay=options.relay,
                idle_tunnels=plan.idle_tunnels,
                nofile=hard,
                tls=peers.make_certificates(workdir / "tls") if options.tls else None,
                haproxy_pipesize=options.haproxy_pipesize,
            )
            if options.scaling:
                _scaling(session, settings, backend, workdir, say)
            else:
                _compare(session, settings, backend, workdir, started, say)
    finally:
        for running in started:
            session.notes += running.stop()
        if backend is not None:
            session.notes += backend.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        session.finished = time.time()
    return session


def _compare(
    session: Session,
    settings: peers.Settings,
    backend: procs.Managed,
    workdir: Path,
    started: list[peers.Running],
    say: Say,
) -> None:
    options, plan = session.options, session.plan
    assert session.binaries is not None
    loadgen = session.binaries.loadgen
    lineup: list[peers.Running] = [peers.direct(settings.backend_port)]
    generation = 0
    for name in ("tunnel", *options.against):
        reason = peers.missing_reason(name)
        if reason is not None:
            session.skipped[name] = reason
            say(f"bench: skipping {name}: {reason}")
            continue
        say(f"bench: starting {name}")
        running = _start_peer(name, workdir / f"{name}-{generation}", settings, session, loadgen)
        if running is None:
            say(f"bench: skipping {name}: {session.skipped[name]}")
            continue
        started.append(running)
        lineup.append(running)
        session.configs[name] = running.config_text
    session.peers = [running.name for running in lineup]
    selected = [w for w in WORKLOADS if w in options.only]
    for repetition in range(plan.repeat):
        shift = repetition % len(lineup)  # rotate who goes first, to spread drift evenly
        order = lineup[shift:] + lineup[:shift]
        for workload in selected:
            for running in order:
                if workload == "idle" and running.process is None:
                    continue  # "direct" has no proxy whose memory to measure
                if workload == "idle":  # a fresh process, so earlier runs' memory is not reused
                    generation += 1
                    name = running.name
                    session.notes += running.stop()
                    started.remove(running)
                    fresh = _start_peer(
                        name, workdir / f"{name}-{generation}", settings, session, loadgen
                    )
                    if fresh is None:
                        reason = session.skipped.pop(name)
                        say(f"bench: {name} did not restart: {reason}")
                        session.notes.append(f"{name} did not restart for the idle test: {reason}")
                        lineup.remove(running)
                        continue
                    started.append(fresh)
                    lineup[lineup.index(running)] = fresh
                    running = fresh
                say(
                    f"bench: [{repetition + 1}/{plan.repeat}] {workload:8} {running.name}",
                )
                target = Target(loadgen, running, backend)
                sample = workloads.run(target, plan, workload, repetition)
                session.samples.append(sample)
                _report_sample(sample, say)


def _report_sample(sample: Sample, say: Say) -> None:
    if sample.failure:
        say(f"bench:   FAILED: {sample.failure}")
    shown = {k: round(v, 2) for k, v in sample.metrics.items()}
    say(
        f"bench:   {shown} errors={sample.errors} mismatches={sample.mismatches}"
        f" loadgen_cpu={sample.loadgen_cpu:.0%}"
    )
    for line in sample.problems[:3]:
        say(f"bench:   log: {line}")


def _scaling(
    session: Session,
    settings: peers.Settings,
    backend: procs.Managed,
    workdir: Path,
    say: Say,
) -> None:
    """The upgrade workload against tunnel with workers = 1, then workers = 2."""
    assert session.binaries is not None
    loadgen = session.binaries.loadgen
    plan = session.plan
    result: dict[str, Any] = {"workers": [1, 2]}
    for workers in (1, 2):
        label = f"tunnel w{workers}"
        say(f"bench: starting {label}")
        try:
            running = peers.start_tunnel(
                workdir / f"scaling-{workers}", replace(settings, workers=workers), label
            )
        except procs.ProcessError as error:
            result[label] = {"supported": False, "reason": f"did not start: {error}"}
            say(f"bench: {label} did not start: {error}")
            continue
        try:
            workloads.warm_up(loadgen, running.port, running.tls)
            processes = len(running.pids())
            session.configs[label] = running.config_text
            session.peers.append(label)
            supported = workers == 1 or processes > 1
            entry: dict[str, Any] = {"processes": processes, "supported": supported}
            if not supported:
                entry["reason"] = (
                    f"server.workers = {workers} was accepted but only {processes} process runs; "
                    "multi-process workers are not working in this build"
                )
                say(f"bench: {label}: {entry['reason']}")
            result[label] = entry
            for repetition in range(plan.repeat):
                say(f"bench: [{repetition + 1}/{plan.repeat}] upgrade  {label}")
                target = Target(loadgen, running, backend)
                sample = workloads.run(target, plan, "upgrade", repetition)
                session.samples.append(sample)
                _report_sample(sample, say)
        finally:
            session.notes += running.stop()
    session.scaling = result
