"""Raw HTTP over trio streams, for the tests that play client or backend byte by byte.

A plain module (not a fixture file): pytest puts ``tests/`` on ``sys.path`` through the rootdir
conftest, so test modules ``from rawhttp import ...`` under both ``pytest`` and
``python -m pytest``. Every reader is bounded: a peer that never stops talking fails the test
instead of filling memory, and a peer that stops too early raises at once.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Awaitable, Callable
from functools import partial

import trio

from tunnel.core.response import websocket_accept

LOOPBACK = "127.0.0.1"
KEY = base64.b64encode(b"0123456789abcdef").decode("ascii")
"""A fixed, valid ``Sec-WebSocket-Key``."""

HEAD_LIMIT = 64 * 1024
"""A head is this many bytes or fewer."""
MAX_RAW_BYTES = 1 << 20
"""Default bound for reading to EOF: fewer bytes than this."""

READ_SIZE = 65536

RawHandler = Callable[[trio.SocketStream], Awaitable[None]]


def upgrade_request(host: str, key: str = KEY, path: str = "/") -> bytes:
    """A complete WebSocket upgrade request head for ``path`` with ``Host: host``."""
    return (
        f"GET {path} HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        "Connection: Upgrade\r\n"
        "Upgrade: websocket\r\n"
        f"Sec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        "\r\n"
    ).encode("ascii")


def switching(key: str) -> bytes:
    """A correct ``101 Switching Protocols`` head answering an upgrade sent with ``key``."""
    return (
        "HTTP/1.1 101 Switching Protocols\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {websocket_accept(key)}\r\n"
        "\r\n"
    ).encode("ascii")


def status_of(response: bytes) -> int:
    """The status code of an HTTP/1.1 response (head alone or with its body)."""
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", response)
    assert match, response
    return int(match.group(1))


def header(head: bytes, name: str) -> str:
    """The value of the first ``name`` header field in ``head``; fails if there is none."""
    for line in head.decode("latin-1").split("\r\n")[1:]:
        key, colon, value = line.partition(":")
        if colon and key.lower() == name.lower():
            return value.strip(" \t")
    raise AssertionError(f"no {name} header in {head!r}")


def assert_switching(head: bytes, key: str) -> None:
    """``head`` is a 101 whose ``Sec-WebSocket-Accept`` answers ``key``."""
    assert status_of(head) == 101, head
    assert header(head, "Sec-WebSocket-Accept") == websocket_accept(key)


async def read_head(stream: trio.abc.ReceiveStream) -> tuple[bytes, bytes]:
    """Read up to the blank line; return ``(head, bytes after it)``.

    Raises ``EOFError`` if the peer closes before the head ends (backends that expect a hang-up
    catch it); fails once the head would exceed ``HEAD_LIMIT``.
    """
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(READ_SIZE)
        if not chunk:
            raise EOFError(f"EOF after {len(data)} bytes of a head: {data!r}")
        data += chunk
        assert len(data) <= HEAD_LIMIT, f"head never ended: {data[:200]!r}"
    head, _, rest = data.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest


async def read_exactly(stream: trio.abc.ReceiveStream, size: int, received: bytes = b"") -> bytes:
    """Read until ``size`` bytes, counting ``received`` already in hand; fails on an early EOF."""
    data = bytearray(received)
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            raise AssertionError(f"EOF after {len(data)} of {size} bytes: {bytes(data[:200])!r}")
        data += chunk
    return bytes(data)


async def read_to_eof(
    stream: trio.abc.ReceiveStream, received: bytes = b"", limit: int = MAX_RAW_BYTES
) -> bytes:
    """``received`` plus everything until the peer's EOF; fails once ``limit`` bytes arrive."""
    data = bytearray(received)
    while chunk := await stream.receive_some(READ_SIZE):
        data += chunk
        assert len(data) < limit, "peer never closed"
    return bytes(data)


async def serve_loopback(nursery: trio.Nursery, handler: RawHandler) -> int:
    """Serve ``handler`` on a fresh loopback port in ``nursery``; return the port."""
    listeners: list[trio.SocketListener] = await nursery.start(
        partial(trio.serve_tcp, handler, 0, host=LOOPBACK)
    )
    port: int = listeners[0].socket.getsockname()[1]
    return port
