"""Reading the PROXY header off a real loopback connection: only the header is consumed, a header
in pieces is waited for without spinning, and a slow, closed or lying peer is refused.

Timeouts run on a MockClock that jumps only after 10 ms of real idleness, so bytes written to
loopback arrive before virtual time moves on.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from tunnel.core.proxy_protocol import ProxyHeader, build
from tunnel.errors import BadProxyHeader
from tunnel.net.proxy_header import read_proxy_header
from tunnel.net.sockio import receive_some

LOOPBACK = "127.0.0.1"
GUARD_SECONDS = 60.0
"""Bound of every test, in virtual seconds."""
HANDSHAKE_TIMEOUT = 10.0
SOURCE, DESTINATION = ("192.0.2.1", 56324), ("198.51.100.7", 443)
HTTP = b"GET /chat HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n"
HEADERS = {
    "v1": build("v1", SOURCE, DESTINATION),
    "v2": build("v2", SOURCE, DESTINATION),
    "v2 TLVs": (
        build("v2", SOURCE, DESTINATION)[:14]
        + (12 + 7).to_bytes(2, "big")
        + build("v2", SOURCE, DESTINATION)[16:]
        + b"\x01\x00\x04http"
    ),
}
MAX_RECV_CALLS = 500
"""More ``recv`` calls than a header of at most 4112 bytes in a few pieces can need: beyond it
the reader is spinning."""


class CountingSocket(socket.socket):
    """A real socket that counts ``recv`` calls and fails the test when the reader spins."""

    recv_calls = 0

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        self.recv_calls += 1
        if self.recv_calls > MAX_RECV_CALLS:
            raise AssertionError(f"{self.recv_calls} recv calls: the reader spins")
        return super().recv(bufsize, flags)


class ShortReadSocket(CountingSocket):
    """A real socket whose reads (not peeks) return one byte at a time, as ``recv`` may."""

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        return super().recv(bufsize if flags & socket.MSG_PEEK else 1, flags)


@pytest.fixture
def patient_clock() -> trio.testing.MockClock:
    """Virtual time that jumps only after 10 ms of real idleness."""
    return trio.testing.MockClock(autojump_threshold=0.01)


@asynccontextmanager
async def accepted(
    family: int = socket.AF_INET, kind: type[CountingSocket] = CountingSocket
) -> AsyncIterator[tuple[CountingSocket, Any]]:
    """(the accepted non-blocking server side, a trio stream for the client side)."""
    host = LOOPBACK if family == socket.AF_INET else "::1"
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        listener.bind((host, 0))
        listener.listen()
        listener.setblocking(False)
        client = await trio.open_tcp_stream(host, listener.getsockname()[1])
        async with client:
            await trio.lowlevel.wait_readable(listener)
            raw, _ = listener.accept()
            server = kind(raw.family, raw.type, fileno=raw.detach())
            server.setblocking(False)
            with server:
                yield server, client


async def read_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = await receive_some(sock, count - len(data))
        assert chunk, f"EOF after {data!r}"
        data += chunk
    return data


def deadline() -> float:
    return trio.current_time() + HANDSHAKE_TIMEOUT


@pytest.mark.parametrize("name", HEADERS)
async def test_the_bytes_after_the_header_stay_in_the_socket(name: str) -> None:
    header = HEADERS[name]
    with trio.fail_after(GUARD_SECONDS):
        async with accepted() as (server, client):
            await client.send_all(header + HTTP)
            found = await read_proxy_header(server, deadline())
            assert found == ProxyHeader(len(header), SOURCE, DESTINATION)
            assert await read_exactly(server, len(HTTP)) == HTTP
            assert server.recv_calls <= 3


async def test_short_reads_take_the_header_and_no_more() -> None:
    header = HEADERS["v1"]
    with trio.fail_after(GUARD_SECONDS):
        async with accepted(kind=ShortReadSocket) as (server, client):
            await client.send_all(header + HTTP)
            assert await read_proxy_header(server, deadline()) == ProxyHeader(
                len(header), SOURCE, DESTINATION
            )
            assert server.recv(len(HTTP), socket.MSG_PEEK) == HTTP


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback")
async def test_a_header_over_ipv6_loopback() -> None:
    header = build("v2", ("2001:db8::1", 1), ("::1", 2))
    with trio.fail_after(GUARD_SECONDS):
        async with accepted(socket.AF_INET6) as (server, client):
            await client.send_all(header + HTTP)
            found = await read_proxy_header(server, deadline())
            assert found == ProxyHeader(len(header), ("2001:db8::1", 1), ("::1", 2))
            assert await read_exactly(server, len(HTTP)) == HTTP


def cuts(length: int) -> list[list[int]]:
    """Ways to cut a header: one byte at a time at the start, then in thirds, and around the
    last bytes (a v1 line's CRLF)."""
    return [
        [1, 2, 3],
        [length // 3, 2 * length // 3],
        [length - 2, length - 1],
        list(range(1, length)),
    ]


async def read_into(result: list[ProxyHeader], server: socket.socket) -> None:
    result.append(await read_proxy_header(server, deadline()))


@pytest.mark.parametrize("name", HEADERS)
async def test_a_header_in_pieces_is_waited_for_without_spinning(
    name: str, patient_clock: trio.testing.MockClock
) -> None:
    header = HEADERS[name]
    for points in cuts(len(header)):
        pieces = [header[a:b] for a, b in zip([0, *points], [*points, None], strict=True)]
        with trio.fail_after(GUARD_SECONDS):
            async with accepted() as (server, client):
                result: list[ProxyHeader] = []
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(read_into, result, server)
                    for piece in pieces[:-1]:
                        await client.send_all(piece)
                        await trio.sleep(0.1)  # virtual: the reader waits with a partial header
                        assert not result
                    await client.send_all(pieces[-1] + HTTP)
                assert result == [ProxyHeader(len(header), SOURCE, DESTINATION)]
                assert await read_exactly(server, len(HTTP)) == HTTP
                # Per piece: EAGAIN, a peek and a take; then the last peek and take.
                assert server.recv_calls <= 3 * len(pieces) + 2, points


async def test_a_stalled_header_costs_no_wake_ups(patient_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(GUARD_SECONDS):
        async with accepted() as (server, client), trio.open_nursery() as nursery:
            nursery.start_soon(read_proxy_header, server, trio.current_time() + 30)
            await client.send_all(HEADERS["v1"][:10])
            await trio.sleep(20)
            calls = server.recv_calls
            await trio.sleep(5)
            assert server.recv_calls == calls <= 3
            await client.send_all(HEADERS["v1"][10:])


async def test_slowloris_past_the_deadline_is_refused(
    patient_clock: trio.testing.MockClock,
) -> None:
    header = HEADERS["v1"]
    with trio.fail_after(GUARD_SECONDS):
        async with accepted() as (server, client), trio.open_nursery() as nursery:
            start = trio.current_time()

            async def dribble() -> None:
                await trio.sleep(0.5)
                for byte in header[:-1]:  # at 0.5, 1.5, ... 9.5 s: 10 bytes in time
                    await client.send_all(bytes([byte]))
                    await trio.sleep(1)

            nursery.start_soon(dribble)
            with pytest.raises(BadProxyHeader, match="within handshake_timeout") as caught:
                await read_proxy_header(server, start + HANDSHAKE_TIMEOUT)
            nursery.cancel_scope.cancel()
    assert HANDSHAKE_TIMEOUT <= trio.current_time() - start < HANDSHAKE_TIMEOUT + 1
    assert "(10 bytes of it came)" in caught.value.message


async def test_silence_past_the_deadline_is_refused(
    patient_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(GUARD_SECONDS):
        async with accepted() as (server, _client):
            start = trio.current_time()
            with pytest.raises(BadProxyHeader, match=r"within handshake_timeout \(0 bytes"):
                await read_proxy_header(server, start + HANDSHAKE_TIMEOUT)
    assert trio.current_time() - start == pytest.approx(HANDSHAKE_TIMEOUT, abs=0.1)


async def test_a_deadline_already_past_is_refused() -> None:
    with trio.fail_after(GUARD_SECONDS):
        async with accepted() as (server, _client):
            with pytest.raises(BadProxyHeader, match="within handshake_timeout"):
                await read_proxy_header(server, trio.current_time() - 1)


@pytest.mark.parametrize("sent", [0, 1, 20, 40])
async def test_eof_before_a_whole_header_is_refused(sent: int) -> None:
    header = HEADERS["v1"]
    with trio.fail_after(GUARD_SECONDS):
        async with accepted() as (server, client):
            await client.send_all(header[:sent])
            await client.send_eof()
            with pytest.raises(BadProxyHeader, match=f"closed after {sent} bytes"):
                await read_proxy_header(server, deadline())


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (HTTP, "did not start with a PROXY protocol header"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.7 1 2\n" + HTTP, "bare CR or LF"),
        (b"PROXY UNKNOWN " + b"x" * 200, "107 bytes"),
    ],
)
async def test_bytes_that_are_no_header_are_refused(data: bytes, message: str) -> None:
    with trio.fail_after(GUARD_SECONDS):
        async with accepted() as (server, client):
            await client.send_all(data)
            with pytest.raises(BadProxyHeader, match=message):
                await read_proxy_header(server, deadline())


async def test_an_invalid_header_after_valid_pieces_is_refused(
    patient_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(GUARD_SECONDS):
        async with accepted() as (server, client), trio.open_nursery() as nursery:

            async def send() -> None:
                await client.send_all(b"PROXY TCP4 192.0.2.1 ")
                await trio.sleep(1)
                await client.send_all(b"198.51.100.7 99999 1\r\n")

            nursery.start_soon(send)
            with pytest.raises(BadProxyHeader, match="source port '99999'"):
                await read_proxy_header(server, deadline())
