"""Integrity (issue 14): 64 MiB of random bytes each way at the same time through every relay
path, SHA-256 identical at both ends, then a half-close.

Paths: ``relay = "splice"``, ``"copy"`` and ``"auto"`` between a plain client and a plain
backend; a TLS client (the listener's TLS) with a plain backend; a plain client with a
``wss://`` backend (verified against a test CA); TLS at both ends. The peers are raw sockets
(``BioTLS`` where TLS is on, because it can half-close), not ``websockets``: the bytes are not
frames and nothing reads them as such.

The end: the client sends its last byte and shuts its write side; the backend sees EOF right
after that byte, only then sends the last MiB of its own stream, and closes; the client gets
every byte, then EOF.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from faultpeers import (
    LOOPBACK,
    READ_SIZE,
    BioTLS,
    TLSFiles,
    closed_reasons,
    make_tls_files,
)
from rawhttp import KEY, assert_switching, header, read_head, switching, upgrade_request

from tunnel import Config, Control, serve
from tunnel.logs import LOGGER_NAME

MiB = 1 << 20
SIZE = 64 * MiB
TAIL = MiB
"""What the backend sends only after the client's EOF: the half-close is real."""
SLICE = MiB
TEST_SECONDS = 60.0

Conn = Any
"""A ``trio.SocketStream`` or a ``BioTLS``: both ``send_all``, ``receive_some``, ``send_eof``."""


@pytest.fixture(scope="module")
def payloads() -> tuple[bytes, bytes]:
    """64 MiB up, 64 MiB down, different and random (``os.urandom``: a seeded generator takes
    seconds for this much)."""
    return os.urandom(SIZE), os.urandom(SIZE)


@dataclass
class Received:
    """What one end read: how much, its SHA-256, and how much it had when EOF came."""

    size: int = 0
    digest: Any = field(default_factory=hashlib.sha256)
    at_eof: int | None = None

    def hexdigest(self) -> str:
        return str(self.digest.hexdigest())


async def receive_all(conn: Conn, received: Received, first: bytes = b"") -> None:
    """Read until EOF into ``received`` (bounded: no more than ``SIZE`` bytes)."""
    received.digest.update(first)
    received.size += len(first)
    while chunk := await conn.receive_some(READ_SIZE):
        received.digest.update(chunk)
        received.size += len(chunk)
        assert received.size <= SIZE, "more bytes than were sent"
    received.at_eof = received.size


async def send_slices(conn: Conn, data: bytes) -> None:
    view = memoryview(data)
    for start in range(0, len(view), SLICE):
        await conn.send_all(view[start : start + SLICE])


@dataclass
class BulkBackend:
    """Accepts one upgrade, then sends all but the tail of ``down`` while reading to EOF;
    after the EOF the tail, then a close."""

    down: bytes
    tls: TLSFiles | None
    received: Received = field(default_factory=Received)
    tail_sent_after: int | None = None
    """Bytes received when the tail went out."""
    done: trio.Event = field(default_factory=trio.Event)

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            conn: Conn = stream
            if self.tls is not None:
                conn = BioTLS(stream, self.tls.server_context(), server_side=True)
                await conn.handshake()
            head, rest = await read_head(conn)
            await conn.send_all(switching(header(head, "Sec-WebSocket-Key")))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive_all, conn, self.received, rest)
                await send_slices(conn, self.down[:-TAIL])
            self.tail_sent_after = self.received.size
            await conn.send_all(self.down[-TAIL:])
            await conn.send_eof()
        self.done.set()


def bulk_config(url: str, files: TLSFiles, relay: str, client_tls: bool) -> Config:
    listener: dict[str, Any] = {"listen": f"{LOOPBACK}:0"}
    if client_tls:
        listener["tls"] = files.listener()
    route: dict[str, Any] = {"name": "bulk", "backends": [{"name": "b", "url": url}]}
    if url.startswith("wss://"):
        route["backend_tls"] = {"ca": str(files.ca)}
    return Config.from_mapping(
        {"server": {"relay": relay}, "listeners": [listener], "routes": [route]}
    )


PATHS = [
    pytest.param("splice", False, False, id="splice-plain-plain"),
    pytest.param("copy", False, False, id="copy-plain-plain"),
    pytest.param("auto", False, False, id="auto-plain-plain"),
    pytest.param("auto", True, False, id="auto-tls-plain"),
    pytest.param("auto", False, True, id="auto-plain-tls"),
    pytest.param("auto", True, True, id="auto-tls-tls"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("relay", "client_tls", "backend_tls"), PATHS)
async def test_64_mib_each_way_arrive_identical_then_the_half_close_is_honoured(
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    payloads: tuple[bytes, bytes],
    relay: str,
    client_tls: bool,
    backend_tls: bool,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    up, down = payloads
    files = make_tls_files(tmp_path)
    backend = BulkBackend(down, files if backend_tls else None)
    listeners: list[trio.SocketListener] = await nursery.start(
        partial(trio.serve_tcp, backend.handle, 0, host=LOOPBACK)
    )
    backend_port = listeners[0].socket.getsockname()[1]
    url = f"{'wss://localhost' if backend_tls else f'ws://{LOOPBACK}'}:{backend_port}"
    control = Control()
    bound: list[trio.SocketListener] = await nursery.start(
        partial(serve, bulk_config(url, files, relay, client_tls), control=control)
    )
    port = bound[0].socket.getsockname()[1]
    client_received = Received()

    with trio.fail_after(TEST_SECONDS):
        stream = await trio.open_tcp_stream(LOOPBACK, port)
        async with stream:
            client: Conn = stream
            if client_tls:
                client = BioTLS(
                    stream, files.client_context(), server_side=False, server_hostname="localhost"
                )
                await client.handshake()
            await client.send_all(upgrade_request(f"localhost:{port}"))
            head, rest = await read_head(client)
            assert_switching(head, KEY)

            async def send_then_eof() -> None:
                await send_slices(client, up)
                await client.send_eof()

            async with trio.open_nursery() as both:
                both.start_soon(send_then_eof)
                both.start_soon(receive_all, client, client_received, rest)
        await backend.done.wait()

    assert backend.received.size == SIZE
    assert backend.received.hexdigest() == hashlib.sha256(up).hexdigest()
    assert backend.received.at_eof == SIZE, "the backend saw EOF right after the last byte"
    assert backend.tail_sent_after == SIZE, "the tail went out after the client's EOF"
    assert client_received.size == SIZE
    assert client_received.hexdigest() == hashlib.sha256(down).hexdigest()
    assert client_received.at_eof == SIZE, "the client got every byte, then EOF"
    assert closed_reasons(caplog, "bulk") in (["client_eof"], ["backend_eof"])
    assert control.generation is not None
    spliced = control.generation.engine.statistics().pipe_size > 0
    assert spliced == (relay != "copy" and not (client_tls or backend_tls)), "the path taken"
