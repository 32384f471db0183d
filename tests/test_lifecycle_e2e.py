"""Lifecycle end to end: graceful stop, reloads, lifetimes and polite closes, with real sockets.

As a subprocess (``python -m tunnel run --config FILE``, the way operators run it): SIGTERM
drains an open tunnel and exits 0 as soon as it ends, a second SIGTERM ends it at once; a
tunnel that never ends gets Close 1001 ``shutdown`` on both sides; SIGHUP and ``POST /reload``
apply a rewritten file (a removed route's tunnel drains with reason ``drain``, a kept one never
notices; a listener kept across the reload never refuses a connection) or, for a broken file,
log one error and change nothing.

In process (``serve`` with a ``Control``, faster): ``max_lifetime`` and ``idle_timeout`` closes
seen by a real ``websockets`` client; an admin close in the middle of a 16 MiB frame, either
way, arrives after that frame, whose bytes are intact; ``/stats.json`` across a reload.

Every port is loopback. Tunnel and admin ports are 0 and read from the ``listening`` log lines,
except where a reload must name a listener (then ``free_port``). Each subprocess is stopped by
the ``trio.Process`` this test started (SIGKILL in ``finally`` if it still runs), never by name.
Wall-clock bounds are generous: a loaded two-core machine is slow, not broken.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import ExitStack, asynccontextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import websockets.sync.client
from conftest import Tunnel, WsBackend
from rawhttp import (
    LOOPBACK,
    header,
    read_head,
    serve_loopback,
    status_of,
    switching,
    upgrade_request,
)
from test_admin import Answer, call
from websockets.exceptions import ConnectionClosed

from tunnel import Config, Control, serve
from tunnel.logs import LOGGER_NAME

WAIT_SECONDS = 20.0
"""Bound on waiting for anything the tunnel should do; healthy runs take well under a second."""
TEST_SECONDS = 60.0
"""Bound on a whole test (``trio.fail_after``)."""
POLL_SECONDS = 0.02
CLIENT_SECONDS = 10.0
"""``websockets`` client timeouts: opening, one message, the closing handshake."""
KILL_WAIT_SECONDS = 10.0
LISTENING = re.compile(r" info listening address=127\.0\.0\.1:(\d+)")
ADMIN_LISTENING = re.compile(r" info admin listening address=127\.0\.0\.1:(\d+)")
GOING_AWAY = 1001
PROMPT_EXIT_SECONDS = 8.0
"""After the last tunnel ends, the process exits within this ("well before" a 20 s drain)."""
SLACK_BELOW = 0.05
"""Clock reading differences (trio's clock against ``time.monotonic``), not load."""
SLACK_ABOVE = 2.0
"""How late a timed close may come on a loaded machine."""
MAX_GAP_SECONDS = 5.0
"""The longest silence allowed between two echoes of a tunnel that sends every 20-50 ms: generous
for a loaded machine, yet shorter than the 8 s drain a reload that waited for it would show."""

# --- helpers: configuration files, the subprocess, clients ----------------------------------


def free_port() -> int:
    """A loopback port nobody listens on right now (bind to 0, read it, let it go)."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def config_text(
    routes: Sequence[tuple[str, str | None, str]],
    listeners: tuple[str, ...] = (f"{LOOPBACK}:0",),
    admin: str = f"{LOOPBACK}:0",
    **server: str,
) -> str:
    """A config file: an admin listener (by default on a free loopback port), ``listeners``,
    and one route per ``(name, host or None for any host, backend url)``, its backend named
    ``b-<name>``."""
    lines = ["[server]", *(f'{key} = "{value}"' for key, value in server.items())]
    lines += ["[admin]", f'listen = "{admin}"']
    for listen in listeners:
        lines += ["[[listeners]]", f'listen = "{listen}"']
    for name, host, url in routes:
        lines += ["[[routes]]", f'name = "{name}"']
        if host is not None:
            lines.append(f'hosts = ["{host}"]')
        lines.append(f'backends = [{{ name = "b-{name}", url = "{url}" }}]')
    return "\n".join(lines) + "\n"


def error_lines(log: str) -> list[str]:
    """The log lines at level error (``<time> error <message> <fields>``)."""
    return [line for line in log.splitlines() if line.split(" ", 2)[1:2] == ["error"]]


class TunnelRun:
    """The ``tunnel run --config FILE`` this test started: its process and its log."""

    def __init__(self, process: trio.Process, log_path: Path, config_path: Path) -> None:
        self.process = process
        self.log_path = log_path
        self.config_path = config_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_log(self, what: str, ready: Callable[[str], Any]) -> Any:
        """Poll the log (bounded by count and time) until ``ready(log)`` is truthy."""
        with trio.move_on_after(WAIT_SECONDS):
            for _ in range(int(WAIT_SECONDS / POLL_SECONDS) + 1):
                if result := ready(self.log()):
                    return result
                assert self.process.returncode is None, f"exited early:\n{self.log()}"
                await trio.sleep(POLL_SECONDS)
        raise AssertionError(f"gave up waiting for {what}; log:\n{self.log()}")

    def ports(self) -> list[int]:
        """The tunnel listeners' ports, in the order they were logged."""
        return [int(port) for port in LISTENING.findall(self.log())]

    def admin_port(self) -> int:
        match = ADMIN_LISTENING.search(self.log())
        assert match, self.log()
        return int(match[1])

    def send_signal(self, signum: int) -> None:
        self.process.send_signal(signum)  # the PID this test started, nothing else

    async def wait_exit(self, seconds: float) -> int:
        with trio.move_on_after(seconds):
            return await self.process.wait()
        raise AssertionError(f"still running after {seconds} s; log:\n{self.log()}")


@asynccontextmanager
async def tunnel_run(tmp_path: Path, config: str, listeners: int = 1) -> AsyncIterator[TunnelRun]:
    """Run ``tunnel run --config`` with ``config`` until ``listeners`` tunnel listeners and the
    admin listener are logged; kill it on the way out if it still runs."""
    config_path = tmp_path / "tunnel.toml"
    config_path.write_text(config, encoding="utf-8")
    log_path = tmp_path / "tunnel.log"
    with log_path.open("wb") as log:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-P", "-m", "tunnel", "run", "--config", str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    run = TunnelRun(process, log_path, config_path)
    try:
        await run.wait_log(
            "the listeners",
            lambda log: len(LISTENING.findall(log)) >= listeners and ADMIN_LISTENING.search(log),
        )
        yield run
    finally:
        if process.returncode is None:
            process.kill()  # the trio.Process this test started, by its own handle
            with trio.CancelScope(shield=True), trio.move_on_after(KILL_WAIT_SECONDS):
                await process.wait()


def ws_open(port: int, host: str = LOOPBACK, **options: Any) -> Any:
    """A real ``websockets`` client to the tunnel at loopback ``port``, naming ``host`` in the
    URL (and so in the Host header); without compression, so that frame sizes are known."""
    sock = socket.create_connection((LOOPBACK, port), timeout=CLIENT_SECONDS)
    return websockets.sync.client.connect(
        f"ws://{host}:{port}/",
        sock=sock,
        open_timeout=CLIENT_SECONDS,
        close_timeout=CLIENT_SECONDS,
        ping_interval=None,
        compression=None,
        **options,
    )


def ws_echo(ws: Any, message: str | bytes) -> str | bytes:
    ws.send(message)
    reply: str | bytes = ws.recv(timeout=CLIENT_SECONDS)
    return reply


def echo_as(port: int, host: str, message: str = "ping") -> str | bytes:
    """A new connection: one message there and back, then a clean close."""
    with ws_open(port, host) as ws:
        return ws_echo(ws, message)


@dataclass(frozen=True)
class Closed:
    """How a client's connection ended: the Close frame it received, and when."""

    code: int | None
    reason: str | None
    at: float
    """``time.monotonic()`` when the client saw the end."""


def wait_closed(ws: Any, seconds: float) -> Closed:
    """Block until the tunnel ends ``ws`` (no message may arrive first)."""
    try:
        message = ws.recv(timeout=seconds)
    except ConnectionClosed as closed:
        at = time.monotonic()
        received = closed.rcvd
        return Closed(
            None if received is None else received.code,
            None if received is None else received.reason,
            at,
        )
    raise AssertionError(f"a message instead of a close: {message!r:.100}")


class Clients:
    """The ``websockets`` clients of one test, closed at its end whatever happened."""

    def __init__(self) -> None:
        self.stack = ExitStack()

    async def connect(self, port: int, host: str = LOOPBACK, **options: Any) -> Any:
        def enter() -> Any:
            return self.stack.enter_context(ws_open(port, host, **options))

        return await trio.to_thread.run_sync(enter)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(KILL_WAIT_SECONDS):
            await trio.to_thread.run_sync(self.stack.close)


async def in_thread(function: Callable[..., Any], *args: Any) -> Any:
    return await trio.to_thread.run_sync(partial(function, *args))


async def upgrade_status(port: int, host: str) -> int:
    """Send a WebSocket upgrade for ``host`` over a raw socket: the answer's status code."""
    stream = await trio.open_tcp_stream(LOOPBACK, port)
    async with stream:
        await stream.send_all(upgrade_request(host))
        head, _ = await read_head(stream)
    return status_of(head)


async def refused(port: int) -> bool:
    """Whether a connection to ``port`` is refused (nothing listens)."""
    with trio.socket.socket() as sock:
        try:
            await sock.connect((LOOPBACK, port))
        except ConnectionRefusedError:
            return True
    return False


async def refused_soon(port: int) -> None:
    """Poll (bounded) until ``port`` refuses: the log line that announces a listener's close
    is written just before the close."""
    with trio.move_on_after(WAIT_SECONDS):
        for _ in range(int(WAIT_SECONDS / POLL_SECONDS) + 1):
            if await refused(port):
                return
            await trio.sleep(POLL_SECONDS)
    raise AssertionError(f"127.0.0.1:{port} still accepts after {WAIT_SECONDS} s")


async def eventually(what: str, check: Callable[[], Awaitable[Any]]) -> Any:
    """Poll ``check`` (bounded by count and time) until it returns something truthy."""
    with trio.move_on_after(WAIT_SECONDS):
        for _ in range(int(WAIT_SECONDS / POLL_SECONDS) + 1):
            if result := await check():
                return result
            await trio.sleep(POLL_SECONDS)
    raise AssertionError(f"gave up waiting for {what} after {WAIT_SECONDS} s")


# --- helpers: WebSocket frames on the wire, for raw backends --------------------------------


@dataclass(frozen=True)
class Frame:
    fin: bool
    opcode: int
    masked: bool
    payload: bytes
    """Unmasked."""

    @property
    def close_code(self) -> int:
        return int.from_bytes(self.payload[:2], "big")

    @property
    def close_reason(self) -> str:
        return self.payload[2:].decode("utf-8")


TEXT, BINARY, CLOSE = 0x1, 0x2, 0x8


def frame_head(opcode: int, size: int, masked: bool = False) -> bytes:
    """The head of a final frame of ``size`` payload bytes: unmasked (a server's) or masked
    (a client's, its 4-byte key to follow)."""
    first = bytes([0x80 | opcode])
    bit = 0x80 if masked else 0
    if size < 126:
        return first + bytes([bit | size])
    if size < 1 << 16:
        return first + bytes([bit | 126]) + size.to_bytes(2, "big")
    return first + bytes([bit | 127]) + size.to_bytes(8, "big")


def server_frame(opcode: int, payload: bytes) -> bytes:
    return frame_head(opcode, len(payload)) + payload


def mask(payload: bytes, key: bytes) -> bytes:
    """``payload`` XOR the repeated 4-byte ``key`` (RFC 6455 5.3), as one big-integer XOR."""
    size = len(payload)
    if not size:
        return b""
    keys = (key * (size // 4 + 1))[:size]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(keys, "big")).to_bytes(size, "big")


def client_frame(opcode: int, payload: bytes) -> bytes:
    key = os.urandom(4)
    return frame_head(opcode, len(payload), masked=True) + key + mask(payload, key)


def parse_frames(data: bytes) -> tuple[list[Frame], bytes]:
    """Every complete frame in ``data`` (unmasked), and the bytes of an incomplete last one."""
    frames: list[Frame] = []
    at = 0
    while len(data) - at >= 2:
        first, second = data[at], data[at + 1]
        size, offset = second & 0x7F, at + 2
        if size == 126:
            if len(data) < offset + 2:
                break
            size, offset = int.from_bytes(data[offset : offset + 2], "big"), offset + 2
        elif size == 127:
            if len(data) < offset + 8:
                break
            size, offset = int.from_bytes(data[offset : offset + 8], "big"), offset + 8
        masked = bool(second & 0x80)
        key = b""
        if masked:
            if len(data) < offset + 4:
                break
            key, offset = data[offset : offset + 4], offset + 4
        if len(data) < offset + size:
            break
        payload = data[offset : offset + size]
        if masked:
            payload = mask(payload, key)
        frames.append(Frame(bool(first & 0x80), first & 0x0F, masked, payload))
        at = offset + size
    return frames, data[at:]


@dataclass
class Recorded:
    """What a raw backend received after the upgrade request, until the tunnel's EOF."""

    data: bytearray = field(default_factory=bytearray)
    ended: trio.Event = field(default_factory=trio.Event)

    def frames(self) -> list[Frame]:
        frames, rest = parse_frames(bytes(self.data))
        assert rest == b"", f"an incomplete frame at the end: {rest[:50]!r}"
        return frames


async def record_to_eof(stream: trio.SocketStream, recorded: Recorded, reply: bool) -> None:
    """Append what ``stream`` sends to ``recorded`` until EOF (bounded in size); with
    ``reply``, answer the first Close frame with a Close 1001, as a well-behaved server does."""
    replied = False
    try:
        while chunk := await stream.receive_some(65536):
            recorded.data += chunk
            assert len(recorded.data) < 1 << 20, "the tunnel never stopped sending"
            if reply and not replied:
                frames, _ = parse_frames(bytes(recorded.data))
                if any(frame.opcode == CLOSE for frame in frames):
                    replied = True
                    await stream.send_all(server_frame(CLOSE, GOING_AWAY.to_bytes(2, "big")))
    except trio.BrokenResourceError:
        pass  # a reset instead of a FIN: what arrived before it is what is checked
    finally:
        recorded.ended.set()


def assert_masked_close(frame: Frame, reason: str) -> None:
    assert frame.opcode == CLOSE, frame
    assert frame.masked, "a client's frame toward a server must be masked (RFC 6455 5.3)"
    assert (frame.close_code, frame.close_reason) == (GOING_AWAY, reason)


# --- 1. SIGTERM: drain, 503, listeners closed, exit 0 when the last tunnel ends ---------------


async def test_sigterm_keeps_an_open_tunnel_flowing_and_exits_0_once_it_ends(
    tmp_path: Path, echo_backend: WsBackend
) -> None:
    config = config_text([("echo", None, echo_backend.url)], drain_timeout="20s")
    clients = Clients()
    with trio.fail_after(TEST_SECONDS):
        async with tunnel_run(tmp_path, config) as tunnel:
            try:
                [port], admin = tunnel.ports(), tunnel.admin_port()
                ws = await clients.connect(port)
                before = await in_thread(ws_echo, ws, "before the stop")
                serving = await call(admin, "GET", "/healthz")

                tunnel.send_signal(signal.SIGTERM)
                await tunnel.wait_log("the drain", lambda log: "open tunnels drain" in log)
                draining = await call(admin, "GET", "/healthz")
                during = await in_thread(ws_echo, ws, "during the drain")
                await refused_soon(port)
                upgrade_refused = await in_thread(upgrade_error, port)
                still_running = tunnel.process.returncode is None
                during_again = await in_thread(ws_echo, ws, b"\x00binary during the drain")

                client_closed_at = time.monotonic()
                await in_thread(ws.close)
                returncode = await tunnel.wait_exit(WAIT_SECONDS)
                exit_seconds = time.monotonic() - client_closed_at
            finally:
                await clients.aclose()
    log = tunnel.log()
    assert before == "before the stop"
    assert (serving.status, serving.body) == (200, b"ok\n")
    assert (draining.status, draining.body) == (503, b"draining\n")
    assert during == "during the drain"
    assert during_again == b"\x00binary during the drain"
    assert upgrade_refused in ("ConnectionRefusedError", "ConnectionResetError")
    assert still_running, "the tunnel's process waits for its open tunnel"
    assert returncode == 0, log
    assert exit_seconds < PROMPT_EXIT_SECONDS, f"exited {exit_seconds:.1f} s after the close"
    assert "info stopping signal=SIGTERM" in log
    assert "info stopped tunnels_left=0 drained=True" in log
    assert "Traceback" not in log


def upgrade_error(port: int) -> str:
    """A real ``websockets`` client tries to connect: the name of the error it gets."""
    try:
        with ws_open(port):
            pass
    except OSError as error:
        return type(error).__name__
    raise AssertionError("a new upgrade succeeded after SIGTERM")


async def test_a_second_sigterm_closes_every_tunnel_at_once(
    tmp_path: Path, echo_backend: WsBackend
) -> None:
    config = config_text([("echo", None, echo_backend.url)], drain_timeout="20s")
    clients = Clients()
    with trio.fail_after(TEST_SECONDS):
        async with tunnel_run(tmp_path, config) as tunnel:
            try:
                [port] = tunnel.ports()
                ws = await clients.connect(port)
                tunnel.send_signal(signal.SIGTERM)
                await tunnel.wait_log("the drain", lambda log: "open tunnels drain" in log)
                during = await in_thread(ws_echo, ws, "during the drain")

                second_at = time.monotonic()
                tunnel.send_signal(signal.SIGTERM)
                closed = await in_thread(wait_closed, ws, WAIT_SECONDS)
                returncode = await tunnel.wait_exit(WAIT_SECONDS)
                exit_seconds = time.monotonic() - second_at
            finally:
                await clients.aclose()
    log = tunnel.log()
    assert during == "during the drain"
    assert closed.at - second_at < PROMPT_EXIT_SECONDS, "closed at once, not after the drain"
    assert returncode == 0, log
    assert exit_seconds < PROMPT_EXIT_SECONDS, f"exited {exit_seconds:.1f} s after the second"
    assert "second stop signal; closing every tunnel now signal=SIGTERM" in log
    assert re.search(r" tunnel closed .*reason=shutdown", log), log


# --- 2. a tunnel that never ends: Close 1001 "shutdown" both ways within drain_timeout --------


async def test_sigterm_closes_a_tunnel_that_never_ends_politely_on_both_sides(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    recorded = Recorded()

    async def backend(stream: trio.SocketStream) -> None:
        async with stream:
            head, rest = await read_head(stream)
            recorded.data += rest
            welcome = server_frame(TEXT, b"welcome")
            await stream.send_all(switching(header(head, "Sec-WebSocket-Key")) + welcome)
            await record_to_eof(stream, recorded, reply=False)

    backend_port = await serve_loopback(nursery, backend)
    drain = 3.0
    config = config_text([("raw", None, f"ws://{LOOPBACK}:{backend_port}")], drain_timeout="3s")
    clients = Clients()
    with trio.fail_after(TEST_SECONDS):
        async with tunnel_run(tmp_path, config) as tunnel:
            try:
                [port] = tunnel.ports()
                ws = await clients.connect(port)
                welcome = await in_thread(ws.recv, CLIENT_SECONDS)
                await in_thread(ws.send, "hello")
                # The backend has the client's message before the stop begins.
                await eventually("the client's message", _has_frames(recorded, 1))

                stopped_at = time.monotonic()
                tunnel.send_signal(signal.SIGTERM)
                closed = await in_thread(wait_closed, ws, drain + WAIT_SECONDS)
                returncode = await tunnel.wait_exit(drain + WAIT_SECONDS)
                exit_seconds = time.monotonic() - stopped_at
                with trio.fail_after(WAIT_SECONDS):
                    await recorded.ended.wait()
            finally:
                await clients.aclose()
    log = tunnel.log()
    assert welcome == "welcome"
    assert (closed.code, closed.reason) == (GOING_AWAY, "shutdown")
    # Two thirds of the window undisturbed, but the last close leaves two close_grace (1 s
    # each) before the end: with 3 s, the close comes 1 s after the signal.
    assert 1.0 - SLACK_BELOW <= closed.at - stopped_at < drain + 1, closed.at - stopped_at
    frames = recorded.frames()
    assert [f.opcode for f in frames] == [TEXT, CLOSE], frames
    assert frames[0].masked
    assert frames[0].payload == b"hello"
    assert_masked_close(frames[1], "shutdown")
    assert returncode == 0, log
    assert exit_seconds < drain + 3, f"exited {exit_seconds:.1f} s after SIGTERM"
    assert re.search(r" tunnel closed .*reason=shutdown", log), log
    assert "Traceback" not in log


def _has_frames(recorded: Recorded, count: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        frames, _ = parse_frames(bytes(recorded.data))
        return len(frames) >= count

    return check


# --- 3. SIGHUP removes a route: the kept tunnel never notices, the removed one drains ---------


def chatter(ws: Any, stop: threading.Event, arrivals: list[float], limit: int = 1500) -> None:
    """Send a message every 20-50 ms and read its echo, until ``stop`` (at most ``limit``
    messages); append when each echo arrived (``time.monotonic()``) to ``arrivals`` as it
    arrives, so the test can wait for echoes before and after the reload."""
    pace = random.Random(11)
    for i in range(limit):
        if stop.is_set():
            break
        message = f"message {i}"
        ws.send(message)
        assert ws.recv(timeout=CLIENT_SECONDS) == message
        arrivals.append(time.monotonic())
        time.sleep(pace.uniform(0.02, 0.05))


async def wait_for_arrival(arrivals: list[float], after: float) -> None:
    """Wait (at most ``WAIT_SECONDS``) for an echo that arrived later than ``after``."""
    with trio.fail_after(WAIT_SECONDS):
        while not arrivals or arrivals[-1] <= after:
            await trio.sleep(POLL_SECONDS)


async def test_sighup_removing_a_route_drains_its_tunnel_and_leaves_the_other_alone(
    tmp_path: Path, start_ws_backend: Callable[..., WsBackend]
) -> None:
    kept_backend, gone_backend = start_ws_backend(), start_ws_backend()
    drain = 8.0  # longer than MAX_GAP_SECONDS: a reload that waited for the drain would show
    routes = [("keep", "keep.test", kept_backend.url), ("gone", "gone.test", gone_backend.url)]
    config = config_text(routes, drain_timeout="8s")
    clients = Clients()
    stop = threading.Event()
    arrivals: list[float] = []

    async def keep_talking(ws: Any) -> None:
        await trio.to_thread.run_sync(chatter, ws, stop, arrivals)

    with trio.fail_after(TEST_SECONDS):
        async with tunnel_run(tmp_path, config) as tunnel:
            try:
                [port] = tunnel.ports()
                kept = await clients.connect(port, "keep.test")
                gone = await clients.connect(port, "gone.test")
                assert await in_thread(ws_echo, gone, "before") == "before"
                async with trio.open_nursery() as talking:
                    talking.start_soon(keep_talking, kept)
                    await wait_for_arrival(arrivals, after=0.0)

                    tunnel.config_path.write_text(config_text(routes[:1], drain_timeout="8s"))
                    reloaded_at = time.monotonic()
                    tunnel.send_signal(signal.SIGHUP)
                    closed = await in_thread(wait_closed, gone, drain + WAIT_SECONDS)
                    await tunnel.wait_log("the reload", lambda log: "configuration reloaded" in log)
                    gone_status = await upgrade_status(port, "gone.test")
                    new_kept = await in_thread(echo_as, port, "keep.test", "a new one")
                    await wait_for_arrival(arrivals, after=closed.at)
                    stop.set()
                kept_after = await in_thread(ws_echo, kept, "after")
                await clients.aclose()
                tunnel.send_signal(signal.SIGTERM)
                returncode = await tunnel.wait_exit(WAIT_SECONDS)
            finally:
                stop.set()
                await clients.aclose()
    log = tunnel.log()
    assert (closed.code, closed.reason) == (GOING_AWAY, "drain")
    assert closed.at - reloaded_at < drain + 2, f"closed {closed.at - reloaded_at:.1f} s after"
    assert gone_status == 404
    assert new_kept == "a new one"
    assert kept_after == "after"
    assert arrivals[0] < reloaded_at < closed.at < arrivals[-1], "the chatter spans the reload"
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert max(gaps) < MAX_GAP_SECONDS, f"a {max(gaps):.2f} s gap in {len(arrivals)} echoes"
    assert re.search(r" configuration reloaded .*routes_removed=gone .*tunnels_draining=1", log)
    assert re.search(r" tunnel closed .*route=gone .*reason=drain", log), log
    assert not re.search(r" tunnel closed .*route=keep .*reason=drain", log)
    assert returncode == 0, log


# --- 4. a broken file: one error line, nothing changes; POST /reload 400 then 200 -------------


async def test_a_broken_file_is_refused_with_one_error_line_and_the_old_routes_stay(
    tmp_path: Path, echo_backend: WsBackend
) -> None:
    url = echo_backend.url
    good = [("one", "one.test", url), ("two", "two.test", url)]
    # Without route "two" and with a bad duration: applied in part, "two" would be gone.
    broken = config_text(good[:1], idle_timeout="banana")
    clients = Clients()
    with trio.fail_after(TEST_SECONDS):
        async with tunnel_run(tmp_path, config_text(good)) as tunnel:
            try:
                [port], admin = tunnel.ports(), tunnel.admin_port()
                open_before = await clients.connect(port, "two.test")
                tunnel.config_path.write_text(broken)
                tunnel.send_signal(signal.SIGHUP)
                await tunnel.wait_log("the refusal", lambda log: "not reloaded" in log)
                after_sighup = [
                    await in_thread(echo_as, port, "one.test", "one"),
                    await in_thread(echo_as, port, "two.test", "two"),
                    await in_thread(ws_echo, open_before, "still open"),
                ]
                errors_after_sighup = error_lines(tunnel.log())

                refused_reload = await call(admin, "POST", "/reload")
                after_post = [
                    await in_thread(echo_as, port, "one.test", "one"),
                    await in_thread(echo_as, port, "two.test", "two"),
                ]
                errors_after_post = error_lines(tunnel.log())

                three = [("one", "one.test", url), ("three", "three.test", url)]
                tunnel.config_path.write_text(config_text(three))
                applied = await call(admin, "POST", "/reload")
                after_good = [
                    await in_thread(echo_as, port, "one.test", "one"),
                    await in_thread(echo_as, port, "three.test", "three"),
                ]
                two_status = await upgrade_status(port, "two.test")
                healthz = await call(admin, "GET", "/healthz")

                # A key a running process cannot change: refused whole, naming the key.
                moved = config_text(three[:1], admin=f"{LOOPBACK}:{free_port()}")
                tunnel.config_path.write_text(moved)
                restart_needed = await call(admin, "POST", "/reload")
                after_restart_needed = await in_thread(echo_as, port, "three.test", "three")
                running = tunnel.process.returncode is None
            finally:
                await clients.aclose()
    file = str(tunnel.config_path)
    [line] = errors_after_sighup
    assert "configuration not reloaded; the running one stays error=" in line
    assert f"{file}: server.idle_timeout: 'banana' is not a duration" in line
    assert after_sighup == ["one", "two", "still open"]

    assert refused_reload.status == 400
    assert (
        f"{file}: server.idle_timeout: 'banana' is not a duration" in refused_reload.json["error"]
    )
    assert after_post == ["one", "two"]
    assert len(errors_after_post) == 2, errors_after_post
    assert "server.idle_timeout" in errors_after_post[1]

    assert applied.status == 200, applied
    assert applied.json == {
        "reloaded": True,
        "routes_added": ["three"],
        "routes_removed": ["two"],
        "draining": 1,  # open_before, on route "two" since before the refused reloads
    }
    assert after_good == ["one", "three"]
    assert two_status == 404
    assert (healthz.status, healthz.body) == (200, b"ok\n")

    assert restart_needed.status == 400
    assert "admin.listen: changing it needs a restart" in restart_needed.json["error"]
    assert after_restart_needed == "three"
    assert running
    assert len(error_lines(tunnel.log())) == 3


# --- 5. listeners across a reload: new one opens, removed one closes, kept one never refuses ---


def knock(
    port: int, started: threading.Event, stop: threading.Event, spacing: float, limit: int = 3000
) -> tuple[list[str], float, float]:
    """Connections to ``port``, one every ``spacing`` seconds, each a plain request that must
    get an HTTP answer, from before ``started`` is set until a few after ``stop`` is (at most
    ``limit``); return the failures, the first and last instant."""
    failures: list[str] = []
    first = time.monotonic()
    after_stop = 5
    for i in range(limit):
        if stop.is_set():
            after_stop -= 1
            if after_stop < 0:
                break
        try:
            with socket.create_connection((LOOPBACK, port), timeout=CLIENT_SECONDS) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                answer = sock.recv(64)
            if not answer.startswith(b"HTTP/1.1 "):
                failures.append(f"attempt {i}: {answer!r}")
        except OSError as error:
            failures.append(f"attempt {i}: {error!r}")
        started.set()
        time.sleep(spacing)
    return failures, first, time.monotonic()


async def test_a_reload_opens_new_listeners_closes_removed_ones_and_keeps_the_others(
    tmp_path: Path, echo_backend: WsBackend
) -> None:
    kept, removed, added = (f"{LOOPBACK}:{free_port()}" for _ in range(3))
    kept_port, removed_port, added_port = (
        int(a.rpartition(":")[2]) for a in (kept, removed, added)
    )
    assert len({kept_port, removed_port, added_port}) == 3
    routes = [("echo", None, echo_backend.url)]
    outcome: list[tuple[list[str], float, float]] = []
    started, stop = threading.Event(), threading.Event()

    async def knocking() -> None:
        outcome.append(await trio.to_thread.run_sync(knock, kept_port, started, stop, 0.01))

    with trio.fail_after(TEST_SECONDS):
        async with tunnel_run(tmp_path, config_text(routes, (kept, removed)), 2) as tunnel:
            before = [
                await in_thread(echo_as, kept_port, "localhost", "kept"),
                await in_thread(echo_as, removed_port, "localhost", "removed"),
            ]
            added_refused_before = await refused(added_port)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(knocking)
                    with trio.fail_after(WAIT_SECONDS):
                        while not started.is_set():
                            await trio.sleep(POLL_SECONDS)
                    tunnel.config_path.write_text(config_text(routes, (kept, added)))
                    tunnel.send_signal(signal.SIGHUP)
                    await tunnel.wait_log("the reload", lambda log: "configuration reloaded" in log)
                    reloaded_at = time.monotonic()
                    stop.set()
            finally:
                stop.set()
            after = [
                await in_thread(echo_as, kept_port, "localhost", "kept"),
                await in_thread(echo_as, added_port, "localhost", "added"),
            ]
            removed_refused = await refused(removed_port)
            tunnel.send_signal(signal.SIGTERM)
            returncode = await tunnel.wait_exit(WAIT_SECONDS)
    log = tunnel.log()
    [(failures, first, last)] = outcome
    assert before == ["kept", "removed"]
    assert added_refused_before
    assert failures == []
    assert first < reloaded_at < last, "the reload happened while the clients connected"
    assert after == ["kept", "added"]
    assert removed_refused
    assert f"listener closed by a reload address={removed}" in log
    assert f"info listening address={added} " in log
    assert log.count(f"info listening address={kept} ") == 1, "the kept socket was not reopened"
    assert re.search(r" configuration reloaded .*listeners_opened=1 listeners_closed=1", log), log
    assert returncode == 0, log


# --- 6. max_lifetime and idle_timeout, in process ---------------------------------------------


def lifetime_of(port: int) -> tuple[Closed, float, float]:
    """Open a tunnel and wait for its end without a word: how it ended, and the instants just
    before the client connected and just after the 101 (the tunnel's clock starts between)."""
    connecting = time.monotonic()
    with ws_open(port) as ws:
        opened = time.monotonic()
        return wait_closed(ws, WAIT_SECONDS), connecting, opened


async def test_max_lifetime_closes_each_tunnel_politely_within_its_jittered_window(
    start_tunnel: Callable[..., Awaitable[Tunnel]], echo_backend: WsBackend
) -> None:
    tunnel = await start_tunnel([echo_backend.url], max_lifetime="2s", lifetime_jitter="1s")
    ends: list[tuple[Closed, float, float]] = []

    async def one() -> None:
        ends.append(await trio.to_thread.run_sync(lifetime_of, tunnel.port))

    with trio.fail_after(TEST_SECONDS):
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(one)
    assert len(ends) == 3
    for closed, connecting, opened in ends:
        assert (closed.code, closed.reason) == (GOING_AWAY, "max_lifetime")
        # 2 s ± 1 s, counted from the adoption, which falls between connecting and opened.
        assert closed.at - connecting >= 1.0 - SLACK_BELOW, closed.at - connecting
        assert closed.at - opened <= 3.0 + SLACK_ABOVE, closed.at - opened


def idle_end(port: int) -> tuple[str | bytes, Closed, float, float]:
    """One message there and back, then silence: (the echo, how the tunnel ended, the
    instants just before the message was sent and just after its echo arrived)."""
    with ws_open(port) as ws:
        sent = time.monotonic()
        echoed = ws_echo(ws, "then silence")
        quiet_since = time.monotonic()
        return echoed, wait_closed(ws, WAIT_SECONDS), sent, quiet_since


async def test_idle_timeout_closes_a_silent_tunnel_politely(
    start_tunnel: Callable[..., Awaitable[Tunnel]], echo_backend: WsBackend
) -> None:
    tunnel = await start_tunnel([echo_backend.url], idle_timeout="1s")
    with trio.fail_after(TEST_SECONDS):
        echoed, closed, sent, quiet_since = await in_thread(idle_end, tunnel.port)
    assert echoed == "then silence"
    assert (closed.code, closed.reason) == (GOING_AWAY, "idle_timeout")
    # The tunnel's last activity (the echo passing through) falls between sent and quiet_since.
    assert closed.at - sent >= 1.0 - SLACK_BELOW, closed.at - sent
    assert closed.at - quiet_since <= 1.0 + SLACK_ABOVE, closed.at - quiet_since


# --- in process, with an admin listener -------------------------------------------------------


async def serve_with_admin(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, data: dict[str, Any]
) -> tuple[Control, int, int]:
    """``serve`` ``data`` with an admin listener on a free loopback port: (control, tunnel
    port, admin port as the ``admin listening`` log line gives it)."""
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    data = {
        "admin": {"listen": f"{LOOPBACK}:0"},
        "listeners": [{"listen": f"{LOOPBACK}:0"}],
        **data,
    }
    control = Control()
    listeners = await nursery.start(partial(serve, Config.from_mapping(data), control=control))
    [line] = [r for r in caplog.records if r.getMessage() == "admin listening"]
    admin = int(line.fields["address"].rpartition(":")[2])  # type: ignore[attr-defined]
    return control, listeners[0].socket.getsockname()[1], admin


async def stats(admin: int) -> dict[str, Any]:
    answer: Answer = await call(admin, "GET", "/stats.json")
    assert answer.status == 200, answer
    document: dict[str, Any] = answer.json
    return document


# --- 7. an admin close in the middle of a 16 MiB frame ----------------------------------------

BIG = 16 * 2**20
PIECE = 256 * 1024


async def test_a_close_during_a_16_mib_frame_comes_after_that_frame_intact(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    payload = random.Random(7).randbytes(BIG)
    halfway, resume = trio.Event(), trio.Event()
    recorded = Recorded()

    async def backend(stream: trio.SocketStream) -> None:
        async with stream:
            head, rest = await read_head(stream)
            recorded.data += rest
            await stream.send_all(switching(header(head, "Sec-WebSocket-Key")))
            await stream.send_all(frame_head(BINARY, BIG))
            for start in range(0, BIG, PIECE):
                if start == BIG // 2:
                    halfway.set()
                    await resume.wait()  # the pause, during which the admin close arrives
                await stream.send_all(payload[start : start + PIECE])
            await record_to_eof(stream, recorded, reply=True)

    backend_port = await serve_loopback(nursery, backend)
    route = {"name": "big", "backends": [{"name": "b0", "url": f"ws://{LOOPBACK}:{backend_port}"}]}
    # A generous close_grace: the test is about order and integrity, not the grace's length.
    _, port, admin = await serve_with_admin(
        nursery, caplog, {"server": {"close_grace": "10s"}, "routes": [route]}
    )
    received: list[tuple[str, Closed]] = []

    def client(ws: Any) -> None:
        message = ws.recv(timeout=WAIT_SECONDS)
        assert isinstance(message, bytes)
        received.append((hashlib.sha256(message).hexdigest(), wait_closed(ws, WAIT_SECONDS)))

    clients = Clients()
    try:
        with trio.fail_after(TEST_SECONDS):
            ws = await clients.connect(port, max_size=2 * BIG)
            async with trio.open_nursery() as reading:
                reading.start_soon(in_thread, client, ws)
                await halfway.wait()
                [tunnel] = (await stats(admin))["tunnels"]
                closed = await call(admin, "POST", f"/tunnels/{tunnel['id']}/close")
                await trio.sleep(0.5)
                resume.set()
            await recorded.ended.wait()
    finally:
        await clients.aclose()
    assert (closed.status, closed.json) == (200, {"closed": tunnel["id"]})
    [(digest, end)] = received
    assert digest == hashlib.sha256(payload).hexdigest(), "the frame's bytes are intact"
    assert (end.code, end.reason) == (GOING_AWAY, "admin")
    [close] = recorded.frames()
    assert_masked_close(close, "admin")
    [line] = [r for r in caplog.records if r.getMessage() == "tunnel closed"]
    assert line.fields["reason"] == "admin"  # type: ignore[attr-defined]
    assert line.fields["bytes_down"] > BIG  # type: ignore[attr-defined]


async def test_a_close_during_a_16_mib_frame_from_the_client_reaches_the_backend_after_it(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, echo_backend: WsBackend
) -> None:
    """The other direction: a raw client is sending a 16 MiB frame when the admin close comes;
    the ``websockets`` backend gets the whole message, then the tunnel's Close."""
    payload = random.Random(8).randbytes(BIG)
    key = os.urandom(4)
    frame = frame_head(BINARY, BIG, masked=True) + key + mask(payload, key)
    body = len(frame) - BIG
    route = {"name": "echo", "backends": [{"name": "b0", "url": echo_backend.url}]}
    _, port, admin = await serve_with_admin(
        nursery, caplog, {"server": {"close_grace": "10s"}, "routes": [route]}
    )
    received = bytearray()
    close_seen = trio.Event()

    async def read_until_eof(stream: trio.SocketStream, rest: bytes) -> None:
        received.extend(rest)
        with suppress(trio.BrokenResourceError):
            while chunk := await stream.receive_some(65536):
                received.extend(chunk)
                assert len(received) < 1 << 20, "only a Close was expected"
                if any(f.opcode == CLOSE for f in parse_frames(bytes(received))[0]):
                    close_seen.set()
        close_seen.set()

    with trio.fail_after(TEST_SECONDS):
        stream = await trio.open_tcp_stream(LOOPBACK, port)
        async with stream, trio.open_nursery() as talking:
            await stream.send_all(upgrade_request(f"{LOOPBACK}:{port}"))
            head, rest = await read_head(stream)
            assert status_of(head) == 101, head
            talking.start_soon(read_until_eof, stream, rest)
            await stream.send_all(frame[: body + BIG // 2])
            [tunnel] = (await stats(admin))["tunnels"]
            closed = await call(admin, "POST", f"/tunnels/{tunnel['id']}/close")
            await trio.sleep(0.5)  # the pause: the client is still in its frame
            await stream.send_all(frame[body + BIG // 2 :])
            await close_seen.wait()
            await stream.send_all(client_frame(CLOSE, GOING_AWAY.to_bytes(2, "big")))

        def backend_saw_it() -> bool:
            with echo_backend.lock:
                return hashlib.sha256(payload).hexdigest() in echo_backend.digests

        await eventually("the backend's message", partial(trio.to_thread.run_sync, backend_saw_it))

    assert (closed.status, closed.json) == (200, {"closed": tunnel["id"]})
    frames, rest_bytes = parse_frames(bytes(received))
    assert rest_bytes == b""
    [close] = frames  # the backend's echo, after the Close went out, is dropped
    assert (close.opcode, close.masked) == (CLOSE, False)
    assert (close.close_code, close.close_reason) == (GOING_AWAY, "admin")
    [line] = [r for r in caplog.records if r.getMessage() == "tunnel closed"]
    assert line.fields["reason"] == "admin"  # type: ignore[attr-defined]
    assert line.fields["bytes_up"] >= len(frame)  # type: ignore[attr-defined]


# --- 8. /stats.json across a reload: kept counters, the removed backend draining --------------


async def test_stats_keep_the_kept_tunnels_counters_and_show_the_removed_backend_draining(
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
    start_ws_backend: Callable[..., WsBackend],
) -> None:
    kept_backend, gone_backend = start_ws_backend(), start_ws_backend()

    def route(name: str, url: str) -> dict[str, Any]:
        return {"name": name, "hosts": [f"{name}.test"], "backends": [{"name": "b0", "url": url}]}

    routes = [route("keep", kept_backend.url), route("gone", gone_backend.url)]
    control, port, admin = await serve_with_admin(
        nursery, caplog, {"server": {"drain_timeout": "20s"}, "routes": routes}
    )
    clients = Clients()
    try:
        with trio.fail_after(TEST_SECONDS):
            await in_thread(echo_as, port, "keep.test", "a tunnel that ends before the reload")
            kept = await clients.connect(port, "keep.test")
            gone = await clients.connect(port, "gone.test")
            await in_thread(ws_echo, kept, "k" * 1000)  # 1008 bytes up: head 4, mask 4
            await in_thread(ws_echo, gone, "g" * 500)

            async def settled() -> dict[str, Any] | None:
                document = await stats(admin)
                counts = {(t["route"], t["bytes_up"]) for t in document["tunnels"]}
                return document if counts == {("keep", 1008), ("gone", 508)} else None

            before = await eventually("both tunnels' bytes", settled)
            reloaded = await control.reload(
                Config.from_mapping(
                    {
                        "server": {"drain_timeout": "20s"},
                        "admin": {"listen": f"{LOOPBACK}:0"},
                        "listeners": [{"listen": f"{LOOPBACK}:0"}],
                        "routes": routes[:1],
                    }
                )
            )
            after = await stats(admin)
            draining_echo = await in_thread(ws_echo, gone, "still draining")
            await in_thread(ws_echo, kept, "k" * 100)  # 106 bytes up

            async def grown() -> dict[str, Any] | None:
                document = await stats(admin)
                [tunnel] = [t for t in document["tunnels"] if t["route"] == "keep"]
                return document if tunnel["bytes_up"] == 1008 + 106 else None

            later = await eventually("the kept tunnel's bytes to grow", grown)
    finally:
        await clients.aclose()

    def tunnel_of(document: dict[str, Any], name: str) -> dict[str, Any]:
        [tunnel] = [t for t in document["tunnels"] if t["route"] == name]
        return dict(tunnel)

    def backend_of(document: dict[str, Any], name: str) -> dict[str, Any]:
        [found] = [r for r in document["routes"] if r["name"] == name]
        [backend] = found["backends"]
        return dict(backend)

    assert (reloaded.added, reloaded.removed, reloaded.draining) == ((), ("gone",), 1)
    kept_before, kept_after = tunnel_of(before, "keep"), tunnel_of(after, "keep")
    assert kept_after["id"] == kept_before["id"]
    assert (kept_after["bytes_up"], kept_after["bytes_down"]) == (
        kept_before["bytes_up"],
        kept_before["bytes_down"],
    )
    assert backend_of(after, "keep") == backend_of(before, "keep"), "counters kept as they were"
    assert backend_of(after, "keep")["state"] == "up"
    assert backend_of(after, "keep")["tunnels_total"] == 2
    assert backend_of(after, "gone")["state"] == "draining"
    assert backend_of(after, "gone")["open_tunnels"] == 1
    assert tunnel_of(after, "gone")["id"] == tunnel_of(before, "gone")["id"]
    assert tunnel_of(after, "gone")["bytes_up"] == 508
    assert draining_echo == "still draining"
    assert tunnel_of(later, "keep")["id"] == kept_before["id"]
    assert backend_of(later, "gone")["state"] == "draining"
