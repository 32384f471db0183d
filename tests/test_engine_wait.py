"""How the engine waits, and how ``relay = "auto"`` chooses, over real loopback TCP.

The engine blocks in its own epoll while trio has nothing else to do (trio's epoll descriptor is
in its set): trio's I/O, timers and runnable tasks must still get their turn, whether the
tunnels are busy or idle. These tests run on trio's real clock, since that is the mode that
waits in its own epoll (a MockClock makes the engine wait through trio, as the other engine
tests check); their wall-clock bounds are generous guards, not measurements.

``auto`` must splice a single bulk stream (large reads) and keep small messages on the copy
path: checked through the engine's ``splice_reads`` counter, with the bytes compared by SHA-256.
"""

from __future__ import annotations

import hashlib
import os

import pytest
import trio
import trio.testing
from test_engine import (
    MODES,
    MiB,
    needs_splice,
    receive_digest,
    running_engine,
    send_in_pieces,
    sha256,
)

from tunnel.net.engine import Engine
from tunnel.net.trioloop import TrioLoop
from tunnel.reasons import CloseReason

CHUNK = 64 * 1024


async def echo(stream: trio.SocketStream, size: int) -> None:
    """Send back everything ``stream`` receives, ``size`` bytes in all."""
    left = size
    while left:
        chunk = await stream.receive_some(min(CHUNK, left))
        assert chunk, f"EOF with {left} bytes still to echo"
        await stream.send_all(chunk)
        left -= len(chunk)


async def test_the_engine_waits_in_its_own_epoll_on_trios_real_clock() -> None:
    assert TrioLoop.current() is not None, "this trio's run loop cannot be read"
    async with running_engine(relay="copy") as relay:
        await trio.sleep(0)
        assert relay.engine.waits_in_own_epoll


async def test_under_a_mock_clock_the_engine_waits_through_trio(
    autojump_clock: trio.testing.MockClock,
) -> None:
    assert TrioLoop.current() is None
    async with running_engine(relay="copy", idle_timeout=5.0) as relay:
        conn = relay.open()
        await trio.sleep(0)
        assert not relay.engine.waits_in_own_epoll
        # The engine's own timer still runs on the jumping clock.
        await conn.closed.wait()
        assert conn.stats.close_reason is CloseReason.IDLE_TIMEOUT
        assert trio.current_time() >= 5.0


@needs_splice
async def test_auto_splices_one_bulk_stream_echoed_on_one_connection() -> None:
    size = 16 * MiB
    data = os.urandom(size)
    async with running_engine(relay="auto") as relay:
        conn = relay.open()
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_in_pieces, conn.client, data, (CHUNK,))
                nursery.start_soon(echo, conn.backend, size)
                digest = await receive_digest(conn.client, size)
        assert digest == sha256(data)
        assert (conn.stats.bytes_up, conn.stats.bytes_down) == (size, size)
        reads = relay.engine.statistics().splice_reads
        # Both directions went bulk: most of the 512 chunks moved through pipes, not one
        # whole-buffer read needed to get there.
        assert reads >= size // CHUNK, f"only {reads} spliced reads for {size} bytes each way"


@needs_splice
async def test_auto_keeps_small_messages_on_the_copy_path() -> None:
    message = b"m" * 64
    async with running_engine(relay="auto") as relay:
        conn = relay.open()
        with trio.fail_after(60):
            for _ in range(300):
                await conn.client.send_all(message)
                got = await conn.backend.receive_some(len(message))
                assert got == message
                await conn.backend.send_all(got)
                assert await conn.client.receive_some(len(message)) == message
        assert relay.engine.statistics().splice_reads == 0


@needs_splice
async def test_auto_goes_back_to_copying_when_a_bulk_flow_turns_to_small_messages() -> None:
    bulk = os.urandom(4 * MiB)
    async with running_engine(relay="auto") as relay:
        conn = relay.open()
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_in_pieces, conn.client, bulk, (CHUNK,))
                assert await receive_digest(conn.backend, len(bulk)) == sha256(bulk)
            after_bulk = relay.engine.statistics().splice_reads
            assert after_bulk > 0
            for number in range(200):
                message = number.to_bytes(2, "big") * 32
                await conn.client.send_all(message)
                assert await conn.backend.receive_some(len(message)) == message
        # At most the first small read after the bulk went through a pipe.
        assert relay.engine.statistics().splice_reads <= after_bulk + 1


@pytest.mark.parametrize("splice", MODES)
@pytest.mark.parametrize("busy", [True, False], ids=["busy", "idle"])
async def test_new_connections_and_timers_are_served_while_tunnels_are_busy_or_idle(
    splice: str, busy: bool
) -> None:
    # A trio listener accepts and answers a small request/response exchange (what a handshake
    # does) while the engine serves a tunnel moving bulk both ways, or holds idle tunnels; a
    # trio timer set meanwhile fires. If the engine blocked in its own epoll without trio's
    # descriptor or its deadlines, these would wait for the tunnels' traffic (or forever).
    size = 32 * MiB if busy else 0
    data = os.urandom(size)
    served = 0
    async with running_engine(relay=splice) as relay:
        conns = [relay.open() for _ in range(1 if busy else 50)]
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]

        async def answer(stream: trio.SocketStream) -> None:
            nonlocal served
            async with stream:
                request = await stream.receive_some(64)
                await stream.send_all(b"101 " + request)
                served += 1

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, answer, listeners)
                if busy:
                    conn = conns[0]
                    nursery.start_soon(send_in_pieces, conn.client, data, (CHUNK,))
                    nursery.start_soon(echo, conn.backend, size)
                await trio.sleep(0.05)
                assert relay.engine.waits_in_own_epoll
                await trio.sleep(0.02)
                for number in range(20):
                    client = await trio.open_tcp_stream("127.0.0.1", port)
                    async with client:
                        request = b"GET /%d" % number
                        await client.send_all(request)
                        reply = await client.receive_some(64)
                        assert reply == b"101 " + request
                if busy:
                    digest = await receive_digest(conns[0].client, size)
                    assert digest == sha256(data)
                nursery.cancel_scope.cancel()
        assert served == 20
        assert relay.engine.statistics().tunnels == len(conns)


async def test_an_idle_timeout_fires_on_the_real_clock_while_the_engine_waits() -> None:
    async with running_engine(relay="copy", idle_timeout=0.2) as relay:
        quiet = relay.open()
        talking = relay.open()
        with trio.fail_after(30):
            for _ in range(5):
                await talking.client.send_all(b"ping")
                assert await talking.backend.receive_some(4) == b"ping"
            await quiet.closed.wait()
            await talking.closed.wait()
        assert quiet.stats.close_reason is CloseReason.IDLE_TIMEOUT
        assert talking.stats.close_reason is CloseReason.IDLE_TIMEOUT


async def test_a_task_woken_by_a_tunnels_close_runs_while_the_engine_waits() -> None:
    # The close callback sets an event: the woken task must run without any further traffic
    # or timer (it is in trio's run queue, which the engine checks before it blocks).
    async with running_engine(relay="copy") as relay:
        conn = relay.open()
        with trio.fail_after(30):
            await trio.sleep(0.05)
            await conn.client.aclose()
            await conn.backend.aclose()
            await conn.closed.wait()
        assert conn.stats.close_reason in (CloseReason.CLIENT_EOF, CloseReason.BACKEND_EOF)


async def test_both_ways_of_waiting_relay_the_same_bytes() -> None:
    size = 8 * MiB
    up, down = os.urandom(size), os.urandom(size)
    digests = []
    for own_wait in (True, False):
        engine = Engine(relay="auto", splice_pipes=64, idle_timeout=0.0, own_wait=own_wait)
        async with running_engine(relay="auto", engine=engine) as relay:
            conn = relay.open()
            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send_in_pieces, conn.client, up, (CHUNK, 1, 300_001))
                    nursery.start_soon(send_in_pieces, conn.backend, down, (4097, CHUNK))
                    got_up = await receive_digest(conn.backend, size)
                    got_down = await receive_digest(conn.client, size)
                assert relay.engine.waits_in_own_epoll is own_wait
            digests.append((got_up, got_down))
    expected = (hashlib.sha256(up).hexdigest(), hashlib.sha256(down).hexdigest())
    assert digests == [expected, expected]


async def test_two_engines_in_one_run_both_relay_and_one_waits_in_its_own_epoll() -> None:
    # A hand-off between two engines of one process (as the export tests do): the second
    # engine's events are in neither the first one's epoll nor trio's unless it waits through
    # trio, so only one may block in its own set.
    async with running_engine(relay="copy") as first, running_engine(relay="copy") as second:
        conns = [first.open(), second.open()]
        with trio.fail_after(30):
            await trio.sleep(0.05)
            waiting = [first.engine.waits_in_own_epoll, second.engine.waits_in_own_epoll]
            assert sorted(waiting) == [False, True]
            for _ in range(50):
                for conn in conns:
                    await conn.client.send_all(b"hello")
                    assert await conn.backend.receive_some(5) == b"hello"
                    await conn.backend.send_all(b"back")
                    assert await conn.client.receive_some(4) == b"back"
                await trio.sleep(0.001)
