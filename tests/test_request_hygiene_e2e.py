"""What a prober gets over real loopback sockets: refusals in words, no backend details in
bodies, and only clean headers reaching a real backend.

Each test plays the client with raw bytes (the look-alikes a library client would never send)
against a tunnel in front of a raw backend that records the request head it received.
"""

from __future__ import annotations

import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import pytest
import trio
from conftest import WsBackend
from rawhttp import (
    KEY,
    LOOPBACK,
    read_head,
    read_to_eof,
    status_of,
    switching,
    upgrade_request,
)
from test_e2e import in_thread, raw_exchange, refused, start_raw_backend

from tunnel.core.session import TLS_ON_PLAIN_PORT
from tunnel.logs import LOGGER_NAME

if TYPE_CHECKING:
    from conftest import Tunnel

StartTunnel = Callable[..., Awaitable["Tunnel"]]
WAIT_SECONDS = 15.0


class RecordingBackend:
    """A raw backend that answers every upgrade with a correct 101 and keeps each request head
    it received, exactly as it arrived."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []

    async def __call__(self, stream: trio.SocketStream) -> None:
        async with stream:
            head, _ = await read_head(stream)
            self.heads.append(head)
            key = next(
                line.partition(b":")[2].strip().decode()
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"sec-websocket-key:")
            )
            await stream.send_all(switching(key))

    def fields(self, index: int = 0) -> list[tuple[str, str]]:
        lines = self.heads[index].decode("latin-1").split("\r\n")[1:]
        return [(k, v.strip()) for k, _, v in (line.partition(":") for line in lines if line)]


def request_with(port: int, *extra: str, path: str = "/chat", host: str = "") -> bytes:
    head = upgrade_request(host or f"{LOOPBACK}:{port}", path=path)
    return head[:-2] + "".join(f"{line}\r\n" for line in extra).encode("latin-1") + b"\r\n"


async def test_spoofed_and_look_alike_headers_never_reach_the_backend(
    nursery: trio.Nursery, start_tunnel: StartTunnel
) -> None:
    backend = RecordingBackend()
    with trio.fail_after(WAIT_SECONDS):
        tunnel = await start_tunnel([await start_raw_backend(nursery, backend)])
        answer = await raw_exchange(
            tunnel.port,
            request_with(
                tunnel.port,
                "X_Forwarded_For: 6.6.6.6",
                "X_Real_IP: 6.6.6.6",
                "X-Forwarded-For: 6.6.6.6",
                "X_Forwarded_Proto: https",
                "X_Forwarded_Host: evil.example",
                "X-Forwarded-Port: 443",
                "X-Forwarded-Prefix: /admin",
                "X-Client-IP: 6.6.6.6",
                "True-Client-IP: 6.6.6.6",
                "CF-Connecting-IP: 6.6.6.6",
                "X-Original-URL: /admin",
                "X-Request-Id: kept",
            ),
        )

    assert status_of(answer) == 101
    fields = backend.fields()
    names = [name.lower() for name, _ in fields]
    assert "6.6.6.6" not in backend.heads[0].decode("latin-1")
    assert [n for n in names if "_" in n] == []
    for spoof in ("x-forwarded-port", "x-forwarded-prefix", "x-client-ip", "true-client-ip"):
        assert spoof not in names
    assert ("X-Forwarded-For", LOOPBACK) in fields
    assert ("X-Real-IP", LOOPBACK) in fields
    assert ("X-Forwarded-Proto", "http") in fields
    assert ("X-Request-Id", "kept") in fields


async def test_handshake_headers_listed_in_connection_reach_the_backend(
    nursery: trio.Nursery, start_tunnel: StartTunnel
) -> None:
    backend = RecordingBackend()
    with trio.fail_after(WAIT_SECONDS):
        tunnel = await start_tunnel([await start_raw_backend(nursery, backend)])
        request = request_with(tunnel.port, "Origin: http://chat.example").replace(
            b"Connection: Upgrade",
            b"Connection: Upgrade, Sec-WebSocket-Key, Origin, Sec-WebSocket-Version",
        )
        answer = await raw_exchange(tunnel.port, request)

    assert status_of(answer) == 101, "the backend got the key and answered a matching 101"
    fields = backend.fields()
    assert ("Sec-WebSocket-Key", KEY) in fields
    assert ("Origin", "http://chat.example") in fields
    assert ("Sec-WebSocket-Version", "13") in fields


@pytest.mark.parametrize(
    ("request_bytes", "status", "words"),
    [
        pytest.param(
            lambda port: request_with(port, path="/chat/../admin"),
            400,
            b"'..' segment",
            id="dot-segment",
        ),
        pytest.param(
            lambda port: request_with(port, path="/chat/%2e%2e/admin"),
            400,
            b"'..' segment",
            id="encoded-dot-segment",
        ),
        pytest.param(
            lambda port: request_with(port, host="a@b"),
            400,
            b"is not a host name",
            id="host-with-userinfo",
        ),
        pytest.param(
            lambda port: request_with(port, host=f"{LOOPBACK}:99999"),
            400,
            b"port that is not a number from 1 to 65535",
            id="host-port-out-of-range",
        ),
        pytest.param(
            lambda port: request_with(port, "X-Trace: a\x01b"),
            400,
            b"control character",
            id="control-character",
        ),
        pytest.param(
            lambda port: b"hello there\r\n\r\n",
            400,
            b'the request line is not "METHOD /path HTTP/1.1"',
            id="garbage",
        ),
        pytest.param(
            lambda port: request_with(port, path="/" + "a" * 40_000),
            414,
            b"request target is longer than max_header_bytes",
            id="long-target",
        ),
    ],
)
async def test_bad_requests_are_refused_in_words_and_never_reach_the_backend(
    nursery: trio.Nursery,
    start_tunnel: StartTunnel,
    request_bytes: Callable[[int], bytes],
    status: int,
    words: bytes,
) -> None:
    backend = RecordingBackend()
    with trio.fail_after(WAIT_SECONDS):
        tunnel = await start_tunnel([await start_raw_backend(nursery, backend)])
        answer = await raw_exchange(tunnel.port, request_bytes(tunnel.port))
        served = await raw_exchange(tunnel.port, request_with(tunnel.port))

    assert status_of(answer) == status
    _, _, body = answer.partition(b"\r\n\r\n")
    assert words in body
    assert b"bytearray" not in body
    assert not re.search(rb"(^|[\s(:])b'", body), "no Python bytes repr"
    assert status_of(served) == 101, "the tunnel keeps serving everyone else"
    assert len(backend.heads) == 1


async def test_a_tls_client_on_a_plain_port_is_told_so(
    nursery: trio.Nursery, start_tunnel: StartTunnel, echo_backend: WsBackend
) -> None:
    hello = ssl.create_default_context().wrap_bio(
        ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname="localhost"
    )
    with pytest.raises(ssl.SSLWantReadError):
        hello.do_handshake()
    client_hello = outgoing.read()
    with trio.fail_after(WAIT_SECONDS):
        tunnel = await start_tunnel([echo_backend.url])
        answer = await raw_exchange(tunnel.port, client_hello)

    assert status_of(answer) == 400
    assert TLS_ON_PLAIN_PORT.encode() in answer


async def test_502_body_names_no_backend_and_the_log_names_every_one_tried(
    start_tunnel: StartTunnel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    dead = []
    for _ in range(2):
        sock = trio.socket.socket()
        await sock.bind((LOOPBACK, 0))
        dead.append(sock)
    ports = [sock.getsockname()[1] for sock in dead]
    with trio.fail_after(WAIT_SECONDS):
        tunnel = await start_tunnel([f"ws://{LOOPBACK}:{port}" for port in ports])
        response = await in_thread(refused, tunnel.url)
    for sock in dead:
        sock.close()

    assert response.status_code == 502
    body = response.body.decode()
    assert body == (
        "502 Bad Gateway: the service behind this address is unavailable; try again later\n"
    )
    [refusal] = [r for r in caplog.records if r.getMessage() == "request refused"]
    reason = str(refusal.fields["reason"])  # type: ignore[attr-defined]
    assert "(2 tried)" in reason
    for port in ports:
        assert f"{LOOPBACK}:{port}" in reason
    assert reason.count("Connection refused") == 2


async def test_a_client_leaving_mid_head_is_a_debug_line_not_a_refusal(
    tunnel: Tunnel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER_NAME)
    partial_head = upgrade_request(f"{LOOPBACK}:{tunnel.port}")[:40]
    with trio.fail_after(WAIT_SECONDS):
        async with await trio.open_tcp_stream(LOOPBACK, tunnel.port) as stream:
            await stream.send_all(partial_head)
            await stream.send_eof()
            answer = await read_to_eof(stream)
        while not any(r.getMessage().startswith("client left") for r in caplog.records):
            await trio.sleep(0.01)

    assert answer == b""
    [left] = [r for r in caplog.records if r.getMessage().startswith("client left")]
    assert left.levelno == logging.DEBUG
    assert left.fields["bytes_received"] == len(partial_head)  # type: ignore[attr-defined]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
