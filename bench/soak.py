"""``python -m bench soak``: mixed traffic against one tunnel process for a while, then a verdict.

The harness starts the C echo backend and ``python -m tunnel run --config FILE`` (with an admin
listener) on free loopback ports, and drives them from one trio run in this process:

- upgrades: an upgrade on ``/close`` (the backend sends its FIN after the 101), 101 and
  ``Sec-WebSocket-Accept`` checked, then EOF expected;
- echo: ``--tunnels`` tunnels kept open, each sending masked WebSocket frames and checking every
  echoed byte;
- bulk: random frames one way, the echo back, SHA-256 of both compared, then a half-close that
  must come back as EOF;
- resets: a tunnel that sends half a frame and is closed with ``SO_LINGER`` 0 (an RST);
- admin closes: ``POST /tunnels/<id>/close`` on a tunnel of ours; its Close frame and EOF are
  expected;
- reloads: ``POST /reload`` and SIGHUP in turn, each changing ``idle_timeout`` in the file.

Time is cut into periods (a minute, shorter for short runs). At the end of each one every worker
finishes its operation, the harness waits until the tunnel reports no open tunnel and then reads
the descriptors and ``VmRSS`` of the tunnel process: samples taken in the same quiet state, so a
slope through them is drift and not load. The first sample follows a short warm-up.

Bounds (the verdict): no error of any kind; descriptor drift under ``FD_DRIFT_BOUND`` per minute
(at rest the count must come back to the same number: any slope is a leak); RSS drift under
``RSS_DRIFT_BOUND_KIB`` per minute, see its docstring.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import signal
import socket
import struct
import sys
import tempfile
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import trio

from bench import build, procs
from bench.peers import REPO_DIR

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_SECONDS = 30.0
"""Bound on any single operation (connect, upgrade, one echo, one bulk transfer, a close)."""
QUIET_SECONDS = 15.0
"""How long the end of a period may wait for the tunnel to report no open tunnel."""
WARMUP_SECONDS = 5.0
FD_SETTLE_READS = 20
FD_DRIFT_BOUND = 0.5
"""Descriptors per minute. At rest the tunnel holds its listeners, epoll, log and admin sockets
and nothing else (idle splice pipes are closed with the last tunnel), so every quiet sample
should be the same number: one descriptor leaked per period already gives a slope of 1."""
RSS_DRIFT_BOUND_KIB = 1024.0
"""KiB per minute. CPython keeps freed memory in its arenas, so RSS at rest settles at the
high-water mark of the busiest moment and only a leak keeps it growing. The traffic opens
thousands of tunnels a minute (the report prints how many), so this bound catches a leak of a
few hundred bytes per tunnel (the report prints the exact figure) while the settling that the
first minutes show stays well under it."""
ECHO_PAUSE = 0.01
BULK_BYTES = 2 * 2**20
BULK_FRAME = 64 * 1024
RELOAD_EVERY = 10.0
MAX_OPS = 10**7
"""Bound on the operations of one worker in one period (time ends it long before)."""


@dataclass(frozen=True)
class SoakOptions:
    seconds: float
    tunnels: int = 50
    relay: str = "auto"
    progress_every: float = 10.0


@dataclass(frozen=True)
class Sample:
    """The tunnel process at rest after a period: seconds since the first sample."""

    at: float
    fds: int
    rss_kib: int


@dataclass
class Counters:
    upgrades: int = 0
    """Every 101 checked, whatever the operation."""
    messages: int = 0
    bytes_checked: int = 0
    resets: int = 0
    admin_closes: int = 0
    reloads: int = 0
    open_now: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    first_errors: dict[str, str] = field(default_factory=dict)

    def error(self, kind: str, detail: str) -> None:
        self.errors[kind] += 1
        self.first_errors.setdefault(kind, detail)


@dataclass
class SoakResult:
    options: SoakOptions
    counters: Counters
    samples: list[Sample]
    elapsed: float
    config_text: str

    @property
    def fd_drift(self) -> float:
        return slope([(s.at / 60, float(s.fds)) for s in self.samples])

    @property
    def rss_drift_kib(self) -> float:
        return slope([(s.at / 60, float(s.rss_kib)) for s in self.samples])

    @property
    def tunnels_per_minute(self) -> float:
        return self.counters.upgrades / max(self.elapsed / 60, 1e-9)

    @property
    def passed(self) -> bool:
        return (
            not self.counters.errors
            and len(self.samples) >= 2
            and abs(self.fd_drift) <= FD_DRIFT_BOUND
            and self.rss_drift_kib <= RSS_DRIFT_BOUND_KIB
        )

    def report(self) -> str:
        c = self.counters
        errors = ", ".join(f"{k} {n}" for k, n in sorted(c.errors.items())) or "none"
        leak = RSS_DRIFT_BOUND_KIB * 1024 / max(self.tunnels_per_minute, 1)
        lines = [
            f"soak: {self.elapsed:.0f} s, {self.options.tunnels} echo tunnels held at once",
            f"errors: {sum(c.errors.values())} ({errors})",
            *(f"  first {kind}: {detail}" for kind, detail in sorted(c.first_errors.items())),
            f"upgrades: {c.upgrades} ({self.tunnels_per_minute:.0f}/min); messages echoed:"
            f" {c.messages}; bytes checked: {c.bytes_checked}",
            f"resets: {c.resets}; admin closes: {c.admin_closes}; reloads: {c.reloads}",
            "at rest after each period (s, fds, RSS KiB):",
            *(f"  {s.at:6.0f} {s.fds:6d} {s.rss_kib:8d}" for s in self.samples),
            f"fd drift: {self.fd_drift:+.2f}/min (bound ±{FD_DRIFT_BOUND})",
            f"RSS drift: {self.rss_drift_kib:+.0f} KiB/min (bound {RSS_DRIFT_BOUND_KIB:.0f};"
            f" at this pace a leak of {leak:.0f} bytes per tunnel would reach it)",
            f"verdict: {'pass' if self.passed else 'FAIL'}",
        ]
        return "\n".join(lines)

    def as_json(self) -> dict[str, Any]:
        return {
            "seconds": self.elapsed,
            "tunnels": self.options.tunnels,
            "errors": dict(self.counters.errors),
            "first_errors": self.counters.first_errors,
            "upgrades": self.counters.upgrades,
            "messages": self.counters.messages,
            "bytes_checked": self.counters.bytes_checked,
            "resets": self.counters.resets,
            "admin_closes": self.counters.admin_closes,
            "reloads": self.counters.reloads,
            "samples": [[s.at, s.fds, s.rss_kib] for s in self.samples],
            "fd_drift_per_min": self.fd_drift,
            "rss_drift_kib_per_min": self.rss_drift_kib,
            "passed": self.passed,
        }


def slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of y over x; 0 with fewer than two distinct x."""
    if len(points) < 2:
        return 0.0
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    if sxx == 0:
        return 0.0
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / sxx


def period_seconds(seconds: float) -> float:
    """A minute, or a quarter of a short run (at least 5 s) so that it still has samples."""
    return min(60.0, max(5.0, seconds / 4))


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# --- the wire: handshakes and frames -------------------------------------------------------


def upgrade_request(path: str, port: int) -> tuple[bytes, bytes]:
    """The request head and the ``Sec-WebSocket-Accept`` the reply must carry."""
    key = base64.b64encode(os.urandom(16))
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    head = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    return head, accept


def masked_frame(payload: bytes, opcode: int = 2) -> bytes:
    """One final client frame (masked, as RFC 6455 requires of clients)."""
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 2**16:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    mask = os.urandom(4)
    key = (mask * (n // 4 + 1))[:n]
    body = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
    return header + mask + body


class Wire:
    """One client connection through the tunnel, with what it has read but not consumed."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def fill(self) -> bool:
        chunk = await self.stream.receive_some(262144)
        self.buffer += chunk
        return bool(chunk)

    async def read_exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            if not await self.fill():
                raise ConnectionError(f"EOF after {len(self.buffer)} of {n} bytes")
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    async def read_to_eof(self, limit: int = 2**20) -> bytes:
        while await self.fill():
            if len(self.buffer) > limit:
                raise ConnectionError(f"more than {limit} bytes before EOF")
        data = bytes(self.buffer)
        self.buffer.clear()
        return data


def _header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


async def open_tunnel(port: int, path: str, counters: Counters) -> Wire:
    """Connect, upgrade and check the 101; raises ``ConnectionError`` saying what was wrong."""
    stream = await trio.open_tcp_stream(procs.LOOPBACK, port)
    wire = Wire(stream)
    try:
        head, accept = upgrade_request(path, port)
        await stream.send_all(head)
        while b"\r\n\r\n" not in wire.buffer:
            if len(wire.buffer) > 65536 or not await wire.fill():
                raise ConnectionError(f"no complete reply head: {bytes(wire.buffer[:200])!r}")
        end = wire.buffer.index(b"\r\n\r\n") + 4
        reply = bytes(wire.buffer[:end])
        del wire.buffer[:end]
        if not reply.startswith(b"HTTP/1.1 101 "):
            raise ConnectionError(f"not a 101: {reply[:200]!r}")
        if _header(reply, b"sec-websocket-accept") != accept:
            raise ConnectionError(f"wrong Sec-WebSocket-Accept: {reply!r}")
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    counters.upgrades += 1
    return wire


# --- the admin listener ---------------------------------------------------------------------


def admin_call(port: int, method: str, path: str) -> tuple[int, Any]:
    """(status, decoded JSON body) of one admin request; blocking, for a worker thread."""
    request = urllib.request.Request(
        f"http://{procs.LOOPBACK}:{port}{path}",
        method=method,
        data=b"" if method == "POST" else None,
    )
    try:
        with urllib.request.urlopen(request, timeout=OP_SECONDS) as answer:
            return answer.status, json.loads(answer.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode("utf-8", "replace")


async def admin(port: int, method: str, path: str) -> tuple[int, Any]:
    return await trio.to_thread.run_sync(admin_call, port, method, path)


async def open_tunnel_ids(port: int) -> dict[str, str]:
    """Open tunnels by client address (``host:port``) → id, from ``/stats.json``."""
    status, document = await admin(port, "GET", "/stats.json")
    if status != 200:
        raise ConnectionError(f"/stats.json answered {status}")
    return {t["client"]: t["id"] for t in document.get("tunnels", [])}


# --- the workers: each loops until its period ends, each operation bounded ------------------


@dataclass
class Target:
    """Everything a worker needs to reach the processes of this session."""

    port: int
    admin_port: int
    tunnel_pid: int
    config_path: Path
    backend_port: int
    log: procs.Managed
    counters: Counters = field(default_factory=Counters)
    reload_turn: int = 0


Worker = Callable[[Target, Counters, float], Any]


async def _loop(kind: str, target: Target, counters: Counters, until: float, op: Any) -> None:
    """Run ``op`` until the period ends; each run must end ``OP_SECONDS`` after its start or
    after the period's end, whichever is later (an echo worker holds its tunnel to the end)."""
    for _ in range(MAX_OPS):
        now = trio.current_time()
        if now >= until:
            return
        with trio.move_on_at(until + OP_SECONDS) as scope:
            try:
                await op(target, counters, until)
            except trio.TooSlowError:
                counters.error(f"{kind}_timeout", f"a step took over {OP_SECONDS:.0f} s")
            except (OSError, ConnectionError, ValueError, trio.BrokenResourceError) as error:
                counters.error(kind, f"{type(error).__name__}: {error}")
                await trio.sleep(0.1)
        if scope.cancelled_caught:
            counters.error(
                f"{kind}_timeout", f"an operation outlived its period by {OP_SECONDS:.0f} s"
            )


async def upgrade_op(target: Target, counters: Counters, until: float) -> None:
    wire = await open_tunnel(target.port, "/close", counters)
    async with wire.stream:
        rest = await wire.read_to_eof()
        if rest:
            raise ConnectionError(f"bytes after the 101 on /close: {rest[:100]!r}")


async def echo_op(target: Target, counters: Counters, until: float) -> None:
    """One tunnel held until the period ends, echoing messages of random sizes."""
    wire = await open_tunnel(target.port, "/echo", counters)
    counters.open_now += 1
    try:
        async with wire.stream:
            for _ in range(MAX_OPS):
                if trio.current_time() >= until:
                    break
                frame = masked_frame(os.urandom(random.randint(1, 4096)))
                with trio.fail_after(OP_SECONDS):
                    await wire.stream.send_all(frame)
                    echoed = await wire.read_exactly(len(frame))
                if echoed != frame:
                    raise ValueError(f"echo differs from the {len(frame)} bytes sent")
                counters.messages += 1
                counters.bytes_checked += len(frame)
                await trio.sleep(ECHO_PAUSE)
    finally:
        counters.open_now -= 1


async def bulk_op(target: Target, counters: Counters, until: float) -> None:
    wire = await open_tunnel(target.port, "/bulk", counters)
    sent, received = hashlib.sha256(), hashlib.sha256()
    total = 0
    async with wire.stream:

        async def send() -> None:
            nonlocal total
            while total < BULK_BYTES:
                frame = masked_frame(random.randbytes(BULK_FRAME))
                sent.update(frame)
                total += len(frame)
                await wire.stream.send_all(frame)
            await wire.stream.send_eof()

        got = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            while await wire.fill():
                received.update(wire.buffer)
                got += len(wire.buffer)
                wire.buffer.clear()
        if got != total or sent.digest() != received.digest():
            raise ValueError(f"bulk: sent {total} bytes, got {got}; SHA-256 differs")
    counters.bytes_checked += total


async def reset_op(target: Target, counters: Counters, until: float) -> None:
    wire = await open_tunnel(target.port, "/reset", counters)
    frame = masked_frame(os.urandom(1000))
    await wire.stream.send_all(frame[: len(frame) // 2])
    wire.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    wire.stream.socket.close()
    counters.resets += 1
    await trio.sleep(0.05)


async def admin_close_op(target: Target, counters: Counters, until: float) -> None:
    wire = await open_tunnel(target.port, "/admin-close", counters)
    async with wire.stream:
        frame = masked_frame(b"before the admin close")
        await wire.stream.send_all(frame)
        if await wire.read_exactly(len(frame)) != frame:
            raise ValueError("echo before the admin close differs")
        host, port = wire.stream.socket.getsockname()[:2]
        tunnel_id = (await open_tunnel_ids(target.admin_port)).get(f"{host}:{port}")
        if tunnel_id is None:
            raise ConnectionError(f"tunnel of client {host}:{port} not in /stats.json")
        status, answer = await admin(target.admin_port, "POST", f"/tunnels/{tunnel_id}/close")
        if status != 200:
            raise ConnectionError(f"POST /tunnels/{tunnel_id}/close answered {status}: {answer}")
        rest = await wire.read_to_eof()
        if not rest.startswith(b"\x88"):
            raise ConnectionError(f"no Close frame before EOF after an admin close: {rest[:20]!r}")
    counters.admin_closes += 1
    await trio.sleep(0.2)


async def reload_op(target: Target, counters: Counters, until: float) -> None:
    """Rewrite ``idle_timeout`` (so the reload has something to apply), then reload by
    ``POST /reload`` or SIGHUP in turn; SIGHUP's outcome is read in the log."""
    target.reload_turn += 1
    text = target.config_path.read_text()
    old, new = ('"3599s"', '"1h"') if target.reload_turn % 2 else ('"1h"', '"3599s"')
    target.config_path.write_text(text.replace(f"idle_timeout = {old}", f"idle_timeout = {new}"))
    if target.reload_turn % 2:
        status, answer = await admin(target.admin_port, "POST", "/reload")
        if status != 200 or not answer.get("reloaded"):
            raise ConnectionError(f"POST /reload answered {status}: {answer}")
    else:
        os.kill(target.tunnel_pid, signal.SIGHUP)
    counters.reloads += 1
    await trio.sleep(min(RELOAD_EVERY, max(0.0, until - trio.current_time())))


WORKERS: tuple[tuple[str, Worker, int], ...] = (
    ("upgrade", upgrade_op, 2),
    ("bulk", bulk_op, 2),
    ("reset", reset_op, 1),
    ("admin_close", admin_close_op, 1),
    ("reload", reload_op, 1),
)
"""(kind, operation, concurrent workers); echo gets ``--tunnels`` workers."""


# --- a session ------------------------------------------------------------------------------


def tunnel_config(port: int, admin_port: int, backend_port: int, relay: str) -> str:
    return f"""\
[server]
relay = "{relay}"
idle_timeout = "1h"
max_tunnels = 100000

[admin]
listen = "{procs.LOOPBACK}:{admin_port}"

[[listeners]]
listen = "{procs.LOOPBACK}:{port}"

[[routes]]
name = "soak"
backends = [ {{ name = "echo", url = "ws://{procs.LOOPBACK}:{backend_port}" }} ]
"""


PROBLEM_WORDS = ("Traceback", "configuration not reloaded", " error ", " critical ")


def _log_problems(target: Target, counters: Counters) -> None:
    for line in target.log.new_log_lines():
        if any(word in line for word in PROBLEM_WORDS):
            counters.error("tunnel_log", line.strip()[:300])


async def _quiet_sample(target: Target, counters: Counters, baseline: int | None) -> Sample:
    """Wait until no tunnel is open, then read the process: the fewest descriptors seen over
    ``FD_SETTLE_READS`` reads (our own admin request may still be closing), stopping early
    once back at ``baseline``."""
    deadline = trio.current_time() + QUIET_SECONDS
    for _ in range(MAX_OPS):
        ids = await open_tunnel_ids(target.admin_port)
        if not ids or trio.current_time() > deadline:
            break
        await trio.sleep(0.1)
    if ids:
        counters.error("tunnels_left_open", f"{len(ids)} still open {QUIET_SECONDS:.0f} s later")
    fds = fd_count(target.tunnel_pid)
    for _ in range(FD_SETTLE_READS):
        if baseline is not None and fds <= baseline:
            break
        await trio.sleep(0.1)
        fds = min(fds, fd_count(target.tunnel_pid))
    return Sample(0.0, fds, procs.rss_kib([target.tunnel_pid]))


async def _period(target: Target, counters: Counters, seconds: float, echo: int) -> None:
    until = trio.current_time() + seconds
    async with trio.open_nursery() as nursery:
        for _ in range(echo):
            nursery.start_soon(_loop, "echo", target, counters, until, echo_op)
        for kind, op, count in WORKERS:
            for _ in range(count):
                nursery.start_soon(_loop, kind, target, counters, until, op)


async def _progress(counters: Counters, started: float, every: float, out: TextIO) -> None:
    while True:
        await trio.sleep(every)
        errors = sum(counters.errors.values())
        print(
            f"soak: {trio.current_time() - started:5.0f} s  tunnels {counters.open_now:4d}"
            f"  upgrades {counters.upgrades}  messages {counters.messages}"
            f"  bytes checked {counters.bytes_checked}  errors {errors}",
            file=out,
            flush=True,
        )


async def drive(target: Target, options: SoakOptions, out: TextIO) -> tuple[list[Sample], float]:
    """Warm up, take the first sample, then periods of traffic each ending in a sample."""
    counters = target.counters
    period = period_seconds(options.seconds)
    await _period(target, counters, min(WARMUP_SECONDS, period), options.tunnels)
    first = await _quiet_sample(target, counters, None)
    samples = [first]
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_progress, counters, started, options.progress_every, out)
        for _ in range(max(1, round(options.seconds / period))):
            await _period(target, counters, period, options.tunnels)
            sample = await _quiet_sample(target, counters, first.fds)
            _log_problems(target, counters)
            samples.append(Sample(trio.current_time() - started, sample.fds, sample.rss_kib))
            print(
                f"soak: at rest after {samples[-1].at:.0f} s: {sample.fds} fds,"
                f" {sample.rss_kib} KiB RSS",
                file=out,
                flush=True,
            )
        nursery.cancel_scope.cancel()
    return samples, trio.current_time() - started


def run_soak(options: SoakOptions, out: TextIO = sys.stderr) -> SoakResult:
    """Build the backend, start it and the tunnel, drive the traffic, stop both."""
    procs.raise_nofile_limit()
    binaries = build.build()
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as scratch:
        workdir = Path(scratch)
        backend = procs.start(
            "echo_backend",
            [str(binaries.echo_backend), "--host", procs.LOOPBACK, "--port", "0"],
            workdir / "backend.log",
            capture_stdout=True,
        )
        tunnel: procs.Managed | None = None
        try:
            assert backend.stdout is not None
            line = backend.stdout.readline(10.0) or ""
            if not line.startswith("listening "):
                raise procs.ProcessError(f"echo_backend said {line!r}: {backend.log_tail()}")
            backend_port = int(line.split()[1])
            port, admin_port = procs.free_port(), procs.free_port()
            config_path = workdir / "tunnel.toml"
            config_text = tunnel_config(port, admin_port, backend_port, options.relay)
            config_path.write_text(config_text)
            tunnel = procs.start(
                "tunnel",
                [sys.executable, "-m", "tunnel", "run", "--config", str(config_path)],
                workdir / "tunnel.log",
                cwd=REPO_DIR,
            )
            for what, probe in (("port", port), ("admin port", admin_port)):
                procs.wait_until(tunnel, partial(procs.port_accepts, probe), 20.0, f"open {what}")
            target = Target(port, admin_port, tunnel.pid, config_path, backend_port, tunnel)
            samples, elapsed = trio.run(drive, target, options, out)
            counters = target.counters
            if not tunnel.alive():
                counters.error("tunnel_exited", f"status {tunnel.popen.returncode}")
            _log_problems(target, counters)
            return SoakResult(options, counters, samples, elapsed, config_text)
        finally:
            for managed in (tunnel, backend):
                if managed is not None:
                    for note in managed.stop():
                        print(f"soak: {note}", file=out)
