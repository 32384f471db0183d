"""The relay engine: every established tunnel, served from one epoll set.

After the 101 nothing is parsed, so a tunnel needs no task, nursery or stream: its two
non-blocking sockets go into one edge-triggered ``select.epoll``, and one trio task waits on that
epoll's descriptor. Each wake-up services every ready socket in a batch, which is what brings the
per-message cost near a C proxy's (``docs/benchmarks.md`` has the figures). Bytes move with
``splice(2)`` through pooled pipes when allowed (both ends plain sockets), or with
``recv_into``/``send`` through one shared buffer otherwise (TLS ends are ``TLSConn`` objects,
which encrypt and decrypt inside those calls); either way a partial write parks the rest on the
tunnel and stops reading its source until the destination drains, so memory stays bounded.

Edge-triggered rules this code keeps (each cost a stall or a leak in a prototype):
- a socket is read until ``EAGAIN``, a short read, or, once the peer's FIN was reported
  (``EPOLLRDHUP``), until ``recv`` returns EOF: the FIN is reported only once;
- a source left unread because its destination was full is read again as soon as that
  destination drains, since no new edge will come for bytes already queued;
- a batch that leaves work behind yields to trio and comes back to it;
- a TLS end may hold encrypted bytes its socket has not taken (``TLSConn.backlog``): they count
  as parked, so a half-close or a close waits for them.
"""

from __future__ import annotations

import errno
import fcntl
import heapq
import logging
import os
import select
import socket
from collections.abc import Callable
from dataclasses import dataclass
from itertools import count

import trio

from tunnel.net.relay import RelayStats
from tunnel.net.sockio import Conn
from tunnel.net.tlsconn import TLSConn
from tunnel.reasons import CloseReason

log = logging.getLogger(__name__)

COPY_CHUNK = 64 * 1024
PIPE_SIZE = 64 * 1024
"""Asked of ``F_SETPIPE_SZ``; the kernel may grant less. Measured on loopback (bench/): 64 KiB
pipes cost 0.26-0.34 s of CPU per GiB relayed, 1 MiB pipes 0.94; see docs/benchmarks.md."""
SPLICE_BELOW = 16 * 1024
"""In ``auto`` mode a spliced read shorter than this sends the flow back to copying: small
messages cost two splices and a pipe each, where ``recv``/``send`` cost two syscalls."""
PAGE = os.sysconf("SC_PAGESIZE") if hasattr(os, "sysconf") else 4096
MAX_EVENTS = 512
ROUNDS_PER_TURN = 8
"""Batches served back to back before the engine lets other trio tasks run."""
READS_PER_TURN = 16
"""Reads one direction may make per batch before it yields to the other tunnels."""

_IN = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_OUT = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
_HANGUP = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_INTEREST = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_RESET_ERRNOS = {errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ETIMEDOUT}


def splice_available() -> bool:
    """True where the kernel and Python offer ``splice(2)`` (Linux, Python 3.10+)."""
    return hasattr(os, "splice") and hasattr(fcntl, "F_SETPIPE_SZ")


@dataclass(frozen=True, slots=True)
class EngineStatistics:
    """A snapshot for the stats page and the tests."""

    tunnels: int
    pipes_in_use: int
    pipes_idle: int
    pipe_size: int
    splice_fallbacks: int
    """Reads that copied because no pipe was free (``splice_pipes`` reached or no descriptor)."""


Pipe = tuple[int, int, int]
"""``(read_fd, write_fd, size)`` of a pooled pipe."""


class PipePool:
    """Pipes for splicing, held by a direction only while bytes sit in them.

    A tunnel that kept its own two pipes would hold six descriptors; a pool bounded by
    ``limit`` keeps the count proportional to the bytes in flight instead. Idle pipes are kept
    for reuse while tunnels exist and closed when the last tunnel ends.
    """

    def __init__(self, limit: int, size: int = PIPE_SIZE) -> None:
        self.limit = limit
        self.size = size
        """What each new pipe asks for; the last grant is what ``statistics()`` shows."""
        self.in_use = 0
        self.fallbacks = 0
        self.granted = 0
        self._idle: list[Pipe] = []

    def acquire(self) -> Pipe | None:
        """A pipe, or None when the limit or the descriptors ran out.

        Each pipe carries the size the kernel granted it: past ``pipe-user-pages-soft`` an
        unprivileged process gets small pipes, and one small grant must not shrink the others.
        """
        if self._idle:
            self.in_use += 1
            return self._idle.pop()
        if self.in_use >= self.limit:
            self.fallbacks += 1
            return None
        try:
            read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            self.fallbacks += 1
            return None
        try:
            granted = fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, self.size)
        except OSError:
            granted = fcntl.fcntl(write_fd, fcntl.F_GETPIPE_SZ)
        self.in_use += 1
        self.granted = granted
        return read_fd, write_fd, granted

    @property
    def idle(self) -> int:
        """Empty pipes kept for reuse."""
        return len(self._idle)

    def release(self, pipe: Pipe) -> None:
        """Give back an empty pipe."""
        self.in_use -= 1
        self._idle.append(pipe)

    def discard(self, pipe: Pipe) -> None:
        """Close a pipe that may still hold bytes (its tunnel died)."""
        self.in_use -= 1
        os.close(pipe[0])
        os.close(pipe[1])

    def trim(self) -> None:
        """Close the idle pipes, so an idle server holds no descriptor for splicing."""
        while self._idle:
            read_fd, write_fd, _ = self._idle.pop()
            os.close(read_fd)
            os.close(write_fd)


class _Flow:
    """One direction of a tunnel: bytes read from ``src`` and written to ``dst``."""

    __slots__ = (
        "can_splice",
        "dst",
        "dst_fd",
        "eof",
        "eof_reason",
        "hangup",
        "parked",
        "pipe",
        "piped",
        "ready",
        "reset_dst",
        "reset_src",
        "shut",
        "splicing",
        "src",
        "src_fd",
        "stats",
        "tls_dst",
        "tunnel",
        "upstream",
    )

    def __init__(self, tunnel: Tunnel, src: Conn, dst: Conn, upstream: bool) -> None:
        self.tunnel: Tunnel | None = tunnel
        """Cleared when the tunnel closes, so that no reference cycle outlives it."""
        self.stats = tunnel.stats
        self.src = src
        self.dst = dst
        self.src_fd = src.fileno()
        self.dst_fd = dst.fileno()
        self.upstream = upstream
        self.tls_dst = dst if isinstance(dst, TLSConn) else None
        """Set when ``dst`` is TLS: its backlog must be written before the flow is done."""
        self.can_splice = type(src) is socket.socket and type(dst) is socket.socket
        """Both ends are plain sockets, so ``splice(2)`` may move the bytes; TLS ends are
        decrypted and encrypted in user space."""
        self.parked = b""
        """Bytes read but not yet written (copy path, or leftovers from the handshake)."""
        self.splicing = False
        """Read through a pipe (splice) rather than the shared buffer (copy)."""
        self.pipe: Pipe | None = None
        self.piped = 0
        """Bytes sitting in ``pipe`` (splice path)."""
        self.ready = False
        """The source may hold unread bytes (an edge was reported and not yet drained)."""
        self.hangup = False
        """The source's FIN or an error was reported: read until EOF, whatever the sizes."""
        self.eof = False
        self.shut = False
        self.eof_reason = CloseReason.CLIENT_EOF if upstream else CloseReason.BACKEND_EOF
        self.reset_src = CloseReason.CLIENT_RESET if upstream else CloseReason.BACKEND_RESET
        self.reset_dst = CloseReason.BACKEND_RESET if upstream else CloseReason.CLIENT_RESET


class Tunnel:
    """An established tunnel owned by the engine: two sockets, two flows and the counters."""

    __slots__ = ("backend", "client", "closed", "down", "on_close", "stats", "up")

    def __init__(
        self,
        client: Conn,
        backend: Conn,
        stats: RelayStats,
        on_close: Callable[[Tunnel], None],
    ) -> None:
        self.client = client
        self.backend = backend
        self.stats = stats
        self.on_close = on_close
        self.up = _Flow(self, client, backend, upstream=True)
        self.down = _Flow(self, backend, client, upstream=False)
        self.closed = False


def _closed_already(tunnel: Tunnel) -> None:
    """Stands in for a closed tunnel's callback, so the tunnel no longer refers to its owner."""


class _TunnelEnded(Exception):
    """Raised inside the pumps when a tunnel must close now; carries the reason."""

    def __init__(self, reason: CloseReason) -> None:
        self.reason = reason


class Engine:
    """Relays every adopted tunnel until it ends; run it with ``nursery.start(engine.run)``."""

    def __init__(self, *, relay: str = "auto", splice_pipes: int, idle_timeout: float) -> None:
        """``relay``: ``copy`` never splices; ``splice`` splices every read a pipe is free for;
        ``auto`` copies until a read fills the whole buffer (a bulk flow), then splices until a
        read comes back small."""
        can_splice = relay != "copy" and splice_available() and splice_pipes > 0
        self.splice_always = can_splice and relay == "splice"
        self.splice_bulk = can_splice and relay == "auto"
        self.idle_timeout = idle_timeout
        self.pipes = PipePool(splice_pipes)
        self._epoll = select.epoll()
        self._by_fd: dict[int, tuple[_Flow, _Flow, Tunnel]] = {}
        self._tunnels: set[Tunnel] = set()
        self._again: list[_Flow] = []
        self._deadlines: list[tuple[float, int, Tunnel]] = []
        self._sequence = count()
        self._tunnel_added = trio.Event()
        self._buffer = bytearray(COPY_CHUNK)
        self._view = memoryview(self._buffer)

    def statistics(self) -> EngineStatistics:
        return EngineStatistics(
            tunnels=len(self._tunnels),
            pipes_in_use=self.pipes.in_use,
            pipes_idle=self.pipes.idle,
            pipe_size=self.pipes.granted,
            splice_fallbacks=self.pipes.fallbacks,
        )

    def adopt(
        self,
        client: Conn,
        backend: Conn,
        stats: RelayStats,
        on_close: Callable[[Tunnel], None],
        *,
        to_client: bytes = b"",
        to_backend: bytes = b"",
    ) -> Tunnel:
        """Take ownership of two connected non-blocking connections and relay between them.

        ``to_client`` and ``to_backend`` are written first (the 101 and bytes the handshake
        read past its head). ``on_close`` runs once, after both sockets are closed, with
        ``stats.close_reason`` set. Registering sockets that already hold data reports them at
        once, so nothing is lost in the hand-over.
        """
        tunnel = Tunnel(client, backend, stats, on_close)
        if self._epoll.closed:
            self._close(tunnel, CloseReason.SHUTDOWN)
            return tunnel
        tunnel.down.parked = to_client
        tunnel.up.parked = to_backend
        tunnel.up.splicing = tunnel.down.splicing = self.splice_always and tunnel.up.can_splice
        stats.last_activity = trio.current_time()
        self._by_fd[tunnel.up.src_fd] = (tunnel.up, tunnel.down, tunnel)
        self._by_fd[tunnel.down.src_fd] = (tunnel.down, tunnel.up, tunnel)
        self._tunnels.add(tunnel)
        try:
            self._epoll.register(tunnel.up.src_fd, _INTEREST)
            self._epoll.register(tunnel.down.src_fd, _INTEREST)
        except OSError:
            self._close(tunnel, CloseReason.CLIENT_RESET)
            return tunnel
        for flow in (tunnel.up, tunnel.down):
            if isinstance(flow.src, TLSConn) and flow.src.has_buffered_input:
                # Already out of the socket, so no event will come for it. Registering the
                # (writable) sockets wakes the engine, which then retries this flow.
                flow.ready = True
                self._again.append(flow)
        if self.idle_timeout > 0:
            deadline = stats.last_activity + self.idle_timeout
            heapq.heappush(self._deadlines, (deadline, next(self._sequence), tunnel))
            self._tunnel_added.set()
        return tunnel

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve events until cancelled; then close every tunnel with reason ``shutdown``."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._expire_idle)
                task_status.started()
                await self._serve_events()
        finally:
            for tunnel in list(self._tunnels):
                self._close(tunnel, CloseReason.SHUTDOWN)
            self.pipes.trim()
            self._epoll.close()

    async def _serve_events(self) -> None:
        epoll_fd = self._epoll.fileno()
        poll = self._epoll.poll
        while True:
            await trio.lowlevel.wait_readable(epoll_fd)
            rounds = 0
            while True:
                events = poll(0, MAX_EVENTS)
                if events:
                    self._dispatch(events)
                if self._again:
                    self._retry()
                elif not events:
                    break
                # Under load, bytes arrive while a batch is served: polling again at once
                # serves them without a round trip through trio's own epoll (two syscalls and
                # a reschedule). Handshake tasks get their turn every few rounds.
                rounds += 1
                if rounds == ROUNDS_PER_TURN:
                    rounds = 0
                    await trio.lowlevel.checkpoint()

    def _dispatch(self, events: list[tuple[int, int]]) -> None:
        now = trio.current_time()
        by_fd = self._by_fd
        for fd, mask in events:
            entry = by_fd.get(fd)
            if entry is None:
                continue
            out_flow, in_flow, tunnel = entry
            tunnel.stats.last_activity = now
            try:
                if mask & _OUT and (
                    in_flow.parked or in_flow.piped or (in_flow.tls_dst and in_flow.tls_dst.backlog)
                ):
                    self._flush(in_flow)
                    if in_flow.ready and not (in_flow.parked or in_flow.piped):
                        self._pump(in_flow)
                if mask & _IN:
                    if out_flow.eof and mask & select.EPOLLERR:
                        # The source already sent EOF, so no read will see this error: a
                        # half-closed peer that then resets would otherwise linger until the
                        # other side writes or the idle timeout.
                        raise _TunnelEnded(out_flow.reset_src)
                    out_flow.ready = True
                    if mask & _HANGUP:
                        out_flow.hangup = True
                    if not (out_flow.parked or out_flow.piped):
                        self._pump(out_flow)
            except _TunnelEnded as ended:
                self._close(tunnel, ended.reason)

    def _retry(self) -> None:
        again, self._again = self._again, []
        for flow in again:
            entry = self._by_fd.get(flow.src_fd)
            # The flow's tunnel may have closed since it was queued, and its descriptor number
            # may already belong to a tunnel adopted meanwhile: only the same flow is pumped.
            if entry is None or entry[0] is not flow or not flow.ready:
                continue
            try:
                self._pump(flow)
            except _TunnelEnded as ended:
                self._close(entry[2], ended.reason)

    def _pump(self, flow: _Flow) -> None:
        """Move bytes from ``flow.src`` to ``flow.dst`` until the source is drained, the
        destination is full, or this turn's budget is spent.

        A flow that still holds bytes (parked or piped) is left alone: reading more now would
        put new bytes ahead of them and overwrite them. It is pumped again when its destination
        drains. This matters for flows queued in ``_again``: between the queueing and the retry,
        an event may pump the same flow into a full destination.

        This is the hot path of every message, so the copy step is written out here.
        """
        if flow.eof or flow.parked or flow.piped:
            return
        src, dst, buffer = flow.src, flow.dst, self._buffer
        for _ in range(READS_PER_TURN):
            if flow.splicing:
                moved = self._splice_once(flow)
                if moved == 0 or flow.piped:
                    return
                if moved > 0:
                    continue
            try:
                n = src.recv_into(buffer)
            except BlockingIOError:
                flow.ready = False
                return
            except OSError as exc:
                raise _TunnelEnded(flow.reset_src) from exc
            if not n:
                self._source_ended(flow)
                return
            try:
                sent = dst.send(self._view[:n])
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise _TunnelEnded(flow.reset_dst) from exc
            if flow.upstream:
                flow.stats.bytes_up += sent
            else:
                flow.stats.bytes_down += sent
            if sent < n:
                flow.parked = bytes(self._view[sent:n])
                return
            if n < COPY_CHUNK:
                if not flow.hangup:
                    flow.ready = False
                    return
            elif self.splice_bulk and flow.can_splice:
                flow.splicing = True
        self._again.append(flow)

    def _splice_once(self, flow: _Flow) -> int:
        """One splice into a pooled pipe and out of it; -1 when no pipe is free (copy instead),
        0 when this turn should stop, else the bytes read."""
        pipe = self.pipes.acquire()
        if pipe is None:
            return -1
        try:
            n = os.splice(flow.src_fd, pipe[1], pipe[2], flags=_SPLICE_FLAGS)
        except BlockingIOError:
            self.pipes.release(pipe)
            flow.ready = False
            return 0
        except OSError as exc:
            self.pipes.release(pipe)
            raise _TunnelEnded(flow.reset_src) from exc
        if n == 0:
            self.pipes.release(pipe)
            self._source_ended(flow)
            return 0
        flow.pipe = pipe
        flow.piped = n
        if self.splice_bulk and n < SPLICE_BELOW:
            flow.splicing = False
        self._flush(flow)
        # Each pipe slot holds one page or one fragment, so a read can stop short because the
        # slots ran out; only a read shorter than the slot count proves the socket drained.
        if not flow.piped and n < pipe[2] // PAGE and not flow.hangup:
            flow.ready = False
            return 0
        return n

    def _flush(self, flow: _Flow) -> None:
        """Write what is parked or piped; on ``EAGAIN`` keep it for the next ``EPOLLOUT``."""
        try:
            if flow.tls_dst is not None and not flow.tls_dst.flush():
                return
            if flow.parked:
                sent = flow.dst.send(flow.parked)
                self._count(flow, sent)
                flow.parked = flow.parked[sent:]
            while flow.piped:
                assert flow.pipe is not None
                sent = os.splice(flow.pipe[0], flow.dst_fd, flow.piped, flags=_SPLICE_FLAGS)
                self._count(flow, sent)
                flow.piped -= sent
        except BlockingIOError:
            return
        except OSError as exc:
            raise _TunnelEnded(flow.reset_dst) from exc
        if flow.pipe is not None and not flow.piped:
            self.pipes.release(flow.pipe)
            flow.pipe = None
        if flow.eof and not flow.parked:
            if flow.shut:
                self._end_if_done(flow)
            else:
                self._shut(flow)

    @staticmethod
    def _count(flow: _Flow, sent: int) -> None:
        if flow.upstream:
            flow.stats.bytes_up += sent
        else:
            flow.stats.bytes_down += sent

    def _source_ended(self, flow: _Flow) -> None:
        flow.eof = True
        flow.ready = False
        if not flow.stats.close_reason:
            flow.stats.close_reason = flow.eof_reason
        if not (flow.parked or flow.piped):
            self._shut(flow)

    def _shut(self, flow: _Flow) -> None:
        """Pass the half-close on; when both directions are shut the tunnel is done."""
        if flow.shut:
            return
        flow.shut = True
        try:
            flow.dst.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise _TunnelEnded(flow.reset_dst) from exc
        tunnel = flow.tunnel
        if tunnel is None:
            return
        if flow.tls_dst is not None and flow.tls_dst.has_buffered_input:
            # close_notify made the TLS end decrypt what it held: no socket event will say so.
            reverse = tunnel.down if flow.upstream else tunnel.up
            reverse.ready = True
            self._again.append(reverse)
        self._end_if_done(flow)

    @staticmethod
    def _end_if_done(flow: _Flow) -> None:
        """Both directions shut and every TLS record written: the tunnel is done."""
        tunnel = flow.tunnel
        if tunnel is None or not (tunnel.up.shut and tunnel.down.shut):
            return
        if any(f.tls_dst is not None and f.tls_dst.backlog for f in (tunnel.up, tunnel.down)):
            return
        raise _TunnelEnded(flow.stats.close_reason or CloseReason.ERROR)

    def close(self, tunnel: Tunnel, reason: CloseReason) -> None:
        """Close an open tunnel now (the admin listener, drains); its callback runs as for
        any other close. A tunnel already closed is left alone."""
        self._close(tunnel, reason)

    def _close(self, tunnel: Tunnel, reason: CloseReason) -> None:
        if tunnel.closed:
            return
        tunnel.closed = True
        stats = tunnel.stats
        clean = reason in (CloseReason.CLIENT_EOF, CloseReason.BACKEND_EOF)
        if not stats.close_reason or (
            not clean
            and stats.close_reason not in (CloseReason.CLIENT_RESET, CloseReason.BACKEND_RESET)
        ):
            stats.close_reason = reason
        for flow in (tunnel.up, tunnel.down):
            flow.tunnel = None
            if flow.pipe is not None:
                self.pipes.discard(flow.pipe)
                flow.pipe = None
                flow.piped = 0
            self._by_fd.pop(flow.src_fd, None)
        self._tunnels.discard(tunnel)
        tunnel.client.close()
        tunnel.backend.close()
        if not self._tunnels:
            self.pipes.trim()
        try:
            tunnel.on_close(tunnel)
        except Exception:
            log.exception("error in a tunnel's close callback")
        tunnel.on_close = _closed_already
        self._drop_closed_deadlines()

    def _drop_closed_deadlines(self) -> None:
        """Rebuild the idle heap without closed tunnels once they are half of it.

        A closed tunnel's entry would otherwise stay until its deadline (an hour by default),
        keeping the tunnel and its callback alive. Rebuilding when the heap holds more than
        twice the open tunnels costs O(1) per close, amortised, and leaves it empty when the
        last tunnel closes. The list is changed in place: ``_expire_idle`` holds it.
        """
        deadlines = self._deadlines
        if len(deadlines) > 2 * len(self._tunnels):
            deadlines[:] = [entry for entry in deadlines if not entry[2].closed]
            heapq.heapify(deadlines)

    async def _expire_idle(self) -> None:
        """Close tunnels with no bytes either way for ``idle_timeout``; one timer for all."""
        deadlines = self._deadlines
        while True:
            if not deadlines:
                self._tunnel_added = trio.Event()
                await self._tunnel_added.wait()
                continue
            await trio.sleep_until(deadlines[0][0])
            now = trio.current_time()
            while deadlines and deadlines[0][0] <= now:
                _, _, tunnel = heapq.heappop(deadlines)
                if tunnel.closed:
                    continue
                deadline = tunnel.stats.last_activity + self.idle_timeout
                if deadline <= now:
                    self._close(tunnel, CloseReason.IDLE_TIMEOUT)
                else:
                    heapq.heappush(deadlines, (deadline, next(self._sequence), tunnel))
