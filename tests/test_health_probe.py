"""Active health probes over real loopback sockets, and the one runner task on a MockClock.

Probes meet a real ``websockets`` server (plain and TLS), a socket that accepts and never
answers, a closed port, and small trio servers that answer one canned reply (403, 101 with a
wrong accept, garbage, nothing). The runner gets stand-in upstreams (plain dataclasses with the
attributes ``run_health_checks`` reads) and records every ``check_result``.
"""

from __future__ import annotations

import base64
import hashlib
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from tests.conftest import LOOPBACK, WsBackend
from tunnel.certs import write_dev_certificates
from tunnel.config import BackendConfig
from tunnel.net import health_probe
from tunnel.net.health_probe import probe_tcp, probe_websocket, run_health_checks

TEST_SECONDS = 20
"""Bound on every test (virtual seconds on the MockClock tests)."""
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def backend(port: int, scheme: str = "ws", name: str = "") -> BackendConfig:
    return BackendConfig.parse_url(f"{scheme}://{LOOPBACK}:{port}", "test.url", name)


@pytest.fixture
def patient_clock() -> trio.testing.MockClock:
    """Virtual time that jumps only after 50 ms of real idleness, so a loopback connect or
    answer is never overtaken by a jump to a probe's timeout."""
    return trio.testing.MockClock(autojump_threshold=0.05)


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose kernel completes connections (listen backlog) that nobody ever answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        sock.listen(8)
        yield sock.getsockname()[1]


@dataclass
class Canned:
    """A trio server that reads one request head, records it, and sends ``reply``."""

    reply: bytes
    heads: list[bytes] = field(default_factory=list)
    port: int = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                data = await stream.receive_some(4096)
                if not data:
                    return
                head += data
            self.heads.append(head)
            if self.reply:
                await stream.send_all(self.reply.replace(b"{accept}", _accept_of(head)))


def _accept_of(head: bytes) -> bytes:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-key":
            return base64.b64encode(hashlib.sha1(value.strip() + GUID).digest())
    return b""


@pytest.fixture
def canned(nursery: trio.Nursery) -> Callable[[bytes], Awaitable[Canned]]:
    async def start(reply: bytes) -> Canned:
        server = Canned(reply)
        listeners = await nursery.start(partial(trio.serve_tcp, server.handle, 0, host=LOOPBACK))
        server.port = listeners[0].socket.getsockname()[1]
        return server

    return start


SWITCH = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: {accept}\r\n\r\n"
)


# --- probes ------------------------------------------------------------------------------------


async def test_a_websockets_server_is_healthy_and_gets_a_close(
    start_ws_backend: Callable[..., WsBackend],
) -> None:
    server = start_ws_backend()
    with trio.fail_after(TEST_SECONDS):
        assert await probe_websocket(backend(server.port), "/", 5.0, None, "") is None
        assert await probe_tcp(LOOPBACK, server.port, 5.0) is None
        for _ in range(500):  # the server's handler ends when the Close frame arrives
            if server.connections == 1 and server.open_now == 0:
                break
            await trio.sleep(0.01)
    assert server.connections == 1
    assert server.open_now == 0
    headers = server.request_headers[0]
    assert headers["User-Agent"] == "tunnel-health-check"
    assert headers["Host"] == f"{LOOPBACK}:{server.port}"
    assert headers["Sec-WebSocket-Version"] == "13"
    assert len(base64.b64decode(headers["Sec-WebSocket-Key"])) == 16


async def test_the_request_goes_to_the_check_path(
    canned: Callable[[bytes], Awaitable[Canned]],
) -> None:
    server = await canned(SWITCH)
    with trio.fail_after(TEST_SECONDS):
        assert await probe_websocket(backend(server.port), "/health?deep=1", 5.0, None, "") is None
    assert server.heads[0].startswith(b"GET /health?deep=1 HTTP/1.1\r\n")


async def test_keys_are_random(canned: Callable[[bytes], Awaitable[Canned]]) -> None:
    server = await canned(SWITCH)
    with trio.fail_after(TEST_SECONDS):
        for _ in range(2):
            assert await probe_websocket(backend(server.port), "/", 5.0, None, "") is None
    assert _accept_of(server.heads[0]) != _accept_of(server.heads[1])


async def test_a_silent_server_fails_the_websocket_probe_but_passes_tcp(
    silent_port: int, patient_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(TEST_SECONDS):
        start = trio.current_time()
        reason = await probe_websocket(backend(silent_port), "/", 1.0, None, "")
        assert reason == "no answer within 1s"
        assert trio.current_time() - start == pytest.approx(1.0, abs=0.05)
        assert await probe_tcp(LOOPBACK, silent_port, 1.0) is None


async def test_a_closed_port_fails_both(dead_port: int) -> None:
    with trio.fail_after(TEST_SECONDS):
        assert await probe_websocket(backend(dead_port), "/", 5.0, None, "") == "connection refused"
        assert await probe_tcp(LOOPBACK, dead_port, 5.0) == "connection refused"


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n", "answered 403 instead of 101"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", "answered 200 instead of 101"),
        (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 503 Service Unavailable\r\n"
            b"Content-Length: 0\r\n\r\n",
            "answered 503 instead of 101",
        ),
        (SWITCH.replace(b"{accept}", b"d3Jvbmc="), "bad Sec-WebSocket-Accept"),
        (SWITCH.replace(b"Sec-WebSocket-Accept: {accept}\r\n", b""), "bad Sec-WebSocket-Accept"),
        (
            SWITCH.replace(b"Upgrade: websocket", b"Upgrade: h2c"),
            "backend switched to Upgrade h2c, not websocket",
        ),
        (b"", "closed the connection without answering"),
        (b"HTTP/1.1 101 Switching", "closed the connection mid-answer"),
    ],
)
async def test_a_wrong_answer_is_the_reason(
    canned: Callable[[bytes], Awaitable[Canned]], reply: bytes, reason: str
) -> None:
    server = await canned(reply)
    with trio.fail_after(TEST_SECONDS):
        assert await probe_websocket(backend(server.port), "/", 5.0, None, "") == reason


async def test_garbage_is_not_http(canned: Callable[[bytes], Awaitable[Canned]]) -> None:
    server = await canned(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
    with trio.fail_after(TEST_SECONDS):
        reason = await probe_websocket(backend(server.port), "/", 5.0, None, "")
    assert reason is not None
    assert reason.startswith("answered with something other than HTTP")


async def test_an_endless_head_is_bounded(canned: Callable[[bytes], Awaitable[Canned]]) -> None:
    server = await canned(b"HTTP/1.1 101 Switching Protocols\r\nX: " + b"a" * 100_000)
    with trio.fail_after(TEST_SECONDS):
        reason = await probe_websocket(backend(server.port), "/", 5.0, None, "")
    assert reason is not None
    assert "16384" in reason or "other than HTTP" in reason


@pytest.fixture
def wss_server(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A ``websockets`` TLS server with a development certificate for 127.0.0.1 and
    localhost: its port and its CA file."""
    import threading

    import websockets.sync.server

    paths = write_dev_certificates(tmp_path / "certs", [LOOPBACK, "localhost"])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(paths.cert, paths.key)

    def handler(connection: websockets.sync.server.ServerConnection) -> None:
        for _ in connection:
            pass

    server = websockets.sync.server.serve(handler, LOOPBACK, 0, ssl=context, ping_interval=None)
    thread = threading.Thread(target=server.serve_forever, name="wss-health-backend")
    thread.start()
    try:
        yield server.socket.getsockname()[1], paths.ca_cert
    finally:
        server.shutdown()
        thread.join(10)
        assert not thread.is_alive()


async def test_a_wss_backend_is_probed_over_tls(wss_server: tuple[int, Path]) -> None:
    port, ca = wss_server
    trusting = ssl.create_default_context(cafile=str(ca))
    with trio.fail_after(TEST_SECONDS):
        assert await probe_websocket(backend(port, "wss"), "/", 5.0, trusting, "") is None
        assert await probe_websocket(backend(port, "wss"), "/", 5.0, trusting, "localhost") is None
        wrong_name = await probe_websocket(
            backend(port, "wss"), "/", 5.0, trusting, "elsewhere.example"
        )
        untrusted = await probe_websocket(backend(port, "wss"), "/", 5.0, None, "")
    assert wrong_name is not None
    assert wrong_name.startswith("TLS failed: certificate verify failed")
    assert untrusted is not None
    assert untrusted.startswith("TLS failed: certificate verify failed")


# --- the runner --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Health:
    kind: str = "tcp"
    path: str = "/"
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3


@dataclass(frozen=True)
class Tls:
    server_name: str = ""


@dataclass(frozen=True)
class Route:
    name: str
    backends: tuple[Any, ...]
    health: Health = Health()
    backend_tls: Tls = Tls()


@dataclass
class FakeUpstream:
    route: Route
    tls: ssl.SSLContext | None = None
    results: list[tuple[str, bool, str, float]] = field(default_factory=list)
    explode_on: str = ""

    def check_result(self, name: str, ok: bool, detail: str, now: float) -> None:
        self.results.append((name, ok, detail, now))
        if name == self.explode_on:
            raise RuntimeError("state machine bug")

    def times(self, name: str) -> list[float]:
        return [now for who, _, _, now in self.results if who == name]


@dataclass(frozen=True)
class Broken:
    """A backend the probe code cannot even start on (a bug, not a sick backend)."""

    name: str = "broken"
    host: str = LOOPBACK
    port: Any = None
    url: str = "ws://broken"
    scheme: str = "ws"
    path: str = ""


async def run_for(seconds: float, upstreams: Callable[[], list[Any]]) -> float:
    """Run the checks for ``seconds`` of virtual time; when they started."""
    with trio.fail_after(TEST_SECONDS * 10):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_health_checks, upstreams)
            start = trio.current_time()
            await trio.sleep(seconds)
            nursery.cancel_scope.cancel()
    return start


async def test_checks_run_at_once_then_every_interval(
    silent_port: int, dead_port: int, patient_clock: trio.testing.MockClock
) -> None:
    upstream = FakeUpstream(
        Route("chat", (backend(silent_port, name="up"), backend(dead_port, name="down")))
    )
    start = await run_for(5.5, lambda: [upstream])
    for name in ("up", "down"):
        times = upstream.times(name)
        assert [round(t - start, 1) for t in times] == [0.0, 2.0, 4.0]
    assert {(n, ok, d) for n, ok, d, _ in upstream.results} == {
        ("up", True, ""),
        ("down", False, "connection refused"),
    }


async def test_a_slow_check_is_bounded_by_its_timeout(
    silent_port: int, patient_clock: trio.testing.MockClock
) -> None:
    health = Health(kind="websocket", interval=3.0, timeout=0.5)
    upstream = FakeUpstream(Route("chat", (backend(silent_port, name="a"),), health))
    start = await run_for(4.0, lambda: [upstream])
    assert [(ok, detail) for _, ok, detail, _ in upstream.results] == [
        (False, "no answer within 500ms")
    ] * 2
    assert [round(t - start, 2) for t in upstream.times("a")] == [0.5, 3.5]


async def test_routes_without_checks_are_left_alone(
    silent_port: int, patient_clock: trio.testing.MockClock
) -> None:
    off = FakeUpstream(Route("off", (backend(silent_port),), Health(kind="none")))
    await run_for(5.0, lambda: [off])
    assert off.results == []


async def test_one_failing_probe_does_not_stop_the_others(
    silent_port: int,
    patient_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    upstream = FakeUpstream(
        Route(
            "chat",
            (Broken(), backend(silent_port, name="ok"), backend(silent_port, name="boom")),
        ),
        explode_on="boom",
    )
    await run_for(4.5, lambda: [upstream])
    assert upstream.times("broken") == []  # a probe bug reports nothing rather than "down"
    assert len(upstream.times("ok")) == 3
    assert len(upstream.times("boom")) == 3  # its check_result raised every time
    messages = [record.getMessage() for record in caplog.records]
    assert messages.count("health probe failed") == 3
    assert messages.count("recording a health check failed") == 3


async def test_a_reload_of_the_upstreams_is_picked_up(
    silent_port: int, patient_clock: trio.testing.MockClock
) -> None:
    first = FakeUpstream(Route("old", (backend(silent_port, name="a"),)))
    second = FakeUpstream(Route("new", (backend(silent_port, name="b"),), Health(interval=10.0)))
    current = [first]

    async def swap_later() -> None:
        await trio.sleep(3.5)
        current[:] = [second]

    with trio.fail_after(TEST_SECONDS * 10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(swap_later)
            start = await run_for(8.0, lambda: list(current))
    assert [round(t - start, 1) for t in first.times("a")] == [0.0, 2.0]
    (picked_up,) = second.times("b")
    assert 3.5 <= picked_up - start <= 3.5 + health_probe.MAX_WAKE_SECONDS


async def test_a_reload_that_keeps_a_check_keeps_its_schedule(
    silent_port: int, patient_clock: trio.testing.MockClock
) -> None:
    """A new upstream object with the same route, backend and check is the same schedule."""
    route = Route("chat", (backend(silent_port, name="a"),), Health(interval=3.0))
    first, second = FakeUpstream(route), FakeUpstream(route)
    current = [first]

    async def swap_later() -> None:
        await trio.sleep(1.0)
        current[:] = [second]

    with trio.fail_after(TEST_SECONDS * 10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(swap_later)
            start = await run_for(4.0, lambda: list(current))
    assert [round(t - start, 1) for t in first.times("a")] == [0.0]
    assert [round(t - start, 1) for t in second.times("a")] == [3.0]
