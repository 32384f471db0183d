"""Memory-stream tests of the relay: ordering, half-close, resets, idle timeout, backpressure.

The relay sits between two in-memory stream pairs. The test holds the far ends: ``client`` plays
the browser, ``backend`` the upstream server. Timeouts run on trio's MockClock (autojump), so no
test waits on the wall clock; every test has a ``fail_after`` guard.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing
from rawhttp import read_exactly, read_to_eof

from tunnel.net.relay import (
    BACKEND_EOF,
    BACKEND_RESET,
    CHUNK_SIZE,
    CLIENT_EOF,
    CLIENT_RESET,
    IDLE_TIMEOUT,
    RelayStats,
    relay,
)

GUARD_SECONDS = 10.0
"""Upper bound for any one test. On the MockClock this is virtual time: a stuck test jumps
straight to it, so virtual-time tests may pass a larger guard without slowing a failure."""

Stream = trio.StapledStream[Any, Any]
PairFactory = Callable[[], tuple[Stream, Stream]]


@dataclass
class Running:
    """A relay running in the background, with the test's ends of both connections."""

    client: Stream
    backend: Stream
    relay_client: Stream
    relay_backend: Stream
    stats: RelayStats
    done: trio.Event = field(default_factory=trio.Event)
    result: RelayStats | None = None
    finished_at: float | None = None


@asynccontextmanager
async def running_relay(
    *,
    idle_timeout: float = 0,
    chunk_size: int = CHUNK_SIZE,
    client_pair: PairFactory = trio.testing.memory_stream_pair,
    backend_pair: PairFactory = trio.testing.memory_stream_pair,
    guard: float = GUARD_SECONDS,
) -> AsyncIterator[Running]:
    client, relay_client = client_pair()
    backend, relay_backend = backend_pair()
    run = Running(client, backend, relay_client, relay_backend, RelayStats())

    async def go() -> None:
        run.result = await relay(
            relay_client,
            relay_backend,
            idle_timeout=idle_timeout,
            stats=run.stats,
            chunk_size=chunk_size,
        )
        run.finished_at = trio.current_time()
        run.done.set()

    with trio.fail_after(guard):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(go)
            yield run
            nursery.cancel_scope.cancel()


# --- bytes both ways --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pair", [trio.testing.memory_stream_pair, trio.testing.lockstep_stream_pair]
)
async def test_bytes_flow_both_ways_in_order_and_untouched(pair: PairFactory) -> None:
    # Several chunks' worth of random bytes, sent in odd-sized pieces, both ways at once.
    up = os.urandom(3 * CHUNK_SIZE + 12345)
    down = os.urandom(2 * CHUNK_SIZE + 777)
    got: dict[str, bytes] = {}

    async def send_in_pieces(stream: trio.abc.SendStream, data: bytes, piece: int) -> None:
        for start in range(0, len(data), piece):
            await stream.send_all(data[start : start + piece])

    async def collect(name: str, stream: trio.abc.ReceiveStream, size: int) -> None:
        got[name] = await read_exactly(stream, size)

    async with running_relay(client_pair=pair, backend_pair=pair) as run:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_in_pieces, run.client, up, 10_007)
            nursery.start_soon(send_in_pieces, run.backend, down, 65_537)
            nursery.start_soon(collect, "up", run.backend, len(up))
            nursery.start_soon(collect, "down", run.client, len(down))
        assert got["up"] == up
        assert got["down"] == down
        await trio.testing.wait_all_tasks_blocked()
        assert (run.stats.bytes_up, run.stats.bytes_down) == (len(up), len(down))
        assert not run.done.is_set(), "the relay must keep running while both sides are open"


async def test_order_holds_with_one_byte_chunks() -> None:
    # A chunk size of 1 forces one read per byte: order must still hold.
    data = bytes(range(256))
    async with running_relay(chunk_size=1) as run:
        await run.client.send_all(data)
        assert await read_exactly(run.backend, len(data)) == data


# --- half-close --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("closer", "reason"), [("client", CLIENT_EOF), ("backend", BACKEND_EOF)], ids=str
)
async def test_half_close_is_propagated_and_the_other_way_stays_open(
    closer: str, reason: str
) -> None:
    async with running_relay(idle_timeout=3600) as run:
        first, other = (
            (run.client, run.backend) if closer == "client" else (run.backend, run.client)
        )
        await first.send_all(b"last words")
        await first.send_eof()

        # The other side reads the data, then EOF: the half-close went through.
        assert await read_to_eof(other) == b"last words"
        await trio.testing.wait_all_tasks_blocked()
        assert not run.done.is_set(), "one EOF must not end the tunnel"
        assert run.stats.close_reason == reason

        # The other direction still works after the half-close.
        for i in range(3):
            await other.send_all(b"reply %d;" % i)
        assert await read_exactly(first, 24) == b"reply 0;reply 1;reply 2;"

        await other.send_eof()
        assert await read_to_eof(first) == b""
        await run.done.wait()
    assert run.result is run.stats
    assert run.stats.close_reason == reason
    assert run.stats.bytes_up + run.stats.bytes_down == len(b"last words") + 24


async def test_both_sides_eof_returns_with_the_first_eof_as_reason() -> None:
    async with running_relay() as run:
        await run.backend.send_eof()
        await trio.testing.wait_all_tasks_blocked()
        await run.client.send_eof()
        await run.done.wait()
        assert await read_to_eof(run.client) == b""
        assert await read_to_eof(run.backend) == b""
    assert run.stats.close_reason == BACKEND_EOF


# --- resets ------------------------------------------------------------------------------------


def break_receive(stream: Stream) -> Callable[[], None]:
    """Arm ``stream`` (a relay-side memory stream) so its next receive raises, like a TCP RST."""
    broken = False

    async def hook() -> None:
        if broken:
            raise trio.BrokenResourceError("connection reset by peer")

    stream.receive_stream.receive_some_hook = hook

    def arm() -> None:
        nonlocal broken
        broken = True

    return arm


@pytest.mark.parametrize(
    ("side", "reason"), [("client", CLIENT_RESET), ("backend", BACKEND_RESET)], ids=str
)
async def test_reset_on_receive_ends_the_whole_relay(side: str, reason: str) -> None:
    async with running_relay(idle_timeout=3600) as run:
        relay_side = run.relay_client if side == "client" else run.relay_backend
        arm = break_receive(relay_side)
        await run.client.send_all(b"up")
        await run.backend.send_all(b"down")
        assert await read_exactly(run.backend, 2) == b"up"
        assert await read_exactly(run.client, 4) == b"down"

        arm()
        # One more byte wakes the pump; its next receive fails.
        sender = run.client if side == "client" else run.backend
        await sender.send_all(b"!")
        # The failure ends both directions although the other side stays open and silent.
        await run.done.wait()
    assert run.stats.close_reason == reason


@pytest.mark.parametrize(
    ("side", "reason"), [("client", CLIENT_RESET), ("backend", BACKEND_RESET)], ids=str
)
async def test_reset_on_send_ends_the_whole_relay(side: str, reason: str) -> None:
    async with running_relay(idle_timeout=3600) as run:
        # The far end goes away entirely: writes towards it now fail.
        gone, talker = (run.client, run.backend) if side == "client" else (run.backend, run.client)
        await gone.aclose()
        await talker.send_all(b"anyone there?")
        await run.done.wait()
    assert run.stats.close_reason == reason


async def test_reset_after_half_close_overrides_the_eof_reason() -> None:
    async with running_relay() as run:
        arm = break_receive(run.relay_backend)
        await run.client.send_eof()
        assert await read_to_eof(run.backend) == b""
        await trio.testing.wait_all_tasks_blocked()
        assert run.stats.close_reason == CLIENT_EOF
        arm()
        await run.backend.send_all(b"x")
        await run.done.wait()
    assert run.stats.close_reason == BACKEND_RESET


@pytest.mark.parametrize(
    ("closer", "reason"), [("client", BACKEND_RESET), ("backend", CLIENT_RESET)], ids=str
)
async def test_eof_that_cannot_be_passed_on_is_a_reset_of_the_other_side(
    closer: str, reason: str
) -> None:
    async with running_relay(idle_timeout=3600) as run:
        # The half-close reaches a side whose connection is already broken.
        target = run.relay_backend if closer == "client" else run.relay_client

        def refuse_close() -> None:
            raise trio.BrokenResourceError("connection reset by peer")

        target.send_stream.close_hook = refuse_close
        await (run.client if closer == "client" else run.backend).send_eof()
        await run.done.wait()
    assert run.stats.close_reason == reason


# --- idle timeout ------------------------------------------------------------------------------


async def test_idle_timeout_closes_a_silent_relay(autojump_clock: trio.testing.MockClock) -> None:
    start = trio.current_time()
    async with running_relay(idle_timeout=10, guard=3600) as run:
        await run.done.wait()
    assert run.stats.close_reason == IDLE_TIMEOUT
    assert run.finished_at is not None
    assert run.finished_at - start == pytest.approx(10)


async def test_idle_timeout_zero_disables_the_idle_check(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running_relay(idle_timeout=0, guard=2 * 24 * 3600) as run:
        # A day of silence on the virtual clock: the relay is still there.
        await trio.sleep(24 * 3600)
        assert not run.done.is_set()
        assert run.stats.close_reason == ""
        # And it still relays.
        await run.client.send_all(b"still here")
        assert await read_exactly(run.backend, 10) == b"still here"


@pytest.mark.parametrize("direction", ["up", "down"])
async def test_activity_resets_the_idle_timer(
    autojump_clock: trio.testing.MockClock, direction: str
) -> None:
    start = trio.current_time()
    async with running_relay(idle_timeout=10, guard=3600) as run:
        sender, receiver = (
            (run.client, run.backend) if direction == "up" else (run.backend, run.client)
        )
        # A byte every 6 s for 30 s: never 10 s of silence.
        for _ in range(5):
            await trio.sleep(6)
            await sender.send_all(b".")
            assert await read_exactly(receiver, 1) == b"."
        assert not run.done.is_set(), "activity must keep the tunnel open"
        last = trio.current_time()
        assert last - start == pytest.approx(30)
        await run.done.wait()
    assert run.stats.close_reason == IDLE_TIMEOUT
    assert run.finished_at is not None
    assert run.finished_at - last == pytest.approx(10)
    assert run.stats.last_activity == pytest.approx(last)


async def test_idle_timeout_also_applies_after_a_half_close(
    autojump_clock: trio.testing.MockClock,
) -> None:
    start = trio.current_time()
    async with running_relay(idle_timeout=10, guard=3600) as run:
        await run.client.send_eof()
        assert await read_to_eof(run.backend) == b""
        await run.done.wait()
    assert run.stats.close_reason == IDLE_TIMEOUT
    assert run.finished_at is not None
    assert run.finished_at - start == pytest.approx(10)


# --- backpressure ------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1024, CHUNK_SIZE])
async def test_stalled_sink_bounds_what_the_relay_reads_from_the_source(
    autojump_clock: trio.testing.MockClock, chunk_size: int
) -> None:
    # Lockstep streams have no buffer: a send completes only once the peer read it all. The
    # backend never reads, so every byte the client managed to send sits in the relay's memory.
    piece = 512
    pieces = 400  # 200 KiB on offer, more than three default chunks
    sent = 0

    async def pusher(stream: trio.abc.SendStream) -> None:
        nonlocal sent
        for _ in range(pieces):
            await stream.send_all(b"x" * piece)
            sent += piece

    async with running_relay(
        idle_timeout=0,
        guard=3600,
        chunk_size=chunk_size,
        client_pair=trio.testing.lockstep_stream_pair,
        backend_pair=trio.testing.lockstep_stream_pair,
    ) as run:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pusher, run.client)
            await trio.sleep(60)  # virtual: plenty of time for a relay that reads ahead
            stalled_at = sent
            assert stalled_at <= chunk_size + piece, (
                f"the relay took {stalled_at} bytes while the sink read nothing"
            )
            assert stalled_at > 0
            assert run.stats.bytes_up == 0, "nothing was delivered yet"

            # Once the backend reads, everything flows, in order and complete.
            received = await read_exactly(run.backend, piece * pieces)
            assert received == b"x" * (piece * pieces)
        assert sent == piece * pieces
        await trio.testing.wait_all_tasks_blocked()
        assert run.stats.bytes_up == piece * pieces


# --- live counters -----------------------------------------------------------------------------


async def test_counters_update_while_bytes_flow(autojump_clock: trio.testing.MockClock) -> None:
    async with running_relay(idle_timeout=3600) as run:
        assert (run.stats.bytes_up, run.stats.bytes_down) == (0, 0)
        opened_at = run.stats.last_activity
        up_total = down_total = 0
        for i in range(1, 6):
            await trio.sleep(1)
            await run.client.send_all(b"u" * i)
            await read_exactly(run.backend, i)
            await run.backend.send_all(b"d" * (2 * i))
            await read_exactly(run.client, 2 * i)
            up_total += i
            down_total += 2 * i
            await trio.testing.wait_all_tasks_blocked()
            # Read mid-tunnel: the relay is still running and the counters are current.
            assert not run.done.is_set()
            assert (run.stats.bytes_up, run.stats.bytes_down) == (up_total, down_total)
            assert run.stats.last_activity == pytest.approx(trio.current_time())
        assert run.stats.last_activity > opened_at
        assert run.stats.close_reason == ""
