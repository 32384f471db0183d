"""Peers for the live hand-off tests: the tunnel process chain, raw backends and clients.

A hand-off makes the serving process a child of the one it replaces, which then exits. The test
process becomes a child subreaper (``prctl(PR_SET_CHILD_SUBREAPER)``) for the length of a test,
so each orphaned successor is reparented to it: the test can then read every old process's exit
status with ``waitpid``, not just the first one's, and reap what it stops. Only processes this
test started (the first by its ``Popen``, the others named by the pid file and running
``tunnel run`` with this test's config file) are ever signalled.

Everything here is threads and blocking sockets with timeouts: the tunnel is another process,
so nothing needs a trio loop, and every loop is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import http.client
import json
import os
import random
import re
import resource
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import websockets.sync.client
from rawhttp import status_of, switching, upgrade_request

LOOPBACK = "127.0.0.1"
WAIT_SECONDS = 30.0
"""Bound on waiting for anything the tunnel should do; healthy runs take well under a second."""
POLL_SECONDS = 0.02
CLIENT_SECONDS = 10.0
"""Socket and ``websockets`` timeouts: one read, one write, an opening handshake."""
KILL_WAIT_SECONDS = 10.0
HEAD_LIMIT = 16 * 1024
PR_SET_CHILD_SUBREAPER = 36
LISTENING = re.compile(r" info listening address=127\.0\.0\.1:(\d+)")
ADMIN_LISTENING = re.compile(r" info admin listening address=127\.0\.0\.1:(\d+)")
HANDED_OFF = re.compile(
    r" info tunnels handed off to the new process pid=(\d+) tunnels=(\d+) kept=(\d+) "
    r"duration=([0-9.]+)s"
)
TAKEN_OVER = " info tunnels taken over from the old process"
DRAIN = 10.0
EXIT_SLACK = 10.0
"""How long after its drain bound a loaded machine may take to exit."""


def _prctl_subreaper(on: bool) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def error_lines(log: str) -> list[str]:
    """The log lines at level error (``<time> error <message> <fields>``)."""
    return [line for line in log.splitlines() if line.split(" ", 2)[1:2] == ["error"]]


def descriptors(pid: int) -> int:
    """How many descriptors ``pid`` holds now."""
    return len(os.listdir(f"/proc/{pid}/fd"))


class TunnelChain:
    """``tunnel run --config FILE`` and every process that took over from it.

    All of them write to one log file (a successor inherits stdout and stderr).
    """

    def __init__(self, directory: Path, config: str, raise_nofile: bool = False) -> None:
        self.config_path = directory / "tunnel.toml"
        self.pid_path = directory / "tunnel.pid"
        self.log_path = directory / "tunnel.log"
        self.config_path.write_text(config.replace("@PID_FILE@", str(self.pid_path)))
        self.seen: set[int] = set()
        _prctl_subreaper(True)
        with self.log_path.open("wb") as log:
            self.first = subprocess.Popen(
                [sys.executable, "-P", "-m", "tunnel", "run", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                preexec_fn=_raise_nofile if raise_nofile else None,
            )
        self.seen.add(self.first.pid)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(
        self, what: str, ready: Callable[[str], Any], seconds: float = WAIT_SECONDS
    ) -> Any:
        """Poll the log (bounded by count and time) until ``ready(log)`` is truthy."""
        deadline = time.monotonic() + seconds
        for _ in range(int(seconds / POLL_SECONDS) + 1):
            if result := ready(self.log()):
                return result
            if time.monotonic() > deadline:
                break
            time.sleep(POLL_SECONDS)
        raise AssertionError(f"gave up waiting for {what} after {seconds} s; log:\n{self.log()}")

    def wait_serving(self) -> None:
        self.wait_for(
            "the listeners and the pid file",
            lambda log: (
                LISTENING.search(log)
                and ADMIN_LISTENING.search(log)
                and self.serving_pid() == self.first.pid
            ),
        )

    def port(self) -> int:
        match = LISTENING.search(self.log())
        assert match, self.log()
        return int(match[1])

    def ports(self) -> list[int]:
        """Each tunnel listener's port, in the order the first process logged them."""
        return list(dict.fromkeys(int(port) for port in LISTENING.findall(self.log())))

    def admin_port(self) -> int:
        match = ADMIN_LISTENING.search(self.log())
        assert match, self.log()
        return int(match[1])

    def serving_pid(self) -> int | None:
        try:
            pid = int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return None
        if self.is_ours(pid):
            self.seen.add(pid)
        return pid

    def is_ours(self, pid: int) -> bool:
        """Whether ``pid`` is alive (not a zombie) and runs ``tunnel run`` with our config."""
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        state = stat.rsplit(")", 1)[1].split()[0]
        return state != "Z" and str(self.config_path).encode() in cmdline

    def hand_offs(self) -> list[tuple[int, int, int, float]]:
        """``(new pid, tunnels sent, kept, seconds)`` of each hand-off logged so far."""
        return [
            (int(pid), int(sent), int(kept), float(seconds))
            for pid, sent, kept, seconds in HANDED_OFF.findall(self.log())
        ]

    def signal(self, pid: int, signum: int) -> None:
        assert pid in self.seen, f"{pid} is not a tunnel this test started"
        assert self.is_ours(pid), f"{pid} no longer runs this test's tunnel"
        os.kill(pid, signum)

    def hand_off(self, count: int) -> tuple[int, int]:
        """SIGUSR2 to the serving process; wait for the ``count``-th hand-off line and the pid
        file to name the new process. Returns ``(old pid, new pid)``."""
        old = self.serving_pid()
        assert old is not None
        self.signal(old, signal.SIGUSR2)
        return old, self.wait_new_pid(old, count)

    def wait_new_pid(self, old: int, count: int) -> int:
        def moved() -> int | None:
            offs = self.hand_offs()
            pid = self.serving_pid()
            if len(offs) >= count and pid != old and pid == offs[count - 1][0]:
                return pid
            return None

        new: int = self.wait_for(f"hand-off {count}", lambda _: moved())
        return new

    def wait_exit(self, pid: int, seconds: float) -> int:
        """The exit status of ``pid`` (ours: the first process, or an orphan reparented to this
        subreaper); fails if it still runs after ``seconds``."""
        if pid == self.first.pid:
            try:
                return self.first.wait(seconds)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{pid} still runs after {seconds} s:\n{self.log()}") from None
        deadline = time.monotonic() + seconds
        for _ in range(int(seconds / POLL_SECONDS) + 1):
            with contextlib.suppress(ChildProcessError):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done == pid:
                    return os.waitstatus_to_exitcode(status)
            if time.monotonic() > deadline:
                break
            time.sleep(POLL_SECONDS)
        raise AssertionError(f"{pid} still runs after {seconds} s:\n{self.log()}")

    def close(self) -> None:
        """Kill whatever of ours still runs, reap it, and stop being a subreaper."""
        try:
            if self.first.poll() is None:
                self.first.kill()
                self.first.wait(KILL_WAIT_SECONDS)
            self.serving_pid()
            for pid in sorted(self.seen - {self.first.pid}):
                if self.is_ours(pid):
                    os.kill(pid, signal.SIGKILL)
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(pid, 0)  # ours once its parent is gone, as it is by now
        finally:
            _prctl_subreaper(False)


def _raise_nofile() -> None:
    """In the tunnel process only: the soft descriptor limit up to the hard one."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --- admin -----------------------------------------------------------------------------------


def admin(port: int, method: str, target: str) -> tuple[int, Any]:
    """One admin request; ``(status, body as JSON or text)``."""
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=CLIENT_SECONDS)
    try:
        connection.request(method, target, headers={"Host": "localhost"})
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    if response.getheader("content-type") == "application/json":
        return response.status, json.loads(body)
    return response.status, body.decode(errors="replace")


def tunnels_by_route(port: int) -> dict[str, dict[str, Any]]:
    status, stats = admin(port, "GET", "/stats.json")
    assert status == 200, stats
    return {tunnel["route"]: tunnel for tunnel in stats["tunnels"]}


# --- clients ---------------------------------------------------------------------------------


def ws_connect(port: int, host: str, ssl_context: Any = None) -> Any:
    """A real ``websockets`` client through the tunnel at ``port``, ``Host: host``."""
    sock = socket.create_connection((LOOPBACK, port), timeout=CLIENT_SECONDS)
    scheme = "wss" if ssl_context is not None else "ws"
    return websockets.sync.client.connect(
        f"{scheme}://{host}:{port}/",
        sock=sock,
        ssl=ssl_context,
        server_hostname="localhost" if ssl_context is not None else None,
        open_timeout=CLIENT_SECONDS,
        close_timeout=CLIENT_SECONDS,
        ping_interval=None,
        compression=None,
        legacy=True,  # closed by the test itself, not a with block
    )


@dataclass
class Chatter:
    """A ``websockets`` client that sends ``n`` every ``every`` seconds and expects ``n`` back
    before the next: any other answer, silence or close is recorded as the failure."""

    ws: Any
    every: float = 0.02
    echoed: int = 0
    failure: str | None = None
    longest_gap: float = 0.0
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> Chatter:
        self.thread = threading.Thread(target=self._run, name="handoff-chatter", daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        last = time.monotonic()
        try:
            while not self.stop.is_set():
                message = str(self.echoed)
                self.ws.send(message)
                reply = self.ws.recv(timeout=CLIENT_SECONDS)
                if reply != message:
                    self.failure = f"sent {message!r}, received {reply!r}"
                    return
                self.echoed += 1
                now = time.monotonic()
                self.longest_gap = max(self.longest_gap, now - last)
                last = now
                self.stop.wait(self.every)
        except Exception as error:  # the test reports it
            self.failure = f"after {self.echoed} echoes: {error!r}"

    def wait_echoed(self, count: int) -> None:
        deadline = time.monotonic() + WAIT_SECONDS
        for _ in range(int(WAIT_SECONDS / POLL_SECONDS) + 1):
            assert self.failure is None, self.failure
            if self.echoed >= count or time.monotonic() > deadline:
                break
            time.sleep(POLL_SECONDS)
        assert self.echoed >= count, f"only {self.echoed} echoes"

    def finish(self) -> int:
        """Stop, close the connection; the number of echoes, failing on any failure."""
        self.stop.set()
        assert self.thread is not None
        self.thread.join(WAIT_SECONDS)
        assert not self.thread.is_alive(), "the chatter is stuck"
        assert self.failure is None, self.failure
        self.ws.close()
        return self.echoed


def read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """Up to the blank line; ``(head, what came after it)``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(f"EOF after {len(data)} bytes of a head: {data!r}")
        data += chunk
        assert b"\r\n\r\n" in data or len(data) <= HEAD_LIMIT, data[:200]
    head, _, rest = data.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest


def upgrade_status(port: int, host: str) -> int:
    """A raw upgrade request through the tunnel: the status of the answer (then close)."""
    with socket.create_connection((LOOPBACK, port), timeout=CLIENT_SECONDS) as sock:
        sock.sendall(upgrade_request(host))
        head, _ = read_head(sock)
    return status_of(head)


@dataclass
class Prober:
    """New upgrades every ``every`` seconds until stopped: the status of each."""

    port: int
    host: str
    every: float = 0.1
    statuses: list[int | str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> Prober:
        self.thread = threading.Thread(target=self._run, name="handoff-prober", daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        deadline = time.monotonic() + 4 * WAIT_SECONDS
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                self.statuses.append(upgrade_status(self.port, self.host))
            except (OSError, EOFError) as error:
                self.statuses.append(repr(error))
            self.stop.wait(self.every)

    def finish(self) -> list[int | str]:
        self.stop.set()
        assert self.thread is not None
        self.thread.join(WAIT_SECONDS)
        assert not self.thread.is_alive(), "the prober is stuck"
        return self.statuses


# --- a bulk stream of WebSocket frames, both ways ---------------------------------------------

BULK_FRAME = 256 * 1024


def frame_stream(total: int, seed: int, masked: bool) -> Iterator[bytes]:
    """Binary frames of ``BULK_FRAME`` payload bytes (pseudo-random, from ``seed``) adding up
    to ``total`` payload bytes; a client's are masked with the all-zero key, so the payload
    goes on the wire as it is."""
    rng = random.Random(seed)
    for _ in range(total // BULK_FRAME):
        head = bytes([0x82, (0x80 if masked else 0) | 127]) + BULK_FRAME.to_bytes(8, "big")
        yield head + (b"\0\0\0\0" if masked else b"") + rng.randbytes(BULK_FRAME)


def stream_size(total: int, masked: bool) -> int:
    return (total // BULK_FRAME) * (BULK_FRAME + 10 + (4 if masked else 0))


@dataclass
class Pump:
    """One direction of the bulk stream: sends ``total`` payload bytes in frames, at most
    ``slow_rate`` bytes a second until ``fast`` is set, and hashes what it sent."""

    sock: socket.socket
    total: int
    seed: int
    masked: bool
    slow_rate: float
    fast: threading.Event
    sent: int = 0
    digest: str = ""
    failure: str | None = None

    def run(self) -> None:
        sha = hashlib.sha256()
        started = time.monotonic()
        try:
            for frame in frame_stream(self.total, self.seed, self.masked):
                if not self.fast.is_set():
                    due = started + self.sent / self.slow_rate
                    self.fast.wait(max(0.0, due - time.monotonic()))
                self.sock.sendall(frame)
                sha.update(frame)
                self.sent += len(frame)
        except OSError as error:
            self.failure = f"after {self.sent} bytes sent: {error!r}"
        self.digest = sha.hexdigest()


@dataclass
class Sink:
    """The other end of a ``Pump``: reads exactly ``size`` bytes (``first`` already in hand)
    and hashes them."""

    sock: socket.socket
    size: int
    first: bytes = b""
    received: int = 0
    digest: str = ""
    failure: str | None = None

    def run(self) -> None:
        sha = hashlib.sha256(self.first)
        self.received = len(self.first)
        try:
            while self.received < self.size:
                chunk = self.sock.recv(min(1 << 20, self.size - self.received))
                if not chunk:
                    self.failure = f"EOF after {self.received} of {self.size} bytes"
                    break
                sha.update(chunk)
                self.received += len(chunk)
        except OSError as error:
            self.failure = f"after {self.received} bytes received: {error!r}"
        self.digest = sha.hexdigest()


def run_in_thread(target: Callable[[], None], name: str) -> threading.Thread:
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread


class BulkBackend:
    """A raw WebSocket backend on loopback: answers each upgrade with a 101, then streams
    ``total`` payload bytes of server frames to the client while it sinks and hashes what the
    client streams. Counts the connections it accepts."""

    def __init__(self, total: int, slow_rate: float, fast: threading.Event) -> None:
        self.total, self.slow_rate, self.fast = total, slow_rate, fast
        self.listener = socket.create_server((LOOPBACK, 0))
        self.listener.settimeout(POLL_SECONDS * 5)
        self.port: int = self.listener.getsockname()[1]
        self.accepted = 0
        self.pumps: list[Pump] = []
        self.sinks: list[Sink] = []
        self.threads: list[threading.Thread] = []
        self.sockets: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = run_in_thread(self._accept, "bulk-backend")

    @property
    def url(self) -> str:
        return f"ws://{LOOPBACK}:{self.port}"

    def _accept(self) -> None:
        deadline = time.monotonic() + 10 * WAIT_SECONDS
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            sock.settimeout(CLIENT_SECONDS)
            self.sockets.append(sock)
            head, rest = read_head(sock)
            key = next(
                line.split(b":", 1)[1].strip().decode()
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"sec-websocket-key:")
            )
            sock.sendall(switching(key))
            pump = Pump(sock, self.total, 2, False, self.slow_rate, self.fast)
            sink = Sink(sock, stream_size(self.total, True), rest)
            self.pumps.append(pump)
            self.sinks.append(sink)
            self.threads += [
                run_in_thread(pump.run, "bulk-backend-pump"),
                run_in_thread(sink.run, "bulk-backend-sink"),
            ]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(WAIT_SECONDS)
        for sock in self.sockets:
            sock.close()
        for thread in self.threads:
            thread.join(WAIT_SECONDS)
        self.listener.close()


@dataclass
class BulkClient:
    """The client side of the bulk stream through the tunnel (``Host: host``)."""

    sock: socket.socket
    pump: Pump
    sink: Sink
    threads: list[threading.Thread]

    @classmethod
    def open(
        cls, port: int, host: str, total: int, slow_rate: float, fast: threading.Event
    ) -> BulkClient:
        sock = socket.create_connection((LOOPBACK, port), timeout=CLIENT_SECONDS)
        sock.sendall(upgrade_request(host))
        head, rest = read_head(sock)
        assert status_of(head) == 101, head
        pump = Pump(sock, total, 1, True, slow_rate, fast)
        sink = Sink(sock, stream_size(total, False), rest)
        threads = [run_in_thread(pump.run, "bulk-pump"), run_in_thread(sink.run, "bulk-sink")]
        return cls(sock, pump, sink, threads)

    def join(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            assert not thread.is_alive(), (
                f"bulk stream unfinished after {seconds} s: sent {self.pump.sent}, "
                f"received {self.sink.received}"
            )


BULK_BEFORE = 2 * 2**20
"""Bytes each bulk direction has delivered before the hand-off starts."""
BULK_SECONDS = 60.0


def wait_bulk_both_ways(bulk: BulkClient, backend: BulkBackend) -> None:
    """Until each direction of the stream has delivered ``BULK_BEFORE`` bytes."""
    wait_until(
        "bulk bytes both ways",
        lambda: (
            bulk.sink.received >= BULK_BEFORE
            and sum(sink.received for sink in backend.sinks) >= BULK_BEFORE
        ),
    )


def bulk_received(bulk: BulkClient, backend: BulkBackend) -> tuple[int, int]:
    """Bytes the client's and the backend's sinks have received so far."""
    return bulk.sink.received, backend.sinks[0].received


def check_bulk_intact(bulk: BulkClient, backend: BulkBackend, at_hand_off: tuple[int, int]) -> None:
    """The stream ended both ways without an error, the hand-off (``at_hand_off``: what
    ``bulk_received`` said then) came in its middle, and each end received exactly the bytes
    the other sent (SHA-256)."""
    bulk.join(BULK_SECONDS)
    for thread in backend.threads:
        thread.join(BULK_SECONDS)
    [backend_pump], [backend_sink] = backend.pumps, backend.sinks
    for end in (bulk.pump, bulk.sink, backend_pump, backend_sink):
        assert end.failure is None, end.failure
    assert 0 < at_hand_off[0] < bulk.sink.size, "the hand-off came after the stream"
    assert 0 < at_hand_off[1] < backend_sink.size, "the hand-off came after the stream"
    assert bulk.pump.digest == backend_sink.digest
    assert backend_pump.digest == bulk.sink.digest


# --- many idle tunnels -----------------------------------------------------------------------


class IdleBackend:
    """A raw backend in one thread (``selectors``) that answers every upgrade with a 101 and
    then holds the connection, reading and dropping whatever arrives."""

    def __init__(self) -> None:
        self.listener = socket.create_server((LOOPBACK, 0), backlog=4096)
        self.listener.setblocking(False)
        self.port: int = self.listener.getsockname()[1]
        self.wake_read, self.wake_write = socket.socketpair()
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self.selector.register(self.wake_read, selectors.EVENT_READ, "stop")
        self.heads: dict[socket.socket, bytes] = {}
        self.answered = 0
        self.thread = run_in_thread(self._run, "idle-backend")

    @property
    def url(self) -> str:
        return f"ws://{LOOPBACK}:{self.port}"

    def _run(self) -> None:
        deadline = time.monotonic() + 60 * WAIT_SECONDS
        while time.monotonic() < deadline:
            for key, _ in self.selector.select(1.0):
                if key.data == "stop":
                    return
                if key.data == "accept":
                    self._accept()
                    continue
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                self._read(sock)

    def _accept(self) -> None:
        for _ in range(1024):
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            self.heads[sock] = b""
            self.selector.register(sock, selectors.EVENT_READ, "peer")

    def _read(self, sock: socket.socket) -> None:
        try:
            chunk = sock.recv(65536)
        except (BlockingIOError, ConnectionError):
            return
        if not chunk:
            self.selector.unregister(sock)
            return
        if sock not in self.heads:
            return
        data = self.heads[sock] + chunk
        if b"\r\n\r\n" not in data:
            self.heads[sock] = data
            return
        del self.heads[sock]
        key = next(
            line.split(b":", 1)[1].strip().decode()
            for line in data.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        sock.setblocking(True)
        sock.settimeout(CLIENT_SECONDS)
        sock.sendall(switching(key))
        sock.setblocking(False)
        self.answered += 1
        self.selector.modify(sock, selectors.EVENT_READ, "tunnel")

    def close(self) -> None:
        self.wake_write.send(b"x")
        self.thread.join(WAIT_SECONDS)
        for key in list(self.selector.get_map().values()):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            sock.close()
        self.selector.close()
        self.wake_write.close()


class IdleBackendProcess:
    """``IdleBackend`` in a child process, so that its descriptors (one per tunnel) count
    against that process's limit rather than this one's, which holds the clients' ends."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            preexec_fn=_raise_nofile,
        )
        assert self.process.stdout is not None
        ready = selectors.DefaultSelector()
        ready.register(self.process.stdout, selectors.EVENT_READ)
        if not ready.select(WAIT_SECONDS):
            self.close()
            raise AssertionError("the idle backend process did not start")
        ready.close()
        self.port = int(self.process.stdout.readline())

    @property
    def url(self) -> str:
        return f"ws://{LOOPBACK}:{self.port}"

    def close(self) -> None:
        """Close its stdin (it then stops) and reap it; killed if it does not exit."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(KILL_WAIT_SECONDS)


def open_idle_tunnels(port: int, host: str, count: int, batch: int = 200) -> list[socket.socket]:
    """``count`` upgrades through the tunnel, ``batch`` at a time, each answered 101."""
    opened: list[socket.socket] = []
    try:
        while len(opened) < count:
            group = []
            for _ in range(min(batch, count - len(opened))):
                sock = socket.create_connection((LOOPBACK, port), timeout=CLIENT_SECONDS)
                group.append(sock)
                opened.append(sock)
                sock.sendall(upgrade_request(host))
            for sock in group:
                head, _ = read_head(sock)
                assert status_of(head) == 101, head
    except BaseException:
        for sock in opened:
            sock.close()
        raise
    return opened


# --- configuration and the chain's life ------------------------------------------------------


def config_text(
    routes: dict[str, str],
    tls: tuple[Path, Path] | None = None,
    tls_port: int = 0,
    **server: str | int,
) -> str:
    """A config with a pid file, an admin listener, a plain listener on port 0 (and a TLS one
    on ``tls_port``) and one route per ``host → backend url``."""
    settings = {"pid_file": "@PID_FILE@", "drain_timeout": f"{DRAIN:g}s", **server}
    lines = ["[server]", *(f"{key} = {json.dumps(value)}" for key, value in settings.items())]
    lines += ["[admin]", 'listen = "127.0.0.1:0"', "[[listeners]]", 'listen = "127.0.0.1:0"']
    if tls is not None:
        cert, key = tls
        lines += ["[[listeners]]", f'listen = "127.0.0.1:{tls_port}"', "[listeners.tls]"]
        lines += [f'cert = "{cert}"', f'key = "{key}"']
    for host, url in routes.items():
        name = host.split(".")[0]
        lines += ["[[routes]]", f'name = "{name}"', f'hosts = ["{host}"]']
        lines.append(f'backends = [{{ name = "b-{name}", url = "{url}" }}]')
    return "\n".join(lines) + "\n"


def stop_last(chain: TunnelChain) -> None:
    """SIGTERM to the serving process: it exits 0 and removes the pid file."""
    pid = chain.serving_pid()
    assert pid is not None
    chain.signal(pid, signal.SIGTERM)
    assert chain.wait_exit(pid, DRAIN + EXIT_SLACK) == 0
    assert not chain.pid_path.exists()


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def wait_until(what: str, ready: Callable[[], bool], seconds: float = WAIT_SECONDS) -> None:
    deadline = time.monotonic() + seconds
    while not ready():
        assert time.monotonic() < deadline, f"gave up waiting for {what} after {seconds} s"
        time.sleep(0.02)


def free_port() -> int:
    """A loopback port nobody listens on right now: a TLS listener's, so that its address
    differs from the plain listener's ``127.0.0.1:0`` (see the xfail test below)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


if __name__ == "__main__":
    # ``IdleBackendProcess``: serve until stdin closes.
    served = IdleBackend()
    print(served.port, flush=True)
    sys.stdin.read()
    served.close()
