"""Hostile clients against a tunnel process: the bounds on connections still in their
handshake (``[server] max_handshakes``) and on the fields of a request head
(``[server] max_headers``).

The tunnel runs as ``python -m tunnel run`` in front of the C echo backend of bench/; the
scenarios and their clients are ``bench.hostile``'s, so the test and the figures in
bench/README.md come from the same code.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from bench import hostile, procs
from bench.peers import REPO_DIR

FEW_ACCEPT_FAILURES = 3
"""``accept failed`` lines tolerated under the slowloris load (before max_handshakes: 298)."""
FLOOD_REQUESTS = 200
FLOOD_CPU_MS_BOUND = 2.0
"""CPU milliseconds the tunnel may spend on one 5,000-field head under the default
``max_headers`` (about 0.2 ms here; 11 ms when every field was parsed)."""
FLOOD_COST_RATIO = 5.0
"""At least this many times the cost once ``max_headers`` is lifted (about 30 here)."""
FLOOD_STATUS = {100: "431", hostile.LIFTED_HEADERS: "426"}

pytestmark = pytest.mark.slow


@pytest.fixture
def backend_port(tmp_path: Path) -> Iterator[int]:
    """The C echo backend's port (skips without a C compiler)."""
    if shutil.which(os.environ.get("CC", "gcc")) is None:
        pytest.skip("gcc not installed (apt-get install gcc)")
    backend, port = hostile.start_backend(tmp_path)
    yield port
    backend.stop()


def test_a_normal_client_is_served_while_400_slow_clients_reconnect(
    tmp_path: Path, backend_port: int
) -> None:
    result = hostile.slowloris(hostile.STRATEGIES["shed-oldest"], REPO_DIR, tmp_path, backend_port)
    assert result.nofile == hostile.NOFILE
    assert result.alive
    assert result.attack_connections > hostile.SLOW_CLIENTS, "the slow clients were never shed"
    assert result.shed > 0
    assert [attempt.outcome for attempt in result.attempts] == ["101"] * hostile.ATTEMPTS
    assert max(result.times_to_101) < hostile.ATTEMPT_TIMEOUT
    assert result.accept_failures <= FEW_ACCEPT_FAILURES


def test_the_slowloris_harness_fills_an_uncapped_tunnel(tmp_path: Path, backend_port: int) -> None:
    """The scenario can fail: without the bound the slow clients hold every descriptor."""
    result = hostile.slowloris(hostile.STRATEGIES["uncapped"], REPO_DIR, tmp_path, backend_port)
    assert result.shed == 0
    assert result.accept_failures > FEW_ACCEPT_FAILURES


async def _flood(port: int, requests: int) -> hostile.FloodResult:
    result = hostile.FloodResult(rate=0, max_headers=100)
    async with trio.open_nursery() as nursery:
        for _ in range(requests):
            nursery.start_soon(hostile.flood_one, port, result)
    return result


def _cpu_ms_per_flood_head(tmp_path: Path, backend_port: int, max_headers: int) -> float:
    """The tunnel's CPU per 5,000-field head, ``FLOOD_REQUESTS`` of them sent at once; each
    must be answered with ``FLOOD_STATUS[max_headers]``."""
    running = hostile.start_tunnel(REPO_DIR, tmp_path, backend_port, f"max_headers = {max_headers}")
    try:
        pids = procs.tree(running.tunnel.pid)
        before = procs.cpu_seconds(pids)
        result = trio.run(_flood, running.port, FLOOD_REQUESTS)
        cpu = procs.cpu_seconds(pids) - before
    finally:
        running.tunnel.stop()
    assert result.answers == {FLOOD_STATUS[max_headers]: FLOOD_REQUESTS}
    return 1000 * cpu / FLOOD_REQUESTS


def test_a_5000_field_head_is_refused_before_any_per_field_work(
    tmp_path: Path, backend_port: int
) -> None:
    """Under the default ``max_headers`` (431 at the 101st line) a flood head costs little;
    lifted, the same heads are parsed (then 426, no Upgrade) at many times the cost, so the
    measure can tell the two apart."""
    bounded = _cpu_ms_per_flood_head(tmp_path, backend_port, 100)
    lifted = _cpu_ms_per_flood_head(tmp_path, backend_port, hostile.LIFTED_HEADERS)
    print(f"\nCPU per 5,000-field head: {bounded:.2f} ms bounded, {lifted:.2f} ms lifted")
    assert bounded < FLOOD_CPU_MS_BOUND
    assert lifted > FLOOD_COST_RATIO * bounded


EMFILE_NOFILE = 64
FD_WAIT_SECONDS = 10.0


def _descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _wait_steady(pid: int) -> None:
    """Until the count holds for half a second: the harness's readiness probe may still be
    closing when the tunnel is first seen listening."""
    deadline = time.monotonic() + FD_WAIT_SECONDS
    count, since = _descriptors(pid), time.monotonic()
    while time.monotonic() - since < 0.5:
        assert time.monotonic() < deadline, "the descriptor count never settled"
        time.sleep(0.02)
        now = _descriptors(pid)
        if now != count:
            count, since = now, time.monotonic()


def _wait_descriptors(pid: int, count: int) -> None:
    deadline = time.monotonic() + FD_WAIT_SECONDS
    while _descriptors(pid) != count:
        assert time.monotonic() < deadline, f"{_descriptors(pid)} descriptors, not {count}"
        time.sleep(0.01)


def test_running_out_of_descriptors_does_not_mark_the_backend_down(
    tmp_path: Path, backend_port: int
) -> None:
    """Idle connections hold all but one descriptor: each upgrade's accept takes the last
    one and its backend socket cannot be made (502). Once one descriptor is free, the next
    upgrade must get its 101: the backend never failed."""
    running = hostile.start_tunnel(
        REPO_DIR,
        tmp_path,
        backend_port,
        'handshake_timeout = "60s"\nmax_handshakes = 100000',
        nofile=EMFILE_NOFILE,
    )
    pid = running.tunnel.pid
    idle: list[socket.socket] = []
    try:
        _wait_steady(pid)
        for _ in range(EMFILE_NOFILE):
            held = _descriptors(pid)
            if held >= EMFILE_NOFILE - 1:
                break
            idle.append(socket.create_connection((procs.LOOPBACK, running.port), 5.0))
            _wait_descriptors(pid, held + 1)
        assert _descriptors(pid) == EMFILE_NOFILE - 1
        starved = [trio.run(hostile.upgrade, running.port) for _ in range(3)]
        idle.pop().close()
        _wait_descriptors(pid, EMFILE_NOFILE - 2)
        freed = trio.run(hostile.upgrade, running.port)
    finally:
        for sock in idle:
            sock.close()
        running.tunnel.stop()
    # The tunnel's own shortage: 503 with Retry-After, not the backend's 502.
    assert [attempt.outcome for attempt in starved] == ["HTTP/1.1 503 Service Unavailable"] * 3
    assert freed.ok, freed.outcome
    assert "backend marked down" not in running.tunnel.log_path.read_text()
