"""The admin listener over real loopback sockets: every endpoint, status and content type, the
bounds on one connection, and that a bad client or a failing source never stops the server.

``serve_admin`` runs in the test's nursery on 127.0.0.1 port 0 in front of ``FakeSource``, plain
Python data that a test changes between requests. Clients are trio streams speaking HTTP/1.1
through an h11 client connection, or raw bytes where the request is meant to be broken.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import h11
import pytest
import trio
import trio.testing

from tunnel.errors import ConfigError
from tunnel.net import admin
from tunnel.net.admin import AdminSource, open_admin_listener, serve_admin
from tunnel.net.listener import ListenError

LOOPBACK = "127.0.0.1"
EXCHANGE_SECONDS = 10
"""Bound on every exchange with the server (``trio.fail_after``), so no test can hang."""
MAX_RESPONSE_BYTES = 1 << 20
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
METRICS = b'# TYPE tunnel_open_tunnels gauge\ntunnel_open_tunnels{route="chat"} 1.0\n\xff raw\n'


def sample_stats() -> dict[str, Any]:
    return {
        "version": "0.1.0",
        "uptime": 12.3,
        "healthy": True,
        "listeners": [{"address": "127.0.0.1:8080", "tls": False, "redirect_https": False}],
        "routes": [
            {
                "name": "chat",
                "hosts": ["chat.example.com"],
                "path_prefix": "/",
                "open_tunnels": 1,
                "backends": [
                    {
                        "name": "a",
                        "url": "ws://127.0.0.1:9000",
                        "state": "up",
                        "open_tunnels": 1,
                        "tunnels_total": 5,
                        "bytes_up": 1000,
                        "bytes_down": 2000,
                    }
                ],
            }
        ],
        "tunnels": [
            {
                "id": "17",
                "client": "127.0.0.1:5555",
                "route": "chat",
                "backend": "a",
                "age": 1.2,
                "idle": 0.1,
                "bytes_up": 10,
                "bytes_down": 20,
            }
        ],
    }


@dataclass
class FakeSource:
    """An ``AdminSource`` made of plain data; ``failing`` makes every call raise."""

    is_healthy: bool = True
    document: dict[str, Any] = field(default_factory=sample_stats)
    metrics_body: bytes = METRICS
    open_ids: set[str] = field(default_factory=lambda: {"17", "2-17"})
    closed: list[str] = field(default_factory=list)
    backends: dict[tuple[str, str], int] = field(
        default_factory=lambda: {("chat", "a"): 1, ("chat", "127.0.0.1:9001"): 0}
    )
    """Open tunnels of each (route, backend) that ``drain_backend``/``enable_backend`` know."""
    changed: list[tuple[str, str, str]] = field(default_factory=list)
    """Every (action, route, backend) asked for, known or not."""
    failing: Exception | None = None

    def _check(self) -> None:
        if self.failing is not None:
            raise self.failing

    async def healthy(self) -> bool:
        self._check()
        return self.is_healthy

    async def stats(self) -> dict[str, Any]:
        self._check()
        return self.document

    async def metrics(self) -> tuple[bytes, str]:
        self._check()
        return self.metrics_body, METRICS_TYPE

    async def close_tunnel(self, tunnel_id: str) -> bool:
        self._check()
        self.closed.append(tunnel_id)
        if tunnel_id in self.open_ids:
            self.open_ids.remove(tunnel_id)
            return True
        return False

    async def drain_backend(self, route: str, backend: str) -> dict[str, Any] | None:
        return self._change("drain", route, backend, "draining")

    async def enable_backend(self, route: str, backend: str) -> dict[str, Any] | None:
        return self._change("enable", route, backend, "up")

    def _change(self, action: str, route: str, backend: str, state: str) -> dict[str, Any] | None:
        self._check()
        self.changed.append((action, route, backend))
        if (route, backend) not in self.backends:
            return None
        open_tunnels = self.backends[route, backend]
        return {"route": route, "backend": backend, "state": state, "open_tunnels": open_tunnels}


async def test_fake_source_is_an_admin_source() -> None:
    source: AdminSource = FakeSource()  # mypy checks the Protocol; this checks it at run time
    assert await source.healthy()


@dataclass
class Admin:
    source: FakeSource
    port: int


@pytest.fixture
async def server(nursery: trio.Nursery) -> Admin:
    source = FakeSource()
    listener = await open_admin_listener(f"{LOOPBACK}:0")
    nursery.start_soon(serve_admin, listener, source)
    return Admin(source, listener.socket.getsockname()[1])


# --- clients ---------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        assert self.headers["content-type"] == "application/json"
        return json.loads(self.body)


class Client:
    """One keep-alive HTTP/1.1 connection to the admin listener."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)

    async def request(
        self, method: str, target: str, headers: list[tuple[str, str]] | None = None
    ) -> Answer:
        if self.h11.our_state is h11.DONE:
            self.h11.start_next_cycle()
        named = any(name.lower() == "host" for name, _ in headers or [])
        fields = [*([] if named else [("Host", "localhost")]), *(headers or [])]
        data = self.h11.send(h11.Request(method=method, target=target, headers=fields))
        data = (data or b"") + (self.h11.send(h11.EndOfMessage()) or b"")
        with trio.fail_after(EXCHANGE_SECONDS):
            await self.stream.send_all(data)
            return await self._read()

    async def _read(self) -> Answer:
        response: h11.Response | None = None
        body = b""
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                self.h11.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
                assert len(body) < MAX_RESPONSE_BYTES
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise AssertionError(f"unexpected {event!r}")
        assert response is not None
        headers = {k.decode(): v.decode() for k, v in response.headers}
        return Answer(response.status_code, headers, body)


async def connect(port: int) -> Client:
    return Client(await trio.open_tcp_stream(LOOPBACK, port))


async def call(port: int, method: str, target: str, **options: Any) -> Answer:
    client = await connect(port)
    async with client.stream:
        return await client.request(method, target, **options)


async def raw(port: int, data: bytes) -> bytes:
    """Send ``data``, then read what the server says until it closes."""
    with trio.fail_after(EXCHANGE_SECONDS):
        return await _raw(port, data)


async def _raw(port: int, data: bytes) -> bytes:
    async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
        await stream.send_all(data)
        received = b""
        while chunk := await stream.receive_some(65536):
            received += chunk
            assert len(received) < MAX_RESPONSE_BYTES
        return received


def status_line(response: bytes) -> bytes:
    return response.partition(b"\r\n")[0]


# --- endpoints -------------------------------------------------------------------------------


async def test_healthz_follows_the_source(server: Admin) -> None:
    answer = await call(server.port, "GET", "/healthz")
    assert (answer.status, answer.body) == (200, b"ok\n")
    assert answer.headers["content-type"] == "text/plain; charset=utf-8"
    server.source.is_healthy = False
    answer = await call(server.port, "GET", "/healthz")
    assert (answer.status, answer.body) == (503, b"draining\n")


async def test_head_gets_the_headers_of_get_without_a_body(server: Admin) -> None:
    client = await connect(server.port)
    async with client.stream:
        for target in ("/healthz", "/stats.json", "/stats", "/metrics"):
            get = await client.request("GET", target)
            head = await client.request("HEAD", target)
            assert head.status == 200
            assert head.body == b""
            assert head.headers["content-length"] == str(len(get.body))
            assert head.headers["content-type"] == get.headers["content-type"]


async def test_metrics_are_passed_through_byte_for_byte(server: Admin) -> None:
    answer = await call(server.port, "GET", "/metrics")
    assert answer.status == 200
    assert answer.body == METRICS
    assert answer.headers["content-type"] == METRICS_TYPE


async def test_stats_json_is_the_source_document_and_not_cached(server: Admin) -> None:
    client = await connect(server.port)
    async with client.stream:
        answer = await client.request("GET", "/stats.json")
        assert answer.status == 200
        assert answer.json == sample_stats()
        assert answer.headers["cache-control"] == "no-store"
        server.source.document["tunnels"][0]["bytes_up"] = 12345
        server.source.document["workers"] = 2
        answer = await client.request("GET", "/stats.json?t=1")
        assert answer.json["tunnels"][0]["bytes_up"] == 12345
        assert answer.json["workers"] == 2


async def test_stats_page_is_html_with_a_strict_content_security_policy(server: Admin) -> None:
    answer = await call(server.port, "GET", "/stats")
    assert answer.status == 200
    assert answer.headers["content-type"] == "text/html; charset=utf-8"
    assert answer.body.startswith(b"<!doctype html>")
    policy = answer.headers["content-security-policy"]
    assert "default-src 'none'" in policy
    assert "script-src 'sha256-" in policy
    assert "unsafe-inline" not in policy


async def test_root_redirects_to_the_page(server: Admin) -> None:
    answer = await call(server.port, "GET", "/")
    assert answer.status == 302
    assert answer.headers["location"] == "/stats"


async def test_closing_a_tunnel_asks_the_source(server: Admin) -> None:
    answer = await call(server.port, "POST", "/tunnels/17/close")
    assert (answer.status, answer.json) == (200, {"closed": "17"})
    answer = await call(server.port, "POST", "/tunnels/2-17/close")
    assert (answer.status, answer.json) == (200, {"closed": "2-17"})
    answer = await call(server.port, "POST", "/tunnels/17/close")
    assert (answer.status, answer.json) == (404, {"error": "no open tunnel with id 17"})
    assert server.source.closed == ["17", "2-17", "17"]


@pytest.mark.parametrize(
    "target",
    ["/tunnels/a.b/close", "/tunnels/%31%37/close", "/tunnels//close", "/tunnels/17/close/"],
)
async def test_ids_outside_the_alphabet_are_not_found_and_never_reach_the_source(
    server: Admin, target: str
) -> None:
    answer = await call(server.port, "POST", target)
    assert answer.status == 404
    assert server.source.closed == []


async def test_unknown_paths_are_404(server: Admin) -> None:
    for target in ("/nope", "/stats.json/", "/healthz/x", "/tunnels", "/tunnels/17"):
        answer = await call(server.port, "GET", target)
        assert answer.status == 404, target


@pytest.mark.parametrize(
    ("method", "target", "allow"),
    [
        ("POST", "/healthz", "GET, HEAD"),
        ("DELETE", "/stats.json", "GET, HEAD"),
        ("PUT", "/metrics", "GET, HEAD"),
        ("GET", "/tunnels/17/close", "POST"),
    ],
)
async def test_wrong_method_is_405_with_allow(
    server: Admin, method: str, target: str, allow: str
) -> None:
    answer = await call(server.port, method, target)
    assert answer.status == 405
    assert answer.headers["allow"] == allow
    assert server.source.closed == []


async def test_a_post_from_another_site_is_refused(server: Admin) -> None:
    evil = [("Origin", "http://evil.example")]
    answer = await call(server.port, "POST", "/tunnels/17/close", headers=evil)
    assert answer.status == 403
    assert server.source.closed == []
    same = [("Origin", "http://localhost")]
    answer = await call(server.port, "POST", "/tunnels/17/close", headers=same)
    assert answer.status == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:9901", "admin.test", "a b"])
async def test_a_loopback_listener_refuses_other_host_names_against_dns_rebinding(
    server: Admin, host: str
) -> None:
    """A page of another site whose name now points at 127.0.0.1 sends its own name as Host
    (and as Origin, which passes the cross-site check): it must read and close nothing."""
    for method, target in (("GET", "/stats.json"), ("POST", "/tunnels/17/close")):
        headers = [("Host", host), ("Origin", f"http://{host}")]
        answer = await call(server.port, method, target, headers=headers)
        assert answer.status == 421
        assert b"localhost and IP addresses only" in answer.body
    assert server.source.closed == []


@pytest.mark.parametrize("host", ["localhost", "localhost:9901", "127.0.0.1:9901", "[::1]:9901"])
async def test_a_loopback_listener_answers_to_localhost_and_addresses(
    server: Admin, host: str
) -> None:
    answer = await call(server.port, "GET", "/healthz", headers=[("Host", host)])
    assert answer.status == 200


async def test_a_failing_source_gets_500_and_a_log_line(
    server: Admin, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tunnel")
    server.source.failing = RuntimeError("boom")
    for target in ("/healthz", "/metrics", "/stats.json"):
        answer = await call(server.port, "GET", target)
        assert answer.status == 500
        assert b"boom" not in answer.body
    [record, *_] = [r for r in caplog.records if r.getMessage() == "admin request failed"]
    assert record.fields["path"] == "/healthz"  # type: ignore[attr-defined]
    assert record.fields["error"] == "RuntimeError: boom"  # type: ignore[attr-defined]
    assert record.fields["client"].startswith("127.0.0.1:")  # type: ignore[attr-defined]
    server.source.failing = None
    assert (await call(server.port, "GET", "/healthz")).status == 200


# --- bad clients -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\n\r\n",  # no Host
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64) + b"\r\n\r\n",
        b"POST /tunnels/17/close HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n",
    ],
)
async def test_a_malformed_request_gets_400_and_the_server_goes_on(
    server: Admin, request_bytes: bytes
) -> None:
    response = await raw(server.port, request_bytes)
    assert status_line(response) == b"HTTP/1.1 400 Bad Request"
    assert server.source.closed == []
    assert (await call(server.port, "GET", "/healthz")).status == 200


async def test_a_head_over_8_kib_is_431(server: Admin) -> None:
    padding = "x" * (admin.MAX_HEAD_BYTES + 100)
    response = await raw(
        server.port, f"GET /healthz HTTP/1.1\r\nHost: a\r\nX: {padding}\r\n\r\n".encode()
    )
    assert status_line(response) == b"HTTP/1.1 431 Request Header Fields Too Large"
    small = "x" * (admin.MAX_HEAD_BYTES - 200)
    answer = await call(server.port, "GET", "/healthz", headers=[("X", small)])
    assert answer.status == 200


async def test_a_head_that_never_ends_is_431(server: Admin) -> None:
    endless = b"GET /healthz HTTP/1.1\r\nHost: a\r\nX: " + b"y" * (4 * admin.MAX_HEAD_BYTES)
    response = await raw(server.port, endless)
    assert status_line(response) == b"HTTP/1.1 431 Request Header Fields Too Large"


async def test_a_body_over_the_limit_is_413(server: Admin) -> None:
    size = admin.MAX_BODY_BYTES + 1
    head = f"POST /tunnels/17/close HTTP/1.1\r\nHost: a\r\nContent-Length: {size}\r\n\r\n"
    response = await raw(server.port, head.encode() + b"z" * size)
    assert status_line(response).startswith(b"HTTP/1.1 413 ")
    assert server.source.closed == []


async def test_a_small_body_is_read_and_ignored(server: Admin) -> None:
    head = "POST /tunnels/17/close HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{}"
    head += "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    response = await raw(server.port, head.encode())
    assert response.count(b"HTTP/1.1 200 OK") == 2
    assert server.source.closed == ["17"]


async def test_a_silent_client_is_dropped_after_the_request_timeout(
    server: Admin, autojump_clock: trio.testing.MockClock
) -> None:
    async with await trio.open_tcp_stream(LOOPBACK, server.port) as stream:
        await stream.send_all(b"GET /healthz HTTP/1.1\r\n")  # and never the rest
        start = trio.current_time()
        with trio.fail_after(2 * admin.REQUEST_TIMEOUT_SECONDS):
            assert await stream.receive_some(1024) == b""
        assert trio.current_time() - start == pytest.approx(admin.REQUEST_TIMEOUT_SECONDS)


async def test_a_silent_client_does_not_hold_up_others(server: Admin) -> None:
    async with await trio.open_tcp_stream(LOOPBACK, server.port):
        assert (await call(server.port, "GET", "/healthz")).status == 200


async def test_keep_alive_is_bounded(server: Admin) -> None:
    client = await connect(server.port)
    async with client.stream:
        for number in range(1, admin.MAX_REQUESTS_PER_CONNECTION + 1):
            answer = await client.request("GET", "/healthz")
            assert answer.status == 200
            closing = answer.headers.get("connection") == "close"
            assert closing == (number == admin.MAX_REQUESTS_PER_CONNECTION)
        with trio.fail_after(EXCHANGE_SECONDS):
            assert await client.stream.receive_some(1024) == b""


async def test_client_connection_close_is_honoured(server: Admin) -> None:
    response = await raw(
        server.port, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    assert status_line(response) == b"HTTP/1.1 200 OK"
    assert response.endswith(b"\r\n\r\nok\n")


async def test_the_listener_closes_when_the_server_is_cancelled() -> None:
    listener = await open_admin_listener(f"{LOOPBACK}:0")
    port = listener.socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_admin, listener, FakeSource())
        assert (await call(port, "GET", "/healthz")).status == 200
        nursery.cancel_scope.cancel()
    with pytest.raises(OSError, match="failed"):
        await trio.open_tcp_stream(LOOPBACK, port)


# --- opening the listener --------------------------------------------------------------------


async def test_open_admin_listener_binds_one_socket() -> None:
    async with await open_admin_listener("localhost:0") as listener:
        host = listener.socket.getsockname()[0]
        assert host in {"127.0.0.1", "::1"}


async def test_open_admin_listener_names_what_is_wrong() -> None:
    with pytest.raises(ConfigError, match=r"admin\.listen"):
        await open_admin_listener("not an address")
    async with await open_admin_listener(f"{LOOPBACK}:0") as taken:
        port = taken.socket.getsockname()[1]
        with pytest.raises(ListenError, match=f"cannot listen on 127.0.0.1:{port}"):
            await open_admin_listener(f"{LOOPBACK}:{port}")
