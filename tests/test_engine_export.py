"""Moving a live tunnel from one engine to another (``Engine.export``, ``Engine.adopt_state``).

Two engines run side by side in one process, as the old and the new process of a hand-off would.
Tunnels are real loopback TCP pairs (the harness of ``test_engine``): the test holds the outer
ends, the engines the inner ones. A tunnel is exported from engine A while bytes flow, or while a
splice pipe holds some, and adopted by engine B; what the outer ends receive must be exactly what
was sent. The engine that gave a tunnel away must never report it closed; the one that took it
reports its close once. Deadlines run on trio's MockClock.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing
from rawhttp import read_exactly, read_to_eof
from test_engine import (
    GUARD_SECONDS,
    MODES,
    Conn,
    MiB,
    open_fds,
    receive_digest,
    send_in_pieces,
    sha256,
    stream_of,
    tcp_pair,
    wait_until,
)

from tunnel.core.wsframes import FramePosition
from tunnel.net.engine import Engine
from tunnel.net.handoff import FlowState, TunnelState, receive_tunnels, send_tunnels
from tunnel.net.relay import RelayStats
from tunnel.net.tlsconn import TLSConn
from tunnel.reasons import CloseReason

PLAIN_MODES = [mode for mode in MODES if mode.values[0] != "auto"]
"""splice and copy: the two ways bytes can sit in a tunnel."""


@dataclass(eq=False)
class Pair:
    """Engines A (the old process's) and B (the new one's), running."""

    a: Engine
    b: Engine
    conns: list[Conn] = field(default_factory=list)

    def open(
        self, *, buffer: int | None = None, websocket: bool = False, lifetime: float = 0.0
    ) -> Conn:
        client_outer, client_inner = tcp_pair(buffer)
        backend_inner, backend_outer = tcp_pair(buffer)
        client_inner.setblocking(False)
        backend_inner.setblocking(False)
        conn = Conn(stream_of(client_outer), stream_of(backend_outer), RelayStats())
        self.conns.append(conn)
        conn.tunnel = self.a.adopt(
            client_inner,
            backend_inner,
            conn.stats,
            conn.on_close,
            websocket=websocket,
            lifetime=lifetime,
        )
        return conn

    def move(self, conn: Conn, **meta: str) -> TunnelState:
        """Export ``conn`` from A and adopt it in B, as the two processes would (the sockets
        themselves are passed here; ``test_handoff_wire`` passes descriptors)."""
        assert conn.tunnel is not None
        exported = self.a.export(conn.tunnel, meta)
        assert exported is not None, "a plain tunnel must be exportable"
        client, backend, state = exported
        assert state.meta == meta
        # The JSON round trip is what crosses a process boundary.
        state = TunnelState.from_json(state.to_json())
        conn.tunnel = self.b.adopt_state(client, backend, state, conn.on_close, conn.stats)
        return state


@asynccontextmanager
async def two_engines(
    *,
    relay: str = "copy",
    idle_timeout: float = 0.0,
    close_grace: float = 1.0,
    guard: float = GUARD_SECONDS,
) -> AsyncIterator[Pair]:
    """Engines A and B for the body; afterwards every tunnel was reported closed once (by B,
    since A only ever gives them away)."""
    pair = Pair(
        *(
            Engine(relay=relay, splice_pipes=16, idle_timeout=idle_timeout, close_grace=close_grace)
            for _ in range(2)
        )
    )
    try:
        with trio.fail_after(guard):
            async with trio.open_nursery() as nursery:
                await nursery.start(pair.a.run)
                await nursery.start(pair.b.run)
                yield pair
                nursery.cancel_scope.cancel()
    finally:
        for conn in pair.conns:
            conn.close_outer()
    for conn in pair.conns:
        assert conn.close_calls == 1, "on_close must run exactly once per tunnel"


# --- bytes in flight ---------------------------------------------------------------------------


@pytest.mark.parametrize("relay", MODES)
async def test_a_tunnel_streaming_both_ways_moves_without_losing_a_byte(relay: str) -> None:
    size = 16 * MiB
    up, down = os.urandom(size), os.urandom(size)
    digests: dict[str, str] = {}
    async with two_engines(relay=relay) as pair:
        conn = pair.open()

        async def collect(name: str, stream: trio.SocketStream, max_read: int) -> None:
            digests[name] = await receive_digest(stream, size, max_read=max_read)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_in_pieces, conn.client, up, (65_537, 1, 300_001))
            nursery.start_soon(send_in_pieces, conn.backend, down, (1_000_003, 4097))
            nursery.start_soon(collect, "up", conn.backend, 2048)
            nursery.start_soon(collect, "down", conn.client, 65536)
            # Mid-stream: both directions under way, neither finished.
            await wait_until(lambda: 2 * MiB < conn.stats.bytes_up < size // 2)
            before = (conn.stats.bytes_up, conn.stats.bytes_down)
            state = pair.move(conn, id="7")
            assert (state.bytes_up, state.bytes_down) == before
            assert pair.a.statistics().tunnels == 0
            assert pair.b.statistics().tunnels == 1
        assert digests == {"up": sha256(up), "down": sha256(down)}
        assert (conn.stats.bytes_up, conn.stats.bytes_down) == (size, size)
        assert conn.close_calls == 0, "engine A must not report a tunnel it gave away"


@pytest.mark.parametrize("relay", PLAIN_MODES)
async def test_bytes_held_by_the_engine_for_a_stalled_destination_move_with_the_tunnel(
    relay: str,
) -> None:
    # The backend reads nothing, so the engine ends up holding bytes it could not write: in a
    # splice pipe (splice) or parked (copy). They must reach the backend first, from engine B.
    data = os.urandom(8 * MiB)
    async with two_engines(relay=relay) as pair:
        conn = pair.open(buffer=64 * 1024)
        assert conn.tunnel is not None
        flow = conn.tunnel.up

        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.client.send_all, data)
            await wait_until(lambda: bool(flow.piped if relay == "splice" else flow.parked))
            held = flow.piped or len(flow.parked)
            pipes_before = pair.a.statistics().pipes_in_use
            state = pair.move(conn)
            assert len(state.up.pending) == held
            assert state.up.pending == data[state.bytes_up : state.bytes_up + held]
            if relay == "splice":
                assert pipes_before == 1
                assert pair.a.statistics().pipes_in_use == 0, "the drained pipe goes back"
            got = await receive_digest(conn.backend, len(data))
        assert got == sha256(data)
        assert conn.stats.bytes_up == len(data)


async def test_a_tunnel_with_nothing_in_flight_moves_and_keeps_relaying() -> None:
    async with two_engines() as pair:
        conn = pair.open()
        await conn.client.send_all(b"before")
        assert await read_exactly(conn.backend, 6) == b"before"
        state = pair.move(conn)
        assert state.up == FlowState()
        assert state.down == FlowState()
        await conn.backend.send_all(b"after")
        assert await read_exactly(conn.client, 5) == b"after"
        assert (conn.stats.bytes_up, conn.stats.bytes_down) == (6, 5)
        await conn.client.send_eof()
        assert await read_to_eof(conn.backend) == b""
        await conn.backend.send_eof()
        await conn.closed.wait()
        assert conn.stats.close_reason == CloseReason.CLIENT_EOF


@pytest.mark.parametrize("relay", PLAIN_MODES)
async def test_a_tunnel_moved_back_before_its_first_event_still_relays(relay: str) -> None:
    # A to B, and at once back to A: B never saw an event of it, and must forget it wholly.
    async with two_engines(relay=relay) as pair:
        conn = pair.open()
        await conn.client.send_all(b"one")
        assert await read_exactly(conn.backend, 3) == b"one"
        pair.move(conn)
        assert conn.tunnel is not None
        exported = pair.b.export(conn.tunnel)
        assert exported is not None
        client, backend, state = exported
        conn.tunnel = pair.a.adopt_state(client, backend, state, conn.on_close, conn.stats)
        assert pair.b.statistics().tunnels == 0
        await conn.backend.send_all(b"two")
        assert await read_exactly(conn.client, 3) == b"two"
        assert (conn.stats.bytes_up, conn.stats.bytes_down) == (3, 3)
        await conn.client.send_eof()
        await conn.backend.send_eof()
        await conn.closed.wait()


# --- half-closes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("relay", PLAIN_MODES)
async def test_a_half_closed_tunnel_moves_and_its_shut_direction_stays_shut(relay: str) -> None:
    async with two_engines(relay=relay) as pair:
        conn = pair.open()
        await conn.client.send_all(b"last words")
        await conn.client.send_eof()
        assert await read_to_eof(conn.backend) == b"last words"
        state = pair.move(conn)
        assert (state.up.eof, state.up.shut, state.down.eof, state.down.shut) == (
            True,
            True,
            False,
            False,
        )
        assert state.close_reason == "client_eof"
        data = os.urandom(MiB)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.backend.send_all, data)
            assert await receive_digest(conn.client, len(data)) == sha256(data)
        await conn.backend.send_eof()
        assert await read_to_eof(conn.client) == b""
        await conn.closed.wait()
        assert conn.stats.close_reason == CloseReason.CLIENT_EOF, "the first EOF names it"


async def test_an_eof_read_but_not_yet_passed_on_is_passed_on_by_the_new_engine() -> None:
    # The state a tunnel is in between reading its source's EOF and shutting its destination
    # (with bytes still to write, or none): engine B writes them, then shuts.
    async with two_engines() as pair:
        for pending in (b"", b"tail"):
            client_outer, client_inner = tcp_pair()
            backend_inner, backend_outer = tcp_pair()
            conn = Conn(stream_of(client_outer), stream_of(backend_outer), RelayStats())
            pair.conns.append(conn)
            state = TunnelState(up=FlowState(pending, eof=True), down=FlowState())
            conn.tunnel = pair.b.adopt_state(
                client_inner, backend_inner, state, conn.on_close, conn.stats
            )
            assert await read_to_eof(conn.backend) == pending
            await conn.backend.send_all(b"answer")
            assert await read_exactly(conn.client, 6) == b"answer"
            assert conn.stats.bytes_up == len(pending)


# --- WebSocket frames ----------------------------------------------------------------------------


def frame(payload: bytes, opcode: int = 0x2) -> bytes:
    """An unmasked frame (as a server sends) with a 64-bit length."""
    return bytes((0x80 | opcode, 127)) + len(payload).to_bytes(8, "big") + payload


def parse_frames(data: bytes) -> list[tuple[int, bytes]]:
    """``(opcode, unmasked payload)`` of every frame in ``data``, which must end on a frame's
    end."""
    frames = []
    pos = 0
    while pos < len(data):
        first, second = data[pos], data[pos + 1]
        length, pos = second & 0x7F, pos + 2
        if length == 126:
            length, pos = int.from_bytes(data[pos : pos + 2]), pos + 2
        elif length == 127:
            length, pos = int.from_bytes(data[pos : pos + 8]), pos + 8
        mask = b""
        if second & 0x80:
            mask, pos = data[pos : pos + 4], pos + 4
        payload = data[pos : pos + length]
        assert len(payload) == length, "the stream ends inside a frame"
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        frames.append((first & 0x0F, payload))
        pos += length
    return frames


@pytest.mark.parametrize("relay", PLAIN_MODES)
async def test_a_websocket_tunnel_moved_mid_frame_closes_between_frames(relay: str) -> None:
    payload = os.urandom(300_000)
    whole = frame(payload)
    cut = 100_000
    async with two_engines(relay=relay, close_grace=0.5) as pair:
        conn = pair.open(websocket=True)
        await conn.backend.send_all(whole[:cut])
        received = await read_exactly(conn.client, cut)
        state = pair.move(conn)
        assert state.websocket
        assert state.down.frames == FramePosition(left=len(whole) - cut)
        assert state.up.frames == FramePosition()
        assert conn.tunnel is not None
        # A drain decided by engine B: its Close frame must wait for the frame in flight.
        pair.b.close(conn.tunnel, CloseReason.DRAIN)
        await conn.backend.send_all(whole[cut:])
        received += await read_to_eof(conn.client)
        frames = parse_frames(received)
        assert [opcode for opcode, _ in frames] == [0x2, 0x8]
        assert frames[0][1] == payload
        assert frames[1][1] == (1001).to_bytes(2, "big") + b"drain"
        to_backend = parse_frames(await read_to_eof(conn.backend))
        assert to_backend == [(0x8, (1001).to_bytes(2, "big") + b"drain")]
        await conn.closed.wait()
        assert conn.stats.close_reason == CloseReason.DRAIN


async def test_a_tunnel_closing_politely_is_not_exported() -> None:
    async with two_engines(close_grace=0.5) as pair:
        conn = pair.open(websocket=True)
        assert conn.tunnel is not None
        await conn.backend.send_all(frame(b"x" * 10)[:5])
        await read_exactly(conn.client, 5)
        pair.a.close(conn.tunnel, CloseReason.ADMIN)
        assert conn.tunnel.closing == CloseReason.ADMIN
        assert pair.a.export(conn.tunnel) is None
        # A's tunnel; the harness expects B: count its close here.
        await conn.closed.wait()
        assert conn.stats.close_reason == CloseReason.ADMIN
        assert pair.a.export(conn.tunnel) is None, "nor is a closed one"


async def test_a_tls_tunnel_is_not_exported() -> None:
    async with two_engines() as pair:
        client_outer, client_inner = tcp_pair()
        backend_inner, backend_outer = tcp_pair()
        client_inner.setblocking(False)
        backend_inner.setblocking(False)
        tls = TLSConn(client_inner, ssl.create_default_context(), server_side=False)
        conn = Conn(stream_of(client_outer), stream_of(backend_outer), RelayStats())
        pair.conns.append(conn)
        conn.tunnel = pair.a.adopt(tls, backend_inner, conn.stats, conn.on_close)
        assert pair.a.export(conn.tunnel) is None
        assert pair.a.statistics().tunnels == 1, "it stays where it was"
        pair.a.close(conn.tunnel, CloseReason.ADMIN)
        assert conn.close_calls == 1


# --- deadlines -----------------------------------------------------------------------------------


@pytest.fixture
def patient_clock() -> trio.testing.MockClock:
    """Virtual time that jumps only after 10 ms of real idleness (see ``test_engine``)."""
    return trio.testing.MockClock(autojump_threshold=0.01)


async def test_the_lifetime_goes_on_counting_in_the_new_engine(
    patient_clock: trio.testing.MockClock,
) -> None:
    async with two_engines(idle_timeout=1000.0, guard=600.0) as pair:
        opened = trio.current_time()
        conn = pair.open(lifetime=50.0)
        await trio.sleep(30.0)
        await conn.client.send_all(b"tick")
        assert await read_exactly(conn.backend, 4) == b"tick"
        state = pair.move(conn)
        assert state.lifetime == pytest.approx(20.0, abs=0.5)
        assert state.age == pytest.approx(30.0, abs=0.5)
        assert state.idle == pytest.approx(0.0, abs=0.5)
        assert (state.hard_stop, state.credential, state.drain) == (None, None, None)
        await conn.closed.wait()
        assert conn.stats.close_reason == CloseReason.MAX_LIFETIME
        assert conn.closed_at == pytest.approx(opened + 50.0, abs=0.5)
        assert conn.tunnel is not None
        assert conn.tunnel.opened_at == pytest.approx(opened, abs=0.5)


async def test_the_idle_clock_goes_on_in_the_new_engine(
    patient_clock: trio.testing.MockClock,
) -> None:
    async with two_engines(idle_timeout=100.0, guard=600.0) as pair:
        conn = pair.open()
        await conn.client.send_all(b"tick")
        assert await read_exactly(conn.backend, 4) == b"tick"
        last = trio.current_time()
        await trio.sleep(60.0)
        state = pair.move(conn)
        assert state.idle == pytest.approx(60.0, abs=0.5)
        await conn.closed.wait()
        assert conn.stats.close_reason == CloseReason.IDLE_TIMEOUT
        assert conn.closed_at == pytest.approx(last + 100.0, abs=0.5)


async def test_a_drain_under_way_goes_on_in_the_new_engine(
    patient_clock: trio.testing.MockClock,
) -> None:
    async with two_engines(guard=600.0, close_grace=1.0) as pair:
        conn = pair.open()
        assert conn.tunnel is not None
        start = trio.current_time()
        end = pair.a.drain((conn.tunnel,), CloseReason.SHUTDOWN, 30.0)
        state = pair.move(conn)
        assert state.hard_stop == pytest.approx(end - start, abs=0.5)
        assert state.drain is not None
        assert state.drain <= state.hard_stop
        assert state.drain_reason == "shutdown"
        await conn.closed.wait()
        assert conn.stats.close_reason == CloseReason.SHUTDOWN
        assert conn.closed_at is not None
        assert conn.closed_at <= end + 0.5


# --- many at once, over the wire, and the descriptors they leave ------------------------------


async def test_a_thousand_tunnels_move_over_a_unix_socket_and_leave_no_descriptor() -> None:
    count = 1000
    baseline = open_fds()
    async with two_engines(guard=120.0) as pair:
        for _ in range(count):
            pair.open()
        opened = open_fds()
        assert opened == baseline + 4 * count + 2 * 2, "four ends a tunnel; two per engine"
        exported = []
        for i, conn in enumerate(pair.conns):
            assert conn.tunnel is not None
            item = pair.a.export(conn.tunnel, {"id": str(i)})
            assert item is not None
            exported.append(item)
        old, new = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with old, new:
            received: list[tuple[socket.socket, socket.socket, TunnelState]] = []

            async def receive() -> None:
                received.extend(await receive_tunnels(new))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive)
                assert await send_tunnels(old, exported) == count
            for client, backend, _ in exported:
                client.close()
                backend.close()
            for client, backend, state in received:
                conn = pair.conns[int(state.meta["id"])]
                conn.tunnel = pair.b.adopt_state(client, backend, state, conn.on_close, conn.stats)
        assert open_fds() == opened, "the old copies closed, the new ones adopted"
        # Each tunnel still joins its own client to its own backend.
        for i, conn in enumerate(pair.conns):
            await conn.client.send_all(b"%d\n" % i)
        for i, conn in enumerate(pair.conns):
            assert await read_exactly(conn.backend, len(b"%d\n" % i)) == b"%d\n" % i
        for conn in pair.conns:
            conn.client.socket.close()
            conn.backend.socket.close()
        await wait_until(lambda: all(conn.close_calls for conn in pair.conns))
        assert pair.b.statistics().tunnels == 0
    assert open_fds() == baseline


def test_a_tunnel_state_survives_json() -> None:
    state = TunnelState(
        up=FlowState(b"\x00\xff" * 10, eof=True, shut=False, frames=FramePosition(3, b"", True)),
        down=FlowState(b"", frames=FramePosition(0, b"\x82", False)),
        bytes_up=1 << 40,
        bytes_down=5,
        close_reason="client_eof",
        age=12.5,
        idle=0.25,
        lifetime=-1.0,
        credential=None,
        drain=3.0,
        drain_reason="shutdown",
        hard_stop=30.0,
        meta={"id": "42", "route": "chat"},
    )
    assert TunnelState.from_json(state.to_json()) == state
