"""``TLSConn`` on its own, over a real socket pair: the socket-like contract the handshake code
and the relay engine rely on (``BlockingIOError`` where a socket would block, short reads only
when drained, back-pressure through the backlog) and a half-close that loses nothing."""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tunnel.certs import issue, make_ca
from tunnel.net.tls import handshake
from tunnel.net.tlsconn import RAW_READ, TLSConn

HOST = "tunnel.test"
GUARD_SECONDS = 10.0


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    directory: Path = tmp_path_factory.mktemp("tlsconn")
    ca = make_ca()
    leaf = issue(ca, [HOST])
    (directory / "cert.pem").write_bytes(leaf.cert_pem)
    (directory / "key.pem").write_bytes(leaf.key_pem)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    client = ssl.create_default_context(cadata=ca.cert_pem.decode())
    return server, client


@pytest.fixture
async def pair(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> Iterator[tuple[TLSConn, TLSConn]]:
    """(server, client), handshaken, over a non-blocking AF_UNIX stream pair."""
    server_context, client_context = contexts
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    server = TLSConn(a, server_context, server_side=True)
    client = TLSConn(b, client_context, server_side=False, server_hostname=HOST)
    with trio.fail_after(GUARD_SECONDS):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(handshake, server)
            nursery.start_soon(handshake, client)
    yield server, client
    server.close()
    client.close()


async def receive_exactly(conn: TLSConn, size: int) -> bytes:
    data = bytearray()
    with trio.fail_after(GUARD_SECONDS):
        while len(data) < size:
            try:
                chunk = conn.recv(size - len(data))
            except BlockingIOError:
                await trio.lowlevel.wait_readable(conn)
                continue
            assert chunk, f"EOF after {len(data)} of {size} bytes"
            data += chunk
    return bytes(data)


async def test_handshake_negotiates_tls13_and_the_certificate_name(
    pair: tuple[TLSConn, TLSConn],
) -> None:
    server, client = pair
    assert server.tls.version() == "TLSv1.3"
    assert client.tls.server_hostname == HOST


async def test_recv_raises_blocking_io_error_when_nothing_waits(
    pair: tuple[TLSConn, TLSConn],
) -> None:
    server, _ = pair
    with pytest.raises(BlockingIOError):
        server.recv(100)


async def test_a_short_read_means_the_socket_is_drained(pair: tuple[TLSConn, TLSConn]) -> None:
    """Several records sent at once come back in one read that fills the buffer, or all of
    them: the engine treats a short read as drained, as it does for a plain socket."""
    server, client = pair
    data = os.urandom(100_000)  # seven records
    client.send(data)
    assert client.flush()
    buffer = bytearray(len(data) + 1000)
    received = await _read_some(server, buffer)
    assert received == len(data)
    assert bytes(buffer[:received]) == data


async def _read_some(conn: TLSConn, buffer: bytearray) -> int:
    with trio.fail_after(GUARD_SECONDS):
        while True:
            try:
                return conn.recv_into(buffer)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(conn)


async def test_a_full_socket_turns_into_a_backlog_then_back_pressure(
    pair: tuple[TLSConn, TLSConn],
) -> None:
    server, client = pair
    chunk = os.urandom(64 * 1024)
    accepted = 0
    refused = False
    for _ in range(10_000):
        try:
            accepted += server.send(chunk)
        except BlockingIOError:
            refused = True
            break
    assert refused, "a full socket must push back"
    assert server.backlog > 0, "the last accepted chunk waits, encrypted, for the socket"
    assert server.backlog <= len(chunk) + 4096, "never more than one chunk is held"
    received = bytearray()

    async def drain_client() -> None:
        received.extend(await receive_exactly(client, accepted))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain_client)
        with trio.fail_after(GUARD_SECONDS):
            while not server.flush():
                await trio.lowlevel.wait_writable(server)
    assert len(received) == accepted
    assert bytes(received[: len(chunk)]) == chunk


async def test_half_close_keeps_records_already_read(pair: tuple[TLSConn, TLSConn]) -> None:
    """The server reads a little of many records (the rest waits inside OpenSSL and in the
    memory buffer), then sends close_notify. ``SSLSocket.unwrap`` would throw the waiting
    records away; every byte must still be readable, then EOF once the client closes."""
    server, client = pair
    data = os.urandom(3 * RAW_READ)
    client.send(data)
    assert client.flush()
    buffer = bytearray(100)
    head = await _read_some(server, buffer)
    assert head == 100
    server.shutdown(socket.SHUT_WR)
    assert server.has_buffered_input
    rest = await receive_exactly(server, len(data) - head)
    assert bytes(buffer) + rest == data
    with trio.fail_after(GUARD_SECONDS):
        while True:
            try:
                assert client.recv(100) == b"", "close_notify reads as EOF"
                break
            except BlockingIOError:
                await trio.lowlevel.wait_readable(client)
    client.send(b"after your close_notify")
    assert client.flush()
    assert await receive_exactly(server, 23) == b"after your close_notify"
    client.shutdown(socket.SHUT_WR)
    with trio.fail_after(GUARD_SECONDS):
        while True:
            try:
                assert server.recv(100) == b""
                break
            except BlockingIOError:
                await trio.lowlevel.wait_readable(server)


async def test_a_peer_closing_mid_handshake_is_an_error(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    a, b = socket.socketpair()
    a.setblocking(False)
    server = TLSConn(a, contexts[0], server_side=True)
    b.sendall(b"\x16\x03\x01\x00\x05hello")  # the start of a record, then EOF
    b.close()
    with trio.fail_after(GUARD_SECONDS), pytest.raises((ssl.SSLError, ConnectionAbortedError)):
        await handshake(server)
    server.close()
