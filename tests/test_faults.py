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
import os
import random
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import pytest
import trio
from conftest import WsBackend
from faultpeers import (
    ECHO_HOST,
    FAULT_HOST,
    LOOPBACK,
    WAIT_SECONDS,
    Ending,
    Heartbeat,
    Peer,
    Rig,
    abort,
    accept,
    byte_by_byte,
    closed_reasons,
    fd_count,
    fds_settle,
    heartbeat,
    hold,
    make_tls_files,
    open_tunnel,
    quiet,
    read_until_closed,
    recorder,
    silent,
    start_rig,
    stream_forever,
    switch_then_close,
    tunnel_ids,
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
from test_admin import call
from test_lifecycle_e2e import (
    BINARY,
    CLOSE,
    TEXT,
    Closed,
    client_frame,
    config_text,
    frame_head,
    parse_frames,
    server_frame,
    tunnel_run,
    wait_closed,
    ws_open,
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
    baseline = await quiet(rig)
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


# --- 6. a client that never finishes TLS -------------------------------------------------------


async def test_a_client_that_never_finishes_tls_is_closed_at_handshake_timeout(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """Half a ClientHello, then silence: closed 1 s (handshake_timeout) after the connect."""
    files = make_tls_files(tmp_path)
    url = f"ws://{LOOPBACK}:{await serve_loopback(nursery, echo_and_close)}"
    rig = await start_rig(nursery, caplog, url, tls=files.listener(), handshake_timeout="1s")
    assert rig.tls_port is not None
    hello = client_hello(files.client_context())
    with trio.fail_after(TEST_SECONDS):
        async with watched(rig):
            started = trio.current_time()
            async with await trio.open_tcp_stream(LOOPBACK, rig.tls_port) as client:
                await client.send_all(hello[: len(hello) // 2])
                end = await read_until_closed(client)
    assert end.received == 0
    assert 1.0 - EARLY <= end.at - started < 1.0 + SLACK, end.at - started


def client_hello(context: ssl.SSLContext) -> bytes:
    """The first flight of a real TLS client (its ClientHello record)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert len(hello) > 100, hello
    return hello


# --- 7. a peer that sends a Close frame and then garbage -----------------------------------------

GOING_AWAY = 1001
NORMAL = 1000


async def test_close_then_garbage_to_a_websockets_backend_ends_the_tunnel(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, echo_backend: WsBackend
) -> None:
    """A client's Close, then 4 KiB of noise in the same write: the real ``websockets``
    backend answers the Close and hangs up, and the client gets that Close, then EOF."""
    rig = await start_rig(nursery, caplog, echo_backend.url)
    noise = random.Random(1).randbytes(4096)
    with trio.fail_after(TEST_SECONDS):
        async with watched(rig):
            client, rest = await open_tunnel(rig.port, FAULT_HOST)
            async with client:
                await client.send_all(client_frame(TEXT, b"hello"))
                kept = bytearray(rest)
                while not parse_frames(bytes(kept))[0]:
                    kept += await client.receive_some(65536)
                sent_at = trio.current_time()
                await client.send_all(client_frame(CLOSE, NORMAL.to_bytes(2, "big")) + noise)
                end = await read_until_closed(client, keep=kept)
            await wait_for_backend(echo_backend)
    frames, tail = parse_frames(bytes(kept))
    assert [(f.opcode, f.payload) for f in frames[:1]] == [(TEXT, b"hello")]
    assert [f.opcode for f in frames[1:]] == [CLOSE], frames
    assert frames[1].close_code == NORMAL
    assert tail == b""
    assert end.how == "EOF"
    assert end.at - sent_at < PROMPT
    assert closed_reasons(caplog, "fault") == ["backend_eof"]


async def wait_for_backend(backend: WsBackend) -> None:
    """Until the threaded backend has no connection open (bounded)."""
    with trio.fail_after(WAIT_SECONDS):
        while backend.open_now:
            await trio.sleep(0.02)


async def test_close_then_a_frame_that_never_ends_then_an_admin_close_ends_within_close_grace(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """A client's Close, then the head of a 1 TiB frame and a little of it, then silence: the
    tunnel's frame tracker is inside that frame forever. An admin close waits for the frame
    no longer than close_grace (1 s), then both sides are closed."""
    peer = Peer(recorder)
    rig = await start_rig(nursery, caplog, await peer.serve(nursery), close_grace="1s")
    key = os.urandom(4)
    noise = frame_head(BINARY, 1 << 40, masked=True) + key + random.Random(2).randbytes(1000)
    with trio.fail_after(TEST_SECONDS):
        async with watched(rig):
            client, _ = await open_tunnel(rig.port, FAULT_HOST)
            async with client:
                await client.send_all(client_frame(CLOSE, NORMAL.to_bytes(2, "big")) + noise)
                [kept] = await kept_by(peer, len(noise) + 8)
                [tunnel] = await tunnel_ids(rig, "fault", 1)
                closing_at = trio.current_time()
                answer = await call(rig.admin, "POST", f"/tunnels/{tunnel}/close")
                end = await read_until_closed(client)
            backend_end_at = await ended(peer, WAIT_SECONDS)
    assert (answer.status, answer.json) == (200, {"closed": tunnel})
    assert end.how in ("EOF", "reset")
    assert end.at - closing_at < 1.0 + SLACK, end.at - closing_at
    assert backend_end_at - closing_at < 1.0 + SLACK
    assert kept.startswith(client_frame_prefix()), "the client's Close went through first"
    assert closed_reasons(caplog, "fault") == ["admin"]


async def test_close_then_garbage_from_a_backend_ends_a_websockets_clients_tunnel(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """The other way: a raw backend sends a Close and 4 KiB of noise in one write, then
    hangs up once the client's Close reply arrives. The real ``websockets`` client sees the
    Close (1000) and its connection ends promptly; nothing hangs on the noise."""
    noise = random.Random(3).randbytes(4096)
    replies: list[bytes] = []

    async def close_then_noise(peer: Peer, stream: trio.SocketStream) -> None:
        rest = await accept(stream)
        peer.arrived.set()
        await stream.send_all(server_frame(CLOSE, NORMAL.to_bytes(2, "big")) + noise)
        kept = bytearray(rest)
        with trio.fail_after(WAIT_SECONDS), suppress(trio.BrokenResourceError):
            while not parse_frames(bytes(kept))[0]:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                kept += chunk
        replies.append(bytes(kept))

    peer = Peer(close_then_noise)
    rig = await start_rig(nursery, caplog, await peer.serve(nursery))
    with trio.fail_after(TEST_SECONDS):
        async with watched(rig):
            started = time.monotonic()
            closed = await trio.to_thread.run_sync(until_closed, rig.port)
            await ended(peer, WAIT_SECONDS)
    assert closed.code == NORMAL
    assert closed.at - started < PROMPT + 1.0
    [reply] = replies
    frames, _ = parse_frames(reply)
    assert [(f.opcode, f.masked, f.close_code) for f in frames] == [(CLOSE, True, NORMAL)]
    assert closed_reasons(caplog, "fault") in (["backend_eof"], ["client_eof"])


def until_closed(port: int) -> Closed:
    """A real ``websockets`` client through route ``fault``, until its connection ends."""
    with ws_open(port, FAULT_HOST) as ws:
        return wait_closed(ws, WAIT_SECONDS)


def client_frame_prefix() -> bytes:
    """The first two bytes of a masked Close frame with a 2-byte payload."""
    return bytes([0x80 | CLOSE, 0x80 | 2])


async def kept_by(peer: Peer, size: int) -> list[bytearray]:
    """What ``recorder`` backends kept, once the first has ``size`` bytes (bounded)."""
    with trio.fail_after(WAIT_SECONDS):
        while not peer.options.get("kept") or len(peer.options["kept"][0]) < size:
            await trio.sleep(0.02)
    kept: list[bytearray] = peer.options["kept"]
    return kept


# --- 8. a client that leaves while the tunnel waits for the backend's reply ----------------------


@pytest.mark.parametrize("leave", ["fin", "rst"])
async def test_a_client_leaving_before_the_101_closes_the_backend_connection_at_once(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, leave: str
) -> None:
    peer = Peer(silent)
    # Long enough to tell "at once" (under 2 s) from "at response_timeout".
    rig = await start_rig(nursery, caplog, await peer.serve(nursery), response_timeout="6s")
    with trio.fail_after(TEST_SECONDS):
        async with watched(rig):
            client = await trio.open_tcp_stream(LOOPBACK, rig.port)
            await client.send_all(upgrade_request(FAULT_HOST))
            with trio.fail_after(WAIT_SECONDS):
                await peer.arrived.wait()
            left_at = trio.current_time()
            if leave == "rst":
                abort(client)
            else:
                await client.aclose()
            with trio.move_on_after(PROMPT + 1):
                await peer.ended.wait()
            noticed = peer.ended.is_set()
            # The end, at once or (before issue 14) at response_timeout: descriptors settle.
            await ended(peer, WAIT_SECONDS)
    assert noticed, "the backend connection was kept after the client left"
    [end] = peer.endings
    assert end.at - left_at < PROMPT


# --- 9. a half-closed tunnel --------------------------------------------------------------------


async def test_a_half_closed_tunnel_with_a_silent_backend_ends_at_half_close_timeout(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """The client sends its FIN; the backend gets it and stays silent with its connection
    open: 1 s (half_close_timeout) later the tunnel ends, not after idle_timeout (1 h)."""
    release = trio.Event()
    peer = Peer(hold, options={"release": release})
    rig = await start_rig(
        nursery, caplog, await peer.serve(nursery), half_close_timeout="1s", idle_timeout="1h"
    )
    with trio.fail_after(TEST_SECONDS):
        async with watched(rig):
            client, _ = await open_tunnel(rig.port, FAULT_HOST)
            async with client:
                await client.send_all(b"last words")
                await client.send_eof()
                fin_at = trio.current_time()
                end = await read_until_closed(client)
            release.set()
            await ended(peer, WAIT_SECONDS)
    [backend_saw] = peer.endings
    assert (backend_saw.received, backend_saw.how) == (len(b"last words"), "EOF")
    assert end.how in ("EOF", "reset")
    assert 1.0 - EARLY <= end.at - fin_at < 1.0 + SLACK, end.at - fin_at
    assert closed_reasons(caplog, "fault") == ["half_close_timeout"]


async def test_a_half_closed_tunnel_still_flowing_the_other_way_is_not_cut(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """After the client's FIN the backend answers for 3 s, a piece every 0.4 s: never 1 s
    (half_close_timeout) of silence, so the client gets every piece, then the backend's EOF."""
    pieces = [f"piece {i}\n".encode() for i in range(8)]

    async def answer_slowly(peer: Peer, stream: trio.SocketStream) -> None:
        await read_head_and_switch(stream)
        peer.end(await read_until_closed(stream))
        for piece in pieces:
            await trio.sleep(0.4)
            await stream.send_all(piece)

    peer = Peer(answer_slowly)
    rig = await start_rig(
        nursery, caplog, await peer.serve(nursery), half_close_timeout="1s", idle_timeout="1h"
    )
    with trio.fail_after(TEST_SECONDS):
        async with watched(rig):
            client, rest = await open_tunnel(rig.port, FAULT_HOST)
            async with client:
                await client.send_eof()
                kept = bytearray(rest)
                end = await read_until_closed(client, keep=kept)
            await ended(peer, WAIT_SECONDS)
    assert bytes(kept) == b"".join(pieces)
    assert end.how == "EOF"
    assert closed_reasons(caplog, "fault") in (["client_eof"], ["backend_eof"])


# --- 10. admin closes and reloads in the middle of all this ---------------------------------------


class Faults:
    """Every kind of stuck tunnel at once, each on its own route: ``stall`` (the backend
    streams to a client that reads nothing), ``half`` (the client sent its FIN, the backend
    holds its connection silently), ``frame`` (the client is in the middle of a 1 MiB frame),
    and two upgrades still waiting for a reply: ``fault`` (a silent backend) and ``slow`` (a
    101 a byte every 0.5 s)."""

    def __init__(self) -> None:
        self.release = trio.Event()
        self.stall = Peer(stream_forever)
        self.half = Peer(hold, options={"release": self.release})
        self.frame = Peer(recorder)
        self.pending = Peer(silent)
        self.slow = Peer(byte_by_byte, options={"gap": 0.5})
        self.clients: dict[str, trio.SocketStream] = {}
        self.answers: dict[str, tuple[bytes, float]] = {}

    @property
    def tunnels(self) -> dict[str, Peer]:
        return {"stall": self.stall, "half": self.half, "frame": self.frame}

    async def start(self, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> Rig:
        more = {name: await peer.serve(nursery) for name, peer in self.tunnels.items()}
        more["slow"] = await self.slow.serve(nursery)
        return await start_rig(
            nursery,
            caplog,
            await self.pending.serve(nursery),
            more=more,
            response_timeout="3s",
            close_grace="1s",
            drain_timeout="2s",
        )

    async def open(self, rig: Rig, nursery: trio.Nursery) -> None:
        """Bring every tunnel into its stuck state; the two pending upgrades run in
        ``nursery`` until they are answered."""
        for name in ("fault", "slow"):
            nursery.start_soon(self._pending, rig.port, name)
        stall, _ = await open_tunnel(rig.port, "stall.test")
        half, _ = await open_tunnel(rig.port, "half.test")
        await half.send_all(b"before the FIN")
        await half.send_eof()
        frame, _ = await open_tunnel(rig.port, "frame.test")
        key = os.urandom(4)
        await frame.send_all(frame_head(BINARY, MiB, masked=True) + key + bytes(MiB // 2))
        self.clients = {"stall": stall, "half": half, "frame": frame}
        with trio.fail_after(WAIT_SECONDS):
            await self.stall.started.wait()
            while not self.half.endings:  # the FIN went through
                await trio.sleep(0.02)
        await kept_by(self.frame, MiB // 2)

    async def _pending(self, port: int, name: str) -> None:
        host = FAULT_HOST if name == "fault" else f"{name}.test"
        self.answers[name] = await upgrade_answer(port, host)

    async def close_all(self) -> None:
        self.release.set()
        for client in self.clients.values():
            await trio.aclose_forcefully(client)


async def test_admin_closes_and_a_reload_in_the_middle_of_every_fault(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """A reload that keeps every route changes nothing for stuck tunnels or pending upgrades;
    then an admin close ends each stuck tunnel within close_grace (1 s), the client and the
    backend side both; the pending upgrades get their 504 at response_timeout (3 s)."""
    faults = Faults()
    rig = await faults.start(nursery, caplog)
    closes: dict[str, tuple[float, Ending, float]] = {}
    with trio.fail_after(TEST_SECONDS):
        async with watched(rig):
            async with trio.open_nursery() as pending:
                opened_at = trio.current_time()
                await faults.open(rig, pending)
                reloaded = await rig.control.reload(rig.config(idle_timeout="30m"))
                ids = {name: (await tunnel_ids(rig, name, 1))[0] for name in faults.tunnels}
                for name, peer in faults.tunnels.items():
                    closing_at = trio.current_time()
                    answer = await call(rig.admin, "POST", f"/tunnels/{ids[name]}/close")
                    assert answer.status == 200, answer
                    if name == "half":
                        faults.release.set()
                    end = await read_until_closed(faults.clients[name])
                    closes[name] = (closing_at, end, await ended(peer, WAIT_SECONDS))
            await faults.close_all()
    assert (reloaded.added, reloaded.removed, reloaded.draining) == ((), (), 0)
    for name, (closing_at, end, backend_at) in closes.items():
        assert end.how in ("EOF", "reset"), (name, end)
        assert end.at - closing_at < 1.0 + SLACK, (name, end.at - closing_at)
        if name != "half":  # that backend only closes once released, after its client's end
            assert backend_at - closing_at < 1.0 + SLACK, (name, backend_at - closing_at)
        assert closed_reasons(caplog, name) == ["admin"], name
    for name, (head, elapsed) in faults.answers.items():
        assert status_of(head) == 504, (name, head)
        assert 3.0 - EARLY <= elapsed < 3.0 + SLACK, (name, elapsed)
    assert trio.current_time() - opened_at < TEST_SECONDS


async def test_a_reload_removing_their_routes_drains_every_stuck_tunnel_within_drain_timeout(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """A reload keeping only route ``echo`` (the heartbeat's): each stuck tunnel is closed
    within drain_timeout (2 s) and close_grace (1 s), both sides, while the heartbeat goes on."""
    faults = Faults()
    rig = await faults.start(nursery, caplog)
    ends: dict[str, Ending] = {}
    with trio.fail_after(TEST_SECONDS):
        async with watched(rig):
            async with trio.open_nursery() as pending:
                await faults.open(rig, pending)
                reloaded_at = trio.current_time()
                reloaded = await rig.control.reload(rig.only_echo())
                # Released only once the drain's polite closes are out (they are due at once
                # here): released with them, its close races the drain's in the same batch.
                await trio.sleep(0.2)
                faults.release.set()
                async with trio.open_nursery() as reading:
                    for name, client in faults.clients.items():
                        reading.start_soon(read_end, client, ends, name)
                for peer in faults.tunnels.values():
                    await ended(peer, WAIT_SECONDS)
                backends_at = trio.current_time()
            await faults.close_all()
    assert set(reloaded.removed) == {"fault", "stall", "half", "frame", "slow"}
    assert reloaded.draining == 3
    for name, end in ends.items():
        assert end.how in ("EOF", "reset"), (name, end)
        assert end.at - reloaded_at < 2.0 + 1.0 + SLACK, (name, end.at - reloaded_at)
        assert closed_reasons(caplog, name) == ["drain"], name
    assert backends_at - reloaded_at < 2.0 + 1.0 + SLACK


async def read_end(client: trio.SocketStream, ends: dict[str, Ending], name: str) -> None:
    ends[name] = await read_until_closed(client)


# --- 11. 500 cycles of the cheaper faults -----------------------------------------------------

CYCLES = 500
CONCURRENCY = 10
FAULTS = ("client_fin", "client_rst", "backend_fin", "backend_rst", "switch_then_close")


async def cycling_backend(stream: trio.SocketStream) -> None:
    """Acts out the fault the request's path names: echo one message, then close (FIN or
    RST) for ``backend_*``; echo until the client's end otherwise; 101 and close at once."""
    async with stream:
        head, rest = await read_head(stream)
        fault = head.split(b" ", 2)[1].decode().strip("/")
        await stream.send_all(switching(header(head, "Sec-WebSocket-Key")))
        if fault == "switch_then_close":
            return
        with suppress(trio.BrokenResourceError):
            message = await read_exactly(stream, 64, rest)
            await stream.send_all(message)
            if fault == "backend_rst":
                abort(stream)
                return
            if fault == "backend_fin":
                return
            await read_until_closed(stream)


async def one_cycle(port: int, fault: str) -> str:
    """Connect, upgrade, exchange, fault, close; how the client's connection ended."""
    client, rest = await open_tunnel(port, FAULT_HOST, path=f"/{fault}")
    async with client:
        if fault == "switch_then_close":
            return (await read_until_closed(client)).how
        message = os.urandom(64)
        await client.send_all(message)
        assert await read_exactly(client, 64, rest) == message
        if fault == "client_rst":
            abort(client)
            return "reset sent"
        if fault == "client_fin":
            await client.send_eof()
        return (await read_until_closed(client)).how


@pytest.mark.slow
@pytest.mark.parametrize("relay", ["splice", "copy"])
async def test_500_fault_cycles_leave_the_descriptors_at_the_baseline(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, relay: str
) -> None:
    """Ten clients at a time, 500 cycles in all, each fault 100 times. Afterwards the process
    holds exactly the descriptors it held before: no slack is needed, because the warm-up
    tunnel already created what the engine keeps (its epoll set and eventfd) and the splice
    pipe pool is emptied when the last tunnel ends."""
    url = f"ws://{LOOPBACK}:{await serve_loopback(nursery, cycling_backend)}"
    rig = await start_rig(nursery, caplog, url, relay=relay)
    outcomes: dict[str, list[str]] = {fault: [] for fault in FAULTS}

    async def worker(first: int) -> None:
        for i in range(first, CYCLES, CONCURRENCY):
            fault = FAULTS[i % len(FAULTS)]
            with trio.fail_after(WAIT_SECONDS):
                outcomes[fault].append(await one_cycle(rig.port, fault))

    with trio.fail_after(TEST_SECONDS):
        async with watched(rig), trio.open_nursery() as workers:
            for first in range(CONCURRENCY):
                workers.start_soon(worker, first)
    assert sum(len(ends) for ends in outcomes.values()) == CYCLES
    assert set(outcomes["client_fin"]) == {"EOF"}
    assert set(outcomes["backend_fin"]) == {"EOF"}
    assert set(outcomes["switch_then_close"]) == {"EOF"}
    assert set(outcomes["backend_rst"]) <= {"EOF", "reset"}
    reasons = closed_reasons(caplog, "fault")
    assert len(reasons) == CYCLES
    assert reasons.count("client_reset") == CYCLES // len(FAULTS)
    assert reasons.count("backend_reset") == CYCLES // len(FAULTS)
