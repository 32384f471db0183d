"""The relay engine over real loopback TCP: ordering, leftovers, half-close, resets, idle timeout,
backpressure, the splice pipe pool, descriptors, and many tunnels at once.

Each tunnel here is two TCP connections on 127.0.0.1. The test holds the outer ends (``client``
plays the browser, ``backend`` the upstream server) as trio streams; the engine adopts the inner
ends, as the handler does after a 101. Every test runs in both relay modes (splice and copy)
unless it is about one of them, and is bounded by ``trio.fail_after``. Nothing waits on the wall
clock to synchronise: tests wait for events (``on_close``, bytes arriving) or poll a condition
under the guard. Idle timeouts run on trio's MockClock.
"""

from __future__ import annotations

import gc
import hashlib
import os
import socket
import struct
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing
from rawhttp import read_exactly, read_to_eof

from tunnel.net.engine import Engine, Tunnel
from tunnel.net.pipes import splice_available
from tunnel.net.relay import RelayStats
from tunnel.reasons import CloseReason

LOOPBACK = "127.0.0.1"
GUARD_SECONDS = 20.0
"""Upper bound for any one test (virtual time for the MockClock tests)."""
NO_SPLICE = "os.splice not available (Linux, Python 3.10+ needed)"
MiB = 1024 * 1024
POLL_SECONDS = 0.001
POLL_LIMIT = 100_000

needs_splice = pytest.mark.skipif(not splice_available(), reason=NO_SPLICE)
MODES = [
    pytest.param("splice", id="splice", marks=needs_splice),
    pytest.param("copy", id="copy"),
    pytest.param("auto", id="auto", marks=needs_splice),
]
"""The ``relay`` argument of ``Engine``: every relay mode."""


# --- the harness -------------------------------------------------------------------------------


def tcp_pair(buffer: int | None = None) -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair on loopback: ``(connecting end, accepted end)``, both blocking.

    ``buffer`` caps ``SO_SNDBUF``/``SO_RCVBUF`` on both ends (which also turns off the kernel's
    autotuning), so that a stalled reader stalls the writer after a known, small amount.
    """
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(2)]
    listener, connecting = sockets
    try:
        if buffer is not None:
            for sock in sockets:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
        listener.bind((LOOPBACK, 0))
        listener.listen(1)
        connecting.connect(listener.getsockname())
        accepted, _ = listener.accept()
    except BaseException:
        connecting.close()
        raise
    finally:
        listener.close()
    return connecting, accepted


def stream_of(sock: socket.socket) -> trio.SocketStream:
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


@dataclass(eq=False)
class Conn:
    """One adopted tunnel: the test's ends of both connections and what ``on_close`` saw."""

    client: trio.SocketStream
    backend: trio.SocketStream
    stats: RelayStats
    closed: trio.Event = field(default_factory=trio.Event)
    close_calls: int = 0
    closed_at: float | None = None
    tunnel: Tunnel | None = None

    def on_close(self, tunnel: Tunnel) -> None:
        assert tunnel.stats is self.stats
        self.close_calls += 1
        self.closed_at = trio.current_time()
        self.closed.set()

    def close_outer(self) -> None:
        self.client.socket.close()
        self.backend.socket.close()


@dataclass(eq=False)
class Relay:
    """An engine running in the background, and the tunnels the test gave it."""

    engine: Engine
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    stopped: trio.Event = field(default_factory=trio.Event)
    conns: list[Conn] = field(default_factory=list)

    def open(
        self,
        *,
        to_client: bytes = b"",
        to_backend: bytes = b"",
        client_first: bytes = b"",
        backend_first: bytes = b"",
        buffer: int | None = None,
    ) -> Conn:
        """Connect both sides and hand the inner ends to the engine. ``client_first`` and
        ``backend_first`` are sent by the outer ends before the engine adopts the sockets."""
        client_outer, client_inner = tcp_pair(buffer)
        backend_inner, backend_outer = tcp_pair(buffer)
        client_outer.sendall(client_first)
        backend_outer.sendall(backend_first)
        client_inner.setblocking(False)
        backend_inner.setblocking(False)
        conn = Conn(stream_of(client_outer), stream_of(backend_outer), RelayStats())
        self.conns.append(conn)
        conn.tunnel = self.engine.adopt(
            client_inner,
            backend_inner,
            conn.stats,
            conn.on_close,
            to_client=to_client,
            to_backend=to_backend,
        )
        return conn

    async def stop(self) -> None:
        """Cancel the engine and wait until its ``run`` returned."""
        self.scope.cancel()
        await self.stopped.wait()


@asynccontextmanager
async def running_engine(
    *,
    relay: str,
    splice_pipes: int = 64,
    idle_timeout: float = 0.0,
    guard: float = GUARD_SECONDS,
    engine: Engine | None = None,
) -> AsyncIterator[Relay]:
    """An engine (``engine``, or one made with these settings) served in a nursery for the
    body of the ``async with``; afterwards every tunnel it adopted must have been reported to
    ``on_close`` exactly once."""
    if engine is None:
        engine = Engine(relay=relay, splice_pipes=splice_pipes, idle_timeout=idle_timeout)
    relay = Relay(engine)

    async def run(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with relay.scope:
                await relay.engine.run(task_status=task_status)
        finally:
            relay.stopped.set()

    try:
        with trio.fail_after(guard):
            async with trio.open_nursery() as nursery:
                await nursery.start(run)
                yield relay
                await relay.stop()
    finally:
        for conn in relay.conns:
            conn.close_outer()
    for conn in relay.conns:
        assert conn.close_calls == 1, "on_close must run exactly once per tunnel"


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Poll ``predicate`` until it holds; the test's ``fail_after`` bounds the wait."""
    for _ in range(POLL_LIMIT):
        if predicate():
            return
        await trio.sleep(POLL_SECONDS)
    raise AssertionError("condition never held")


async def send_in_pieces(stream: trio.SocketStream, data: bytes, pieces: tuple[int, ...]) -> None:
    """Send ``data`` in pieces of the sizes in ``pieces``, cycling."""
    view = memoryview(data)
    start = 0
    turn = 0
    while start < len(data):
        size = pieces[turn % len(pieces)]
        await stream.send_all(view[start : start + size])
        start += size
        turn += 1


async def receive_digest(
    stream: trio.SocketStream,
    size: int,
    *,
    max_read: int = 65536,
    counter: Callable[[], int] | None = None,
) -> str:
    """Read exactly ``size`` bytes and return their sha256. With ``counter``, check after each
    read that the engine's live counter already covers every byte received so far."""
    digest = hashlib.sha256()
    received = 0
    while received < size:
        chunk = await stream.receive_some(min(max_read, size - received))
        assert chunk, f"EOF after {received} of {size} bytes"
        digest.update(chunk)
        received += len(chunk)
        if counter is not None:
            assert counter() >= received, "a counter lags the bytes already delivered"
    return digest.hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def abort(stream: trio.SocketStream) -> None:
    """Close with ``SO_LINGER`` 0: the kernel sends RST instead of FIN."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


async def send_until_broken(stream: trio.SocketStream) -> bool:
    """Write until the peer's reset breaks the stream; False if it never does (bounded)."""
    for _ in range(1000):
        try:
            await stream.send_all(b"x" * 65536)
        except trio.BrokenResourceError:
            return True
    return False


def open_fds() -> int:
    """Descriptors open now; garbage from earlier tests (sockets awaiting collection) is
    collected first, so that it cannot close in the middle of a count."""
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def open_pipes() -> int:
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("pipe:"):
                count += 1
        except OSError:  # the directory's own descriptor, gone by now
            pass
    return count


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGESIZE")


# --- bytes both ways ---------------------------------------------------------------------------


@pytest.mark.parametrize("splice", MODES)
async def test_large_transfers_both_ways_arrive_intact_with_a_slow_reader(splice: str) -> None:
    # 32 MiB each way at once. The backend reads in small pieces, so the engine keeps meeting
    # a full destination on the way up while the way down runs at full speed.
    size = 32 * MiB
    up, down = os.urandom(size), os.urandom(size)
    digests: dict[str, str] = {}
    async with running_engine(relay=splice) as relay:
        conn = relay.open()

        async def collect(name: str, stream: trio.SocketStream, max_read: int) -> None:
            counter = (
                (lambda: conn.stats.bytes_up) if name == "up" else (lambda: conn.stats.bytes_down)
            )
            digests[name] = await receive_digest(stream, size, max_read=max_read, counter=counter)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_in_pieces, conn.client, up, (65_537, 1, 300_001))
            nursery.start_soon(send_in_pieces, conn.backend, down, (1_000_003, 4097))
            nursery.start_soon(collect, "up", conn.backend, 2048)
            nursery.start_soon(collect, "down", conn.client, 65536)
        assert digests == {"up": sha256(up), "down": sha256(down)}
        assert (conn.stats.bytes_up, conn.stats.bytes_down) == (size, size)
        assert not conn.closed.is_set(), "the tunnel stays open while both sides are"
        assert relay.engine.statistics().tunnels == 1


@pytest.mark.parametrize("splice", MODES)
async def test_counters_are_live_and_equal_the_bytes_delivered(splice: str) -> None:
    async with running_engine(relay=splice) as relay:
        conn = relay.open()
        sent_up = sent_down = 0
        for size in (1, 1000, 70_000, 3 * MiB):
            await conn.client.send_all(os.urandom(size))
            await read_exactly(conn.backend, size)
            sent_up += size
            assert (conn.stats.bytes_up, conn.stats.bytes_down) == (sent_up, sent_down)
            await conn.backend.send_all(os.urandom(size))
            await read_exactly(conn.client, size)
            sent_down += size
            assert (conn.stats.bytes_up, conn.stats.bytes_down) == (sent_up, sent_down)
        assert not conn.closed.is_set()


@pytest.mark.parametrize("splice", MODES)
@pytest.mark.parametrize(
    ("buffer", "size", "bound"),
    [(128 * 1024, 16 * MiB, 8 * MiB), (4 * MiB, 48 * MiB, 40 * MiB)],
    ids=["small-buffers", "large-buffers"],
)
async def test_a_stalled_reader_stalls_the_writer_and_memory_stays_bounded(
    splice: str, buffer: int, size: int, bound: int
) -> None:
    # Socket buffers fixed on all four ends (the kernel doubles the figure): whatever the writer
    # gets rid of while the reader reads nothing sits in those buffers or in the engine, which
    # may hold at most one pipe or one copy chunk per direction. The writer must stall well
    # before it has sent everything. Large buffers let the engine read many chunks in one turn
    # before the destination fills, which is where a flow queued for another turn meets a
    # full destination.
    data = os.urandom(size)
    async with running_engine(relay=splice) as relay:
        conn = relay.open(buffer=buffer)
        sent = 0
        sender_done = trio.Event()

        async def sender() -> None:
            nonlocal sent
            view = memoryview(data)
            for start in range(0, size, 256 * 1024):
                await conn.client.send_all(view[start : start + 256 * 1024])
                sent = start + 256 * 1024
            sender_done.set()

        rss_before = rss_bytes()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            # Every task blocked for a while: the sender waits for room, the engine for events.
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            stalled_at = sent
            assert not sender_done.is_set(), "the writer never stalled"
            assert stalled_at < bound, f"{stalled_at} bytes went out while nobody read"
            assert conn.stats.bytes_up <= stalled_at
            grown = rss_bytes() - rss_before
            assert grown < 4 * MiB, f"RSS grew by {grown} bytes while the reader was stalled"
            # The reader wakes up: everything arrives, in order.
            assert await receive_digest(conn.backend, size) == sha256(data)
        assert conn.stats.bytes_up == size


# --- leftovers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("splice", MODES)
@pytest.mark.parametrize("leftover_size", [17, 8 * MiB], ids=["small", "large"])
async def test_leftovers_go_first_even_when_both_sides_already_sent(
    splice: str, leftover_size: int
) -> None:
    # The peers sent before the engine adopted the sockets, so their bytes are queued at once;
    # a large leftover cannot be written in one go, so it waits for room while those bytes wait.
    to_client = b"HTTP/1.1 101 Switching Protocols\r\n\r\n" + os.urandom(leftover_size)
    to_backend = os.urandom(leftover_size)
    early_up, early_down = b"client spoke first", b"backend spoke first"
    async with running_engine(relay=splice) as relay:
        conn = relay.open(
            to_client=to_client,
            to_backend=to_backend,
            client_first=early_up,
            backend_first=early_down,
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.client.send_all, b" and again")
            nursery.start_soon(conn.backend.send_all, b" and again")
            got_up = await read_exactly(conn.backend, len(to_backend) + len(early_up) + 10)
            got_down = await read_exactly(conn.client, len(to_client) + len(early_down) + 10)
        assert got_up == to_backend + early_up + b" and again"
        assert got_down == to_client + early_down + b" and again"
        assert conn.stats.bytes_up == len(got_up)
        assert conn.stats.bytes_down == len(got_down)


# --- half-close --------------------------------------------------------------------------------


@pytest.mark.parametrize("splice", MODES)
@pytest.mark.parametrize(
    ("closer", "reason"),
    [("client", CloseReason.CLIENT_EOF), ("backend", CloseReason.BACKEND_EOF)],
    ids=str,
)
async def test_half_close_is_passed_on_and_the_other_way_stays_open(
    splice: str, closer: str, reason: str
) -> None:
    async with running_engine(relay=splice) as relay:
        conn = relay.open()
        first, other = (
            (conn.client, conn.backend) if closer == "client" else (conn.backend, conn.client)
        )
        await first.send_all(b"last words")
        await first.send_eof()
        assert await read_to_eof(other) == b"last words"

        # The other way still carries bytes, and the tunnel is still there.
        for i in range(3):
            await other.send_all(b"reply %d;" % i)
        assert await read_exactly(first, 24) == b"reply 0;reply 1;reply 2;"
        assert not conn.closed.is_set(), "one EOF must not end the tunnel"

        await other.aclose()
        assert await read_to_eof(first) == b""
        await conn.closed.wait()
        assert conn.stats.close_reason == reason
        assert conn.stats.bytes_up + conn.stats.bytes_down == len(b"last words") + 24
        assert relay.engine.statistics().tunnels == 0


@pytest.mark.parametrize("splice", MODES)
async def test_both_sides_closing_at_once_ends_the_tunnel(splice: str) -> None:
    async with running_engine(relay=splice) as relay:
        conn = relay.open()
        await conn.client.send_all(b"bye")
        await conn.backend.send_all(b"bye")
        await conn.client.send_eof()
        await conn.backend.send_eof()
        assert await read_to_eof(conn.client) == b"bye"
        assert await read_to_eof(conn.backend) == b"bye"
        await conn.closed.wait()
        assert conn.stats.close_reason in (CloseReason.CLIENT_EOF, CloseReason.BACKEND_EOF)


# --- resets ------------------------------------------------------------------------------------


@pytest.mark.parametrize("splice", MODES)
@pytest.mark.parametrize(
    ("side", "reason"),
    [("client", CloseReason.CLIENT_RESET), ("backend", CloseReason.BACKEND_RESET)],
    ids=str,
)
async def test_a_reset_closes_the_other_side(splice: str, side: str, reason: str) -> None:
    async with running_engine(relay=splice) as relay:
        conn = relay.open()
        await conn.client.send_all(b"up")
        assert await read_exactly(conn.backend, 2) == b"up"
        await conn.backend.send_all(b"down")
        assert await read_exactly(conn.client, 4) == b"down"

        resetting, other = (
            (conn.client, conn.backend) if side == "client" else (conn.backend, conn.client)
        )
        abort(resetting)
        assert await read_to_eof(other) == b"", "the other side is closed"
        await conn.closed.wait()
        assert conn.stats.close_reason == reason
        assert relay.engine.statistics().tunnels == 0


@pytest.mark.parametrize("splice", MODES)
@pytest.mark.parametrize(
    ("side", "reason"),
    [("client", CloseReason.CLIENT_RESET), ("backend", CloseReason.BACKEND_RESET)],
    ids=str,
)
async def test_a_reset_after_a_half_close_still_closes_the_tunnel(
    splice: str, side: str, reason: str
) -> None:
    # A side sends EOF, then dies with RST while the other way is quiet: nothing is left to
    # read from it and nothing is being written to it, yet the tunnel must not linger.
    async with running_engine(relay=splice) as relay:
        conn = relay.open()
        resetting, other = (
            (conn.client, conn.backend) if side == "client" else (conn.backend, conn.client)
        )
        await resetting.send_eof()
        assert await read_to_eof(other) == b""
        abort(resetting)
        await conn.closed.wait()
        assert conn.stats.close_reason == reason
        # Our end already read EOF, so only writing can show that the engine closed it.
        assert await send_until_broken(other)


# --- idle timeout ------------------------------------------------------------------------------


@pytest.fixture
def patient_clock() -> trio.testing.MockClock:
    """Virtual time that jumps only after 10 ms of real idleness, so a loopback byte on its way
    through the kernel is never overtaken by a jump to the idle deadline."""
    return trio.testing.MockClock(autojump_threshold=0.01)


@pytest.mark.parametrize("splice", MODES)
async def test_idle_timeout_closes_a_silent_tunnel(
    splice: str, patient_clock: trio.testing.MockClock
) -> None:
    async with running_engine(relay=splice, idle_timeout=10.0) as relay:
        conn = relay.open()
        await conn.client.send_all(b"ping")
        assert await read_exactly(conn.backend, 4) == b"ping"
        last_activity = trio.current_time()
        await conn.closed.wait()
        assert conn.stats.close_reason == CloseReason.IDLE_TIMEOUT
        assert conn.closed_at is not None
        assert conn.closed_at - last_activity >= 10.0
        assert await read_to_eof(conn.client) == b""
        assert await read_to_eof(conn.backend) == b""


@pytest.mark.parametrize("splice", MODES)
async def test_activity_either_way_defers_the_idle_timeout(
    splice: str, patient_clock: trio.testing.MockClock
) -> None:
    async with running_engine(relay=splice, idle_timeout=10.0, guard=120.0) as relay:
        conn = relay.open()
        start = trio.current_time()
        for turn in range(6):
            await trio.sleep(7.0)
            sender, receiver = (
                (conn.client, conn.backend) if turn % 2 else (conn.backend, conn.client)
            )
            await sender.send_all(b"tick")
            assert await read_exactly(receiver, 4) == b"tick"
            assert not conn.closed.is_set(), f"closed at {trio.current_time() - start}s"
        last_activity = trio.current_time()
        await conn.closed.wait()
        assert conn.stats.close_reason == CloseReason.IDLE_TIMEOUT
        assert conn.closed_at is not None
        assert conn.closed_at - last_activity >= 10.0


@pytest.mark.parametrize("splice", MODES)
async def test_idle_timeout_zero_never_expires(
    splice: str, patient_clock: trio.testing.MockClock
) -> None:
    async with running_engine(relay=splice, idle_timeout=0.0, guard=10 * 86400.0) as relay:
        conn = relay.open()
        await trio.sleep(86400.0)
        assert not conn.closed.is_set()
        await conn.client.send_all(b"still here")
        assert await read_exactly(conn.backend, 10) == b"still here"


# --- the splice pipe pool ----------------------------------------------------------------------


@needs_splice
async def test_pool_exhaustion_falls_back_to_copying_and_loses_nothing() -> None:
    size = 4 * MiB
    async with running_engine(relay="splice", splice_pipes=1) as relay:
        # One tunnel whose backend does not read: its way up holds the only pipe.
        stuck = relay.open(buffer=128 * 1024)
        stuck_data = os.urandom(size)
        busy = [relay.open() for _ in range(4)]
        payloads = [(os.urandom(size), os.urandom(size)) for _ in busy]
        digests: dict[tuple[int, str], str] = {}
        peak_in_use = 0

        async def collect(key: tuple[int, str], stream: trio.SocketStream) -> None:
            nonlocal peak_in_use
            digests[key] = await receive_digest(stream, size)
            peak_in_use = max(peak_in_use, relay.engine.statistics().pipes_in_use)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_in_pieces, stuck.client, stuck_data, (65536,))
            await wait_until(lambda: relay.engine.statistics().pipes_in_use == 1)
            async with trio.open_nursery() as transfers:
                for i, (conn, (up, down)) in enumerate(zip(busy, payloads, strict=True)):
                    transfers.start_soon(send_in_pieces, conn.client, up, (100_000,))
                    transfers.start_soon(send_in_pieces, conn.backend, down, (100_000,))
                    transfers.start_soon(collect, (i, "up"), conn.backend)
                    transfers.start_soon(collect, (i, "down"), conn.client)
            assert await receive_digest(stuck.backend, size) == sha256(stuck_data)

        for i, (up, down) in enumerate(payloads):
            assert digests[i, "up"] == sha256(up)
            assert digests[i, "down"] == sha256(down)
        stats = relay.engine.statistics()
        assert stats.splice_fallbacks > 0
        assert stats.pipes_in_use + stats.pipes_idle <= 1
        assert peak_in_use <= 1


@pytest.mark.parametrize(
    ("splice", "splice_pipes"),
    [pytest.param(True, 0, id="splice-with-no-pipes"), pytest.param(False, 64, id="copy")],
)
async def test_without_pipes_the_engine_copies_and_opens_no_pipe(
    splice: str, splice_pipes: int
) -> None:
    size = 2 * MiB
    pipes_before = open_pipes()
    async with running_engine(relay=splice, splice_pipes=splice_pipes) as relay:
        conns = [relay.open() for _ in range(3)]
        payloads = [(os.urandom(size), os.urandom(size)) for _ in conns]
        most_pipes = 0

        async def watch() -> None:
            nonlocal most_pipes
            for _ in range(POLL_LIMIT):
                most_pipes = max(most_pipes, open_pipes())
                await trio.sleep(POLL_SECONDS)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            async with trio.open_nursery() as transfers:
                for conn, (up, down) in zip(conns, payloads, strict=True):
                    transfers.start_soon(conn.client.send_all, up)
                    transfers.start_soon(conn.backend.send_all, down)
                    transfers.start_soon(check_digest, conn.backend, up)
                    transfers.start_soon(check_digest, conn.client, down)
            nursery.cancel_scope.cancel()
        stats = relay.engine.statistics()
        assert (stats.pipes_in_use, stats.pipes_idle, stats.splice_fallbacks) == (0, 0, 0)
        assert most_pipes == pipes_before


async def check_digest(stream: trio.SocketStream, expected: bytes) -> None:
    assert await receive_digest(stream, len(expected)) == sha256(expected)


# --- descriptors -------------------------------------------------------------------------------


async def exchange(conn: Conn, size: int) -> None:
    """Send ``size`` random bytes each way at once and check they arrive."""
    up, down = os.urandom(size), os.urandom(size)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.client.send_all, up)
        nursery.start_soon(conn.backend.send_all, down)
        nursery.start_soon(check_digest, conn.backend, up)
        nursery.start_soon(check_digest, conn.client, down)


@pytest.mark.parametrize("splice", MODES)
async def test_descriptors_return_to_the_baseline_after_tunnels_close(splice: str) -> None:
    async with running_engine(relay=splice, splice_pipes=16) as relay:
        baseline = open_fds()
        conns = [relay.open() for _ in range(50)]
        async with trio.open_nursery() as nursery:
            for conn in conns:
                nursery.start_soon(exchange, conn, 256 * 1024)
        assert open_fds() > baseline
        if splice != "copy":
            # Pipes that carried bytes wait in the pool while any tunnel is open.
            assert relay.engine.statistics().pipes_idle > 0

        for conn in conns:
            await conn.client.send_eof()
            await conn.backend.send_eof()
        for conn in conns:
            await conn.closed.wait()
            assert await read_to_eof(conn.client) == b""
            assert await read_to_eof(conn.backend) == b""
            conn.close_outer()
        stats = relay.engine.statistics()
        assert (stats.tunnels, stats.pipes_in_use, stats.pipes_idle) == (0, 0, 0)
        assert open_fds() == baseline


@pytest.mark.parametrize("splice", MODES)
async def test_cancelling_the_engine_closes_every_tunnel_with_reason_shutdown(
    splice: str,
) -> None:
    baseline = open_fds()
    async with running_engine(relay=splice, splice_pipes=16) as relay:
        conns = [relay.open(buffer=128 * 1024) for _ in range(20)]
        async with trio.open_nursery() as nursery:
            for conn in conns[:10]:
                nursery.start_soon(exchange, conn, 256 * 1024)
        await conns[9].client.send_eof()  # one of them half-closed
        assert await read_to_eof(conns[9].backend) == b""

        async with trio.open_nursery() as stuck:
            # The other half with bytes stuck in the engine: their backends do not read.
            for conn in conns[10:]:
                stuck.start_soon(send_until_broken, conn.client)
            await trio.testing.wait_all_tasks_blocked(cushion=0.02)
            if splice == "splice":
                assert relay.engine.statistics().pipes_in_use > 0
            await relay.stop()
            stuck.cancel_scope.cancel()

        for conn in conns:
            assert conn.closed.is_set()
            assert conn.stats.close_reason == CloseReason.SHUTDOWN
        for conn in conns[:9]:
            assert await read_to_eof(conn.client) == b""
            assert await read_to_eof(conn.backend) == b""
        assert await read_to_eof(conns[9].client) == b""
        for conn in conns:
            conn.close_outer()
        assert open_fds() == baseline


# --- many tunnels ------------------------------------------------------------------------------


@pytest.mark.parametrize("splice", MODES)
async def test_many_tunnels_echo_at_once(splice: str) -> None:
    tunnels, messages = 200, 5
    async with running_engine(relay=splice) as relay:
        conns = [relay.open() for _ in range(tunnels)]

        async def echo(stream: trio.SocketStream) -> None:
            while chunk := await stream.receive_some(65536):
                await stream.send_all(chunk)
            await stream.send_eof()

        async def talk(index: int, conn: Conn) -> None:
            for turn in range(messages):
                message = b"%d:%d:" % (index, turn) + os.urandom((index * 997 + turn) % 20_000)
                await conn.client.send_all(message)
                assert await read_exactly(conn.client, len(message)) == message
            await conn.client.send_eof()
            assert await read_to_eof(conn.client) == b""
            await conn.closed.wait()

        async with trio.open_nursery() as nursery:
            for index, conn in enumerate(conns):
                nursery.start_soon(echo, conn.backend)
                nursery.start_soon(talk, index, conn)
        assert all(conn.stats.close_reason == CloseReason.CLIENT_EOF for conn in conns)
        assert all(conn.stats.bytes_up == conn.stats.bytes_down > 0 for conn in conns)
        assert relay.engine.statistics().tunnels == 0


@pytest.mark.parametrize("splice", MODES)
async def test_a_failing_close_callback_does_not_stop_the_engine(
    splice: str, caplog: pytest.LogCaptureFixture
) -> None:
    def fail(tunnel: Tunnel) -> None:
        raise RuntimeError("callback bug")

    async with running_engine(relay=splice) as relay:
        client_outer, client_inner = tcp_pair()
        backend_inner, backend_outer = tcp_pair()
        client_inner.setblocking(False)
        backend_inner.setblocking(False)
        relay.engine.adopt(client_inner, backend_inner, RelayStats(), fail)
        client_outer.close()
        backend_outer.close()
        await wait_until(lambda: relay.engine.statistics().tunnels == 0)
        assert "error in a tunnel's close callback" in caplog.text

        conn = relay.open()
        await exchange(conn, 100_000)


# --- what a closed tunnel leaves behind --------------------------------------------------------


class _Owner:
    """Something a close callback refers to, as the handler's closure refers to its handler."""

    def closed(self, tunnel: Tunnel) -> None:
        pass


class _WeakStats(RelayStats):
    """Counters that can be watched with a weak reference: alive while the tunnel is."""

    __slots__ = ("__weakref__",)


@pytest.mark.parametrize("splice", MODES)
async def test_closed_tunnels_are_not_kept_alive_until_their_idle_deadline(splice: str) -> None:
    # With the default one-hour idle timeout, closed tunnels (and whatever their callbacks refer
    # to) must not pile up for the rest of the hour: none is left once all are closed.
    owners: list[weakref.ref[_Owner]] = []
    stats: list[weakref.ref[_WeakStats]] = []
    async with running_engine(relay=splice, idle_timeout=3600.0) as relay:
        for _ in range(200):
            client_outer, client_inner = tcp_pair()
            backend_inner, backend_outer = tcp_pair()
            client_inner.setblocking(False)
            backend_inner.setblocking(False)
            owner, counters = _Owner(), _WeakStats()
            owners.append(weakref.ref(owner))
            stats.append(weakref.ref(counters))
            relay.engine.adopt(client_inner, backend_inner, counters, owner.closed)
            del owner, counters
            abort(stream_of(client_outer))
            backend_outer.close()
        await wait_until(lambda: relay.engine.statistics().tunnels == 0)
        gc.collect()
        alive_owners = sum(ref() is not None for ref in owners)
        alive_stats = sum(ref() is not None for ref in stats)
        assert (alive_owners, alive_stats) == (0, 0), "closed tunnels still referenced"


@needs_splice
async def test_auto_copies_messages_and_splices_bulk() -> None:
    async with running_engine(relay="auto") as relay:
        conn = relay.open()
        for _ in range(50):
            await conn.client.send_all(b"m" * 64)
            assert await read_exactly(conn.backend, 64) == b"m" * 64
        stats = relay.engine.statistics()
        assert (stats.pipes_in_use, stats.pipes_idle) == (0, 0), "a message took a pipe"

        await exchange(conn, 8 * MiB)
        assert relay.engine.statistics().pipes_idle > 0, "bulk never went through a pipe"
