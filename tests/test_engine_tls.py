"""The relay engine with TLS ends: ``TLSConn`` inside, trio's own ``SSLStream`` outside.

The peers the test holds are independent TLS implementations (trio over OpenSSL's memory BIOs,
as any client would), so these tests check ``TLSConn`` against a real peer, not against
itself: bytes arrive intact and in order under back-pressure, a TLS tunnel never splices,
half-close becomes close_notify in both directions, and records that were already read when a
close_notify goes out are not lost.
"""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from test_engine import (
    MODES,
    Relay,
    receive_digest,
    running_engine,
    sha256,
    stream_of,
    tcp_pair,
    wait_until,
)

from tunnel.certs import Issued, issue, make_ca
from tunnel.net.relay import RelayStats
from tunnel.net.tls import handshake
from tunnel.net.tlsconn import TLSConn
from tunnel.reasons import CloseReason

MiB = 1024 * 1024
HOST = "tunnel.test"


@dataclass(frozen=True)
class Pki:
    """A CA and a server certificate for ``HOST``, as contexts for both sides."""

    server: ssl.SSLContext
    client: ssl.SSLContext


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = make_ca()
    leaf = issue(ca, [HOST])
    cert, key = _write(directory, "server", leaf)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cadata=ca.cert_pem.decode())
    return Pki(server, client)


def _write(directory: Path, name: str, issued: Issued) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}-key.pem"
    cert.write_bytes(issued.cert_pem)
    key.write_bytes(issued.key_pem)
    return cert, key


@dataclass(eq=False)
class TlsConn:
    """One adopted tunnel whose client side is TLS (and maybe its backend side)."""

    client: trio.SSLStream[trio.SocketStream]
    client_raw: trio.SocketStream
    backend: trio.abc.Stream
    stats: RelayStats
    closed: trio.Event
    reasons: list[str]


async def open_tls(
    relay: Relay,
    pki: Pki,
    *,
    backend_tls: bool = False,
    to_client: bytes = b"",
    buffer: int | None = None,
) -> TlsConn:
    """A tunnel whose client end speaks TLS to a ``TLSConn`` (and, with ``backend_tls``, whose
    backend end is a ``TLSConn`` client of a TLS backend), adopted by ``relay``'s engine."""
    client_outer, client_inner = tcp_pair(buffer)
    backend_inner, backend_outer = tcp_pair(buffer)
    client_inner.setblocking(False)
    backend_inner.setblocking(False)
    client_raw = stream_of(client_outer)
    client = trio.SSLStream(client_raw, pki.client, server_hostname=HOST)
    inner_client = TLSConn(client_inner, pki.server, server_side=True)
    backend: trio.abc.Stream = stream_of(backend_outer)
    inner_backend: socket.socket | TLSConn = backend_inner
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        nursery.start_soon(handshake, inner_client)
        if backend_tls:
            backend = trio.SSLStream(backend, pki.server, server_side=True)
            inner_backend = TLSConn(
                backend_inner, pki.client, server_side=False, server_hostname=HOST
            )
            nursery.start_soon(backend.do_handshake)
            nursery.start_soon(handshake, inner_backend)
    closed = trio.Event()
    reasons: list[str] = []
    stats = RelayStats()

    def on_close(tunnel: object) -> None:
        reasons.append(stats.close_reason)
        closed.set()

    relay.engine.adopt(inner_client, inner_backend, stats, on_close, to_client=to_client)
    return TlsConn(client, client_raw, backend, stats, closed, reasons)


async def both_ways(conn: TlsConn, up: bytes, down: bytes) -> dict[str, str]:
    """Send ``up`` from the client and ``down`` from the backend at once; the sha256 of what
    each far side received."""
    got: dict[str, str] = {}

    async def upstream() -> None:
        got["up"] = await receive_digest(conn.backend, len(up))

    async def downstream() -> None:
        got["down"] = await receive_digest(conn.client, len(down))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(upstream)
        nursery.start_soon(downstream)
        nursery.start_soon(conn.client.send_all, up)
        nursery.start_soon(conn.backend.send_all, down)
    return got


@asynccontextmanager
async def tls_engine(relay_mode: str) -> AsyncIterator[Relay]:
    async with running_engine(relay=relay_mode) as relay:
        yield relay


async def read_until_eof(stream: trio.abc.ReceiveStream) -> bytes:
    chunks = []
    while chunk := await stream.receive_some(65536):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("relay_mode", MODES)
async def test_bulk_both_ways_arrives_intact_and_never_splices(relay_mode: str, pki: Pki) -> None:
    up, down = os.urandom(8 * MiB), os.urandom(8 * MiB)
    async with tls_engine(relay_mode) as relay:
        conn = await open_tls(relay, pki)
        assert await both_ways(conn, up, down) == {"up": sha256(up), "down": sha256(down)}
        assert conn.stats.bytes_up == len(up)
        assert conn.stats.bytes_down == len(down)
        statistics = relay.engine.statistics()
        assert statistics.pipe_size == 0, "a TLS tunnel must never take a splice pipe"
        await conn.client.aclose()
        await conn.backend.aclose()
        await conn.closed.wait()


@pytest.mark.parametrize("relay_mode", MODES)
async def test_leftovers_reach_the_tls_client_first(relay_mode: str, pki: Pki) -> None:
    async with tls_engine(relay_mode) as relay:
        conn = await open_tls(relay, pki, to_client=b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
        await conn.backend.send_all(b"after")
        expected = b"HTTP/1.1 101 Switching Protocols\r\n\r\nafter"
        received = b""
        while len(received) < len(expected):
            received += await conn.client.receive_some(1024)
        assert received == expected
        assert conn.stats.bytes_down == len(expected)
        await conn.client.aclose()
        await conn.backend.aclose()
        await conn.closed.wait()


async def test_backend_half_close_becomes_close_notify_and_the_client_may_still_send(
    pki: Pki,
) -> None:
    async with tls_engine("auto") as relay:
        conn = await open_tls(relay, pki)
        assert isinstance(conn.backend, trio.SocketStream)
        await conn.backend.send_all(b"last words")
        await conn.backend.send_eof()
        assert await read_until_eof(conn.client) == b"last words"
        await conn.client.send_all(b"still talking")
        assert await conn.backend.receive_some(1024) == b"still talking"
        assert not conn.closed.is_set(), "one direction is still open"
        await conn.client.aclose()
        assert await conn.backend.receive_some(1024) == b""
        await conn.closed.wait()
        assert conn.reasons == [CloseReason.BACKEND_EOF]


async def test_client_close_notify_half_closes_the_backend(pki: Pki) -> None:
    async with tls_engine("copy") as relay:
        conn = await open_tls(relay, pki)
        assert isinstance(conn.backend, trio.SocketStream)
        # A read first takes in the session tickets the server sent after the handshake:
        # closing with unread bytes would make the client's kernel send a reset, not a FIN.
        await conn.backend.send_all(b"hi")
        assert await conn.client.receive_some(1024) == b"hi"
        await conn.client.send_all(b"bye")
        # close_notify, then FIN: trio's SSLStream.aclose sends close_notify and closes.
        await conn.client.aclose()
        assert await read_until_eof(conn.backend) == b"bye"
        assert not conn.closed.is_set(), "the backend may still send: it has not closed"
        await conn.backend.aclose()
        await conn.closed.wait()
        assert conn.reasons == [CloseReason.CLIENT_EOF]


async def test_records_read_before_close_notify_is_sent_are_not_lost(pki: Pki) -> None:
    """The backend stalls while the client sends 2 MiB, so the engine holds encrypted
    records it has read but not decrypted; then the backend half-closes. The close_notify
    sent to the client must not discard those records (``SSLSocket.unwrap`` would)."""
    data = os.urandom(2 * MiB)
    async with tls_engine("auto") as relay:
        conn = await open_tls(relay, pki, buffer=64 * 1024)
        assert isinstance(conn.backend, trio.SocketStream)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.client.send_all, data)
            await wait_until(lambda: conn.stats.bytes_up > 0)
            await trio.sleep(0.05)  # let the engine fill the backend's buffers and park
            assert conn.stats.bytes_up < len(data), "the backend was meant to be stalled"
            await conn.backend.send_eof()
            digest = hashlib.sha256()
            received = 0
            while received < len(data):
                chunk = await conn.backend.receive_some(65536)
                assert chunk, f"EOF after {received} of {len(data)} bytes"
                digest.update(chunk)
                received += len(chunk)
        assert digest.hexdigest() == sha256(data)
        assert await read_until_eof(conn.client) == b""
        await conn.client.aclose()
        await conn.closed.wait()


async def test_a_reset_from_the_tls_client_closes_the_tunnel(pki: Pki) -> None:
    async with tls_engine("auto") as relay:
        conn = await open_tls(relay, pki)
        sock = conn.client_raw.socket
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
        await conn.closed.wait()
        assert conn.reasons == [CloseReason.CLIENT_RESET]
        assert await read_until_eof(conn.backend) == b""


@pytest.mark.parametrize("relay_mode", MODES)
async def test_tls_on_both_ends_relays_bulk_and_half_close(relay_mode: str, pki: Pki) -> None:
    up, down = os.urandom(4 * MiB), os.urandom(4 * MiB)
    async with tls_engine(relay_mode) as relay:
        conn = await open_tls(relay, pki, backend_tls=True)
        assert await both_ways(conn, up, down) == {"up": sha256(up), "down": sha256(down)}
        await conn.client.aclose()
        assert await read_until_eof(conn.backend) == b""
        assert not conn.closed.is_set(), "the backend may still send: it has not closed"
        await conn.backend.aclose()
        await conn.closed.wait()
        assert conn.reasons == [CloseReason.CLIENT_EOF]
