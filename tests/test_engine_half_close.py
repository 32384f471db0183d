"""``half_close_timeout`` in the relay engine, over real loopback TCP on a MockClock.

Once one direction of a tunnel is shut (its source's FIN passed on to the other side), that
much silence the other way ends the tunnel with reason ``half_close_timeout``; bytes still
flowing restart the wait, as they do the idle timeout. Without it a client that leaves a silent
backend holds the tunnel (a slot, two descriptors) for the whole idle timeout.

The harness is ``tests/test_engine_close.py``'s (which is ``tests/test_engine.py``'s): the test
holds the outer ends of two loopback connections and the engine adopts the inner ends. Virtual
time jumps only after 10 ms of real idleness, so bytes on loopback arrive first.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio
import trio.testing
from rawhttp import read_exactly, read_to_eof
from test_engine import MODES, Conn, stream_of, tcp_pair
from test_engine_close import (
    TEXT,
    TIMER_GUARD,
    Relay,
    client_frame,
    expect_eof_both,
    server_frame,
)

from tunnel.net.engine import Engine
from tunnel.net.relay import RelayStats
from tunnel.reasons import CloseReason

__all__ = ["TimedRelay", "patient_clock", "running"]

HALF_CLOSE = 5.0
IDLE = 3600.0
EXACT = 0.1
"""Virtual seconds a deadline may be observed late."""


@pytest.fixture
def patient_clock() -> trio.testing.MockClock:
    """Virtual time that jumps only after 50 ms of real idleness: on a loaded machine the
    kernel may pass a loopback FIN on later than 10 ms, and a jump to the next deadline
    before it arrives would end the tunnel under test early (one run of the whole suite
    beside other suites failed that way)."""
    return trio.testing.MockClock(autojump_threshold=0.05)


@dataclass(eq=False)
class TimedRelay(Relay):
    """``Relay`` whose tunnels may be given a credential expiry."""

    def open(  # type: ignore[override]
        self, *, websocket: bool = True, lifetime: float = 0.0, expires_at: float | None = None
    ) -> Conn:
        client_outer, client_inner = tcp_pair()
        backend_inner, backend_outer = tcp_pair()
        for sock in (client_outer, client_inner, backend_inner, backend_outer):
            # As the handler's sockets: no Nagle delay a MockClock could jump past.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client_inner.setblocking(False)
        backend_inner.setblocking(False)
        conn = Conn(stream_of(client_outer), stream_of(backend_outer), RelayStats())
        self.conns.append(conn)
        conn.tunnel = self.engine.adopt(
            client_inner,
            backend_inner,
            conn.stats,
            conn.on_close,
            websocket=websocket,
            lifetime=lifetime,
            expires_at=expires_at,
        )
        return conn


@asynccontextmanager
async def running(
    *,
    relay: str,
    half_close_timeout: float = HALF_CLOSE,
    idle_timeout: float = IDLE,
    close_grace: float = 2.0,
) -> AsyncIterator[TimedRelay]:
    """An engine served for the body of the ``async with`` under a virtual-time guard;
    afterwards every tunnel it adopted must have been reported to ``on_close`` exactly once."""
    engine = Engine(
        relay=relay,
        splice_pipes=64,
        idle_timeout=idle_timeout,
        close_grace=close_grace,
        half_close_timeout=half_close_timeout,
    )
    harness = TimedRelay(engine)

    async def run(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with harness.scope:
                await engine.run(task_status=task_status)
        finally:
            harness.stopped.set()

    try:
        with trio.fail_after(TIMER_GUARD):
            async with trio.open_nursery() as nursery:
                await nursery.start(run)
                yield harness
                harness.scope.cancel()
                await harness.stopped.wait()
    finally:
        for conn in harness.conns:
            conn.close_outer()
    for conn in harness.conns:
        assert conn.close_calls == 1, "on_close must run exactly once per tunnel"


def sides(conn: Conn, closer: str) -> tuple[trio.SocketStream, trio.SocketStream]:
    """(the side that sends FIN, the other)."""
    return (conn.client, conn.backend) if closer == "client" else (conn.backend, conn.client)


async def half_close(conn: Conn, closer: str) -> float:
    """Traffic both ways, then ``closer`` sends FIN and the other side reads it; returns when."""
    first, other = sides(conn, closer)
    await first.send_all(b"ping")
    assert await read_exactly(other, 4) == b"ping"
    await other.send_all(b"pong")
    assert await read_exactly(first, 4) == b"pong"
    await first.send_eof()
    assert await read_to_eof(other) == b""
    return trio.current_time()


CLOSERS = pytest.mark.parametrize("closer", ["client", "backend"])


@pytest.mark.parametrize("splice", MODES)
@CLOSERS
async def test_a_half_closed_tunnel_with_a_silent_other_side_ends_at_the_timeout(
    splice: str, closer: str, patient_clock: trio.testing.MockClock
) -> None:
    async with running(relay=splice) as relay:
        conn = relay.open(websocket=False)
        fin = await half_close(conn, closer)
        await conn.closed.wait()
        assert conn.closed_at is not None
        assert conn.closed_at - fin == pytest.approx(HALF_CLOSE, abs=EXACT)
        assert conn.stats.close_reason == CloseReason.HALF_CLOSE_TIMEOUT
        first, _ = sides(conn, closer)
        assert await read_to_eof(first) == b""
        assert relay.engine.statistics().tunnels == 0


@pytest.mark.parametrize("splice", MODES)
@CLOSERS
async def test_a_direction_still_flowing_is_not_cut(
    splice: str, closer: str, patient_clock: trio.testing.MockClock
) -> None:
    async with running(relay=splice) as relay:
        conn = relay.open(websocket=False)
        fin = await half_close(conn, closer)
        first, other = sides(conn, closer)
        # Ten pieces, each a little under the timeout after the last: 40 s, eight timeouts.
        for piece in range(10):
            await trio.sleep(HALF_CLOSE - 1.0)
            await other.send_all(b"piece %d;" % piece)
            assert await read_exactly(first, 8) == b"piece %d;" % piece
            assert not conn.closed.is_set(), f"cut {trio.current_time() - fin} s after the FIN"
        last = trio.current_time()
        await conn.closed.wait()
        assert conn.closed_at is not None
        assert conn.closed_at - last == pytest.approx(HALF_CLOSE, abs=EXACT)
        assert conn.stats.close_reason == CloseReason.HALF_CLOSE_TIMEOUT


@pytest.mark.parametrize("splice", MODES)
async def test_an_open_tunnel_is_not_subject_to_it(
    splice: str, patient_clock: trio.testing.MockClock
) -> None:
    async with running(relay=splice, idle_timeout=60.0) as relay:
        conn = relay.open(websocket=False)
        await conn.client.send_all(b"ping")
        assert await read_exactly(conn.backend, 4) == b"ping"
        last = trio.current_time()
        await conn.closed.wait()
        assert conn.closed_at is not None
        assert conn.closed_at - last == pytest.approx(60.0, abs=EXACT)
        assert conn.stats.close_reason == CloseReason.IDLE_TIMEOUT


@pytest.mark.parametrize("splice", MODES)
async def test_zero_leaves_a_half_closed_tunnel_to_the_idle_timeout(
    splice: str, patient_clock: trio.testing.MockClock
) -> None:
    async with running(relay=splice, half_close_timeout=0.0, idle_timeout=120.0) as relay:
        conn = relay.open(websocket=False)
        fin = await half_close(conn, "client")
        await conn.closed.wait()
        assert conn.closed_at is not None
        assert conn.closed_at - fin == pytest.approx(120.0, abs=EXACT)
        assert conn.stats.close_reason == CloseReason.IDLE_TIMEOUT


async def test_a_shorter_idle_timeout_still_comes_first(
    patient_clock: trio.testing.MockClock,
) -> None:
    async with running(relay="copy", half_close_timeout=30.0, idle_timeout=10.0) as relay:
        conn = relay.open(websocket=False)
        fin = await half_close(conn, "backend")
        await conn.closed.wait()
        assert conn.closed_at is not None
        assert conn.closed_at - fin == pytest.approx(10.0, abs=EXACT)
        assert conn.stats.close_reason == CloseReason.IDLE_TIMEOUT


@pytest.mark.parametrize("splice", MODES)
async def test_a_reload_with_a_shorter_timeout_applies_to_half_closed_tunnels_at_once(
    splice: str, patient_clock: trio.testing.MockClock
) -> None:
    async with running(relay=splice, half_close_timeout=300.0) as relay:
        conn = relay.open(websocket=False)
        fin = await half_close(conn, "client")
        await trio.sleep(1.0)
        relay.engine.configure(
            relay=splice,
            splice_pipes=64,
            idle_timeout=IDLE,
            close_grace=2.0,
            half_close_timeout=HALF_CLOSE,
        )
        await conn.closed.wait()
        assert conn.closed_at is not None
        assert conn.closed_at - fin == pytest.approx(HALF_CLOSE, abs=EXACT)
        assert conn.stats.close_reason == CloseReason.HALF_CLOSE_TIMEOUT


@pytest.mark.parametrize("splice", MODES)
async def test_a_half_closed_websocket_tunnel_closes_without_a_close_frame(
    splice: str, patient_clock: trio.testing.MockClock
) -> None:
    # The side that sent FIN has said goodbye and the other has been silent: nobody is
    # waiting for a Close frame, and the FIN'd side could not be sent one.
    async with running(relay=splice) as relay:
        conn = relay.open()
        up = client_frame(TEXT, b"up")
        await conn.client.send_all(up)
        assert await read_exactly(conn.backend, len(up)) == up
        down = server_frame(TEXT, b"down")
        await conn.backend.send_all(down)
        assert await read_exactly(conn.client, len(down)) == down
        await conn.client.send_eof()
        assert await read_to_eof(conn.backend) == b""
        fin = trio.current_time()
        await conn.closed.wait()
        assert conn.closed_at is not None
        assert conn.closed_at - fin == pytest.approx(HALF_CLOSE, abs=EXACT)
        assert conn.stats.close_reason == CloseReason.HALF_CLOSE_TIMEOUT
        await expect_eof_both(conn)
