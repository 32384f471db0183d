"""``python -m bench.hostile``: two hostile loads against a tunnel process, with figures.

Both run over loopback against ``python -m tunnel run`` in front of the C echo backend, driven
by trio: the slow clients from a child process of their own (so that their event loop does not
delay the normal client's), everything else from this one.

- **slowloris**: the tunnel runs with a soft ``RLIMIT_NOFILE`` of ``NOFILE``; ``SLOW_CLIENTS``
  clients connect, send a request head a few bytes a second that never ends, and reconnect as
  soon as they are closed. Meanwhile a normal client makes ``ATTEMPTS`` upgrade attempts spread
  over about 20 s, each bounded by ``ATTEMPT_TIMEOUT``. Figures: its successes and time to 101,
  connections shed (``tunnel_handshakes_shed_total``) and ``accept failed`` log lines. Three
  strategies: ``uncapped`` (``max_handshakes`` far above the descriptor limit, as before the
  bound), ``shed-oldest`` (the tree as it is) and ``close-new`` (a copy of ``git archive HEAD``
  whose ``Handshakes.enter`` closes the new connection instead of shedding the oldest).
- **headers**: ``rate`` requests a second, each on its own connection, of a 30 KB head of 5,000
  tiny fields, while a normal client measures its time to 101 every 100 ms; figures are that
  client's median and p99 and the tunnel's CPU (``/proc/PID/stat``), with ``max_headers`` at its
  default and lifted to 10,000 (the cost the bound saves).

Every figure printed is the median over ``--runs`` runs (3 by default) of that run's figure.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event as EventType
from pathlib import Path

import trio

from bench import build, procs
from bench.peers import REPO_DIR

NOFILE = 256
SLOW_CLIENTS = 400
SLOW_HEAD = b"GET /slow HTTP/1.1\r\nHost: victim.example\r\nX-Slow: "
SLOW_CHUNK = 4
"""Bytes a slow client sends each second (the head then continues with ``a`` forever)."""
SLOW_PERIOD = 1.0
CONNECT_TIMEOUT = 5.0
WARMUP = 3.0
"""Seconds of attack before the normal client's first attempt (every slot is taken by then)."""
ATTEMPTS = 4
ATTEMPT_EVERY = 6.0
ATTEMPT_TIMEOUT = 10.0
ATTACK_SECONDS = WARMUP + ATTEMPTS * ATTEMPT_EVERY + ATTEMPT_TIMEOUT + 30.0
"""Bound on the attacker process, should the parent never tell it to stop."""
STOP_SECONDS = 10.0
COUNT_EVERY = 0.5
"""How often the attacker process publishes how many connections its slow clients made."""
UNCAPPED = 100_000
"""``max_handshakes`` for the strategy without a bound (far above ``NOFILE``)."""

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
"""RFC 6455's example key and its accept value."""
FLOOD_FIELDS = 5_000
FLOOD_HEAD = (
    b"GET /flood HTTP/1.1\r\nHost: victim.example\r\n" + b"ab:c\r\n" * FLOOD_FIELDS + b"\r\n"
)
"""About 30 KB: under the default ``max_header_bytes`` (32 KiB), so only the field count stops
it."""
FLOOD_RATES = (0, 77, 300)
FLOOD_SECONDS = 10.0
PROBE_EVERY = 0.1
REPLY_TIMEOUT = 10.0
MAX_IN_FLIGHT = 500
"""Flood requests outstanding at once; a request due beyond that is counted as not sent."""
LIFTED_HEADERS = 10_000
START_SECONDS = 20.0
START_TRIES = 3
SUITES = ("slowloris", "headers")


# --- processes -------------------------------------------------------------------------------


def start_backend(work: Path) -> tuple[procs.Managed, int]:
    """The C echo backend on a free loopback port, and that port."""
    binaries = build.build()
    backend = procs.start(
        "echo_backend",
        [str(binaries.echo_backend), "--host", procs.LOOPBACK, "--port", "0"],
        work / "backend.log",
        capture_stdout=True,
    )
    assert backend.stdout is not None
    line = backend.stdout.readline(START_SECONDS) or ""
    if not line.startswith("listening "):
        backend.stop()
        raise procs.ProcessError(f"echo backend did not start: {line!r}")
    return backend, int(line.split()[1])


@dataclass(frozen=True)
class Running:
    tunnel: procs.Managed
    port: int
    admin_port: int


def tunnel_config(port: int, admin_port: int, backend_port: int, server: str = "") -> str:
    return f"""\
[server]
{server}
[admin]
listen = "{procs.LOOPBACK}:{admin_port}"

[[listeners]]
listen = "{procs.LOOPBACK}:{port}"

[[routes]]
name = "echo"
backends = [ {{ name = "echo", url = "ws://{procs.LOOPBACK}:{backend_port}" }} ]
"""


def _limit_nofile(soft: int) -> Callable[[], None]:
    def limit() -> None:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return limit


def start_tunnel(
    tree: Path, work: Path, backend_port: int, server: str = "", nofile: int | None = None
) -> Running:
    """``python -m tunnel run`` from ``tree`` (its own ``tunnel`` package first on the path),
    with ``server`` lines in ``[server]`` and, given ``nofile``, that soft descriptor limit.
    A port taken between ``free_port`` and the bind is picked again (``START_TRIES`` times)."""
    for tries_left in reversed(range(START_TRIES)):
        port, admin_port = procs.free_port(), procs.free_port()
        home = Path(tempfile.mkdtemp(prefix="tunnel-", dir=work))  # a log of its own
        config = home / "tunnel.toml"
        config.write_text(tunnel_config(port, admin_port, backend_port, server))
        with (home / "tunnel.log").open("ab") as log:
            popen = subprocess.Popen(
                [sys.executable, "-m", "tunnel", "run", "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=tree,
                env={**os.environ, "PYTHONPATH": str(tree), "PYTHONUNBUFFERED": "1"},
                start_new_session=True,
                preexec_fn=None if nofile is None else _limit_nofile(nofile),
            )
        tunnel = procs.Managed("tunnel", popen, home / "tunnel.log")
        try:
            for probe in (port, admin_port):
                procs.wait_until(tunnel, partial(procs.port_accepts, probe), START_SECONDS, "port")
        except procs.ProcessError as error:
            tunnel.stop()
            if tries_left and "Address already in use" in str(error):
                continue
            raise
        return Running(tunnel, port, admin_port)
    raise AssertionError("unreachable: the last try returns or raises")


def metric(admin_port: int, name: str) -> float:
    """One unlabelled sample of ``/metrics``."""
    url = f"http://{procs.LOOPBACK}:{admin_port}/metrics"
    with urllib.request.urlopen(url, timeout=REPLY_TIMEOUT) as answer:
        text = answer.read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise LookupError(f"{name} not in /metrics")


def accept_failures(log_path: Path) -> int:
    """``accept failed`` lines (the listener's and the admin listener's) in the tunnel's log."""
    return log_path.read_text(errors="replace").count("accept failed")


def nofile_soft(pid: int) -> int:
    for row in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if row.startswith("Max open files"):
            return int(row.split()[3])
    raise LookupError(f"no Max open files in /proc/{pid}/limits")


@dataclass(frozen=True)
class Patch:
    """One line of a module of the copy, replaced."""

    module: str
    old: str
    new: str


CLOSE_NEW = Patch(
    "tunnel/net/handshakes.py",
    "if len(self._open) >= self.limit and not self._shed_oldest():",
    "if len(self._open) >= self.limit:",
)
"""``Handshakes.enter`` closes the new connection at the bound instead of shedding the oldest."""
ACCEPT_BATCH = Patch(
    "tunnel/net/listener.py",
    "            while True:\n"
    "                try:\n"
    "                    sock, peer = accepting.accept()",
    "            for _ in range(16):\n"
    "                try:\n"
    "                    sock, peer = accepting.accept()",
)
"""``accept_loop`` takes at most 16 connections a wake-up, so handlers run ``Handshakes.enter``
(and shed) before the next ones hold descriptors."""


@dataclass(frozen=True)
class Strategy:
    name: str
    server: str = ""
    patches: tuple[Patch, ...] = ()


STRATEGIES = {
    s.name: s
    for s in (
        Strategy("uncapped", f"max_handshakes = {UNCAPPED}"),
        Strategy("shed-oldest"),
        Strategy("close-new", patches=(CLOSE_NEW,)),
        Strategy("shed-oldest+batch", patches=(ACCEPT_BATCH,)),
        Strategy("close-new+batch", patches=(CLOSE_NEW, ACCEPT_BATCH)),
    )
}
"""``uncapped`` is the bound's absence; ``shed-oldest`` the tree as it is; the others run from
a patched copy of ``git archive HEAD``."""


def patched_tree(work: Path, strategy: Strategy) -> Path:
    """This repository as it is when ``strategy`` patches nothing, else a patched copy of
    ``git archive HEAD`` under ``work``."""
    if not strategy.patches:
        return REPO_DIR
    tree = work / strategy.name
    tree.mkdir()
    archive = subprocess.run(
        ["git", "archive", "HEAD"], cwd=REPO_DIR, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    for patch in strategy.patches:
        module = tree / patch.module
        source = module.read_text()
        if source.count(patch.old) != 1:
            raise RuntimeError(f"{module}: the text to patch is not there once: {patch.old!r}")
        module.write_text(source.replace(patch.old, patch.new))
    return tree


# --- clients ---------------------------------------------------------------------------------


def upgrade_head(port: int) -> bytes:
    return (
        f"GET / HTTP/1.1\r\nHost: {procs.LOOPBACK}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY.decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


@dataclass(frozen=True)
class Attempt:
    seconds: float
    """From the connect to the end of the 101 (or to the failure)."""
    outcome: str
    """``101``, another status line, or what went wrong."""

    @property
    def ok(self) -> bool:
        return self.outcome == "101"


async def _send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[await sock.send(view) :]


async def _read_head(sock: trio.socket.SocketType) -> bytes:
    reply = b""
    while b"\r\n\r\n" not in reply:
        chunk = await sock.recv(4096)
        if not chunk:
            raise EOFError(f"EOF after {len(reply)} bytes")
        reply += chunk
    return reply


async def upgrade(port: int, limit: float = ATTEMPT_TIMEOUT) -> Attempt:
    """One upgrade by a normal client: connect, the whole head at once, the 101 checked."""
    started = trio.current_time()
    outcome = "timeout"
    with trio.move_on_after(limit), trio.socket.socket() as sock:
        try:
            await sock.connect((procs.LOOPBACK, port))
            await _send_all(sock, upgrade_head(port))
            reply = await _read_head(sock)
        except (OSError, EOFError) as error:
            outcome = type(error).__name__
        else:
            status = reply.split(b"\r\n", 1)[0].decode("latin-1")
            if not status.startswith("HTTP/1.1 101 "):
                outcome = status
            elif b"Sec-WebSocket-Accept: " + ACCEPT + b"\r\n" not in reply:
                outcome = "101 with a wrong Sec-WebSocket-Accept"
            else:
                outcome = "101"
    return Attempt(trio.current_time() - started, outcome)


async def slow_client(port: int, connections: list[int]) -> None:
    """Connect, send the never-ending head ``SLOW_CHUNK`` bytes a second, reconnect as soon as
    the tunnel closes the connection (or answers it); runs until cancelled."""
    while True:
        with trio.socket.socket() as sock:
            try:
                with trio.fail_after(CONNECT_TIMEOUT):
                    await sock.connect((procs.LOOPBACK, port))
            except (OSError, trio.TooSlowError):
                await trio.sleep(SLOW_PERIOD)
                continue
            connections[0] += 1
            head = SLOW_HEAD
            try:
                while True:
                    chunk, head = head[:SLOW_CHUNK], head[SLOW_CHUNK:] or b"a" * SLOW_CHUNK
                    await sock.send(chunk)
                    with trio.move_on_after(SLOW_PERIOD):
                        await sock.recv(4096)  # any answer or EOF: the tunnel is done with us
                        break
            except OSError:
                pass


@dataclass(frozen=True)
class SlowlorisResult:
    strategy: str
    attempts: tuple[Attempt, ...]
    shed: float
    accept_failures: int
    attack_connections: int
    nofile: int
    """The tunnel process's soft descriptor limit as /proc read it."""
    alive: bool

    @property
    def successes(self) -> int:
        return sum(attempt.ok for attempt in self.attempts)

    @property
    def times_to_101(self) -> list[float]:
        return [attempt.seconds for attempt in self.attempts if attempt.ok]


async def _attack(port: int, clients: int, stop: EventType, made: Synchronized[int]) -> None:
    """Run ``clients`` slow clients until ``stop`` is set (at most ``ATTACK_SECONDS``),
    counting the connections they made in ``made`` as they go (a loaded machine may kill
    this process before it has stopped its clients: the count must not be lost then)."""
    connections = [0]

    async def count() -> None:
        while True:
            made.value = connections[0]
            await trio.sleep(COUNT_EVERY)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(count)
        for _ in range(clients):
            nursery.start_soon(slow_client, port, connections)
            await trio.sleep(WARMUP / 3 / clients)
        await trio.to_thread.run_sync(stop.wait, ATTACK_SECONDS)
        made.value = connections[0]
        nursery.cancel_scope.cancel()


def _attacker(port: int, clients: int, stop: EventType, made: Synchronized[int]) -> None:
    trio.run(_attack, port, clients, stop, made)


async def _attempts(port: int) -> tuple[Attempt, ...]:
    """The normal client's attempts, ``ATTEMPT_EVERY`` apart after the warm-up."""
    attempts: list[Attempt | None] = [None] * ATTEMPTS

    async def attempt(index: int) -> None:
        await trio.sleep(WARMUP + index * ATTEMPT_EVERY)
        attempts[index] = await upgrade(port)

    async with trio.open_nursery() as nursery:
        for index in range(ATTEMPTS):
            nursery.start_soon(attempt, index)
    return tuple(a for a in attempts if a is not None)


def _under_attack(port: int, clients: int) -> tuple[tuple[Attempt, ...], int]:
    """The normal client's attempts (this process) while the slow clients run in a child
    process of their own, so that their event loop does not delay the normal client's."""
    context = multiprocessing.get_context("fork")
    stop = context.Event()
    made = context.Value("q", 0)
    attacker = context.Process(target=_attacker, args=(port, clients, stop, made))
    attacker.start()
    try:
        attempts = trio.run(_attempts, port)
    finally:
        stop.set()
        attacker.join(STOP_SECONDS)
        if attacker.is_alive():
            attacker.kill()  # our own child, by its Process object
            attacker.join(STOP_SECONDS)
    return attempts, int(made.value)


def slowloris(
    strategy: Strategy, tree: Path, work: Path, backend_port: int, clients: int = SLOW_CLIENTS
) -> SlowlorisResult:
    """One run of the slowloris scenario against a fresh tunnel process from ``tree`` (see
    ``patched_tree``)."""
    running = start_tunnel(tree, work, backend_port, strategy.server, nofile=NOFILE)
    try:
        nofile = nofile_soft(running.tunnel.pid)
        attempts, connections = _under_attack(running.port, clients)
        alive = running.tunnel.alive()
        shed = metric(running.admin_port, "tunnel_handshakes_shed_total") if alive else -1.0
    finally:
        running.tunnel.stop()
    return SlowlorisResult(
        strategy.name,
        attempts,
        shed,
        accept_failures(running.tunnel.log_path),
        connections,
        nofile,
        alive,
    )


# --- header-count amplification --------------------------------------------------------------


@dataclass
class FloodResult:
    rate: int
    max_headers: int
    probes: list[Attempt] = field(default_factory=list)
    cpu_percent: float = 0.0
    """The tunnel's CPU over the window, in percent of one core."""
    sent: int = 0
    answers: Counter[str] = field(default_factory=Counter)

    @property
    def times(self) -> list[float]:
        return sorted(probe.seconds for probe in self.probes if probe.ok)

    @property
    def median_ms(self) -> float:
        return 1000 * statistics.median(self.times) if self.times else float("nan")

    @property
    def p99_ms(self) -> float:
        times = self.times
        return 1000 * times[min(len(times) - 1, int(0.99 * len(times)))] if times else float("nan")

    @property
    def failed_probes(self) -> int:
        return sum(not probe.ok for probe in self.probes)


async def flood_one(port: int, result: FloodResult) -> None:
    outcome = "timeout"
    with trio.move_on_after(REPLY_TIMEOUT), trio.socket.socket() as sock:
        try:
            await sock.connect((procs.LOOPBACK, port))
            await _send_all(sock, FLOOD_HEAD)
            reply = await _read_head(sock)
            outcome = reply.split(b" ", 2)[1].decode("latin-1")
        except (OSError, EOFError) as error:
            outcome = type(error).__name__
    result.answers[outcome] += 1


async def _flood(port: int, result: FloodResult, pids: Sequence[int]) -> None:
    in_flight = trio.CapacityLimiter(MAX_IN_FLIGHT)

    async def one() -> None:
        async with in_flight:
            await flood_one(port, result)

    async def probe() -> None:
        next_at = trio.current_time()
        while trio.current_time() < end:
            result.probes.append(await upgrade(port, REPLY_TIMEOUT))
            next_at = max(next_at + PROBE_EVERY, trio.current_time())
            await trio.sleep_until(next_at)

    begin = trio.current_time()
    end = begin + FLOOD_SECONDS
    cpu_before, wall_before = procs.cpu_seconds(pids), time.monotonic()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(probe)
        total = int(result.rate * FLOOD_SECONDS)
        for index in range(total):
            await trio.sleep_until(begin + index / result.rate)
            if in_flight.borrowed_tokens < MAX_IN_FLIGHT:
                nursery.start_soon(one)
                result.sent += 1
    cpu = procs.cpu_seconds(pids) - cpu_before
    result.cpu_percent = 100 * cpu / (time.monotonic() - wall_before)


def header_flood(
    tree: Path, work: Path, backend_port: int, max_headers: int, rates: Sequence[int]
) -> list[FloodResult]:
    """One tunnel process with ``max_headers``, each rate in turn."""
    running = start_tunnel(tree, work, backend_port, f"max_headers = {max_headers}")
    results = []
    try:
        pids = procs.tree(running.tunnel.pid)
        for rate in rates:
            result = FloodResult(rate, max_headers)
            trio.run(_flood, running.port, result, pids)
            results.append(result)
            time.sleep(1.0)  # the last replies and closes settle before the next window
    finally:
        running.tunnel.stop()
    return results


# --- the report ------------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float:
    values = [v for v in values if v == v]  # NaN (nothing to measure in that run) left out
    return statistics.median(values) if values else float("nan")


def slowloris_table(runs: dict[str, list[SlowlorisResult]]) -> str:
    rows = [
        "| strategy | 101s of 4 | time to 101 median / max (s) | shed | accept failed lines "
        "| slow-client connections |",
        "|---|---|---|---|---|---|",
    ]
    for strategy, results in runs.items():
        medians = [_median(r.times_to_101) if r.times_to_101 else float("nan") for r in results]
        maxima = [max(r.times_to_101) if r.times_to_101 else float("nan") for r in results]
        rows.append(
            f"| {strategy} | {_median([r.successes for r in results]):g} "
            f"| {_median(medians):.3f} / {_median(maxima):.3f} "
            f"| {_median([r.shed for r in results]):.0f} "
            f"| {_median([r.accept_failures for r in results]):.0f} "
            f"| {_median([r.attack_connections for r in results]):.0f} |"
        )
    return "\n".join(rows)


def flood_table(runs: dict[tuple[int, int], list[FloodResult]]) -> str:
    rows = [
        "| max_headers | flood req/s (sent/s) | normal client's time to 101 median / p99 (ms) "
        "| failed probes | tunnel CPU (% of a core) | flood answers |",
        "|---|---|---|---|---|---|",
    ]
    for (max_headers, rate), results in runs.items():
        answers: Counter[str] = Counter()
        for result in results:
            answers.update(result.answers)
        said = ", ".join(f"{k}: {v}" for k, v in sorted(answers.items())) or "-"
        rows.append(
            f"| {max_headers} | {rate} ({_median([r.sent for r in results]) / FLOOD_SECONDS:.0f}) "
            f"| {_median([r.median_ms for r in results]):.1f} / "
            f"{_median([r.p99_ms for r in results]):.1f} "
            f"| {_median([r.failed_probes for r in results]):.0f} "
            f"| {_median([r.cpu_percent for r in results]):.0f} | {said} |"
        )
    return "\n".join(rows)


def _load() -> str:
    """The machine's load average: other work on the cores moves every figure here."""
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def run_slowloris(strategies: Sequence[str], runs: int, work: Path, backend_port: int) -> str:
    trees = {s: patched_tree(work, STRATEGIES[s]) for s in strategies}
    results: dict[str, list[SlowlorisResult]] = {s: [] for s in strategies}
    for run in range(runs):
        for name in strategies:
            result = slowloris(STRATEGIES[name], trees[name], work, backend_port)
            results[name].append(result)
            print(
                f"slowloris run {run + 1} {name}: {result.successes}/{ATTEMPTS} "
                f"{[(round(a.seconds, 3), a.outcome) for a in result.attempts]} "
                f"shed={result.shed:.0f} accept_failed={result.accept_failures} "
                f"connections={result.attack_connections} nofile={result.nofile}; {_load()}",
                file=sys.stderr,
            )
    return (
        f"slowloris: {SLOW_CLIENTS} slow clients, RLIMIT_NOFILE {NOFILE}, medians of {runs} "
        f"runs\n\n{slowloris_table(results)}"
    )


def run_headers(runs: int, work: Path, backend_port: int) -> str:
    results: dict[tuple[int, int], list[FloodResult]] = {}
    for run in range(runs):
        for max_headers in (100, LIFTED_HEADERS):
            for result in header_flood(REPO_DIR, work, backend_port, max_headers, FLOOD_RATES):
                results.setdefault((max_headers, result.rate), []).append(result)
                print(
                    f"headers run {run + 1} max_headers={max_headers} rate={result.rate}: "
                    f"{result.median_ms:.1f}/{result.p99_ms:.1f} ms "
                    f"cpu={result.cpu_percent:.0f}% sent={result.sent} "
                    f"failed={result.failed_probes} {dict(result.answers)}; {_load()}",
                    file=sys.stderr,
                )
    return (
        f"header-count flood: {FLOOD_FIELDS} fields, {len(FLOOD_HEAD)} bytes a head, "
        f"{FLOOD_SECONDS:.0f} s windows, medians of {runs} runs\n\n{flood_table(results)}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__)
    parser.add_argument("--runs", type=int, default=3, help="runs of each cell (medians shown)")
    parser.add_argument("--only", default=",".join(SUITES), help="slowloris,headers")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    options = parser.parse_args(argv)
    suites = options.only.split(",")
    strategies = options.strategies.split(",")
    unknown = set(suites) - set(SUITES) | set(strategies) - set(STRATEGIES)
    if unknown:
        parser.error(f"unknown: {', '.join(sorted(unknown))}")
    print(f"{_load()} at the start", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as scratch:
        work = Path(scratch)
        backend, backend_port = start_backend(work)
        try:
            if "slowloris" in suites:
                print(run_slowloris(strategies, options.runs, work, backend_port) + "\n")
            if "headers" in suites:
                print(run_headers(options.runs, work, backend_port))
        finally:
            backend.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
