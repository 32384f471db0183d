"""Routing, forwarded headers and log lines, end to end over loopback with real websockets peers."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
import trio
import websockets.sync.client
from websockets.exceptions import InvalidStatus
from websockets.http11 import Request

from tunnel import Config, serve
from tunnel.logs import JsonFormatter, TextFormatter

if TYPE_CHECKING:
    from conftest import WsBackend

StartBackend = Callable[..., "WsBackend"]
LOOPBACK = "127.0.0.1"


def recording_backend(start_ws_backend: StartBackend) -> tuple[WsBackend, list[str]]:
    """An echo backend that also records the request target of each handshake."""
    paths: list[str] = []

    def record(_: Any, request: Request) -> None:
        paths.append(request.path)

    return start_ws_backend(process_request=record), paths


async def start(nursery: trio.Nursery, data: dict[str, Any]) -> int:
    data.setdefault("listeners", [{"listen": f"{LOOPBACK}:0"}])
    listeners: list[trio.SocketListener] = await nursery.start(serve, Config.from_mapping(data))
    port: int = listeners[0].socket.getsockname()[1]
    return port


def echo_as(
    host: str,
    port: int,
    path: str = "/",
    headers: dict[str, str] | None = None,
    family: int = socket.AF_INET,
) -> str:
    """Connect to the tunnel at loopback ``port`` while naming ``host`` in the URL (and so in
    the Host header), echo one message and return it."""
    address = "::1" if family == socket.AF_INET6 else LOOPBACK
    sock = socket.create_connection((address, port), timeout=5)
    with websockets.sync.client.connect(
        f"ws://{host}:{port}{path}", sock=sock, additional_headers=headers, open_timeout=5
    ) as ws:
        ws.send("ping")
        reply = ws.recv(timeout=5)
        assert isinstance(reply, str)
        return reply


async def test_routes_pick_backends_by_host_then_path(
    nursery: trio.Nursery, start_ws_backend: StartBackend
) -> None:
    chat, chat_paths = recording_backend(start_ws_backend)
    api, api_paths = recording_backend(start_ws_backend)
    fallback, fallback_paths = recording_backend(start_ws_backend)
    port = await start(
        nursery,
        {
            "routes": [
                {"name": "chat", "hosts": ["chat.example.com"], "backends": [{"url": chat.url}]},
                {"name": "api", "path_prefix": "/api/", "backends": [{"url": api.url}]},
                {"name": "rest", "backends": [{"url": fallback.url}]},
            ]
        },
    )
    with trio.fail_after(20):
        assert await trio.to_thread.run_sync(echo_as, "CHAT.example.com", port, "/api/x") == "ping"
        assert await trio.to_thread.run_sync(echo_as, "other.example", port, "/api/x") == "ping"
        assert await trio.to_thread.run_sync(echo_as, "other.example", port, "/") == "ping"
    assert chat_paths == ["/api/x"]
    assert api_paths == ["/api/x"]
    assert fallback_paths == ["/"]


async def test_backend_path_replaces_the_route_prefix(
    nursery: trio.Nursery, start_ws_backend: StartBackend
) -> None:
    backend, paths = recording_backend(start_ws_backend)
    port = await start(
        nursery,
        {
            "routes": [
                {
                    "name": "ws",
                    "path_prefix": "/ws/",
                    "backends": [{"url": f"{backend.url}/chat/"}],
                },
            ]
        },
    )
    with trio.fail_after(20):
        await trio.to_thread.run_sync(echo_as, "localhost", port, "/ws/room?id=7")
    assert paths == ["/chat/room?id=7"]


async def test_request_matching_no_route_gets_404_naming_host_and_path(
    nursery: trio.Nursery, start_ws_backend: StartBackend
) -> None:
    backend = start_ws_backend()
    port = await start(
        nursery,
        {
            "routes": [
                {"name": "only", "hosts": ["a.example"], "backends": [{"url": backend.url}]},
            ]
        },
    )
    with trio.fail_after(20), pytest.raises(InvalidStatus) as info:
        await trio.to_thread.run_sync(echo_as, "b.example", port, "/x")
    response = info.value.response
    assert response.status_code == 404
    assert b"no route for host 'b.example' and path '/x'" in response.body
    assert backend.connections == 0


@pytest.mark.parametrize(
    ("preserve_host", "expected"), [(True, "app.example:{port}"), (False, "127.0.0.1:{backend}")]
)
async def test_host_header_is_kept_or_set_to_the_backend(
    nursery: trio.Nursery, start_ws_backend: StartBackend, preserve_host: bool, expected: str
) -> None:
    backend = start_ws_backend()
    port = await start(
        nursery,
        {
            "routes": [
                {"name": "r", "preserve_host": preserve_host, "backends": [{"url": backend.url}]},
            ]
        },
    )
    with trio.fail_after(20):
        await trio.to_thread.run_sync(echo_as, "app.example", port)
    headers = backend.request_headers[0]
    assert headers["Host"] == expected.format(port=port, backend=backend.port)
    assert headers["X-Forwarded-Host"] == f"app.example:{port}"
    assert headers["X-Forwarded-Proto"] == "http"


async def test_forwarded_for_from_an_untrusted_peer_is_replaced(
    nursery: trio.Nursery, start_ws_backend: StartBackend
) -> None:
    backend = start_ws_backend()
    port = await start(nursery, {"routes": [{"name": "r", "backends": [{"url": backend.url}]}]})
    spoofed = {"X-Forwarded-For": "203.0.113.7", "X-Real-IP": "203.0.113.7"}
    with trio.fail_after(20):
        await trio.to_thread.run_sync(echo_as, "localhost", port, "/", spoofed)
    headers = backend.request_headers[0]
    assert headers["X-Forwarded-For"] == "127.0.0.1"
    assert headers["X-Real-IP"] == "127.0.0.1"


async def test_forwarded_for_from_a_trusted_proxy_is_appended_to(
    nursery: trio.Nursery, start_ws_backend: StartBackend
) -> None:
    backend = start_ws_backend()
    port = await start(
        nursery,
        {
            "server": {"trusted_proxies": ["127.0.0.0/8"]},
            "routes": [{"name": "r", "backends": [{"url": backend.url}]}],
        },
    )
    sent = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}
    with trio.fail_after(20):
        await trio.to_thread.run_sync(echo_as, "localhost", port, "/", sent)
    headers = backend.request_headers[0]
    assert headers["X-Forwarded-For"] == "203.0.113.7, 127.0.0.1"
    assert headers["X-Real-IP"] == "203.0.113.7"
    assert headers["X-Forwarded-Proto"] == "https"


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
async def test_ipv6_listener_forwards_the_v6_client_address(
    nursery: trio.Nursery, start_ws_backend: StartBackend
) -> None:
    backend = start_ws_backend()
    port = await start(
        nursery,
        {
            "listeners": [{"listen": "[::1]:0"}],
            "routes": [{"name": "r", "backends": [{"url": backend.url}]}],
        },
    )
    with trio.fail_after(20):
        reply = await trio.to_thread.run_sync(
            lambda: echo_as("[::1]", port, family=socket.AF_INET6)
        )
    assert reply == "ping"
    assert backend.request_headers[0]["X-Forwarded-For"] == "::1"


async def test_one_log_line_when_a_tunnel_opens_and_one_when_it_closes(
    nursery: trio.Nursery, start_ws_backend: StartBackend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tunnel")
    backend = start_ws_backend()
    port = await start(
        nursery,
        {
            "routes": [
                {"name": "r", "backends": [{"name": "echo", "url": backend.url}]},
            ]
        },
    )
    with trio.fail_after(20):
        await trio.to_thread.run_sync(echo_as, "localhost", port)
        while not any(r.getMessage() == "tunnel closed" for r in caplog.records):
            await trio.sleep(0.01)
    opened = [r for r in caplog.records if r.getMessage() == "tunnel opened"]
    closed = [r for r in caplog.records if r.getMessage() == "tunnel closed"]
    assert len(opened) == len(closed) == 1
    fields = closed[0].fields  # type: ignore[attr-defined]
    assert fields["route"] == "r"
    assert fields["backend"] == "echo"
    assert fields["client"].startswith("127.0.0.1:")
    assert fields["reason"] in ("client_eof", "backend_eof")
    assert fields["bytes_up"] > 0
    assert fields["bytes_down"] > 0
    assert isinstance(fields["duration"], float)
    assert 0 < fields["duration"] < 20
    for formatter in (JsonFormatter(), TextFormatter()):
        line = formatter.format(closed[0])
        assert "tunnel closed" in line
        assert "route" in line
    entry = json.loads(JsonFormatter().format(closed[0]))
    assert entry["event"] == "tunnel closed"
    assert entry["backend"] == "echo"
    assert entry["level"] == "info"
