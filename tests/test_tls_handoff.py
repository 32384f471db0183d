"""Bytes that arrive with the handshake over TLS are not stranded at the hand-off.

A client may send its first messages in the same flight as the upgrade request, and a backend
its first messages right behind the 101. Over TLS, what the handshake code did not need can sit
decrypted or encrypted inside ``TLSConn`` when the engine adopts the connection, where no
socket event will announce it: the engine must read it without waiting for more bytes.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import pytest
import trio
from rawhttp import (
    KEY,
    LOOPBACK,
    assert_switching,
    header,
    read_exactly,
    read_head,
    serve_loopback,
    switching,
    upgrade_request,
)

from tunnel import Config, serve
from tunnel.certs import issue, make_ca

GUARD_SECONDS = 15.0
SIZES = [
    pytest.param(30 * 1024, id="30KiB-all-read-from-the-socket"),
    pytest.param(200 * 1024, id="200KiB-some-left-in-the-socket"),
]
"""Both larger than one read of the handshake code, so that some is left inside ``TLSConn``;
the first small enough that nothing is left in the socket to raise an event."""


def _pki(tmp_path: Path) -> tuple[Path, Path, ssl.SSLContext, ssl.SSLContext]:
    ca = make_ca()
    leaf = issue(ca, ["localhost", LOOPBACK])
    cert, key, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.write_bytes(leaf.cert_pem)
    key.write_bytes(leaf.key_pem)
    ca_file.write_bytes(ca.cert_pem)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(ca_file))
    return cert, key, server, client


async def _serve_tls(
    nursery: trio.Nursery, cert: Path, key: Path, backend_url: str, more: str = ""
) -> int:
    """A tunnel with one TLS listener and one route to ``backend_url``; its port."""
    config = Config.from_toml(
        f"""
        [[listeners]]
        listen = "{LOOPBACK}:0"
        tls = {{ cert = "{cert}", key = "{key}" }}
        [[routes]]
        name = "raw"
        backends = [{{ url = "{backend_url}" }}]
        {more}
        """
    )
    listeners: list[trio.SocketListener] = await nursery.start(serve, config)
    port: int = listeners[0].socket.getsockname()[1]
    return port


@pytest.mark.parametrize("size", SIZES)
async def test_client_data_sent_with_the_request_reaches_the_backend(
    nursery: trio.Nursery, tmp_path: Path, size: int
) -> None:
    cert, key, _, client_context = _pki(tmp_path)
    early = os.urandom(size)
    received: list[bytes] = []
    done = trio.Event()

    async def backend(stream: trio.SocketStream) -> None:
        head, rest = await read_head(stream)
        await stream.send_all(switching(header(head, "Sec-WebSocket-Key")))
        received.append(await read_exactly(stream, size, rest))
        done.set()

    backend_port = await serve_loopback(nursery, backend)
    port = await _serve_tls(nursery, cert, key, f"ws://{LOOPBACK}:{backend_port}")
    with trio.fail_after(GUARD_SECONDS):
        tcp = await trio.open_tcp_stream(LOOPBACK, port)
        client = trio.SSLStream(tcp, client_context, server_hostname="localhost")
        await client.send_all(upgrade_request(f"localhost:{port}") + early)
        head, _ = await read_head(client)
        assert_switching(head, KEY)
        await done.wait()
    assert received == [early]
    await client.aclose()


@pytest.mark.parametrize("size", SIZES)
async def test_backend_data_sent_with_the_101_reaches_the_client(
    nursery: trio.Nursery, tmp_path: Path, size: int
) -> None:
    cert, key, server_context, client_context = _pki(tmp_path)
    early = os.urandom(size)
    ca = tmp_path / "ca.pem"

    async def backend(tcp: trio.SocketStream) -> None:
        stream = trio.SSLStream(tcp, server_context, server_side=True)
        head, _ = await read_head(stream)
        await stream.send_all(switching(header(head, "Sec-WebSocket-Key")) + early)
        await trio.sleep_forever()

    backend_port = await serve_loopback(nursery, backend)
    port = await _serve_tls(
        nursery, cert, key, f"wss://localhost:{backend_port}", f'[routes.backend_tls]\nca = "{ca}"'
    )
    with trio.fail_after(GUARD_SECONDS):
        tcp = await trio.open_tcp_stream(LOOPBACK, port)
        client = trio.SSLStream(tcp, client_context, server_hostname="localhost")
        await client.send_all(upgrade_request(f"localhost:{port}"))
        head, rest = await read_head(client)
        assert_switching(head, KEY)
        assert await read_exactly(client, size, rest) == early
    await client.aclose()
