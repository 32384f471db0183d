"""The handler's guards over loopback: handshake and response timeouts, unreachable backends and
the max_tunnels limit.

The proxy runs in-process (``await nursery.start(serve, config)``) in front of a small raw trio
backend that answers the upgrade with a correct 101 and then echoes bytes. Clients are raw trio
streams, so every task stays on trio's MockClock: with ``autojump_clock`` the timeouts pass in
virtual time (loopback delivers data within the send call, so nothing is in flight when the clock
jumps) and no test waits on the wall clock.
"""

from __future__ import annotations

import base64
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import trio
import trio.testing
from rawhttp import (
    HEAD_LIMIT,
    assert_switching,
    header,
    read_exactly,
    read_head,
    read_to_eof,
    serve_loopback,
    status_of,
    switching,
    upgrade_request,
)

from tunnel import Config, serve

GUARD_SECONDS = 120.0
"""Virtual seconds on the MockClock; a stuck test jumps straight here and fails."""

HOST = "example.test"
PATH = "/chat"


# --- a raw backend ---------------------------------------------------------------------------

Behaviour = Callable[[trio.SocketStream, list[bytes]], Awaitable[None]]


@dataclass
class RawBackend:
    port: int
    requests: list[bytes]
    """Request heads received, in order."""


async def echo_after_101(stream: trio.SocketStream, requests: list[bytes]) -> None:
    """Answer the upgrade with a correct 101, then echo raw bytes until EOF."""
    async with stream:
        try:
            head, rest = await read_head(stream)
            requests.append(head)
            key = header(head, "Sec-WebSocket-Key")
            assert key is not None, head
            await stream.send_all(switching(key))
            if rest:
                await stream.send_all(rest)
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
        except (trio.BrokenResourceError, EOFError):
            return


async def never_answer(stream: trio.SocketStream, requests: list[bytes]) -> None:
    """Accept and read the request, then say nothing until the proxy gives up."""
    async with stream:
        try:
            head, _ = await read_head(stream)
            requests.append(head)
            while await stream.receive_some(65536):
                pass
        except (trio.BrokenResourceError, EOFError):
            return


async def hang_up(stream: trio.SocketStream, requests: list[bytes]) -> None:
    """Read the request, then close without a word."""
    async with stream:
        head, _ = await read_head(stream)
        requests.append(head)


async def start_backend(nursery: trio.Nursery, behaviour: Behaviour) -> RawBackend:
    requests: list[bytes] = []

    async def handle(stream: trio.SocketStream) -> None:
        await behaviour(stream, requests)

    return RawBackend(await serve_loopback(nursery, handle), requests)


# --- the proxy and its clients ---------------------------------------------------------------


def make_config(backend_port: int, backend_name: str = "echo", **server: Any) -> Config:
    data: Mapping[str, Any] = {
        "server": server,
        "listeners": [{"listen": "127.0.0.1:0"}],
        "routes": [
            {
                "name": "r",
                "backends": [{"name": backend_name, "url": f"ws://127.0.0.1:{backend_port}"}],
            }
        ],
    }
    return Config.from_mapping(data)


@asynccontextmanager
async def proxy(config: Config) -> AsyncIterator[trio.SocketListener]:
    with trio.fail_after(GUARD_SECONDS):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(serve, config)
            yield listeners[0]
            nursery.cancel_scope.cancel()


def new_key() -> str:
    return base64.b64encode(os.urandom(16)).decode()


async def read_response(stream: trio.abc.ReceiveStream) -> tuple[int, bytes, bytes]:
    """A refusal: status, head, and the body up to the proxy's close."""
    head, rest = await read_head(stream)
    body = await read_to_eof(stream, rest, limit=HEAD_LIMIT)
    return status_of(head), head, body


@asynccontextmanager
async def tunnel_through(listener: trio.SocketListener) -> AsyncIterator[trio.SocketStream]:
    """Open a tunnel through the proxy; check the 101 and the echo."""
    stream = await trio.testing.open_stream_to_socket_listener(listener)
    async with stream:
        key = new_key()
        await stream.send_all(upgrade_request(HOST, key, PATH))
        head, rest = await read_head(stream)
        assert_switching(head, key)
        assert rest == b""
        await stream.send_all(b"ping through the tunnel")
        assert await read_exactly(stream, 23) == b"ping through the tunnel"
        yield stream


# --- handshake_timeout -----------------------------------------------------------------------


async def test_partial_head_gets_408_after_handshake_timeout_while_others_tunnel(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as backends:
        backend = await start_backend(backends, echo_after_101)
        async with proxy(make_config(backend.port, handshake_timeout="10s")) as listener:
            slow = await trio.testing.open_stream_to_socket_listener(listener)
            async with slow:
                started = trio.current_time()
                await slow.send_all(b"GET /chat HTTP/1.1\r\nHost: example.test\r\nUpgrade: web")

                # Meanwhile a normal client opens a tunnel and talks through it.
                await trio.sleep(3)
                async with tunnel_through(listener) as fast:
                    await fast.send_all(b"second message")
                    assert await read_exactly(fast, 14) == b"second message"
                    assert trio.current_time() - started < 10

                status, head, body = await read_response(slow)
                waited = trio.current_time() - started
            assert status == 408
            assert header(head, "Connection") == "close"
            assert b"handshake_timeout (10s)" in body
            assert waited == pytest.approx(10, abs=0.5)
        backends.cancel_scope.cancel()
    assert len(backend.requests) == 1, "the slow client's bytes never reached the backend"


async def test_slow_head_trickling_bytes_still_times_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Slowloris: a byte every second keeps the connection busy but the head never completes.
    # handshake_timeout bounds the whole head, not the gap between bytes.
    async with trio.open_nursery() as backends:
        backend = await start_backend(backends, echo_after_101)
        async with proxy(make_config(backend.port, handshake_timeout="5s")) as listener:
            slow = await trio.testing.open_stream_to_socket_listener(listener)

            async def trickle() -> None:
                for byte in upgrade_request(HOST, new_key(), PATH):
                    try:
                        await slow.send_all(bytes([byte]))
                    except trio.BrokenResourceError:
                        return
                    await trio.sleep(1)

            async with slow, trio.open_nursery() as nursery:
                started = trio.current_time()
                nursery.start_soon(trickle)
                status, _, _ = await read_response(slow)
                waited = trio.current_time() - started
                nursery.cancel_scope.cancel()
            assert status == 408
            assert waited == pytest.approx(5, abs=1)
        backends.cancel_scope.cancel()
    assert backend.requests == []


# --- response_timeout ------------------------------------------------------------------------


def refusal_reason(caplog: pytest.LogCaptureFixture) -> str:
    """The ``reason`` of the one ``request refused`` log line: where backend details go."""
    [record] = [r for r in caplog.records if r.getMessage() == "request refused"]
    return str(record.fields["reason"])  # type: ignore[attr-defined]


async def test_backend_that_never_answers_gets_504_after_response_timeout(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with trio.open_nursery() as backends:
        backend = await start_backend(backends, never_answer)
        config = make_config(backend.port, backend_name="mute", response_timeout="7s")
        async with proxy(config) as listener:
            client = await trio.testing.open_stream_to_socket_listener(listener)
            async with client:
                await client.send_all(upgrade_request(HOST, new_key(), PATH))
                started = trio.current_time()
                status, _, body = await read_response(client)
                waited = trio.current_time() - started
        backends.cancel_scope.cancel()
    assert status == 504
    assert body.endswith(
        b": the service behind this address did not answer in time; try again later\n"
    )
    assert "backend mute (127.0.0.1:" in refusal_reason(caplog)
    assert "did not answer the upgrade within response_timeout (7s)" in refusal_reason(caplog)
    assert waited == pytest.approx(7, abs=0.5)
    assert len(backend.requests) == 1, "the backend did receive the rewritten request"


# --- unreachable backend ---------------------------------------------------------------------


async def test_refused_backend_gets_502_and_the_log_names_the_backend(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A port bound but not listening refuses connections, and nobody else can take it meanwhile.
    with socket.socket() as closed_port:
        closed_port.bind(("127.0.0.1", 0))
        port = closed_port.getsockname()[1]
        async with proxy(make_config(port, backend_name="refuser")) as listener:
            client = await trio.testing.open_stream_to_socket_listener(listener)
            async with client:
                await client.send_all(upgrade_request(HOST, new_key(), PATH))
                with trio.fail_after(10):
                    status, head, body = await read_response(client)
    assert status == 502
    assert header(head, "Connection") == "close"
    assert (
        body
        == b"502 Bad Gateway: the service behind this address is unavailable; try again later\n"
    )
    reason = refusal_reason(caplog)
    assert "refuser" in reason
    assert f"127.0.0.1:{port}" in reason
    assert "Connection refused" in reason


async def test_backend_that_hangs_up_before_replying_gets_502(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async with trio.open_nursery() as backends:
        backend = await start_backend(backends, hang_up)
        async with proxy(make_config(backend.port, backend_name="quitter")) as listener:
            client = await trio.testing.open_stream_to_socket_listener(listener)
            async with client:
                await client.send_all(upgrade_request(HOST, new_key(), PATH))
                started = trio.current_time()
                status, _, body = await read_response(client)
                waited = trio.current_time() - started
        backends.cancel_scope.cancel()
    assert status == 502
    assert b"gave an invalid answer to the upgrade" in body
    assert "closed the connection before replying" in refusal_reason(caplog)
    assert waited < 1, "an early close is answered at once, not after response_timeout"
    assert len(backend.requests) == 1


# --- max_tunnels -----------------------------------------------------------------------------


async def test_max_tunnels_refuses_the_next_upgrade_with_503_and_retry_after(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as backends:
        backend = await start_backend(backends, echo_after_101)
        async with proxy(make_config(backend.port, max_tunnels=1)) as listener:
            async with tunnel_through(listener) as first:
                second = await trio.testing.open_stream_to_socket_listener(listener)
                async with second:
                    await second.send_all(upgrade_request(HOST, new_key(), PATH))
                    status, head, body = await read_response(second)
                assert status == 503
                retry_after = header(head, "Retry-After")
                assert retry_after is not None
                assert retry_after.isdigit()
                assert b"max_tunnels (1)" in body

                # The open tunnel is untouched by the refusal.
                await first.send_all(b"still open")
                assert await read_exactly(first, 10) == b"still open"

            # Once the first tunnel is gone, the slot is free again.
            await trio.testing.wait_all_tasks_blocked()
            await trio.sleep(1)
            async with tunnel_through(listener):
                pass
        backends.cancel_scope.cancel()
    assert len(backend.requests) == 2, "the refused upgrade never reached the backend"
