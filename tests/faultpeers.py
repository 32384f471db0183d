"""Misbehaving peers for the fault and integrity tests: raw trio backends and clients over real
loopback sockets, a heartbeat tunnel that must keep flowing beside every fault, descriptor
and memory counts, and a memory-BIO TLS peer that can half-close.

A plain module, like ``rawhttp``: test modules ``from faultpeers import ...``. Every loop is
bounded in count and time, and every reader in size.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from rawhttp import (
    KEY,
    LOOPBACK,
    assert_switching,
    header,
    read_exactly,
    read_head,
    serve_loopback,
    switching,
    upgrade_request,
)
from test_admin import call

from tunnel import Config, Control, serve
from tunnel.certs import issue, make_ca
from tunnel.logs import LOGGER_NAME

WAIT_SECONDS = 20.0
"""Bound on waiting for anything that should happen; healthy runs take well under a second."""
POLL_SECONDS = 0.02
READ_SIZE = 1 << 20
"""Large reads: the bulk tests move hundreds of MiB through Python."""
MAX_DRAIN_BYTES = 1 << 30
"""A peer that sends more than this without closing fails the test."""
BEAT_SECONDS = 0.02
MAX_BEATS = 50_000
MAX_GAP_SECONDS = 2.5
"""Longest silence allowed between two heartbeats (every 20 ms): a fault elsewhere may slow the
tunnel on a loaded two-core machine, never stop it. Everything runs in this one process, so a
fault that blocked the loop until its 3 s timeout (response_timeout = "3s") must still show: the
bound stays below that, with half a second to tell the two apart."""
ECHO_HOST = "echo.test"
FAULT_HOST = "fault.test"


# --- counting ---------------------------------------------------------------------------------


def fd_count(pid: int | str = "self") -> int:
    """Descriptors open now in ``pid``; in this process garbage (sockets awaiting collection)
    is collected first, so that it cannot close in the middle of a count."""
    if pid == "self":
        gc.collect()
    return len(os.listdir(f"/proc/{pid}/fd"))


async def fds_settle(baseline: int, slack: int = 0) -> int:
    """Poll (bounded) until at most ``baseline + slack`` descriptors are open; the last count.
    Closes run on the tunnel's event loop, a moment after the peer saw them."""
    count = fd_count()
    with trio.move_on_after(WAIT_SECONDS):
        for _ in range(int(WAIT_SECONDS / POLL_SECONDS) + 1):
            count = fd_count()
            if count <= baseline + slack:
                return count
            await trio.sleep(POLL_SECONDS)
    return count


def vm_rss(pid: int) -> int:
    """Resident memory of ``pid`` in bytes (``VmRSS`` of ``/proc/PID/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def abort(stream: trio.SocketStream) -> None:
    """Close with ``SO_LINGER`` 0: the kernel sends RST instead of FIN."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


def closed_reasons(caplog: pytest.LogCaptureFixture, route: str) -> list[str]:
    """The ``reason`` of every ``tunnel closed`` line of ``route``, in order."""
    return [
        record.fields["reason"]  # type: ignore[attr-defined]
        for record in caplog.records
        if record.name == LOGGER_NAME
        and record.getMessage() == "tunnel closed"
        and record.fields["route"] == route  # type: ignore[attr-defined]
    ]


# --- reading until the end --------------------------------------------------------------------


@dataclass
class Ending:
    """How a peer's connection ended: bytes read before it, ``EOF`` or ``reset``, and when
    (``trio.current_time()``)."""

    received: int
    how: str
    at: float


async def read_until_closed(
    stream: trio.abc.ReceiveStream, limit: int = MAX_DRAIN_BYTES, keep: bytearray | None = None
) -> Ending:
    """Read and drop (or append to ``keep``) until EOF or a reset; fails past ``limit``."""
    received = 0
    try:
        while chunk := await stream.receive_some(READ_SIZE):
            received += len(chunk)
            if keep is not None:
                keep += chunk
            assert received < limit, "the peer never closed"
    except trio.BrokenResourceError:
        return Ending(received, "reset", trio.current_time())
    except trio.ClosedResourceError:
        return Ending(received, "closed here", trio.current_time())
    return Ending(received, "EOF", trio.current_time())


async def open_tunnel(
    port: int, host: str, leftover: bytes = b"", path: str = "/"
) -> tuple[trio.SocketStream, bytes]:
    """Client side: upgrade through the tunnel at ``port`` naming ``host``; the stream and the
    bytes that came after the 101 head."""
    stream = await trio.open_tcp_stream(LOOPBACK, port)
    try:
        await stream.send_all(upgrade_request(host, path=path) + leftover)
        with trio.fail_after(WAIT_SECONDS):
            head, rest = await read_head(stream)
        assert_switching(head, KEY)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream, rest


# --- backends -----------------------------------------------------------------------------------


async def accept(stream: trio.SocketStream) -> bytes:
    """Read the upgrade request, answer a correct 101; the bytes after the request head."""
    head, rest = await read_head(stream)
    await stream.send_all(switching(header(head, "Sec-WebSocket-Key")))
    return rest


async def echo_backend(stream: trio.SocketStream) -> None:
    """Accept the upgrade and echo raw bytes until EOF (or a reset)."""
    async with stream:
        rest = await accept(stream)
        with suppress(trio.BrokenResourceError):
            await stream.send_all(rest)
            while data := await stream.receive_some(65536):
                await stream.send_all(data)


@dataclass
class Peer:
    """A raw backend's connections and how each ended, for backends written as
    ``async def behaviour(peer, stream)``."""

    behaviour: Callable[[Peer, trio.SocketStream], Awaitable[None]]
    streams: list[trio.SocketStream] = field(default_factory=list)
    endings: list[Ending] = field(default_factory=list)
    arrived: trio.Event = field(default_factory=trio.Event)
    """Set once a connection's request head has been read (or it connected, for a backend
    that reads nothing)."""
    ended: trio.Event = field(default_factory=trio.Event)
    """Set once a connection ended."""
    started: trio.Event = field(default_factory=trio.Event)
    """Set once a streaming backend has sent its first bytes."""
    sent: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    async def handle(self, stream: trio.SocketStream) -> None:
        self.streams.append(stream)
        try:
            await self.behaviour(self, stream)
        finally:
            with suppress(OSError):
                await trio.aclose_forcefully(stream)
            self.ended.set()

    def end(self, ending: Ending) -> None:
        self.endings.append(ending)

    async def serve(self, nursery: trio.Nursery) -> str:
        """Listen on a loopback port in ``nursery``; the ``ws://`` URL."""
        return f"ws://{LOOPBACK}:{await serve_loopback(nursery, self.handle)}"


async def silent(peer: Peer, stream: trio.SocketStream) -> None:
    """Read the request, never answer, notice when the tunnel hangs up."""
    await read_head(stream)
    peer.arrived.set()
    peer.end(await read_until_closed(stream))


async def stream_forever(peer: Peer, stream: trio.SocketStream) -> None:
    """Accept, then send 64 KiB blocks until the connection breaks (bounded by
    ``MAX_DRAIN_BYTES``), reading what comes meanwhile."""
    await accept(stream)
    peer.arrived.set()
    block = bytes(64 * 1024)
    ended: list[Ending] = []

    async def reader() -> None:
        ended.append(await read_until_closed(stream))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        try:
            while peer.sent < MAX_DRAIN_BYTES:
                await stream.send_all(block)
                peer.sent += len(block)
                peer.started.set()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            peer.end(Ending(peer.sent, "broken", trio.current_time()))
        nursery.cancel_scope.cancel()
    peer.endings.extend(ended)


async def recorder(peer: Peer, stream: trio.SocketStream) -> None:
    """Accept, then read what comes until the end, without a word back."""
    rest = await accept(stream)
    peer.arrived.set()
    kept = bytearray(rest)
    peer.options.setdefault("kept", []).append(kept)
    peer.end(await read_until_closed(stream, keep=kept))


async def hold(peer: Peer, stream: trio.SocketStream) -> None:
    """Accept, read until the tunnel's EOF, then stay silent (the connection open) until
    ``options['release']`` is set."""
    await accept(stream)
    peer.arrived.set()
    peer.end(await read_until_closed(stream))
    with trio.move_on_after(WAIT_SECONDS):
        await peer.options["release"].wait()


async def byte_by_byte(peer: Peer, stream: trio.SocketStream) -> None:
    """Answer a correct 101 one byte at a time, ``options['gap']`` seconds apart, then echo."""
    head, _ = await read_head(stream)
    peer.arrived.set()
    reply = switching(header(head, "Sec-WebSocket-Key"))
    try:
        for i in range(len(reply)):
            await stream.send_all(reply[i : i + 1])
            peer.sent += 1
            await trio.sleep(peer.options["gap"])
        while data := await stream.receive_some(65536):
            await stream.send_all(data)
    except trio.BrokenResourceError:
        peer.end(Ending(peer.sent, "broken", trio.current_time()))
        return
    peer.end(Ending(peer.sent, "EOF", trio.current_time()))


async def switch_then_close(peer: Peer, stream: trio.SocketStream) -> None:
    """A 101 and at once a close (FIN)."""
    await accept(stream)
    peer.arrived.set()


# --- the tunnel under test ------------------------------------------------------------------------


@dataclass(frozen=True)
class Rig:
    """A tunnel served in process: a plain listener, perhaps a TLS one, an admin listener,
    a route ``echo`` (host ``echo.test``) to an in-process echo backend and a route ``fault``
    (host ``fault.test``) to the backend under test."""

    port: int
    admin: int
    control: Control
    data: dict[str, Any]
    tls_port: int | None = None

    def config(self, **server: str | int) -> Config:
        """This rig's configuration with ``server`` keys changed (for a reload)."""
        return Config.from_mapping({**self.data, "server": {**self.data["server"], **server}})

    def only_echo(self) -> Config:
        """This rig's configuration with every route but ``echo`` removed."""
        routes = [route for route in self.data["routes"] if route["name"] == "echo"]
        return Config.from_mapping({**self.data, "routes": routes})


async def start_rig(
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
    fault_url: str,
    *,
    tls: dict[str, str] | None = None,
    fault_route: dict[str, Any] | None = None,
    more: dict[str, str] | None = None,
    **server: str | int,
) -> Rig:
    """Serve a tunnel in ``nursery`` in front of ``fault_url`` (see ``Rig``); ``more`` maps
    further route names to backend URLs, each route for host ``<name>.test``."""
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    echo_url = f"ws://{LOOPBACK}:{await serve_loopback(nursery, echo_backend)}"
    listeners: list[dict[str, Any]] = [{"listen": f"{LOOPBACK}:0"}]
    if tls is not None:
        listeners.append({"listen": f"{LOOPBACK}:0", "tls": tls})
    data: dict[str, Any] = {
        "server": dict(server),
        "admin": {"listen": f"{LOOPBACK}:0"},
        "listeners": listeners,
        "routes": [
            {"name": "echo", "hosts": [ECHO_HOST], "backends": [{"name": "e", "url": echo_url}]},
            {
                "name": "fault",
                "hosts": [FAULT_HOST],
                "backends": [{"name": "f", "url": fault_url}],
                **(fault_route or {}),
            },
            *(
                {"name": name, "hosts": [f"{name}.test"], "backends": [{"name": "m", "url": url}]}
                for name, url in (more or {}).items()
            ),
        ],
    }
    control = Control()
    bound: list[trio.SocketListener] = await nursery.start(
        partial(serve, Config.from_mapping(data), control=control)
    )
    [line] = [r for r in caplog.records if r.getMessage() == "admin listening"]
    admin = int(line.fields["address"].rpartition(":")[2])  # type: ignore[attr-defined]
    ports = [listener.socket.getsockname()[1] for listener in bound]
    rig = Rig(ports[0], admin, control, data, ports[1] if tls is not None else None)
    await warm_up(rig)
    return rig


async def warm_up(rig: Rig) -> None:
    """One echo through the tunnel, so that what the first tunnel creates once (and keeps)
    is in the baseline; return once it is gone everywhere."""
    stream, rest = await open_tunnel(rig.port, ECHO_HOST)
    async with stream:
        await stream.send_all(b"warm")
        with trio.fail_after(WAIT_SECONDS):
            assert await read_exactly(stream, 4, rest) == b"warm"
    await quiet(rig)


async def quiet(rig: Rig) -> int:
    """Wait (bounded) until the engine holds no tunnel and the descriptor count has stayed
    the same for 0.1 s (the peers' closes are done too); that count."""
    generation = rig.control.generation
    assert generation is not None
    with trio.fail_after(WAIT_SECONDS):
        while generation.engine.statistics().tunnels:
            await trio.sleep(POLL_SECONDS)
        count = -1
        while count != (count := fd_count()):
            await trio.sleep(0.1)
    return count


async def tunnel_ids(rig: Rig, route: str, count: int) -> list[str]:
    """The ids of ``route``'s open tunnels from ``/stats.json``, once there are ``count``."""
    with trio.move_on_after(WAIT_SECONDS):
        for _ in range(int(WAIT_SECONDS / POLL_SECONDS) + 1):
            answer = await call(rig.admin, "GET", "/stats.json")
            ids = [t["id"] for t in answer.json["tunnels"] if t["route"] == route]
            if len(ids) >= count:
                return ids
            await trio.sleep(POLL_SECONDS)
    raise AssertionError(f"fewer than {count} tunnels on route {route}")


# --- the heartbeat: another tunnel that must keep flowing -----------------------------------------


@dataclass
class Heartbeat:
    """A tunnel on route ``echo`` sending a short message every 20 ms and checking its echo."""

    port: int
    arrivals: list[float] = field(default_factory=list)
    stop: trio.Event = field(default_factory=trio.Event)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        stream, rest = await open_tunnel(self.port, ECHO_HOST)
        async with stream:
            task_status.started()
            for i in range(MAX_BEATS):
                if self.stop.is_set():
                    break
                message = f"beat {i:08d}\n".encode()
                with trio.fail_after(WAIT_SECONDS):
                    await stream.send_all(message)
                    echoed = await read_exactly(stream, len(message), rest)
                rest = b""
                assert echoed == message, (echoed, message)
                self.arrivals.append(trio.current_time())
                await trio.sleep(BEAT_SECONDS)

    def check(self) -> None:
        assert len(self.arrivals) >= 3, f"only {len(self.arrivals)} heartbeats"
        gaps = [b - a for a, b in zip(self.arrivals, self.arrivals[1:], strict=False)]
        assert max(gaps) < MAX_GAP_SECONDS, f"a {max(gaps):.2f} s gap in {len(gaps) + 1} beats"


@asynccontextmanager
async def heartbeat(port: int) -> AsyncIterator[Heartbeat]:
    """Keep a heartbeat tunnel flowing for the block; checked (and closed) at its end."""
    beat = Heartbeat(port)
    async with trio.open_nursery() as nursery:
        await nursery.start(beat.run)
        yield beat
        # At least a few beats inside the block, however short it was.
        with trio.fail_after(WAIT_SECONDS):
            while len(beat.arrivals) < 3:
                await trio.sleep(BEAT_SECONDS)
        beat.stop.set()
    beat.check()


# --- TLS ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TLSFiles:
    """A test CA and a certificate it issued for localhost and 127.0.0.1, in files."""

    ca: Path
    cert: Path
    key: Path

    def listener(self) -> dict[str, str]:
        return {"cert": str(self.cert), "key": str(self.key)}

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        assert context.verify_mode == ssl.CERT_REQUIRED
        return context

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        return context


def make_tls_files(directory: Path) -> TLSFiles:
    ca = make_ca("faults test CA")
    pair = issue(ca, ["localhost", LOOPBACK])
    files = TLSFiles(directory / "ca.pem", directory / "site.pem", directory / "site.key")
    files.ca.write_bytes(ca.cert_pem)
    files.cert.write_bytes(pair.cert_pem)
    files.key.write_bytes(pair.key_pem)
    return files


# --- TLS that can half-close --------------------------------------------------------------------


class BioTLS:
    """TLS over a trio stream through ``ssl.MemoryBIO``, so that, unlike ``trio.SSLStream``,
    it can half-close: ``send_eof`` sends close_notify and a FIN and reading goes on (TLS 1.3).
    One task may send while another receives."""

    def __init__(
        self,
        stream: trio.SocketStream,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
    ) -> None:
        self.stream = stream
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.tls = context.wrap_bio(
            self._in, self._out, server_side=server_side, server_hostname=server_hostname
        )
        self._sending = trio.Lock()

    async def _flush(self) -> None:
        async with self._sending:
            while data := self._out.read():
                await self.stream.send_all(data)

    async def _fill(self) -> bool:
        """Feed the next bytes from the socket; False at its EOF."""
        data = await self.stream.receive_some(READ_SIZE)
        if not data:
            self._in.write_eof()
            return False
        self._in.write(data)
        return True

    async def handshake(self) -> None:
        for _ in range(100):
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
                continue
            await self._flush()
            return
        raise AssertionError("the TLS handshake never ended")

    async def send_all(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        for start in range(0, len(view), 256 * 1024):
            self.tls.write(view[start : start + 256 * 1024])
            await self._flush()

    async def receive_some(self, size: int = READ_SIZE) -> bytes:
        """Decrypted bytes, or b"" at the peer's close_notify (or its plain EOF)."""
        while True:
            try:
                data: bytes = self.tls.read(size)
            except ssl.SSLWantReadError:
                await self._flush()  # a TLS 1.3 key update may want an answer
                if not await self._fill():
                    return b""
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""
            return data

    async def send_eof(self) -> None:
        """close_notify, then a FIN; the read direction stays open."""
        with suppress(ssl.SSLWantReadError):
            self.tls.unwrap()
        await self._flush()
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()
