"""10,000 concurrent tunnels through one tunnel process, each exchanging messages, none lost.

The tunnel runs as ``python -m tunnel run`` (a subprocess, ``max_tunnels`` raised) in front of
the C echo backend of bench/; both inherit the descriptor limit this test raises (the backend
also raises its own soft limit to the hard one). The client side is cheap: blocking loopback
sockets handled in batches (connect a batch, send every precomputed handshake, then read every
101), and one small masked frame per tunnel per round, each echo compared byte for byte.

It prints the tunnel process's RSS per tunnel (``VmRSS`` at rest before opening, and with every
tunnel open and used, divided by the count) and how long each phase took.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import socket
import struct
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest

from bench import build, procs

REPO = Path(__file__).resolve().parent.parent
TUNNELS = 10_000
BATCH = 500
ROUNDS = 2
"""Messages each tunnel sends (and gets back) while all of them are open."""
MIN_TUNNELS = 1_000
"""Below this many the test skips: the machine could say nothing about scale."""
PER_TUNNEL_BUDGET_KIB = 200
"""Memory one tunnel may cost the three processes and the kernel together (the tunnel process
takes about 20 KiB of it, the rest is socket buffers); the count is cut to what MemAvailable
holds."""
SPLICE_PIPES = 64
FD_HEADROOM = 2 * SPLICE_PIPES + 64
"""Descriptors besides two per tunnel: the pooled splice pipes (two each; ``splice_pipes`` is
lowered from 512 so that they do not crowd out tunnels under a 20,000 limit), listeners, epoll,
the log, the admin listener."""
SOCKET_SECONDS = 30.0
SETTLE_SECONDS = 60.0
"""Bound on the tunnel closing every tunnel once the clients have closed."""
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
"""RFC 6455's example key and its accept value: one precomputed handshake for every tunnel."""
MASK = b"\x5a\xa5\x3c\xc3"

pytestmark = pytest.mark.slow


def _mem_available_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    return 0


@dataclass(frozen=True)
class Plan:
    tunnels: int
    workers: int
    """tunnel's ``workers``: 2 when one process may not hold two descriptors per tunnel."""


def _fewer(count: int, why: str) -> int:
    print(f"scale: {why}; running {count} tunnels instead of {TUNNELS}")
    return count


def _per_process(tunnels: int, workers: int) -> int:
    """Descriptors the busiest tunnel process needs: SO_REUSEPORT spreads connections by a
    hash, so each worker gets its share and 10% more."""
    share = tunnels if workers == 1 else tunnels * 11 // (10 * workers)
    return 2 * share + FD_HEADROOM


@pytest.fixture
def plan() -> Iterator[Plan]:
    """How many tunnels this machine holds (at most TUNNELS) and over how many tunnel workers,
    with RLIMIT_NOFILE raised for them (the tunnel inherits it): the soft limit to the hard
    one, and the hard one too where this process may (CAP_SYS_RESOURCE). One process holds
    two descriptors per tunnel; under a lower hard limit two workers share the tunnels (each
    has its own limit), and past that the largest count that fits runs (printed), or under
    MIN_TUNNELS a skip naming the limit. The limits are restored afterwards."""
    saved = resource.getrlimit(resource.RLIMIT_NOFILE)
    hard = saved[1]
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(hard, _per_process(TUNNELS, 1)),) * 2)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    count, workers = TUNNELS, 1
    if _per_process(TUNNELS, 1) > hard:
        workers = 2
        print(
            f"scale: RLIMIT_NOFILE hard limit {hard} < {_per_process(TUNNELS, 1)} (two "
            f"descriptors per tunnel and {FD_HEADROOM} more) and this process may not raise "
            "it: two tunnel workers share the tunnels"
        )
        if _per_process(TUNNELS, 2) > hard:
            count = _fewer(
                (hard - FD_HEADROOM) * 10 // 11, f"RLIMIT_NOFILE hard limit {hard} is lower still"
            )
    memory = _mem_available_kib()
    if memory // PER_TUNNEL_BUDGET_KIB < count:
        count = _fewer(
            memory // PER_TUNNEL_BUDGET_KIB,
            f"MemAvailable {memory} KiB holds that many at {PER_TUNNEL_BUDGET_KIB} KiB each",
        )
    try:
        if count < MIN_TUNNELS:
            pytest.skip(
                f"only {count} tunnels fit (RLIMIT_NOFILE hard limit {hard}, MemAvailable "
                f"{memory} KiB); the test needs {MIN_TUNNELS} at least"
            )
        yield Plan(count, workers)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, saved)


def _config(port: int, admin_port: int, backend_port: int, plan: Plan) -> str:
    return f"""\
[server]
workers = {plan.workers}
idle_timeout = "1h"
max_tunnels = {plan.tunnels + 1000}
splice_pipes = {SPLICE_PIPES}

[admin]
listen = "{procs.LOOPBACK}:{admin_port}"

[[listeners]]
listen = "{procs.LOOPBACK}:{port}"

[[routes]]
name = "scale"
backends = [ {{ name = "echo", url = "ws://{procs.LOOPBACK}:{backend_port}" }} ]
"""


def _nofile_soft(pid: int) -> int:
    for row in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if row.startswith("Max open files"):
            return int(row.split()[3])
    raise AssertionError(f"no Max open files in /proc/{pid}/limits")


def _open_tunnels(port: int) -> int:
    url = f"http://{procs.LOOPBACK}:{port}/stats.json"
    with urllib.request.urlopen(url, timeout=SOCKET_SECONDS) as answer:
        return len(json.loads(answer.read())["tunnels"])


def _frame(index: int, round_: int) -> bytes:
    payload = struct.pack("!IH", index, round_) + b"scale"
    masked = bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))
    return bytes((0x82, 0x80 | len(payload))) + MASK + masked


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"EOF after {len(data)} of {n} bytes")
        data += chunk
    return data


def _open_batch(port: int, size: int) -> list[socket.socket]:
    """``size`` upgraded tunnels: connect all, send every handshake, then read every 101."""
    head = (
        f"GET /scale HTTP/1.1\r\nHost: {procs.LOOPBACK}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY.decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    batch = [socket.create_connection((procs.LOOPBACK, port), SOCKET_SECONDS) for _ in range(size)]
    for sock in batch:
        sock.sendall(head)
    for sock in batch:
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = sock.recv(4096)
            assert chunk, f"EOF before a complete reply: {reply!r}"
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 101 "), reply
        assert b"Sec-WebSocket-Accept: " + ACCEPT + b"\r\n" in reply, reply
        assert reply.endswith(b"\r\n\r\n"), "bytes after the 101 before any were sent"
    return batch


def _wait_for(what: str, check: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"no {what} within {seconds:.0f} s"
        time.sleep(0.2)


def _two_free_ports() -> tuple[int, int]:
    """Two distinct free loopback ports: each probe's socket is closed before the next, so the
    OS may hand out the same port twice."""
    first = procs.free_port()
    for _ in range(100):
        second = procs.free_port()
        if second != first:
            return first, second
    raise AssertionError(f"the OS kept handing out port {first}")


def test_ten_thousand_concurrent_tunnels_each_echo_every_message(
    plan: Plan, tmp_path: Path
) -> None:
    count = plan.tunnels
    if shutil.which(os.environ.get("CC", "gcc")) is None:
        pytest.skip("gcc not installed (apt-get install gcc)")
    started = time.monotonic()
    binaries = build.build()
    backend = procs.start(
        "echo_backend",
        [str(binaries.echo_backend), "--host", procs.LOOPBACK, "--port", "0"],
        tmp_path / "backend.log",
        capture_stdout=True,
    )
    tunnel: procs.Managed | None = None
    clients: list[socket.socket] = []
    try:
        assert backend.stdout is not None
        line = backend.stdout.readline(10.0) or ""
        assert line.startswith("listening "), line
        port, admin_port = _two_free_ports()
        config = tmp_path / "tunnel.toml"
        config.write_text(_config(port, admin_port, int(line.split()[1]), plan))
        tunnel = procs.start(
            "tunnel",
            [sys.executable, "-m", "tunnel", "run", "--config", str(config)],
            tmp_path / "tunnel.log",
            cwd=REPO,
        )
        for probe in (port, admin_port):
            procs.wait_until(tunnel, partial(procs.port_accepts, probe), 20.0, "open port")
        pid = tunnel.pid
        processes = plan.workers + (plan.workers > 1)  # the supervisor and its workers
        _wait_for(f"{processes} tunnel processes", lambda: len(procs.tree(pid)) >= processes, 20.0)
        pids = procs.tree(pid)
        for each in pids:
            assert _nofile_soft(each) >= _per_process(count, plan.workers), each
        rss_before = procs.rss_kib(pids)

        opened = time.monotonic()
        for first in range(0, count, BATCH):
            clients += _open_batch(port, min(BATCH, count - first))
        open_seconds = time.monotonic() - opened
        assert _open_tunnels(admin_port) == count

        exchanged = time.monotonic()
        echoed = 0
        for round_ in range(ROUNDS):
            frames = [_frame(i, round_) for i in range(count)]
            for first in range(0, count, BATCH):
                batch = range(first, min(first + BATCH, count))
                for i in batch:
                    clients[i].sendall(frames[i])
                for i in batch:
                    assert _recv_exactly(clients[i], len(frames[i])) == frames[i], i
                    echoed += 1
        exchange_seconds = time.monotonic() - exchanged
        assert echoed == count * ROUNDS
        rss_open = procs.rss_kib(pids)
        assert _open_tunnels(admin_port) == count, "a tunnel closed while all were in use"

        for sock in clients:
            sock.close()
        clients.clear()
        _wait_for(
            "return to 0 open tunnels", lambda: _open_tunnels(admin_port) == 0, SETTLE_SECONDS
        )
        assert tunnel.alive()
        per_tunnel = (rss_open - rss_before) / count
        print(
            f"\nscale: {count} concurrent tunnels over {plan.workers} tunnel worker(s),"
            f" {echoed} messages echoed, none lost;"
            f" opened in {open_seconds:.1f} s, messages in {exchange_seconds:.1f} s,"
            f" whole test {time.monotonic() - started:.1f} s;"
            f" tunnel RSS (all its processes) {rss_before} KiB at rest,"
            f" {rss_open} KiB with all open:"
            f" {per_tunnel:.1f} KiB per tunnel"
        )
    finally:
        for sock in clients:
            sock.close()
        for managed in (tunnel, backend):
            if managed is not None:
                managed.stop()
