"""End to end over loopback: real ``websockets`` clients and servers, and raw sockets for the
hostile cases, with the tunnel served by ``tunnel.serve`` in between.

Blocking ``websockets`` clients run in worker threads (``in_thread``), each call bounded by its
own timeouts; every test body runs under a ``trio.fail_after`` guard.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import resource
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
import trio
import websockets.asyncio.client
import websockets.sync.client
from rawhttp import (
    KEY,
    LOOPBACK,
    RawHandler,
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
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.http11 import Response
from websockets.sync.server import ServerConnection

if TYPE_CHECKING:
    from conftest import Tunnel, WsBackend

T = TypeVar("T")
StartTunnel = Callable[..., Awaitable["Tunnel"]]

CLIENT_TIMEOUT = 10.0
RETRY_SECONDS = 10.0
"""How long a client may keep meeting 503 after the only tunnel closed (loaded machine)."""
LATE_SECONDS = 5.0
"""How late past its setting a timed cut-off may come on a loaded machine (CLIENT_TIMEOUT is
longer, so a client still tells "cut off late" from "never cut off")."""


async def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking call in a worker thread; a ``fail_after`` guard does not wait for it."""
    return await trio.to_thread.run_sync(partial(fn, *args, **kwargs), abandon_on_cancel=True)


def ws_connect(url: str, **options: Any) -> websockets.sync.client.ClientConnection:
    """A real ``websockets`` client with bounded timeouts, never through a proxy the
    environment may name (the traffic is loopback)."""
    options.setdefault("open_timeout", CLIENT_TIMEOUT)
    options.setdefault("close_timeout", CLIENT_TIMEOUT)
    options.setdefault("ping_interval", None)
    options.setdefault("proxy", None)
    connection: websockets.sync.client.ClientConnection = websockets.sync.client.connect(
        url, **options
    )
    return connection


def echo_once(url: str, message: str | bytes, **options: Any) -> str | bytes:
    """Open a WebSocket through ``url``, send one message, return the answer, close."""
    with ws_connect(url, **options) as ws:
        ws.send(message)
        return ws.recv(timeout=CLIENT_TIMEOUT)


def refused(url: str, **options: Any) -> Response:
    """Connect, expect the upgrade to be refused, return the HTTP response the client got."""
    with pytest.raises(InvalidStatus) as info:
        ws_connect(url, **options).close()
    return info.value.response


# Raw sockets ---------------------------------------------------------------------------------


async def raw_exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` on a fresh connection, return everything received until EOF."""
    async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
        await stream.send_all(request)
        return await read_to_eof(stream)


async def start_raw_backend(nursery: trio.Nursery, handler: RawHandler) -> str:
    """Serve ``handler`` on a loopback port in ``nursery``; return its ``ws://`` URL."""
    return f"ws://{LOOPBACK}:{await serve_loopback(nursery, handler)}"


async def accept_upgrade(stream: trio.SocketStream, extra: bytes = b"") -> bytes:
    """Backend side: read the upgrade request, answer a correct 101 followed by ``extra`` in
    the same write; return the bytes that arrived after the request head."""
    head, rest = await read_head(stream)
    await stream.send_all(switching(header(head, "Sec-WebSocket-Key")) + extra)
    return rest


async def echo_after_upgrade(stream: trio.SocketStream, then: bytes = b"") -> None:
    """Backend side: accept the upgrade, echo raw bytes until EOF, then send ``then``."""
    async with stream:
        await accept_upgrade(stream)
        while data := await stream.receive_some(16384):
            await stream.send_all(data)
        await stream.send_all(then)


async def open_raw_tunnel(port: int, leftover: bytes = b"") -> tuple[trio.SocketStream, bytes]:
    """Client side: send the upgrade (plus ``leftover`` in the same write), expect the 101;
    return the stream and the bytes received after the 101 head."""
    stream = await trio.open_tcp_stream(LOOPBACK, port)
    await stream.send_all(upgrade_request(f"{LOOPBACK}:{port}") + leftover)
    head, rest = await read_head(stream)
    assert_switching(head, KEY)
    return stream, rest


# 1. Messages ---------------------------------------------------------------------------------


async def test_text_and_binary_messages_echo_through_the_tunnel(
    tunnel: Tunnel, echo_backend: WsBackend
) -> None:
    def client() -> list[str | bytes]:
        answers: list[str | bytes] = []
        with ws_connect(tunnel.url) as ws:
            for message in ("hello", "héllo wörld ✓", b"\x00\x01\xfe\xff", b"", "x" * 70_000):
                ws.send(message)
                answers.append(ws.recv(timeout=CLIENT_TIMEOUT))
        return answers

    with trio.fail_after(20):
        answers = await in_thread(client)

    assert answers == ["hello", "héllo wörld ✓", b"\x00\x01\xfe\xff", b"", "x" * 70_000]
    assert isinstance(answers[2], bytes)
    assert isinstance(answers[0], str)
    assert echo_backend.connections == 1
    headers = echo_backend.request_headers[0]
    assert headers["X-Forwarded-For"] == LOOPBACK


# 2. Negotiation ------------------------------------------------------------------------------


async def test_subprotocol_and_permessage_deflate_are_negotiated_end_to_end(
    tunnel: Tunnel,
) -> None:
    def client() -> tuple[str | None, str, list[str], str | bytes]:
        with ws_connect(tunnel.url, subprotocols=["chat"], compression="deflate") as ws:
            ws.send("compress me " * 1000)
            answer = ws.recv(timeout=CLIENT_TIMEOUT)
            assert ws.response is not None
            extensions = [type(e).__name__ for e in ws.protocol.extensions]
            return (
                ws.subprotocol,
                ws.response.headers.get("Sec-WebSocket-Extensions", ""),
                extensions,
                answer,
            )

    with trio.fail_after(20):
        subprotocol, header, extensions, answer = await in_thread(client)

    assert subprotocol == "chat"
    assert "permessage-deflate" in header
    assert extensions == [PerMessageDeflate.__name__]
    assert answer == "compress me " * 1000


# 3. Volume -----------------------------------------------------------------------------------


RELAY_MODES = ["auto", "splice", "copy"]
"""``server.relay``: each must carry the same bytes; the engine's own tests go further."""


@pytest.mark.slow
@pytest.mark.parametrize("relay", RELAY_MODES)
async def test_16_mib_each_way_arrives_identical(
    start_tunnel: StartTunnel, echo_backend: WsBackend, relay: str
) -> None:
    tunnel = await start_tunnel([echo_backend.url], relay=relay)
    chunks = [os.urandom(4 * 2**20) for _ in range(4)]

    def client() -> list[bytes]:
        # One message in flight at a time: a websockets sync connection holds its protocol lock
        # while blocked in sendall, so two peers both sending megabytes without reading would
        # deadlock each other, with or without a proxy in between.
        with ws_connect(tunnel.url, max_size=None, compression=None) as ws:
            received: list[bytes] = []
            for chunk in chunks:
                ws.send(chunk)
                message = ws.recv(timeout=CLIENT_TIMEOUT)
                assert isinstance(message, bytes)
                received.append(message)
            return received

    with trio.fail_after(60):
        received = await in_thread(client)

    sent_digests = [hashlib.sha256(c).hexdigest() for c in chunks]
    assert echo_backend.digests == sent_digests  # client → backend
    assert sum(map(len, received)) == 16 * 2**20
    assert received == chunks  # backend → client


# 4. Refusals ---------------------------------------------------------------------------------


async def test_backend_refusal_reaches_the_client_verbatim(
    start_ws_backend: Callable[..., WsBackend], start_tunnel: StartTunnel
) -> None:
    def forbid(connection: ServerConnection, request: Any) -> Response:
        response = connection.respond(403, "no token, no tunnel\n")
        response.headers["X-Backend-Says"] = "nope"
        return response

    backend = start_ws_backend(process_request=forbid)
    with trio.fail_after(20):
        tunnel = await start_tunnel([backend.url])
        response = await in_thread(refused, tunnel.url)
        raw = await raw_exchange(tunnel.port, upgrade_request(f"{LOOPBACK}:{tunnel.port}"))

    assert response.status_code == 403
    assert response.body == b"no token, no tunnel\n"
    assert response.headers["X-Backend-Says"] == "nope"
    assert status_of(raw) == 403
    assert raw.endswith(b"\r\n\r\nno token, no tunnel\n")
    assert backend.connections == 0


async def test_200_to_an_upgrade_never_becomes_a_tunnel(
    nursery: trio.Nursery, start_tunnel: StartTunnel
) -> None:
    received = bytearray()
    backend_done = trio.Event()

    async def plain_http_backend(stream: trio.SocketStream) -> None:
        try:
            await read_head(stream)
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n\r\n"
                b"plain hello"
            )
            with trio.move_on_after(5):
                received.extend(await read_to_eof(stream))
        finally:
            backend_done.set()
            await stream.aclose()

    smuggled = b"GET /admin HTTP/1.1\r\nHost: internal\r\n\r\n"
    with trio.fail_after(15):
        backend_url = await start_raw_backend(nursery, plain_http_backend)
        tunnel = await start_tunnel([backend_url])
        async with await trio.open_tcp_stream(LOOPBACK, tunnel.port) as client:
            await client.send_all(upgrade_request(f"{LOOPBACK}:{tunnel.port}") + smuggled)
            answer = await read_to_eof(client)
        await backend_done.wait()

    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert body == b"plain hello"  # and then EOF: no tunnel, nothing more
    assert bytes(received) == b""  # the backend never saw the smuggled request
    assert b"/admin" not in received


# 5. Slowloris --------------------------------------------------------------------------------


async def test_slowloris_is_cut_off_at_handshake_timeout_while_others_are_served(
    start_tunnel: StartTunnel, echo_backend: WsBackend
) -> None:
    result: dict[str, Any] = {"sent": 0}
    handshake_timeout = 3.0  # the "served meanwhile" echo has this long on a loaded machine
    pace = 0.2

    async def slow_client(port: int, done: trio.Event) -> None:
        request = upgrade_request(f"{LOOPBACK}:{port}")
        async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
            started = trio.current_time()
            async with trio.open_nursery() as inner:

                async def trickle() -> None:
                    for i in range(len(request)):
                        await stream.send_all(request[i : i + 1])
                        result["sent"] = i + 1
                        await trio.sleep(pace)

                inner.start_soon(trickle)
                result["answer"] = await read_to_eof(stream)
                result["elapsed"] = trio.current_time() - started
                inner.cancel_scope.cancel()
        done.set()

    with trio.fail_after(20):
        tunnel = await start_tunnel([echo_backend.url], handshake_timeout="3s")
        done = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow_client, tunnel.port, done)
            while result["sent"] < 2:  # it is trickling (bounded by the fail_after)
                await trio.sleep(0.01)
            echoed = await in_thread(echo_once, tunnel.url, "served meanwhile")
            served_before_cutoff = not done.is_set()

    assert echoed == "served meanwhile"
    assert served_before_cutoff
    assert status_of(result["answer"]) == 408
    assert b"handshake_timeout" in result["answer"]
    assert handshake_timeout - 0.1 <= result["elapsed"] < handshake_timeout + LATE_SECONDS
    # It kept trickling, and was cut off anyway (a byte per pace until the cut-off at most).
    assert 2 <= result["sent"] <= (handshake_timeout + LATE_SECONDS) / pace + 1


# 6. Backends down ----------------------------------------------------------------------------


async def test_backend_down_answers_502(start_tunnel: StartTunnel, dead_port: int) -> None:
    with trio.fail_after(15):
        tunnel = await start_tunnel([f"ws://{LOOPBACK}:{dead_port}"])
        response = await in_thread(refused, tunnel.url)
        # The tunnel keeps serving, and keeps answering 502.
        again = await in_thread(refused, tunnel.url)

    assert response.status_code == 502
    assert b"unavailable; try again later" in response.body
    assert str(dead_port).encode() not in response.body, "the backend stays private"
    assert again.status_code == 502


async def test_failover_skips_a_dead_backend(
    start_tunnel: StartTunnel, dead_port: int, echo_backend: WsBackend
) -> None:
    with trio.fail_after(20):
        tunnel = await start_tunnel([f"ws://{LOOPBACK}:{dead_port}", echo_backend.url])
        answers = [await in_thread(echo_once, tunnel.url, f"message {i}") for i in range(4)]

    assert answers == [f"message {i}" for i in range(4)]
    assert echo_backend.connections == 4


async def test_silent_backend_answers_504_after_response_timeout(
    nursery: trio.Nursery, start_tunnel: StartTunnel, caplog: pytest.LogCaptureFixture
) -> None:
    async def silent_backend(stream: trio.SocketStream) -> None:
        async with stream:
            await read_to_eof(stream)

    with trio.fail_after(15):
        backend_url = await start_raw_backend(nursery, silent_backend)
        tunnel = await start_tunnel([backend_url], response_timeout="1s")
        started = trio.current_time()
        response = await in_thread(refused, tunnel.url)
        elapsed = trio.current_time() - started

    assert response.status_code == 504
    assert b"did not answer in time" in response.body
    assert b"response_timeout" not in response.body, "the client is not told the proxy's settings"
    [refusal] = [r for r in caplog.records if r.getMessage() == "request refused"]
    assert "within response_timeout (1s)" in refusal.fields["reason"]  # type: ignore[attr-defined]
    assert 0.9 <= elapsed < 1.0 + LATE_SECONDS


async def test_max_tunnels_answers_503_with_retry_after(
    start_tunnel: StartTunnel, echo_backend: WsBackend
) -> None:
    def client(url: str) -> tuple[Response, str | bytes]:
        with ws_connect(url) as first:
            second = refused(url)
            first.send("the first tunnel still works")
            return second, first.recv(timeout=CLIENT_TIMEOUT)

    def retry(url: str) -> str | bytes:
        # The proxy may see the first tunnel's last EOF just after the next client arrives:
        # retries for at most RETRY_SECONDS (bounded in count too), each 503 answered at once.
        deadline = time.monotonic() + RETRY_SECONDS
        for _ in range(int(RETRY_SECONDS / 0.02)):
            try:
                return echo_once(url, "room again after the first closed")
            except InvalidStatus as exc:
                if exc.response.status_code != 503:
                    raise
            if time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        raise AssertionError(f"still 503 {RETRY_SECONDS:g} s after the only tunnel closed")

    with trio.fail_after(20):
        tunnel = await start_tunnel([echo_backend.url], max_tunnels=1)
        second, answer = await in_thread(client, tunnel.url)
        again = await in_thread(retry, tunnel.url)

    assert second.status_code == 503
    assert second.headers["Retry-After"] == "5"
    assert answer == "the first tunnel still works"
    assert again == "room again after the first closed"


# 7. Client reset -----------------------------------------------------------------------------


async def test_client_reset_closes_the_backend_socket(
    nursery: trio.Nursery, start_tunnel: StartTunnel
) -> None:
    backend_closed = trio.Event()
    outcome: list[str] = []

    async def backend(stream: trio.SocketStream) -> None:
        async with stream:
            await accept_upgrade(stream, b"ready")
            try:
                while await stream.receive_some(16384):
                    pass
                outcome.append("EOF")
            except trio.BrokenResourceError:
                outcome.append("reset")
            backend_closed.set()

    with trio.fail_after(15):
        tunnel = await start_tunnel([await start_raw_backend(nursery, backend)])
        client, rest = await open_raw_tunnel(tunnel.port)
        assert await read_exactly(client, 5, rest) == b"ready"
        client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await client.aclose()  # RST, not FIN
        reset_at = trio.current_time()
        with trio.fail_after(2):
            await backend_closed.wait()

    assert outcome in (["EOF"], ["reset"])
    assert trio.current_time() - reset_at < 2


# 8. Half-close -------------------------------------------------------------------------------


@pytest.mark.parametrize("relay", RELAY_MODES)
async def test_half_closed_client_still_receives_the_backend_answer(
    nursery: trio.Nursery, start_tunnel: StartTunnel, relay: str
) -> None:
    backend = partial(echo_after_upgrade, then=b"|final words after your EOF")
    with trio.fail_after(15):
        tunnel = await start_tunnel([await start_raw_backend(nursery, backend)], relay=relay)
        client, rest = await open_raw_tunnel(tunnel.port)
        async with client:
            await client.send_all(b"hello, then EOF")
            await client.send_eof()
            answer = await read_to_eof(client, rest)

    assert answer == b"hello, then EOF|final words after your EOF"


# 9. Leftovers --------------------------------------------------------------------------------


async def test_bytes_around_the_101_are_not_lost(
    nursery: trio.Nursery, start_tunnel: StartTunnel
) -> None:
    seen: dict[str, bytes] = {}
    backend_done = trio.Event()

    async def backend(stream: trio.SocketStream) -> None:
        async with stream:
            seen["before_101"] = await accept_upgrade(stream, extra=b"LATE:from-backend")
            seen["after_101"] = await read_exactly(stream, len(b"EARLY:from-client"))
            backend_done.set()

    with trio.fail_after(15):
        tunnel = await start_tunnel([await start_raw_backend(nursery, backend)])
        client, rest = await open_raw_tunnel(tunnel.port, leftover=b"EARLY:from-client")
        async with client:
            from_backend = await read_exactly(client, len(b"LATE:from-backend"), rest)
            await backend_done.wait()

    assert seen["before_101"] == b""  # nothing of the client's early bytes before the 101
    assert seen["after_101"] == b"EARLY:from-client"
    assert from_backend == b"LATE:from-backend"


# 10. Many tunnels ----------------------------------------------------------------------------


TUNNELS = 1000


async def _many_clients(url: str, count: int, timeout: float) -> list[str]:
    """Open ``count`` WebSockets, wait until all are open, then each exchanges one message."""
    opened = 0
    all_open = asyncio.Event()

    async def one(i: int) -> str:
        nonlocal opened
        async with websockets.asyncio.client.connect(
            url, open_timeout=timeout, ping_interval=None, compression=None
        ) as ws:
            opened += 1
            if opened == count:
                all_open.set()
            await asyncio.wait_for(all_open.wait(), timeout)
            await ws.send(f"tunnel {i}")
            answer = await asyncio.wait_for(ws.recv(), timeout)
            assert isinstance(answer, str)
            return answer

    async with asyncio.timeout(timeout * 2):
        return await asyncio.gather(*(one(i) for i in range(count)))


@pytest.mark.slow
async def test_a_thousand_concurrent_tunnels(
    start_tunnel: StartTunnel, asyncio_echo_backend: WsBackend
) -> None:
    with trio.fail_after(90):
        tunnel = await start_tunnel([asyncio_echo_backend.url])
        started = time.monotonic()
        answers = await in_thread(asyncio.run, _many_clients(tunnel.url, TUNNELS, 30.0))
        elapsed = time.monotonic() - started

    assert answers == [f"tunnel {i}" for i in range(TUNNELS)]
    assert asyncio_echo_backend.connections == TUNNELS
    assert asyncio_echo_backend.peak_open == TUNNELS
    assert elapsed < 60


# 11. Bad requests ----------------------------------------------------------------------------


async def test_bad_requests_get_a_clear_status_and_the_tunnel_keeps_serving(
    tunnel: Tunnel, echo_backend: WsBackend
) -> None:
    host = f"Host: {LOOPBACK}:{tunnel.port}\r\n"
    plain_get = f"GET / HTTP/1.1\r\n{host}\r\n".encode()
    post = (
        f"POST / HTTP/1.1\r\n{host}Connection: Upgrade\r\nUpgrade: websocket\r\n"
        f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    padding = "".join(f"X-Pad-{i}: {'p' * 1000}\r\n" for i in range(40))  # ~40 KiB > 32 KiB
    huge = upgrade_request(f"{LOOPBACK}:{tunnel.port}").replace(
        b"\r\n\r\n", f"\r\n{padding}\r\n".encode()
    )

    with trio.fail_after(20):
        answers = {
            name: await raw_exchange(tunnel.port, request)
            for name, request in (("get", plain_get), ("post", post), ("huge", huge))
        }
        echoed = await in_thread(echo_once, tunnel.url, "still serving")

    get_head, _, get_body = answers["get"].partition(b"\r\n\r\n")
    assert status_of(answers["get"]) == 426
    assert header(get_head, "Upgrade") == "websocket"
    assert b"426 Upgrade Required" in get_body
    post_head, _, _ = answers["post"].partition(b"\r\n\r\n")
    assert status_of(answers["post"]) == 405
    assert header(post_head, "Allow") == "GET"
    assert status_of(answers["huge"]) == 431
    assert b"max_header_bytes" in answers["huge"]
    assert echoed == "still serving"
    assert echo_backend.connections == 1  # no refused request reached the backend


# 12. Idle timeout ----------------------------------------------------------------------------


async def test_idle_timeout_closes_a_silent_tunnel(
    start_tunnel: StartTunnel, echo_backend: WsBackend
) -> None:
    def client(url: str) -> tuple[str | bytes, float, str]:
        with ws_connect(url) as ws:
            ws.send("one message, then silence")
            answer = ws.recv(timeout=CLIENT_TIMEOUT)
            quiet_since = time.monotonic()
            try:
                ws.recv(timeout=CLIENT_TIMEOUT)
            except ConnectionClosed as exc:
                code = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else None
                return answer, time.monotonic() - quiet_since, f"{type(exc).__name__} {code}"
            except TimeoutError:
                return answer, time.monotonic() - quiet_since, "still open"
            return answer, time.monotonic() - quiet_since, "unexpected message"

    with trio.fail_after(20):
        tunnel = await start_tunnel([echo_backend.url], idle_timeout="1s")
        answer, silent_for, outcome = await in_thread(client, tunnel.url)
        with trio.fail_after(10):
            while echo_backend.open_now:  # the backend's side closes too
                await trio.sleep(0.05)

    assert answer == "one message, then silence"
    # A Close frame (1001, going away) before the TCP close: browsers report 1001, not 1006.
    assert outcome == "ConnectionClosedOK (1001, 'idle_timeout')"
    assert 0.8 <= silent_for < 1.0 + LATE_SECONDS


# 13. Out of descriptors ----------------------------------------------------------------------


async def test_out_of_descriptors_the_listener_backs_off_then_serves_the_waiting_clients(
    nursery: trio.Nursery, start_tunnel: StartTunnel, caplog: pytest.LogCaptureFixture
) -> None:
    tunnel = await start_tunnel([await start_raw_backend(nursery, echo_after_upgrade)])
    # The clients' sockets exist before the limit drops: connecting them takes no descriptor.
    clients = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(4)]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")), hard))
        for client in clients:
            client.connect((LOOPBACK, tunnel.port))
        with trio.fail_after(10):
            while "accept failed; out of file descriptors" not in caplog.text:
                await trio.sleep(0.01)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    # Descriptors are back: every waiting client gets its tunnel, and it works.
    with trio.fail_after(10):
        for client in clients:
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(client))
            async with stream:
                await stream.send_all(upgrade_request(f"{LOOPBACK}:{tunnel.port}"))
                head, rest = await read_head(stream)
                assert_switching(head, KEY)
                await stream.send_all(b"still serving")
                assert await read_exactly(stream, 13, rest) == b"still serving"
