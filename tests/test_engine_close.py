"""Polite closes in the relay engine, over real loopback TCP.

When the tunnel itself ends a WebSocket tunnel (admin, idle timeout, lifetime, drain, shutdown)
each side gets a Close frame (1001, the reason's value), unmasked toward the client and masked
toward the backend, placed after the frame in flight; then the engine waits up to
``close_grace`` for both sides' Close (or EOF) before it closes the sockets. Plain tunnels, and
closes a peer caused, end at once.

The harness is ``tests/test_engine.py``'s: the test holds the outer ends of two loopback TCP
connections (``client`` plays the browser, ``backend`` the server) and the engine adopts the
inner ends. The frames the peers send are built here from RFC 6455; what they receive is
checked byte for byte. Tests with a ``close_grace`` of a minute run on the real clock under a
ten-second guard, so a close that waited for the grace fails them; tests about timers run on
a MockClock that jumps only after 10 ms of real idleness (bytes on loopback arrive well before).
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing
from rawhttp import read_exactly, read_to_eof
from test_engine import MODES, Conn, MiB, needs_splice, stream_of, tcp_pair

from tunnel.core.wsframes import GOING_AWAY, close_frame
from tunnel.net.engine import CLOSE_CODES, POLITE, Engine
from tunnel.net.relay import RelayStats
from tunnel.reasons import CloseReason

GUARD_SECONDS = 10.0
"""Bound of every real-clock test: well below ``LONG_GRACE``."""
LONG_GRACE = 60.0
"""A grace no real-clock test may wait for."""
TIMER_GUARD = 600.0
"""Bound (virtual seconds) of the MockClock tests."""

TEXT, BINARY, CLOSE = 0x1, 0x2, 0x8
SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
BIG_MODES = [
    pytest.param("splice", id="splice", marks=needs_splice),
    pytest.param("auto", id="auto", marks=needs_splice),
]


# --- frames as the peers write them ------------------------------------------------------------


def header(opcode: int, length: int, key: bytes | None = None) -> bytes:
    """A final frame's header, shortest length encoding; masked with ``key`` when given."""
    flag = 0x80 if key is not None else 0
    if length <= 125:
        head = bytes((0x80 | opcode, flag | length))
    elif length <= 0xFFFF:
        head = bytes((0x80 | opcode, flag | 126)) + length.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, flag | 127)) + length.to_bytes(8, "big")
    return head + (key or b"")


def mask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    if not n:
        return b""
    keystream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(keystream, "big")).to_bytes(n, "big")


def server_frame(opcode: int, payload: bytes) -> bytes:
    """What a backend sends: unmasked."""
    return header(opcode, len(payload)) + payload


def client_frame(opcode: int, payload: bytes, key: bytes | None = None) -> bytes:
    """What a client sends: masked (with a random key unless ``key``)."""
    key = key if key is not None else os.urandom(4)
    return header(opcode, len(payload), key) + mask(payload, key)


def close_payload(reason: str, code: int = GOING_AWAY) -> bytes:
    return code.to_bytes(2, "big") + reason.encode("ascii")


CLIENT_REPLY = client_frame(CLOSE, close_payload(""))
"""A client answering the tunnel's Close."""
BACKEND_REPLY = server_frame(CLOSE, close_payload(""))


async def read_masked_close(stream: trio.SocketStream) -> tuple[bytes, bytes]:
    """Read one masked Close frame (what the tunnel sends a backend); return its key and its
    unmasked payload."""
    head = await read_exactly(stream, 2)
    assert head[0] == 0x80 | CLOSE, f"not a final Close frame: {head!r}"
    assert head[1] & 0x80, "a Close toward the backend must be masked"
    length = head[1] & 0x7F
    assert length <= 125
    rest = await read_exactly(stream, 4 + length)
    key = rest[:4]
    return key, mask(rest[4:], key)


async def expect_backend_close(
    stream: trio.SocketStream, reason: str, code: int = GOING_AWAY
) -> bytes:
    key, payload = await read_masked_close(stream)
    assert payload == close_payload(reason, code)
    return key


async def expect_client_close(
    stream: trio.SocketStream, reason: str, code: int = GOING_AWAY
) -> None:
    expected = close_frame(reason, code=code)
    assert expected == b"\x88" + bytes((2 + len(reason),)) + close_payload(reason, code)
    assert await read_exactly(stream, len(expected)) == expected


# --- the harness -------------------------------------------------------------------------------


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
        websocket: bool = True,
        lifetime: float = 0.0,
        reply_head: bytes = b"",
        to_client: bytes = b"",
        to_backend: bytes = b"",
    ) -> Conn:
        client_outer, client_inner = tcp_pair()
        backend_inner, backend_outer = tcp_pair()
        for sock in (client_outer, client_inner, backend_inner, backend_outer):
            # As the handler's sockets (sockio): without it, a small Close written while the
            # peer's delayed ACK is pending waits ~40 real ms in Nagle's queue, during which
            # a MockClock may jump past the instant under test.
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
            reply_head=reply_head,
            to_client=to_client,
            to_backend=to_backend,
            websocket=websocket,
            lifetime=lifetime,
        )
        return conn

    def close(self, conn: Conn, reason: CloseReason = CloseReason.ADMIN) -> None:
        assert conn.tunnel is not None
        self.engine.close(conn.tunnel, reason)


@asynccontextmanager
async def running_engine(
    *,
    relay: str,
    close_grace: float = LONG_GRACE,
    idle_timeout: float = 0.0,
    guard: float = GUARD_SECONDS,
) -> AsyncIterator[Relay]:
    """An engine served for the body of the ``async with``; afterwards every tunnel it adopted
    must have been reported to ``on_close`` exactly once."""
    relay = Relay(
        Engine(relay=relay, splice_pipes=64, idle_timeout=idle_timeout, close_grace=close_grace)
    )

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
                relay.scope.cancel()
                await relay.stopped.wait()
    finally:
        for conn in relay.conns:
            conn.close_outer()
    for conn in relay.conns:
        assert conn.close_calls == 1, "on_close must run exactly once per tunnel"


@pytest.fixture
def patient_clock() -> trio.testing.MockClock:
    """Virtual time that jumps only after 10 ms of real idleness, so a loopback byte on its way
    is never overtaken by a jump to the next deadline."""
    return trio.testing.MockClock(autojump_threshold=0.01)


async def exchange_frames(conn: Conn, label: bytes = b"hello") -> None:
    """One data frame each way, checked on arrival: the tunnel is open and flowing, and both
    trackers stand between two frames afterwards."""
    up = client_frame(TEXT, b"up " + label)
    down = server_frame(TEXT, b"down " + label)
    await conn.client.send_all(up)
    assert await read_exactly(conn.backend, len(up)) == up
    await conn.backend.send_all(down)
    assert await read_exactly(conn.client, len(down)) == down


async def answer_both(conn: Conn) -> None:
    await conn.client.send_all(CLIENT_REPLY)
    await conn.backend.send_all(BACKEND_REPLY)


async def expect_eof_both(conn: Conn) -> None:
    """Both outer ends read EOF and nothing before it."""
    assert await read_to_eof(conn.client) == b""
    assert await read_to_eof(conn.backend) == b""


# --- an idle tunnel ----------------------------------------------------------------------------


@pytest.mark.parametrize("splice", MODES)
async def test_admin_close_sends_each_side_a_close_and_ends_when_both_answer(splice: str) -> None:
    async with running_engine(relay=splice) as relay:
        conn = relay.open()
        await exchange_frames(conn)
        started = trio.current_time()
        relay.close(conn)
        relay.close(conn)  # closing already: ignored
        relay.close(conn, CloseReason.DRAIN)  # and not re-reasoned
        await expect_client_close(conn.client, "admin")
        await expect_backend_close(conn.backend, "admin")
        await trio.testing.wait_all_tasks_blocked(cushion=0.02)
        assert not conn.closed.is_set(), "closed before the peers answered"
        assert relay.engine.statistics().tunnels == 1

        await answer_both(conn)
        await conn.closed.wait()
        assert trio.current_time() - started < GUARD_SECONDS / 2, "waited for the grace"
        assert conn.stats.close_reason == CloseReason.ADMIN
        # The replies end there: neither side gets the other's Close, nor anything else.
        await expect_eof_both(conn)
        assert relay.engine.statistics().tunnels == 0


@pytest.mark.parametrize("reason", sorted(POLITE))
async def test_every_reason_the_tunnel_decides_is_a_polite_close_naming_it(
    reason: CloseReason,
) -> None:
    assert {
        CloseReason.IDLE_TIMEOUT,
        CloseReason.MAX_LIFETIME,
        CloseReason.DRAIN,
        CloseReason.SHUTDOWN,
        CloseReason.ADMIN,
    } <= POLITE
    async with running_engine(relay="copy") as relay:
        conn = relay.open()
        relay.close(conn, reason)
        code = CLOSE_CODES.get(reason, GOING_AWAY)  # 1008 for credential_expired
        await expect_client_close(conn.client, reason.value, code)
        await expect_backend_close(conn.backend, reason.value, code)
        await answer_both(conn)
        await conn.closed.wait()
        assert conn.stats.close_reason == reason
        await expect_eof_both(conn)


@pytest.mark.parametrize("splice", MODES)
@pytest.mark.parametrize(
    ("client_says", "backend_says", "at_once"),
    [
        ("nothing", "nothing", False),
        ("close", "nothing", False),
        ("nothing", "close", False),
        ("eof", "nothing", False),
        ("close", "close", True),
        ("eof", "eof", True),
        ("close", "eof", True),
        ("eof", "close", True),
    ],
)
async def test_the_sockets_close_when_both_answered_or_after_close_grace(
    splice: str,
    client_says: str,
    backend_says: str,
    at_once: bool,
    patient_clock: trio.testing.MockClock,
) -> None:
    grace = 5.0
    async with running_engine(relay=splice, close_grace=grace, guard=TIMER_GUARD) as relay:
        conn = relay.open()
        await exchange_frames(conn)
        started = trio.current_time()
        relay.close(conn)
        await expect_client_close(conn.client, "admin")
        await expect_backend_close(conn.backend, "admin")
        for stream, says, reply in (
            (conn.client, client_says, CLIENT_REPLY),
            (conn.backend, backend_says, BACKEND_REPLY),
        ):
            if says == "close":
                await stream.send_all(reply)
            elif says == "eof":
                await stream.send_eof()
        await conn.closed.wait()
        assert conn.closed_at is not None
        elapsed = conn.closed_at - started
        if at_once:
            assert elapsed < grace / 10, f"closed after {elapsed}s although both answered"
        else:
            assert elapsed == pytest.approx(grace, abs=0.05)
        assert conn.stats.close_reason == CloseReason.ADMIN
        await expect_eof_both(conn)


@pytest.mark.parametrize("splice", MODES)
@pytest.mark.parametrize(
    ("websocket", "reason", "grace"),
    [
        (False, CloseReason.ADMIN, LONG_GRACE),
        (False, CloseReason.DRAIN, LONG_GRACE),
        (True, CloseReason.ERROR, LONG_GRACE),
        (True, CloseReason.HALF_CLOSE_TIMEOUT, LONG_GRACE),
        (True, CloseReason.ADMIN, 0.0),
    ],
    ids=["plain-admin", "plain-drain", "ws-error", "ws-half-close-timeout", "ws-no-grace"],
)
async def test_an_impolite_close_is_at_once_and_sends_no_frame(
    splice: str, websocket: bool, reason: CloseReason, grace: float
) -> None:
    async with running_engine(relay=splice, close_grace=grace) as relay:
        conn = relay.open(websocket=websocket)
        await exchange_frames(conn)
        relay.close(conn, reason)
        assert conn.closed.is_set(), "the close must be immediate"
        assert conn.stats.close_reason == reason
        await expect_eof_both(conn)


@pytest.mark.parametrize("splice", MODES)
async def test_no_second_close_toward_a_backend_that_got_the_clients_own(splice: str) -> None:
    async with running_engine(relay=splice) as relay:
        conn = relay.open()
        own = client_frame(CLOSE, close_payload("bye", 1000))
        await conn.client.send_all(own)
        assert await read_exactly(conn.backend, len(own)) == own
        relay.close(conn)
        await expect_client_close(conn.client, "admin")
        await conn.backend.send_all(server_frame(CLOSE, close_payload("bye", 1000)))
        await conn.closed.wait()
        assert conn.stats.close_reason == CloseReason.ADMIN
        # Nothing after the client's own Close: no Close of the tunnel's.
        await expect_eof_both(conn)


@pytest.mark.parametrize("splice", MODES)
async def test_no_second_close_toward_a_client_that_got_the_backends_own(splice: str) -> None:
    async with running_engine(relay=splice) as relay:
        conn = relay.open()
        own = server_frame(CLOSE, close_payload("restarting", 1012))
        await conn.backend.send_all(own)
        assert await read_exactly(conn.client, len(own)) == own
        relay.close(conn)
        await expect_backend_close(conn.backend, "admin")
        await conn.client.send_all(client_frame(CLOSE, close_payload("", 1012)))
        await conn.closed.wait()
        await expect_eof_both(conn)


@pytest.mark.parametrize("splice", MODES)
@pytest.mark.parametrize("direction", ["up", "down"])
async def test_a_close_already_in_flight_from_a_side_is_passed_on_whole(
    splice: str, direction: str
) -> None:
    # A side has sent the header and the first bytes of its own Close when the tunnel decides
    # to close: no Close of the tunnel's goes after it, and the rest of that side's Close still
    # reaches the other side (a Close cut short is a broken frame, not a Close).
    upward = direction == "up"
    own = (
        client_frame(CLOSE, close_payload("going away now", 1001))
        if upward
        else server_frame(CLOSE, close_payload("restarting", 1012))
    )
    first = 2 + (4 if upward else 0) + 3  # the header and three bytes of the payload
    async with running_engine(relay=splice) as relay:
        conn = relay.open()
        sender, receiver = (conn.client, conn.backend) if upward else (conn.backend, conn.client)
        await sender.send_all(own[:first])
        assert await read_exactly(receiver, first) == own[:first]
        relay.close(conn)
        if upward:
            await expect_client_close(conn.client, "admin")
        else:
            await expect_backend_close(conn.backend, "admin")
        await sender.send_all(own[first:])
        rest = b""
        with trio.move_on_after(2.0):
            # Bounded: if the rest was dropped, nothing more arrives until the close.
            rest = await read_exactly(receiver, len(own) - first)
        assert rest == own[first:], "the rest of a side's own Close was dropped"
        await receiver.send_all(BACKEND_REPLY if upward else CLIENT_REPLY)
        await conn.closed.wait()
        assert conn.stats.close_reason == CloseReason.ADMIN
        await expect_eof_both(conn)


@pytest.mark.parametrize("splice", MODES)
@pytest.mark.parametrize("direction", ["up", "down"])
async def test_a_frame_that_never_ends_gets_no_close_inside_it(
    splice: str, direction: str, patient_clock: trio.testing.MockClock
) -> None:
    # The sender stops in the middle of a frame: the receiver gets the bytes of that frame
    # that came, then, a grace later, EOF; never a Close inside the frame.
    upward = direction == "up"
    frame = (
        client_frame(BINARY, os.urandom(5000)) if upward else server_frame(BINARY, os.urandom(5000))
    )
    async with running_engine(relay=splice, close_grace=3.0, guard=TIMER_GUARD) as relay:
        conn = relay.open()
        sender, receiver = (conn.client, conn.backend) if upward else (conn.backend, conn.client)
        await sender.send_all(frame[:2500])
        assert await read_exactly(receiver, 2500) == frame[:2500]
        started = trio.current_time()
        relay.close(conn)
        if upward:
            await expect_client_close(conn.client, "admin")
        else:
            await expect_backend_close(conn.backend, "admin")
        # The sender cannot answer: whatever it sends now is more of its frame's payload.
        assert await read_to_eof(receiver) == b""
        assert conn.closed_at is not None
        assert conn.closed_at - started == pytest.approx(3.0, abs=0.05)
        assert conn.stats.close_reason == CloseReason.ADMIN
        assert await read_to_eof(sender) == b""


@pytest.mark.parametrize("splice", MODES)
@pytest.mark.parametrize("direction", ["up", "down"])
async def test_the_replies_get_a_full_grace_after_a_late_close_goes_out(
    splice: str, direction: str, patient_clock: trio.testing.MockClock
) -> None:
    # The sender is mid-frame when the tunnel closes and ends its frame 2.5 s into a 3 s grace:
    # only then does the receiver get its Close, and its answer, 2 s later, is still in time
    # (the sockets close "close_grace after the frames went out", Engine.close).
    grace = 3.0
    upward = direction == "up"
    payload = os.urandom(5000)
    frame = client_frame(BINARY, payload) if upward else server_frame(BINARY, payload)
    async with running_engine(relay=splice, close_grace=grace, guard=TIMER_GUARD) as relay:
        conn = relay.open()
        sender, receiver = (conn.client, conn.backend) if upward else (conn.backend, conn.client)
        await sender.send_all(frame[:2500])
        assert await read_exactly(receiver, 2500) == frame[:2500]
        started = trio.current_time()
        relay.close(conn)
        if upward:
            await expect_client_close(conn.client, "admin")
        else:
            await expect_backend_close(conn.backend, "admin")
        await trio.sleep(2.5)
        await sender.send_all(frame[2500:] + (CLIENT_REPLY if upward else BACKEND_REPLY))
        assert await read_exactly(receiver, len(frame) - 2500) == frame[2500:]
        if upward:
            await expect_backend_close(conn.backend, "admin")
        else:
            await expect_client_close(conn.client, "admin")
        await trio.sleep(2.0)
        assert not conn.closed.is_set(), (
            f"closed {conn.closed_at and conn.closed_at - started}s after the close began, "
            f"{grace}s grace counted from the start instead of from the late Close"
        )
        await receiver.send_all(BACKEND_REPLY if upward else CLIENT_REPLY)
        await conn.closed.wait()
        assert conn.closed_at is not None
        assert conn.closed_at - started == pytest.approx(4.5, abs=0.05)
        await expect_eof_both(conn)


@pytest.mark.parametrize("splice", MODES)
async def test_a_side_that_already_sent_eof_gets_no_close(splice: str) -> None:
    # The backend half-closed (its FIN went to the client): only the backend gets a Close; the
    # client's answer ends the tunnel at once.
    async with running_engine(relay=splice) as relay:
        conn = relay.open()
        await exchange_frames(conn)
        await conn.backend.send_eof()
        assert await read_to_eof(conn.client) == b""
        relay.close(conn)
        await expect_backend_close(conn.backend, "admin")
        await conn.client.send_all(CLIENT_REPLY)
        await conn.closed.wait()
        assert conn.stats.close_reason == CloseReason.ADMIN
        assert await read_to_eof(conn.backend) == b""


# --- the frame in flight -----------------------------------------------------------------------


async def close_mid_frame(relay: Relay, direction: str, size: int) -> None:
    """The sender has sent a frame's header and half its ``size``-byte payload when the tunnel
    closes: the receiver gets the whole frame, byte for byte, then the Close; what the sender
    sends after that frame (a data frame, then its Close reply) goes nowhere."""
    conn = relay.open()
    await exchange_frames(conn)
    upward = direction == "up"
    sender, receiver = (conn.client, conn.backend) if upward else (conn.backend, conn.client)
    payload = os.urandom(size)
    if upward:
        frame = client_frame(BINARY, payload)
        after = client_frame(TEXT, b"must not pass")
        reply = CLIENT_REPLY
    else:
        frame = server_frame(BINARY, payload)
        after = server_frame(TEXT, b"must not pass")
        reply = BACKEND_REPLY
    half = len(frame) - size // 2
    got = bytearray()

    async def receive(until: int) -> None:
        while len(got) < until:
            chunk = await receiver.receive_some(min(1 << 20, until - len(got)))
            assert chunk, f"EOF after {len(got)} bytes"
            got.extend(chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender.send_all, frame[:half])
        nursery.start_soon(receive, half)
    relay.close(conn)
    # The sender's own side is between two frames: its Close comes at once.
    if upward:
        await expect_client_close(conn.client, "admin")
    else:
        await expect_backend_close(conn.backend, "admin")
    assert not conn.closed.is_set()

    tail = close_frame("admin", b"\0\0\0\0") if upward else close_frame("admin")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender.send_all, frame[half:] + after + reply)
        nursery.start_soon(receive, len(frame) + len(tail))
    assert bytes(got[: len(frame)]) == frame, "the frame in flight arrived damaged"
    if upward:
        assert got[len(frame)] == 0x88
        assert got[len(frame) + 1] == 0x80 | len(close_payload("admin"))
        key = bytes(got[len(frame) + 2 : len(frame) + 6])
        assert mask(bytes(got[len(frame) + 6 :]), key) == close_payload("admin")
    else:
        assert bytes(got[len(frame) :]) == tail
    # The receiver answers; the tunnel ends, and nothing the sender sent after its frame (the
    # data frame, its Close reply) ever reached the receiver.
    await receiver.send_all(BACKEND_REPLY if upward else CLIENT_REPLY)
    await conn.closed.wait()
    assert conn.stats.close_reason == CloseReason.ADMIN
    await expect_eof_both(conn)


@pytest.mark.parametrize("splice", MODES)
@pytest.mark.parametrize("direction", ["down", "up"])
async def test_the_close_waits_for_the_frame_in_flight(splice: str, direction: str) -> None:
    async with running_engine(relay=splice) as relay:
        await close_mid_frame(relay, direction, MiB)


@pytest.mark.parametrize("splice", BIG_MODES)
@pytest.mark.parametrize("direction", ["down", "up"])
async def test_the_close_waits_for_a_16_mib_frame_in_flight(splice: str, direction: str) -> None:
    async with running_engine(relay=splice, guard=3 * GUARD_SECONDS) as relay:
        await close_mid_frame(relay, direction, 16 * MiB)


@pytest.mark.parametrize("splice", MODES)
@pytest.mark.parametrize("direction", ["down", "up"])
@pytest.mark.parametrize("length", [100, 300, 70_000], ids=["2-byte", "4-byte", "10-byte"])
async def test_a_header_split_across_reads_still_puts_the_close_after_its_frame(
    splice: str, direction: str, length: int
) -> None:
    # The sender writes a frame's header one byte per read, and the tunnel closes after ``cut``
    # of them: with no byte of it sent, the Close goes at once and the frame is dropped;
    # otherwise the whole frame arrives, then the Close.
    upward = direction == "up"
    key = b"\x11\x22\x33\x44"
    payload = os.urandom(length)
    frame = client_frame(BINARY, payload, key) if upward else server_frame(BINARY, payload)
    head = header(BINARY, length, key if upward else None)
    assert frame.startswith(head)
    async with running_engine(relay=splice) as relay:
        for cut in range(len(head) + 1):
            conn = relay.open()
            sender, receiver = (
                (conn.client, conn.backend) if upward else (conn.backend, conn.client)
            )
            for i in range(cut):
                await sender.send_all(head[i : i + 1])
                assert await read_exactly(receiver, 1) == head[i : i + 1]
            relay.close(conn)
            if upward:
                await expect_client_close(conn.client, "admin")
            else:
                await expect_backend_close(conn.backend, "admin")
            if cut:
                for i in range(cut, len(head)):
                    await sender.send_all(head[i : i + 1])
                    assert await read_exactly(receiver, 1) == head[i : i + 1], (cut, i)
                rest = frame[len(head) :]
                await sender.send_all(rest + server_frame(TEXT, b"dropped"))
                assert await read_exactly(receiver, len(rest)) == rest, cut
            else:
                await sender.send_all(frame)
            if upward:
                await expect_backend_close(conn.backend, "admin")
                await conn.client.send_all(CLIENT_REPLY)
                await conn.backend.send_all(BACKEND_REPLY)
            else:
                await expect_client_close(conn.client, "admin")
                await conn.backend.send_all(BACKEND_REPLY)
                await conn.client.send_all(CLIENT_REPLY)
            await conn.closed.wait()
            await expect_eof_both(conn)


@pytest.mark.parametrize("splice", MODES)
async def test_leftovers_mid_frame_hold_the_close_back(splice: str) -> None:
    # The 101 and the start of the backend's first frame came with the handshake: the 101 is
    # not a frame, and the Close waits for the rest of that frame.
    payload = os.urandom(1000)
    frame = server_frame(BINARY, payload)
    to_client = frame[:300]
    async with running_engine(relay=splice) as relay:
        conn = relay.open(reply_head=SWITCHING, to_client=to_client)
        relay.close(conn)
        await expect_backend_close(conn.backend, "admin")
        assert await read_exactly(conn.client, len(SWITCHING) + 300) == SWITCHING + to_client
        await conn.backend.send_all(frame[300:] + server_frame(TEXT, b"late"))
        tail = close_frame("admin")
        rest = frame[300:]
        assert await read_exactly(conn.client, len(rest) + len(tail)) == rest + tail
        await answer_both(conn)
        await conn.closed.wait()
        await expect_eof_both(conn)


@pytest.mark.parametrize("splice", MODES)
async def test_a_client_that_does_not_read_gets_whole_frames_then_the_close(splice: str) -> None:
    # The backend streams numbered 100 kB frames and the client reads nothing, so the engine
    # holds bytes (parked or piped) and stops reading when the close comes. When the client
    # reads again it finds whole frames, in order, then the Close, then nothing.
    count, size = 200, 100_000

    def numbered(i: int) -> bytes:
        return server_frame(BINARY, i.to_bytes(4, "big") * (size // 4))

    async with running_engine(relay=splice) as relay:
        conn = relay.open()

        async def backend() -> None:
            for i in range(count):
                await conn.backend.send_all(numbered(i))
            await expect_backend_close(conn.backend, "admin")
            await conn.backend.send_all(BACKEND_REPLY)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(backend)
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            assert conn.stats.bytes_down > 0
            relay.close(conn)
            received = bytearray()
            tail = close_frame("admin")
            for _ in range(10_000):
                chunk = await conn.client.receive_some(1 << 20)
                assert chunk, "EOF before the Close"
                received.extend(chunk)
                if received.endswith(tail) and len(received) % len(numbered(0)) == len(tail):
                    break
            else:
                raise AssertionError("no Close after whole frames")
            await conn.client.send_all(CLIENT_REPLY)
        frames, rest = divmod(len(received) - len(tail), len(numbered(0)))
        assert rest == 0
        assert 0 < frames < count, "the close came while the backend was still sending"
        for i in range(frames):
            start = i * len(numbered(0))
            assert received[start : start + len(numbered(0))] == numbered(i), f"frame {i}"
        await conn.closed.wait()
        await expect_eof_both(conn)


# --- timers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("splice", MODES)
async def test_the_idle_timeout_closes_politely(
    splice: str, patient_clock: trio.testing.MockClock
) -> None:
    async with running_engine(
        relay=splice, idle_timeout=10.0, close_grace=2.0, guard=TIMER_GUARD
    ) as relay:
        conn = relay.open()
        await trio.sleep(7.0)
        await exchange_frames(conn)
        last_activity = trio.current_time()
        await expect_client_close(conn.client, "idle_timeout")
        assert trio.current_time() - last_activity == pytest.approx(10.0, abs=0.05)
        await expect_backend_close(conn.backend, "idle_timeout")
        await answer_both(conn)
        await conn.closed.wait()
        assert conn.closed_at is not None
        assert conn.closed_at - last_activity == pytest.approx(10.0, abs=0.05)
        assert conn.stats.close_reason == CloseReason.IDLE_TIMEOUT
        await expect_eof_both(conn)


@pytest.mark.parametrize("splice", MODES)
async def test_the_lifetime_closes_politely_whatever_the_activity(
    splice: str, patient_clock: trio.testing.MockClock
) -> None:
    async with running_engine(
        relay=splice, idle_timeout=3.0, close_grace=2.0, guard=TIMER_GUARD
    ) as relay:
        started = trio.current_time()
        conn = relay.open(lifetime=5.0)
        plain = relay.open(lifetime=5.0, websocket=False)
        for turn in range(4):
            await trio.sleep(1.0)
            await exchange_frames(conn, b"%d" % turn)
            await exchange_frames(plain, b"%d" % turn)
        await expect_client_close(conn.client, "max_lifetime")
        assert trio.current_time() - started == pytest.approx(5.0, abs=0.05)
        await expect_backend_close(conn.backend, "max_lifetime")
        # Nobody answers: the sockets close one grace later.
        await conn.closed.wait()
        assert conn.closed_at is not None
        assert conn.closed_at - started == pytest.approx(7.0, abs=0.05)
        assert conn.stats.close_reason == CloseReason.MAX_LIFETIME
        await expect_eof_both(conn)
        # The plain tunnel ended at its lifetime, at once and without a frame.
        assert plain.closed_at is not None
        assert plain.closed_at - started == pytest.approx(5.0, abs=0.05)
        assert plain.stats.close_reason == CloseReason.MAX_LIFETIME
        await expect_eof_both(plain)


# --- drains ------------------------------------------------------------------------------------


@pytest.mark.parametrize("splice", MODES)
async def test_a_drain_spreads_polite_closes_over_its_last_third(
    splice: str, patient_clock: trio.testing.MockClock
) -> None:
    # Four tunnels drained over 30 s with a 1 s grace: they run undisturbed for 20 s, then get
    # their Close frames at 22, 24, 26 and 28 s. Even ones answer, odd ones do not (closed a
    # grace later). All are closed before the end; wait_empty returns with the last close.
    grace, timeout = 1.0, 30.0
    async with running_engine(relay=splice, close_grace=grace, guard=TIMER_GUARD) as relay:
        conns = [relay.open() for _ in range(4)]
        started = trio.current_time()
        end = relay.engine.drain(
            [conn.tunnel for conn in conns if conn.tunnel], CloseReason.DRAIN, timeout
        )
        assert end == started + timeout
        emptied_at: list[float] = []

        async def wait_empty() -> None:
            await relay.engine.wait_empty()
            emptied_at.append(trio.current_time())

        arrived: dict[int, float] = {}
        keys: list[bytes] = []

        async def side(i: int, conn: Conn) -> None:
            await expect_client_close(conn.client, "drain")
            arrived[i] = trio.current_time() - started
            keys.append(await expect_backend_close(conn.backend, "drain"))
            if i % 2 == 0:
                await answer_both(conn)
            await conn.closed.wait()
            await expect_eof_both(conn)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_empty)
            for moment in (5.0, 10.0, 19.9):
                await trio.sleep_until(started + moment)
                for conn in conns:
                    await exchange_frames(conn, b"at %f" % moment)
                assert not any(conn.closed.is_set() for conn in conns)
            for i, conn in enumerate(conns):
                nursery.start_soon(side, i, conn)

        assert [arrived[i] for i in range(4)] == pytest.approx([22.0, 24.0, 26.0, 28.0], abs=0.05)
        for i, conn in enumerate(conns):
            assert conn.closed_at is not None
            expected = arrived[i] + (0.0 if i % 2 == 0 else grace)
            assert conn.closed_at - started == pytest.approx(expected, abs=0.05)
            assert conn.closed_at <= end
            assert conn.stats.close_reason == CloseReason.DRAIN
        assert len(set(keys)) > 1, "every Close toward a backend gets its own mask key"
        assert emptied_at == pytest.approx([max(conn.closed_at or 0 for conn in conns)])
        assert relay.engine.statistics().tunnels == 0


@pytest.mark.parametrize("splice", MODES)
async def test_a_short_drain_closes_whatever_is_left_at_its_end(
    splice: str, patient_clock: trio.testing.MockClock
) -> None:
    # A 1 s drain with a 2 s grace starts closing at once. The quiet tunnel's peers never
    # answer, and a grace would keep them until 2 s; a backend mid-frame finishes its frame
    # 0.9 s in, and a grace from then would last until 2.9 s; a stuck backend never finishes
    # its frame: the drain's end cuts all three short. A plain tunnel closes at once.
    async with running_engine(relay=splice, close_grace=2.0, guard=TIMER_GUARD) as relay:
        busy, quiet, stuck = relay.open(), relay.open(), relay.open()
        plain = relay.open(websocket=False)
        frame = server_frame(BINARY, os.urandom(10_000))
        for conn in (busy, stuck):
            await conn.backend.send_all(frame[:5000])
            assert await read_exactly(conn.client, 5000) == frame[:5000]
        started = trio.current_time()
        tunnels = [conn.tunnel for conn in (busy, quiet, stuck, plain) if conn.tunnel]
        end = relay.engine.drain(tunnels, CloseReason.DRAIN, 1.0)
        await expect_client_close(quiet.client, "drain")
        for conn in (quiet, busy, stuck):
            await expect_backend_close(conn.backend, "drain")
        await plain.closed.wait()
        assert plain.closed_at == pytest.approx(started, abs=0.05)
        await trio.sleep(0.9)
        await busy.backend.send_all(frame[5000:])
        rest = frame[5000:] + close_frame("drain")
        assert await read_exactly(busy.client, len(rest)) == rest
        for conn in (busy, quiet, stuck):
            await conn.closed.wait()
            assert conn.closed_at == pytest.approx(end, abs=0.05)
            assert conn.stats.close_reason == CloseReason.DRAIN
            await expect_eof_both(conn)


@pytest.mark.parametrize("splice", MODES)
async def test_a_drain_of_every_tunnel_also_drains_those_adopted_later(
    splice: str, patient_clock: trio.testing.MockClock
) -> None:
    grace, timeout = 1.0, 30.0
    async with running_engine(relay=splice, close_grace=grace, guard=TIMER_GUARD) as relay:
        early = [relay.open(), relay.open()]
        started = trio.current_time()
        end = relay.engine.drain([], CloseReason.SHUTDOWN, timeout, every=True)
        await trio.sleep(5.0)
        late = relay.open()
        await exchange_frames(late)
        emptied_at: list[float] = []

        async def wait_empty() -> None:
            await relay.engine.wait_empty()
            emptied_at.append(trio.current_time())

        async def side(conn: Conn) -> None:
            await expect_client_close(conn.client, "shutdown")
            await expect_backend_close(conn.backend, "shutdown")
            await conn.closed.wait()
            await expect_eof_both(conn)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_empty)
            for conn in [*early, late]:
                nursery.start_soon(side, conn)
        closed = sorted((conn.closed_at or 0) - started for conn in early)
        # spread(2, 20, 28) for the early ones (in the engine's order), the last instant for
        # the late one; nobody answers, so each closes a grace after its Close.
        assert closed == pytest.approx([25.0, 29.0], abs=0.05)
        assert (late.closed_at or 0) - started == pytest.approx(29.0, abs=0.05)
        assert all(conn.stats.close_reason == CloseReason.SHUTDOWN for conn in [*early, late])
        assert max(conn.closed_at or 0 for conn in [*early, late]) <= end
        assert emptied_at == pytest.approx([started + 29.0], abs=0.05)


async def test_wait_empty_returns_at_once_without_tunnels() -> None:
    async with running_engine(relay="copy") as relay:
        with trio.fail_after(1):
            await relay.engine.wait_empty()
