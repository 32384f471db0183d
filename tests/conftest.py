"""Shared fixtures: real ``websockets`` backends in background threads, and the tunnel itself.

Every server here binds 127.0.0.1 port 0 and is shut down by its fixture. The tunnel runs in
pytest-trio's ``nursery`` fixture, so it is cancelled when the test ends, before the thread
backends (sync fixtures) are torn down.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio
import websockets.asyncio.server
import websockets.sync.server
from hypothesis import HealthCheck, settings
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from tunnel import Config, serve

if TYPE_CHECKING:
    from handoffpeers import TunnelChain

LOOPBACK = "127.0.0.1"
THREAD_JOIN_SECONDS = 10.0

ProcessRequest = Callable[[websockets.sync.server.ServerConnection, Request], Response | None]


@dataclass
class WsBackend:
    """A running ``websockets`` echo backend and what it observed."""

    host: str
    port: int
    connections: int = 0
    """Handshakes the backend completed."""
    open_now: int = 0
    peak_open: int = 0
    """Most connections open at once."""
    digests: list[str] = field(default_factory=list)
    """sha256 of every message received, in order."""
    request_headers: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def opened(self, headers: dict[str, str]) -> None:
        with self.lock:
            self.connections += 1
            self.open_now += 1
            self.peak_open = max(self.peak_open, self.open_now)
            self.request_headers.append(headers)

    def closed(self) -> None:
        with self.lock:
            self.open_now -= 1

    def received(self, message: str | bytes) -> None:
        data = message.encode() if isinstance(message, str) else message
        with self.lock:
            self.digests.append(hashlib.sha256(data).hexdigest())


@dataclass(frozen=True)
class Tunnel:
    """A running tunnel: where clients connect."""

    host: str
    port: int

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"


def _sync_echo(backend: WsBackend) -> Callable[[websockets.sync.server.ServerConnection], None]:
    def handler(connection: websockets.sync.server.ServerConnection) -> None:
        assert connection.request is not None
        backend.opened(dict(connection.request.headers.raw_items()))
        try:
            for message in connection:
                backend.received(message)
                connection.send(message)
        except ConnectionClosed:
            pass
        finally:
            backend.closed()

    return handler


@pytest.fixture
def start_ws_backend() -> Iterator[Callable[..., WsBackend]]:
    """Factory: start a threaded ``websockets`` echo server; keyword arguments go to ``serve``
    (``subprotocols``, ``process_request``, ``max_size``...)."""
    running: list[tuple[websockets.sync.server.Server, threading.Thread]] = []

    def start(**options: Any) -> WsBackend:
        options.setdefault("ping_interval", None)
        backend = WsBackend(LOOPBACK, 0)
        server = websockets.sync.server.serve(_sync_echo(backend), LOOPBACK, 0, **options)
        backend.port = server.socket.getsockname()[1]
        thread = threading.Thread(target=server.serve_forever, name=f"ws-backend-{backend.port}")
        thread.start()
        running.append((server, thread))
        return backend

    yield start
    for server, thread in running:
        server.shutdown()
        thread.join(THREAD_JOIN_SECONDS)
        assert not thread.is_alive(), "websockets backend thread did not stop"


@pytest.fixture
def echo_backend(start_ws_backend: Callable[..., WsBackend]) -> WsBackend:
    """A threaded echo backend that accepts the ``chat`` subprotocol when offered (and no
    subprotocol when none is), with messages up to 64 MiB."""

    def chat_if_offered(_: Any, offered: Sequence[str]) -> str | None:
        return "chat" if "chat" in offered else None

    return start_ws_backend(select_subprotocol=chat_if_offered, max_size=64 * 2**20)


@pytest.fixture
def asyncio_echo_backend() -> Iterator[WsBackend]:
    """An asyncio ``websockets`` echo server in its own thread, for many concurrent clients."""
    backend = WsBackend(LOOPBACK, 0)
    ready = threading.Event()
    loop_box: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    async def handler(connection: websockets.asyncio.server.ServerConnection) -> None:
        assert connection.request is not None
        backend.opened(dict(connection.request.headers.raw_items()))
        try:
            async for message in connection:
                backend.received(message)
                await connection.send(message)
        except ConnectionClosed:
            pass
        finally:
            backend.closed()

    async def main() -> None:
        stop = asyncio.Event()
        async with websockets.asyncio.server.serve(
            handler, LOOPBACK, 0, ping_interval=None, compression=None, backlog=2048
        ) as server:
            backend.port = server.sockets[0].getsockname()[1]
            loop_box.append((asyncio.get_running_loop(), stop))
            ready.set()
            await stop.wait()

    thread = threading.Thread(target=asyncio.run, args=(main(),), name="asyncio-ws-backend")
    thread.start()
    assert ready.wait(THREAD_JOIN_SECONDS), "asyncio backend did not start"
    yield backend
    loop, stop = loop_box[0]
    loop.call_soon_threadsafe(stop.set)
    thread.join(THREAD_JOIN_SECONDS)
    assert not thread.is_alive(), "asyncio backend thread did not stop"


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound (so nobody else takes it), not listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        yield sock.getsockname()[1]


def tunnel_config(backends: list[str], **server: str | int) -> Config:
    """One loopback listener on port 0, one catch-all route over ``backends``."""
    return Config.from_mapping(
        {
            "server": server,
            "listeners": [{"listen": f"{LOOPBACK}:0"}],
            "routes": [
                {
                    "name": "default",
                    "backends": [{"name": f"b{i}", "url": url} for i, url in enumerate(backends)],
                }
            ],
        }
    )


@pytest.fixture
def start_tunnel(nursery: trio.Nursery) -> Callable[..., Awaitable[Tunnel]]:
    """Factory: ``await start_tunnel([backend_url, ...], idle_timeout="1s", ...)`` serves a
    tunnel in the test's nursery and returns where to connect."""

    async def start(backends: list[str], **server: str | int) -> Tunnel:
        listeners: list[trio.SocketListener] = await nursery.start(
            serve, tunnel_config(backends, **server)
        )
        host, port = listeners[0].socket.getsockname()[:2]
        return Tunnel(host, port)

    return start


@pytest.fixture
async def tunnel(start_tunnel: Callable[..., Awaitable[Tunnel]], echo_backend: WsBackend) -> Tunnel:
    """The tunnel with default settings in front of ``echo_backend``."""
    return await start_tunnel([echo_backend.url])


FUZZ_EXAMPLES = "TUNNEL_FUZZ_EXAMPLES"
"""Environment variable: examples per fuzz test for a longer run than CI's, e.g.
``TUNNEL_FUZZ_EXAMPLES=20000 python -m pytest -q tests/test_fuzz*.py``."""

settings.register_profile(
    "fuzz", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)


def fuzz_settings(examples: int) -> settings:
    """Settings of one bounded fuzz test (the ``fuzz`` profile): ``examples`` examples, small
    enough for CI, or ``$TUNNEL_FUZZ_EXAMPLES`` when set."""
    count = int(os.environ.get(FUZZ_EXAMPLES) or examples)
    return settings(settings.get_profile("fuzz"), max_examples=count)


@pytest.fixture
def start_chain(tmp_path: Path) -> Iterator[Callable[..., TunnelChain]]:
    """Factory: ``tunnel run`` on a config text and every process a hand-off starts from it
    (``handoffpeers.TunnelChain``), serving; every process of it is killed and reaped at the
    end."""
    from handoffpeers import TunnelChain

    chains: list[TunnelChain] = []

    def start(config: str, raise_nofile: bool = False) -> TunnelChain:
        chain = TunnelChain(tmp_path, config, raise_nofile)
        chains.append(chain)
        chain.wait_serving()
        return chain

    yield start
    for chain in chains:
        chain.close()
