"""Fault injection over real loopback sockets (issue 14): peers that die, reset, stall, dawdle,
leave early, half-close or send garbage, with admin closes and reloads in the middle.

Every case checks three things besides its own: the other side is closed within the bound the
configuration implies; a second tunnel (the heartbeat, route ``echo``) keeps echoing every
20 ms without a gap of ``MAX_GAP_SECONDS``; and once every peer is gone this process (tunnel,
peers and clients all run in it) holds no more descriptors than before the case. The memory
case runs the tunnel as a subprocess so that its RSS is the tunnel's alone.

Timeouts are real seconds here (the tunnel, its peers and the kernel take part), so the
configured ones are short ("1s", "3s") and the bounds generous: a loaded two-core machine is
slow, not broken.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import pytest
import trio
from faultpeers import (
    ECHO_HOST,
    FAULT_HOST,
    LOOPBACK,
    WAIT_SECONDS,
    Heartbeat,
    Peer,
    Rig,
    abort,
    byte_by_byte,
    closed_reasons,
    fd_count,
    fds_settle,
    heartbeat,
    open_tunnel,
    read_until_closed,
    silent,
    start_rig,
    stream_forever,
    switch_then_close,
    vm_rss,
)
from rawhttp import (
    header,
    read_exactly,
    read_head,
    serve_loopback,
    status_of,
    switching,
    upgrade_request,
)
from test_lifecycle_e2e import (
    config_text,
    tunnel_run,
)

RELAYS = ["splice", "copy"]
PROMPT = 2.0
"""A close caused by a peer reaches the other side within this (it takes milliseconds)."""
SLACK = 2.0
"""How late a timed close may come on a loaded machine."""
EARLY = 0.1
"""How early a timed close may come: clock readings, not load."""
TEST_SECONDS = 60.0
MiB = 1 << 20


@asynccontextmanager
async def watched(rig: Rig) -> AsyncIterator[Heartbeat]:
    """Run the block beside a heartbeat; then every descriptor opened since must be closed."""
    baseline = fd_count()
    async with heartbeat(rig.port) as beat:
        yield beat
    count = await fds_settle(baseline)
    assert count <= baseline, f"{count} descriptors open after the case, {baseline} before"


async def ended(peer: Peer, seconds: float) -> float:
    """Wait (bounded) until a connection of ``peer`` ended; when."""
    with trio.fail_after(seconds):
        await peer.ended.wait()
    return trio.current_time()


# --- 1. a backend killed mid-stream -----------------------------------------------------------


@pytest.mark.parametrize("relay", RELAYS)
@pytest.mark.parametrize(("kill", "reason"), [("fin", "backend_eof"), ("rst", "backend_reset")])
async def test_a_backend_killed_mid_stream_closes_the_client_promptly(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, relay: str, kill: str, reason: str
) -> None:
    peer = Peer(stream_forever)
    rig = await start_rig(nursery, caplog, await peer.serve(nursery), relay=relay)
    with trio.fail_after(TEST_SECONDS):
        async with watched(rig):
            client, _ = await open_tunnel(rig.port, FAULT_HOST)
            async with client:
                first = await read_exactly(client, MiB)  # the stream flows
                [backend] = peer.streams
                killed_at = trio.current_time()
                if kill == "rst":
                    abort(backend)
                else:
                    await backend.aclose()
                end = await read_until_closed(client)
    assert first == bytes(MiB)
    assert end.how in ("EOF", "reset")
    assert end.at - killed_at < PROMPT, f"the client saw the close {end.at - killed_at:.2f} s late"
    assert closed_reasons(caplog, "fault") == [reason]


# --- 2. a client reset mid-stream --------------------------------------------------------------


@pytest.mark.parametrize("relay", RELAYS)
async def test_a_client_reset_mid_stream_closes_the_backend_side(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, relay: str
) -> None:
    peer = Peer(stream_forever)
    rig = await start_rig(nursery, caplog, await peer.serve(nursery), relay=relay)
    with trio.fail_after(TEST_SECONDS):
        async with watched(rig):
            client, _ = await open_tunnel(rig.port, FAULT_HOST)
            async with trio.open_nursery() as both:
                both.start_soon(read_exactly, client, MiB)  # the backend's stream flows down
                await client.send_all(bytes(2 * MiB))  # and the client's up
            reset_at = trio.current_time()
            abort(client)
            ended_at = await ended(peer, WAIT_SECONDS)
    assert ended_at - reset_at < PROMPT, f"the backend saw it {ended_at - reset_at:.2f} s late"
    assert {e.how for e in peer.endings} <= {"broken", "EOF", "reset"}
    assert closed_reasons(caplog, "fault") == ["client_reset"]


# --- 3. a backend that never answers; one that answers byte by byte -----------------------------


async def upgrade_answer(port: int, host: str = FAULT_HOST) -> tuple[bytes, float]:
    """Send an upgrade; the head of the answer, and how long it took."""
    started = trio.current_time()
    async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
        await stream.send_all(upgrade_request(host))
        head, _ = await read_head(stream)
    return head, trio.current_time() - started


async def test_a_backend_that_never_answers_gets_504_after_response_timeout(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    peer = Peer(silent)
    rig = await start_rig(nursery, caplog, await peer.serve(nursery), response_timeout="1s")
    with trio.fail_after(TEST_SECONDS):
        async with watched(rig):
            head, elapsed = await upgrade_answer(rig.port)
            answered_at = trio.current_time()
            ended_at = await ended(peer, WAIT_SECONDS)
    assert status_of(head) == 504, head
    assert 1.0 - EARLY <= elapsed < 1.0 + SLACK, elapsed
    assert ended_at - answered_at < PROMPT, "the backend connection is closed with the 504"


async def test_a_101_sent_byte_by_byte_a_second_apart_times_out_at_response_timeout(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """response_timeout bounds the whole reply head, not the silence between two bytes: a
    backend dribbling one byte a second (a 101 needs ~130) is answered 504 at 3 s."""
    peer = Peer(byte_by_byte, options={"gap": 1.0})
    rig = await start_rig(nursery, caplog, await peer.serve(nursery), response_timeout="3s")
    with trio.fail_after(TEST_SECONDS):
        async with watched(rig):
            head, elapsed = await upgrade_answer(rig.port)
            answered_at = trio.current_time()
            ended_at = await ended(peer, WAIT_SECONDS)
    assert status_of(head) == 504, head
    assert 3.0 - EARLY <= elapsed < 3.0 + SLACK, elapsed
    assert 2 <= peer.sent <= 6, f"{peer.sent} bytes of the 101 sent"
    # The backend notices at its next byte, a second later at most.
    assert ended_at - answered_at < 1.0 + PROMPT


async def test_a_101_sent_byte_by_byte_within_response_timeout_is_accepted(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """A slow but valid 101 (20 ms a byte, ~2.6 s in all) inside response_timeout (10s)."""
    peer = Peer(byte_by_byte, options={"gap": 0.02})
    rig = await start_rig(nursery, caplog, await peer.serve(nursery), response_timeout="10s")
    with trio.fail_after(TEST_SECONDS):
        async with watched(rig):
            started = trio.current_time()
            client, rest = await open_tunnel(rig.port, FAULT_HOST)
            elapsed = trio.current_time() - started
            async with client:
                await client.send_all(b"after a slow 101")
                echoed = await read_exactly(client, 16, rest)
            await ended(peer, WAIT_SECONDS)
    assert echoed == b"after a slow 101"
    assert elapsed > 1.0, "the 101 really came slowly"
    assert closed_reasons(caplog, "fault") == ["client_eof"]


# --- 4. a 101 followed at once by a close -----------------------------------------------------


async def test_a_101_followed_at_once_by_a_close_gives_the_client_the_101_then_eof(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    peer = Peer(switch_then_close)
    rig = await start_rig(nursery, caplog, await peer.serve(nursery))
    with trio.fail_after(TEST_SECONDS):
        async with watched(rig):
            client, rest = await open_tunnel(rig.port, FAULT_HOST)  # asserts the 101
            async with client:
                switched_at = trio.current_time()
                end = await read_until_closed(client)
    assert (rest, end.received, end.how) == (b"", 0, "EOF")
    assert end.at - switched_at < PROMPT
    assert closed_reasons(caplog, "fault") == ["backend_eof"]


# --- 5. a client that reads nothing while the backend streams: bounded memory --------------------

STREAM_BYTES = 200 * MiB
MAX_RSS_GROWTH = 64 * MiB
STALL_SECONDS = 1.0
"""The backend has sent nothing for this long: the tunnel stopped reading it."""


@pytest.mark.slow
@pytest.mark.parametrize("relay", ["auto", "splice", "copy"])
async def test_a_client_that_reads_nothing_keeps_the_tunnels_memory_bounded(
    nursery: trio.Nursery, tmp_path: Path, relay: str
) -> None:
    """The tunnel runs as a subprocess; the backend tries to send 200 MiB to a client that
    reads nothing. The backend stalls once the buffers on the way are full, the tunnel's RSS
    grows by less than 64 MiB, and once the client reads, all 200 MiB arrive intact."""
    block = random.Random(14).randbytes(MiB)
    progress = {"sent": 0}
    done = trio.Event()

    async def streamer(stream: trio.SocketStream) -> None:
        async with stream:
            await read_head_and_switch(stream)
            for _ in range(STREAM_BYTES // MiB):
                await stream.send_all(block)
                progress["sent"] += MiB
        done.set()

    backend_port = await serve_loopback(nursery, streamer)
    echo_port = await serve_loopback(nursery, echo_and_close)
    routes = [
        ("echo", ECHO_HOST, f"ws://{LOOPBACK}:{echo_port}"),
        ("fault", FAULT_HOST, f"ws://{LOOPBACK}:{backend_port}"),
    ]
    with trio.fail_after(TEST_SECONDS):
        async with tunnel_run(tmp_path, config_text(routes, relay=relay)) as run:
            [port] = run.ports()
            pid = run.process.pid
            warm, _ = await open_tunnel(port, ECHO_HOST)
            await warm.aclose()
            fds_before = fd_count(pid)
            rss_before = peak = vm_rss(pid)
            async with heartbeat(port):
                client, rest = await open_tunnel(port, FAULT_HOST)
                last, still_since = -1, trio.current_time()
                for _ in range(int(WAIT_SECONDS / 0.05)):
                    peak = max(peak, vm_rss(pid))
                    if progress["sent"] != last:
                        last, still_since = progress["sent"], trio.current_time()
                    elif trio.current_time() - still_since > STALL_SECONDS:
                        break
                    await trio.sleep(0.05)
                stalled_at = progress["sent"]
                digest = hashlib.sha256(rest)
                received = len(rest)
                async with client:
                    while chunk := await client.receive_some(MiB):
                        digest.update(chunk)
                        received += len(chunk)
                        assert received <= STREAM_BYTES
                await done.wait()
            fds_after = await settle_in(pid, fds_before)
    expected = hashlib.sha256()
    for _ in range(STREAM_BYTES // MiB):
        expected.update(block)
    assert stalled_at < STREAM_BYTES // 4, f"the backend sent {stalled_at} bytes unread"
    growth = peak - rss_before
    assert growth < MAX_RSS_GROWTH, f"RSS grew {growth / MiB:.1f} MiB"
    assert received == STREAM_BYTES
    assert digest.hexdigest() == expected.hexdigest()
    assert fds_after <= fds_before, (fds_after, fds_before)


async def read_head_and_switch(stream: trio.SocketStream) -> bytes:
    head, rest = await read_head(stream)
    await stream.send_all(switching(header(head, "Sec-WebSocket-Key")))
    return rest


async def echo_and_close(stream: trio.SocketStream) -> None:
    async with stream:
        rest = await read_head_and_switch(stream)
        with suppress(trio.BrokenResourceError):
            await stream.send_all(rest)
            while data := await stream.receive_some(65536):
                await stream.send_all(data)


async def settle_in(pid: int, baseline: int) -> int:
    """Poll (bounded) until ``pid`` holds at most ``baseline`` descriptors; the last count."""
    count = fd_count(pid)
    with trio.move_on_after(WAIT_SECONDS):
        while (count := fd_count(pid)) > baseline:
            await trio.sleep(0.05)
    return count
