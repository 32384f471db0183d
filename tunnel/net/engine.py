"""The relay engine: every established tunnel, served from one epoll set.

After the 101 nothing is parsed, so a tunnel needs no task, nursery or stream: its two
non-blocking sockets go into one edge-triggered ``select.epoll``, served by one trio task. Each
wake-up services every ready socket in a batch, which is what brings the per-message cost near a
C proxy's (``docs/benchmarks.md`` has the figures). While trio has nothing else to do, that task
blocks in the engine's own ``epoll_wait``, with trio's epoll descriptor in the set and trio's next
deadline as the timeout (``tunnel/net/trioloop.py``): one wake-up per batch, not two. Bytes move
with ``splice(2)`` through pooled pipes when allowed (both ends plain sockets), or with
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

import contextlib
import heapq
import logging
import math
import os
import select
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from itertools import count
from typing import cast

import trio

from tunnel.core.wsframes import GOING_AWAY, MAX_HEADER, FrameTracker, TooManyFrames, close_frame
from tunnel.logs import fields
from tunnel.net.handoff import FlowState, TunnelState
from tunnel.net.pipes import Pipe, PipePool, splice_available
from tunnel.net.relay import RelayStats
from tunnel.net.sockio import Conn
from tunnel.net.tlsconn import TLSConn
from tunnel.net.trioloop import TrioLoop
from tunnel.policy.lifecycle import drain_window, spread
from tunnel.reasons import CloseReason

log = logging.getLogger(__name__)

COPY_CHUNK = 64 * 1024
SPLICE_ABOVE = 32 * 1024
"""In ``auto`` mode a copied read at least this long sends the flow to splicing: a bulk flow.
Reads rarely fill the whole buffer: on loopback a 64 KiB write arrives as a 65,483-byte
segment and a short one, and the engine wakes for the first."""
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
NEVER = math.inf
POLITE = frozenset(
    {
        CloseReason.IDLE_TIMEOUT,
        CloseReason.MAX_LIFETIME,
        CloseReason.DRAIN,
        CloseReason.SHUTDOWN,
        CloseReason.ADMIN,
        CloseReason.CREDENTIAL_EXPIRED,
        CloseReason.BACKEND_DOWN,
    }
)
"""Reasons the tunnel itself decides: a WebSocket tunnel closed for one of these gets Close
frames; the others (EOF, resets, errors) come from a peer, and are passed on as they are. A
``half_close_timeout`` closes at once too: one side has already said goodbye with its FIN, and
the other has been silent since."""
POLICY_VIOLATION = 1008
"""The Close code (RFC 6455 section 7.4.1) of a ``credential_expired`` close, to both sides:
the tunnel ends because a rule says so, not because anyone is going away (1001), and the
backend learns the same cause as the client."""
CLOSE_CODES = {CloseReason.CREDENTIAL_EXPIRED: POLICY_VIOLATION}
"""Polite closes whose Close frames carry another code than 1001 (going away)."""


_WAITING: trio.lowlevel.RunVar[Engine | None] = trio.lowlevel.RunVar("engine_waiting", None)
"""The engine of this trio run that blocks in its own epoll. Only one may: another engine's
events are in neither its set nor trio's, so a second engine waits through trio (its epoll
inside trio's, which is inside the first one's)."""


@dataclass(frozen=True, slots=True)
class EngineStatistics:
    """A snapshot for the stats page and the tests."""

    tunnels: int
    pipes_in_use: int
    pipes_idle: int
    pipe_size: int
    splice_fallbacks: int
    """Reads that copied because no pipe was free (``splice_pipes`` reached or no descriptor)."""
    splice_reads: int = 0
    """Reads that went through a pipe: how often ``auto`` judged a flow bulk, or ``splice``
    found a pipe."""


class _Flow:
    """One direction of a tunnel: bytes read from ``src`` and written to ``dst``."""

    __slots__ = (
        "can_splice",
        "closing",
        "dst",
        "dst_fd",
        "eof",
        "eof_reason",
        "frames",
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
        self.frames: FrameTracker | None = None
        """WebSocket frame boundaries of what ``src`` sends (WebSocket tunnels only)."""
        self.closing: _Closing | None = None
        """Set while the tunnel closes politely."""
        self.eof_reason = CloseReason.CLIENT_EOF if upstream else CloseReason.BACKEND_EOF
        self.reset_src = CloseReason.CLIENT_RESET if upstream else CloseReason.BACKEND_RESET
        self.reset_dst = CloseReason.BACKEND_RESET if upstream else CloseReason.CLIENT_RESET


class _Closing:
    """One flow's part in a polite close: the Close frame it owes its destination, and
    whether that frame is on its way."""

    __slots__ = ("frame", "sent")

    def __init__(self, frame: bytes) -> None:
        self.frame = frame
        self.sent = False
        """The frame in flight has ended and nothing more is passed on: the Close frame is
        queued for the destination, or not needed (the source's own Close went through, or
        the destination is shut)."""


class Tunnel:
    """An established tunnel owned by the engine: two sockets, two flows, the counters and
    the deadlines (all on trio's clock; ``inf`` = none)."""

    __slots__ = (
        "backend",
        "client",
        "closed",
        "closing",
        "credential_at",
        "deadline",
        "down",
        "drain_at",
        "drain_reason",
        "expires_at",
        "hard_at",
        "on_close",
        "opened_at",
        "stats",
        "timer_at",
        "up",
    )

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
        self.closing: CloseReason | None = None
        """Why the tunnel is closing politely (Close frames sent, replies awaited)."""
        self.expires_at = NEVER
        """``max_lifetime``: closed politely with reason ``max_lifetime`` then."""
        self.credential_at = NEVER
        """The client's credential expires: closed politely with reason
        ``credential_expired`` then."""
        self.drain_at = NEVER
        """A drain's polite close, with reason ``drain_reason``."""
        self.drain_reason = CloseReason.DRAIN
        self.hard_at = NEVER
        """A drain's end: whatever is still open then is closed at once."""
        self.deadline = NEVER
        """Closed at once then: ``hard_at``, or the end of a polite close's grace."""
        self.timer_at = NEVER
        """When the engine's timer looks at this tunnel next."""
        self.opened_at = 0.0
        """When ``adopt`` took it (``adopt_state``: that long ago in the first process)."""

    @property
    def websocket(self) -> bool:
        return self.up.frames is not None


def _sooner(timeout: float, before: float) -> bool:
    """Whether a new timeout (0 = none) may fall before the one open tunnels were scheduled
    by, so that they must be looked at again."""
    return timeout > 0 and not 0 < before <= timeout


def _left(at: float, now: float) -> float | None:
    """A deadline as the seconds left until it (None: never)."""
    return None if at == NEVER else at - now


def _at(left: float | None, now: float) -> float:
    """``_left`` undone on this engine's clock."""
    return NEVER if left is None else now + left


def _closed_already(tunnel: Tunnel) -> None:
    """Stands in for a closed tunnel's callback, so the tunnel no longer refers to its owner."""


class _TunnelEnded(Exception):
    """Raised inside the pumps when a tunnel must close now; carries the reason."""

    def __init__(self, reason: CloseReason) -> None:
        self.reason = reason


class Engine:
    """Relays every adopted tunnel until it ends; run it with ``nursery.start(engine.run)``."""

    def __init__(
        self,
        *,
        relay: str = "auto",
        splice_pipes: int,
        idle_timeout: float,
        close_grace: float = 1.0,
        half_close_timeout: float = 0.0,
        own_wait: bool = True,
    ) -> None:
        self.pipes = PipePool(splice_pipes)
        self.own_wait = own_wait
        """Block in the engine's own epoll when trio is idle (``_serve_in_own_epoll``); False
        always waits through trio (the tests compare the two)."""
        self._trio_fd = -1
        """trio's epoll descriptor while it is in the engine's set, else -1."""
        self._trio_ready = False
        """The last batch reported trio's descriptor: trio has I/O to serve."""
        self.splice_reads = 0
        self._now: Callable[[], float] = trio.current_time
        """trio's clock; the run loop's own clock function while waiting in the engine's
        epoll (the same time, fewer lookups per batch)."""
        self.idle_timeout = 0.0
        self.half_close_timeout = 0.0
        self._epoll = select.epoll()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        """Written to when work is queued from outside the event loop (a close the timer or
        the admin listener asked for), so that the loop wakes for it."""
        self._epoll.register(self._wake_fd, select.EPOLLIN | select.EPOLLET)
        self._by_fd: dict[int, tuple[_Flow, _Flow, Tunnel]] = {}
        self._arriving: dict[int, tuple[_Flow, _Flow, Tunnel]] = {}
        """Sockets of tunnels taken over (``adopt_state``) until their first event: being
        writable, which registering reports, is not activity, so it must not reset their
        idle clock (``_arrived``)."""
        self._tunnels: set[Tunnel] = set()
        self._again: list[_Flow] = []
        self._timers: list[tuple[float, int, Tunnel]] = []
        self._sequence = count()
        self._rearm = trio.Event()
        self._sleeping_until = NEVER
        """When the timer task wakes next: an earlier deadline must wake it sooner."""
        self._emptied = trio.Event()
        self._draining: tuple[CloseReason, float, float] | None = None
        """A shutdown's reason, last polite close and end: tunnels adopted during it."""
        self._buffer = bytearray(COPY_CHUNK)
        self._view = memoryview(self._buffer)
        self.configure(
            relay=relay,
            splice_pipes=splice_pipes,
            idle_timeout=idle_timeout,
            close_grace=close_grace,
            half_close_timeout=half_close_timeout,
        )

    def configure(
        self,
        *,
        relay: str,
        splice_pipes: int,
        idle_timeout: float,
        close_grace: float,
        half_close_timeout: float = 0.0,
    ) -> None:
        """Apply settings (a reload calls this): open tunnels follow them too, a shorter
        ``idle_timeout`` or ``half_close_timeout`` at once.

        ``relay``: ``copy`` never splices; ``splice`` splices every read a pipe is free for;
        ``auto`` copies until a read brings ``SPLICE_ABOVE`` bytes or more (a bulk flow), then
        splices until a read comes back under ``SPLICE_BELOW``. ``idle_timeout`` (0 = never
        idle), ``close_grace`` and ``half_close_timeout`` are seconds: once a direction of a
        tunnel is shut (its source's EOF passed on), that much silence ends the tunnel, reason
        ``half_close_timeout`` (0 = only the idle timeout applies)."""
        can_splice = relay != "copy" and splice_available() and splice_pipes > 0
        self.splice_always = can_splice and relay == "splice"
        self.splice_bulk = can_splice and relay == "auto"
        self.pipes.limit = splice_pipes
        sooner = _sooner(idle_timeout, self.idle_timeout) or _sooner(
            half_close_timeout, self.half_close_timeout
        )
        self.idle_timeout = idle_timeout
        self.half_close_timeout = half_close_timeout
        self.close_grace = close_grace
        if sooner:
            # Open tunnels are looked at by their old deadline: bring it forward.
            for tunnel in self._tunnels:
                self._schedule(tunnel)

    def statistics(self) -> EngineStatistics:
        return EngineStatistics(
            tunnels=len(self._tunnels),
            pipes_in_use=self.pipes.in_use,
            pipes_idle=self.pipes.idle,
            pipe_size=self.pipes.granted,
            splice_fallbacks=self.pipes.fallbacks,
            splice_reads=self.splice_reads,
        )

    @property
    def waits_in_own_epoll(self) -> bool:
        """The engine is serving by blocking in its own epoll (``_serve_in_own_epoll``)."""
        return self._trio_fd != -1

    def adopt(
        self,
        client: Conn,
        backend: Conn,
        stats: RelayStats,
        on_close: Callable[[Tunnel], None],
        *,
        reply_head: bytes = b"",
        to_client: bytes = b"",
        to_backend: bytes = b"",
        websocket: bool = False,
        lifetime: float = 0.0,
        expires_at: float | None = None,
    ) -> Tunnel:
        """Take ownership of two connected non-blocking connections and relay between them.

        ``reply_head`` (the 101), then ``to_client``, and ``to_backend`` are written first:
        the bytes each handshake read past its head. ``websocket`` tracks frame boundaries, so
        that a close the tunnel decides sends each side a Close frame (``close``);
        ``lifetime`` > 0 closes the tunnel that many seconds from now (reason
        ``max_lifetime``), and ``expires_at`` (trio's clock) when the client's credential
        expires (reason ``credential_expired``; the Close frames say 1008, policy violation,
        to both sides). ``on_close`` runs once, after both sockets are closed, with
        ``stats.close_reason`` set. Registering sockets that already hold data reports them
        at once, so nothing is lost in the hand-over.
        """
        tunnel = Tunnel(client, backend, stats, on_close)
        if self._epoll.closed:
            self._close(tunnel, CloseReason.SHUTDOWN)
            return tunnel
        tunnel.down.parked = reply_head + to_client
        tunnel.up.parked = to_backend
        if websocket:
            tunnel.up.frames = FrameTracker()
            tunnel.down.frames = FrameTracker()
            try:
                if to_backend:
                    tunnel.up.frames.feed(to_backend, len(to_backend))
                if to_client:
                    tunnel.down.frames.feed(to_client, len(to_client))
            except TooManyFrames:
                self._untrack(tunnel.up)
        tunnel.up.splicing = tunnel.down.splicing = self.splice_always and tunnel.up.can_splice
        now = stats.last_activity = tunnel.opened_at = trio.current_time()
        if lifetime > 0:
            tunnel.expires_at = now + lifetime
        if expires_at is not None:
            tunnel.credential_at = expires_at
        self._start(tunnel, now)
        return tunnel

    def _start(self, tunnel: Tunnel, now: float, *, arriving: bool = False) -> None:
        """Register a tunnel whose state is set: its events and deadlines begin."""
        by_fd = self._arriving if arriving else self._by_fd
        by_fd[tunnel.up.src_fd] = (tunnel.up, tunnel.down, tunnel)
        by_fd[tunnel.down.src_fd] = (tunnel.down, tunnel.up, tunnel)
        self._tunnels.add(tunnel)
        try:
            self._epoll.register(tunnel.up.src_fd, _INTEREST)
            self._epoll.register(tunnel.down.src_fd, _INTEREST)
        except OSError:
            self._close(tunnel, CloseReason.CLIENT_RESET)
            return
        for flow in (tunnel.up, tunnel.down):
            if isinstance(flow.src, TLSConn) and flow.src.has_buffered_input:
                # Already out of the socket, so no event will come for it. Registering the
                # (writable) sockets wakes the engine, which then retries this flow.
                flow.ready = True
                self._again.append(flow)
        if self._draining is not None:
            reason, last, end = self._draining
            self._drain_one(tunnel, reason, max(now, last), end)
        self._schedule(tunnel)

    def export(
        self, tunnel: Tunnel, meta: Mapping[str, str] | None = None
    ) -> tuple[socket.socket, socket.socket, TunnelState] | None:
        """Detach an open tunnel for another engine (``adopt_state``, maybe in another process):
        its sockets leave this engine open, with what they need in a ``TunnelState`` (``meta``
        is carried untouched). Bytes in a splice pipe are read out into the state.

        The tunnel is gone from this engine as if closed, but its sockets are not closed and
        ``on_close`` never runs: the caller asked, and updates its own records (a tunnel
        handed off is not a close reason). The caller closes its copies of the sockets once
        the other process holds them, or adopts them back (``adopt_state``) if that failed.

        Returns None, leaving the tunnel as it was, when it cannot move: a TLS end (its
        session lives in this process), a polite close under way (Close frames owed or
        awaited), or already closed. Call it from a trio task of the engine's thread (between
        two of the engine's batches, as every other call)."""
        client, backend = tunnel.client, tunnel.backend
        if tunnel.closed or tunnel.closing is not None:
            return None
        if isinstance(client, TLSConn) or isinstance(backend, TLSConn):
            return None
        try:
            up, down = self._flow_state(tunnel.up), self._flow_state(tunnel.down)
        except OSError:
            # Bytes of a pipe could not be read back: they are lost, and so is the tunnel.
            log.exception("a splice pipe could not be read back for a hand-off")
            self._close(tunnel, CloseReason.ERROR)
            return None
        now = trio.current_time()
        stats = tunnel.stats
        state = TunnelState(
            up=up,
            down=down,
            bytes_up=stats.bytes_up,
            bytes_down=stats.bytes_down,
            close_reason=None if stats.close_reason is None else stats.close_reason.value,
            age=now - tunnel.opened_at,
            idle=now - stats.last_activity,
            lifetime=_left(tunnel.expires_at, now),
            credential=_left(tunnel.credential_at, now),
            drain=_left(tunnel.drain_at, now),
            drain_reason=tunnel.drain_reason.value,
            hard_stop=_left(tunnel.hard_at, now),
            meta=dict(meta or {}),
        )
        tunnel.closed = True
        tunnel.on_close = _closed_already
        for flow in (tunnel.up, tunnel.down):
            flow.tunnel = None
            self._by_fd.pop(flow.src_fd, None)
            self._arriving.pop(flow.src_fd, None)
            with contextlib.suppress(OSError):
                self._epoll.unregister(flow.src_fd)
        self._tunnels.discard(tunnel)
        if not self._tunnels:
            self.pipes.trim()
            self._emptied.set()
        self._drop_closed_timers()
        return client, backend, state

    def _flow_state(self, flow: _Flow) -> FlowState:
        """What a flow holds and where it stands; its pipe, read empty, goes back to the pool."""
        pending = flow.parked
        pipe = flow.pipe
        if pipe is not None:
            chunks = [pending]
            left = flow.piped
            while left:
                chunk = os.read(pipe[0], left)
                if not chunk:
                    raise OSError(f"splice pipe held {left} bytes fewer than counted")
                chunks.append(chunk)
                left -= len(chunk)
            pending = b"".join(chunks)
            flow.parked, flow.piped, flow.pipe = pending, 0, None
            self.pipes.release(pipe)
        frames = None if flow.frames is None else flow.frames.position()
        return FlowState(pending, flow.eof, flow.shut, frames)

    def adopt_state(
        self,
        client: socket.socket,
        backend: socket.socket,
        state: TunnelState,
        on_close: Callable[[Tunnel], None],
        stats: RelayStats,
    ) -> Tunnel:
        """Take over a tunnel another engine exported (``export``): the bytes it had read are
        written first, in order; counters go on from the state's (into ``stats``); its age,
        idle clock and deadlines are set from the state's durations on this engine's clock;
        frame trackers stand where they stood; a direction already shut stays shut. From here
        on it is a tunnel like any ``adopt`` gave, ``on_close`` included."""
        tunnel = Tunnel(client, backend, stats, on_close)
        if self._epoll.closed:
            self._close(tunnel, CloseReason.SHUTDOWN)
            return tunnel
        client.setblocking(False)
        backend.setblocking(False)
        now = trio.current_time()
        stats.bytes_up = state.bytes_up
        stats.bytes_down = state.bytes_down
        stats.close_reason = None if state.close_reason is None else CloseReason(state.close_reason)
        stats.last_activity = now - state.idle
        tunnel.opened_at = now - state.age
        for flow, moved in ((tunnel.up, state.up), (tunnel.down, state.down)):
            flow.parked = moved.pending
            flow.eof = moved.eof
            flow.shut = moved.shut
            if moved.frames is not None:
                flow.frames = FrameTracker.resume(moved.frames)
        if tunnel.up.frames is None or tunnel.down.frames is None:
            tunnel.up.frames = tunnel.down.frames = None
        tunnel.up.splicing = tunnel.down.splicing = self.splice_always and tunnel.up.can_splice
        tunnel.expires_at = _at(state.lifetime, now)
        tunnel.credential_at = _at(state.credential, now)
        tunnel.drain_at = _at(state.drain, now)
        tunnel.drain_reason = CloseReason(state.drain_reason)
        tunnel.hard_at = tunnel.deadline = _at(state.hard_stop, now)
        self._start(tunnel, now, arriving=True)
        for flow in (tunnel.up, tunnel.down):
            if flow.eof and not flow.parked and not flow.shut and not tunnel.closed:
                # Exported between its EOF and the shutdown: no event will pass the EOF on.
                try:
                    self._shut(flow)
                except _TunnelEnded as ended:
                    self._close(tunnel, ended.reason)
        return tunnel

    def drain(
        self, tunnels: Iterable[Tunnel], reason: CloseReason, timeout: float, *, every: bool = False
    ) -> float:
        """Let ``tunnels`` run on for up to ``timeout`` seconds: their polite closes (reason
        ``reason``) are spread over the last third of that window, so clients do not all
        reconnect in the same instant, and whatever is still open at its end is closed at once.
        ``every`` drains every tunnel, and those adopted later too (a shutdown). Returns the
        window's end."""
        now = trio.current_time()
        first, last, end = drain_window(now, timeout, self.close_grace)
        if every:
            self._draining = (reason, last, end)
            tunnels = self._tunnels
        chosen = [tunnel for tunnel in tunnels if not tunnel.closed]
        for tunnel, at in zip(chosen, spread(len(chosen), first, last), strict=True):
            self._drain_one(tunnel, reason, at, end)
            self._schedule(tunnel)
        return end

    @staticmethod
    def _drain_one(tunnel: Tunnel, reason: CloseReason, at: float, end: float) -> None:
        if at < tunnel.drain_at:
            tunnel.drain_at = at
            tunnel.drain_reason = reason
        tunnel.hard_at = min(tunnel.hard_at, end)
        tunnel.deadline = min(tunnel.deadline, end)

    async def wait_empty(self) -> None:
        """Return once no tunnel is open (at once if none is)."""
        while self._tunnels:
            self._emptied = trio.Event()
            await self._emptied.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve events until cancelled; then close every tunnel at once, reason ``shutdown``
        (a graceful stop drains them first: ``drain``)."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._run_timers)
                task_status.started()
                await self._serve_events()
        finally:
            for tunnel in list(self._tunnels):
                self._close(tunnel, CloseReason.SHUTDOWN)
            self.pipes.trim()
            self._epoll.close()
            os.close(self._wake_fd)

    async def _serve_events(self) -> None:
        loop = TrioLoop.current() if self.own_wait and _WAITING.get() is None else None
        if loop is not None:
            try:
                self._epoll.register(loop.fd, select.EPOLLIN)
            except OSError:
                loop = None
        if loop is None:
            await self._serve_through_trio()
            return
        self._trio_fd = loop.fd
        self._now = loop.now
        claim = _WAITING.set(self)
        try:
            await self._serve_in_own_epoll(loop)
        finally:
            _WAITING.reset(claim)
            self._trio_fd = -1
            self._now = trio.current_time
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(loop.fd)

    async def _serve_in_own_epoll(self, loop: TrioLoop) -> None:
        """Block in the engine's own ``epoll_wait`` while trio has nothing to do: one wake-up
        per batch instead of two (``tunnel/net/trioloop.py``).

        trio's epoll descriptor is in the set, so trio's I/O wakes the engine, and the wait
        ends by trio's next deadline. The engine yields to trio (a checkpoint) after a batch
        whenever trio has a task to run, I/O reported, or a deadline due; otherwise it goes
        straight back to waiting."""
        poll = self._epoll.poll
        me = trio.lowlevel.current_task()
        alone = False
        """No other task is scheduled: true from the check after a yield to trio until the
        next yield (tasks the engine's own work wakes go to the run queue, which
        ``sleep_time`` sees)."""
        while True:
            trio_wait = loop.sleep_time()
            if trio_wait and not alone:
                alone = not loop.others_scheduled(me)
                if not alone:
                    trio_wait = 0.0
            if trio_wait and loop.idle_waiters:
                await self._wait_through_trio(loop)
                alone = False
                trio_wait = 0.0
            timeout = 0.0 if self._again else trio_wait
            events = poll(-1.0 if timeout == NEVER else timeout, MAX_EVENTS)
            self._trio_ready = False
            if events:
                self._dispatch(events)
            if self._again:
                self._retry()
            if not trio_wait or self._trio_ready or (not events and timeout > 0):
                await trio.lowlevel.checkpoint()
                alone = False

    async def _wait_through_trio(self, loop: TrioLoop) -> None:
        """Wait for the engine's events through trio, so that trio's loop sees this task
        blocked (``wait_all_tasks_blocked``, used by tests). Two epoll sets must not hold each
        other: trio's leaves the engine's for the wait, and trio forgets the engine's after it
        (``notify_closing``), which would otherwise stay in trio's set for good."""
        epoll_fd = self._epoll.fileno()
        self._epoll.unregister(loop.fd)
        try:
            await trio.lowlevel.wait_readable(epoll_fd)
        finally:
            trio.lowlevel.notify_closing(epoll_fd)
            self._epoll.register(loop.fd, select.EPOLLIN)

    async def _serve_through_trio(self) -> None:
        """Wait for the engine's epoll descriptor through trio, then poll it: where trio's
        loop cannot be read (``TrioLoop.current``), e.g. under a ``MockClock``."""
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
        now = self._now()
        by_fd = self._by_fd
        for fd, mask in events:
            entry = by_fd.get(fd)
            if entry is None:
                if fd == self._trio_fd:
                    self._trio_ready = True
                elif fd == self._wake_fd:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(fd)
                elif self._arriving:
                    self._arrived(fd, mask)
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

    def _arrived(self, fd: int, mask: int) -> None:
        """The first event of a socket taken over by ``adopt_state``: from now on it is served
        as any other; the event counts as activity only if it brought input (bytes or a FIN
        that came during the hand-off), not for the writability that registering reports."""
        entry = self._arriving.pop(fd, None)
        if entry is None:
            return
        out_flow, _, tunnel = entry
        self._by_fd[fd] = entry
        idle_since = tunnel.stats.last_activity
        self._dispatch([(fd, mask)])
        if not (mask & _IN and not out_flow.eof):
            tunnel.stats.last_activity = idle_since

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
        if flow.closing is not None:
            self._pump_closing(flow)
            return
        src, dst, buffer = flow.src, flow.dst, self._buffer
        frames = flow.frames
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
            if frames is not None:
                left = frames.left
                if left >= n:
                    frames.left = left - n
                else:
                    try:
                        frames.feed(buffer, n)
                    except TooManyFrames:
                        frames = None
                        self._untrack(flow)
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
            if n >= SPLICE_ABOVE and self.splice_bulk and flow.can_splice:
                flow.splicing = True
            if n < COPY_CHUNK and not flow.hangup:
                flow.ready = False
                return
        self._again.append(flow)

    def _splice_once(self, flow: _Flow) -> int:
        """One splice into a pooled pipe and out of it; -1 when this read should copy instead
        (no pipe is free, or a frame header must be read), 0 when this turn should stop, else
        the bytes read.

        A WebSocket flow splices one frame at a time: between two frames it peeks at the next
        header (``MSG_PEEK``, so the header itself is spliced with its payload) and each splice
        stops at the end of that frame, so the tracker sees every header without a copy."""
        frames = flow.frames
        if frames is not None and not frames.left:
            if frames.in_frame:
                return -1
            try:
                head = cast(socket.socket, flow.src).recv(MAX_HEADER, socket.MSG_PEEK)
            except BlockingIOError:
                flow.ready = False
                return 0
            except OSError as exc:
                raise _TunnelEnded(flow.reset_src) from exc
            if not head:
                self._source_ended(flow)
                return 0
            size = frames.peek(head)
            if size is None:
                return -1
            if size < SPLICE_BELOW:
                # Three system calls for one small frame: copying reads many in one.
                if self.splice_bulk:
                    flow.splicing = False
                return -1
        pipe = self.pipes.acquire()
        if pipe is None:
            return -1
        want = pipe[2] if frames is None else min(pipe[2], frames.left)
        try:
            n = os.splice(flow.src_fd, pipe[1], want, flags=_SPLICE_FLAGS)
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
        if frames is not None:
            frames.left -= n
        self.splice_reads += 1
        flow.pipe = pipe
        flow.piped = n
        short = n < want
        if self.splice_bulk and short and n < SPLICE_BELOW:
            flow.splicing = False
        self._flush(flow)
        # Each pipe slot holds one page or one fragment, so a read can stop short because the
        # slots ran out; only a read shorter than the slot count proves the socket drained.
        if not flow.piped and short and n < pipe[2] // PAGE and not flow.hangup:
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
        if flow.closing is not None:
            self._advance_close(flow)
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
        if self.half_close_timeout > 0:
            self._schedule(tunnel)
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
        """End an open tunnel for ``reason`` (admin, drain, lifetime...); its callback runs as
        for any other close. A WebSocket tunnel closes politely when ``reason`` is one the
        tunnel decided (``POLITE``): each side gets a Close frame (1001, or the reason's
        ``CLOSE_CODES`` entry; the reason as text) once the frame it is receiving has ended,
        toward the backend masked as a client's; the sockets close when both sides have
        answered with their own Close (or their EOF), or ``close_grace`` after the frames went
        out. Any other tunnel closes at once. A tunnel already closed, or closing, is left
        alone."""
        if tunnel.closed or tunnel.closing is not None:
            return
        if reason in POLITE and tunnel.websocket and self.close_grace > 0:
            try:
                self._begin_close(tunnel, reason)
            except _TunnelEnded as ended:
                self._close(tunnel, ended.reason)
        else:
            self._close(tunnel, reason)

    def _begin_close(self, tunnel: Tunnel, reason: CloseReason) -> None:
        tunnel.closing = tunnel.stats.close_reason = reason
        tunnel.deadline = min(tunnel.hard_at, trio.current_time() + self.close_grace)
        code = CLOSE_CODES.get(reason, GOING_AWAY)
        tunnel.up.closing = _Closing(close_frame(reason.value, os.urandom(4), code))
        tunnel.down.closing = _Closing(close_frame(reason.value, code=code))
        self._schedule(tunnel)
        for flow in (tunnel.up, tunnel.down):
            self._advance_close(flow)
            if not (flow.parked or flow.piped or flow.eof or tunnel.closed):
                # The source may hold bytes already reported, which no new event will report
                # again: read them now (finishing the frame in flight, or finding the reply).
                flow.ready = True
                self._pump(flow)
        if self._again:
            os.eventfd_write(self._wake_fd, 1)

    def _advance_close(self, flow: _Flow) -> None:
        """Queue the flow's Close frame once its destination stands between two frames; then
        close the tunnel if every side has answered."""
        closing = flow.closing
        frames = flow.frames
        tunnel = flow.tunnel
        assert closing is not None
        assert frames is not None
        assert tunnel is not None
        if not closing.sent:
            if flow.eof or flow.shut:
                # The destination gets the source's FIN: nothing may follow it.
                self._cut(flow, closing, tunnel)
            elif not (frames.in_frame or flow.piped):
                flow.parked += self._cut(flow, closing, tunnel)
                self._flush(flow)
        self._check_closed(tunnel)

    def _cut(self, flow: _Flow, closing: _Closing, tunnel: Tunnel) -> bytes:
        """The flow stands between two frames: nothing more is passed on from here. Returns
        the Close frame to write now, or nothing when the source's own Close already went
        through (a second one would break the protocol). Once both flows are cut, the replies
        get ``close_grace`` from now."""
        closing.sent = True
        other = tunnel.down if flow.upstream else tunnel.up
        if other.closing is not None and other.closing.sent:
            tunnel.deadline = min(tunnel.hard_at, trio.current_time() + self.close_grace)
            self._schedule(tunnel)
        assert flow.frames is not None
        return b"" if flow.frames.close_seen else closing.frame

    @staticmethod
    def _untrack(flow: _Flow) -> None:
        """Stop tracking frames in the flow's tunnel (its source sends too many tiny frames
        to track cheaply, ``wsframes.SMALLEST_AVERAGE_FRAME``); the tunnel will close plainly,
        as other upgrades do."""
        tunnel = flow.tunnel
        if tunnel is None:
            return
        tunnel.up.frames = tunnel.down.frames = None
        log.debug(
            "WebSocket frames no longer tracked: too many tiny frames in one read; this "
            "tunnel will be closed without a Close frame",
            extra=fields(side="client" if flow.upstream else "backend"),
        )

    @staticmethod
    def _check_closed(tunnel: Tunnel) -> None:
        """Both Close frames written and both sides answered: the polite close is done."""
        for flow in (tunnel.up, tunnel.down):
            closing, frames = flow.closing, flow.frames
            if closing is None or frames is None or not closing.sent:
                return
            if flow.parked or flow.piped or (flow.tls_dst is not None and flow.tls_dst.backlog):
                return
            if not (flow.eof or frames.close_seen):
                return
        raise _TunnelEnded(tunnel.closing or CloseReason.ERROR)

    def _pump_closing(self, flow: _Flow) -> None:
        """``_pump`` during a polite close: finish the frame in flight and queue the Close
        frame after it; what the source sends after that is read and dropped (nothing may
        follow a Close), watching for the source's own Close. Copies only: a close is short."""
        closing, frames, tunnel = flow.closing, flow.frames, flow.tunnel
        assert closing is not None
        assert frames is not None
        assert tunnel is not None
        flow.splicing = False
        buffer, view = self._buffer, self._view
        for _ in range(READS_PER_TURN):
            try:
                n = flow.src.recv_into(buffer)
            except BlockingIOError:
                flow.ready = False
                break
            except OSError as exc:
                raise _TunnelEnded(tunnel.closing or flow.reset_src) from exc
            if not n:
                if not closing.sent:
                    self._cut(flow, closing, tunnel)
                self._source_ended(flow)
                break
            if closing.sent:
                try:
                    frames.feed(view, n)
                except TooManyFrames:
                    # No reply can be recognised in this: the source has had its chance.
                    raise _TunnelEnded(tunnel.closing or CloseReason.ERROR) from None
                continue
            take = frames.finish_frame(view, n)
            out = bytes(view[:take])
            if take < n or not frames.in_frame:
                out += self._cut(flow, closing, tunnel)
                try:
                    frames.feed(view[take:n], n - take)
                except TooManyFrames:
                    raise _TunnelEnded(tunnel.closing or CloseReason.ERROR) from None
            try:
                sent = flow.dst.send(out)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise _TunnelEnded(tunnel.closing or flow.reset_dst) from exc
            self._count(flow, sent)
            if sent < len(out):
                flow.parked = out[sent:]
                break
        else:
            self._again.append(flow)
        if flow.tunnel is not None:
            self._check_closed(tunnel)

    def _close(self, tunnel: Tunnel, reason: CloseReason) -> None:
        if tunnel.closed:
            return
        tunnel.closed = True
        stats = tunnel.stats
        clean = reason in (CloseReason.CLIENT_EOF, CloseReason.BACKEND_EOF)
        if tunnel.closing is not None:
            stats.close_reason = tunnel.closing
        elif not stats.close_reason or (
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
            if self._arriving:
                self._arriving.pop(flow.src_fd, None)
        self._tunnels.discard(tunnel)
        tunnel.client.close()
        tunnel.backend.close()
        if not self._tunnels:
            self.pipes.trim()
            self._emptied.set()
        try:
            tunnel.on_close(tunnel)
        except Exception:
            log.exception("error in a tunnel's close callback")
        tunnel.on_close = _closed_already
        self._drop_closed_timers()

    def _drop_closed_timers(self) -> None:
        """Rebuild the timer heap without dead entries once they are half of it.

        A closed tunnel's entry would otherwise stay until its deadline (an hour by default),
        keeping the tunnel and its callback alive. Entries an earlier deadline left behind
        (a drain schedules an earlier one for every tunnel) go too, so the rebuilt heap holds
        one entry per open tunnel: rebuilding when it holds more than twice the open tunnels
        then costs O(1) per close, amortised (keeping the superseded entries made every close
        of a drained engine rebuild it: 4,000 drained tunnels cost 2.2 s of CPU, 8,000 four
        times that), and leaves it empty when the last tunnel closes. The list is changed in
        place: ``_run_timers`` holds it.
        """
        timers = self._timers
        if len(timers) > 2 * len(self._tunnels):
            timers[:] = [
                entry for entry in timers if not entry[2].closed and entry[0] == entry[2].timer_at
            ]
            heapq.heapify(timers)

    def _due(self, tunnel: Tunnel) -> float:
        """When the tunnel's next deadline falls."""
        due = tunnel.deadline
        if tunnel.closing is None:
            if self.idle_timeout > 0:
                due = min(due, tunnel.stats.last_activity + self.idle_timeout)
            if self.half_close_timeout > 0 and (tunnel.up.shut or tunnel.down.shut):
                due = min(due, tunnel.stats.last_activity + self.half_close_timeout)
            due = min(due, tunnel.expires_at, tunnel.credential_at, tunnel.drain_at)
        return due

    def _schedule(self, tunnel: Tunnel) -> None:
        """Make sure the timer looks at ``tunnel`` by its next deadline. One heap entry is
        live per tunnel (``timer_at``); entries left behind by an earlier deadline are skipped
        when they come up."""
        due = self._due(tunnel)
        if due >= tunnel.timer_at:
            return
        tunnel.timer_at = due
        heapq.heappush(self._timers, (due, next(self._sequence), tunnel))
        if due < self._sleeping_until:
            self._rearm.set()

    async def _run_timers(self) -> None:
        """Idle and half-close timeouts, lifetimes, credential expiries, drains and close
        graces: one heap, one timer for all."""
        timers = self._timers
        while True:
            self._rearm = trio.Event()
            self._sleeping_until = timers[0][0] if timers else NEVER
            with trio.move_on_at(self._sleeping_until):
                await self._rearm.wait()
            self._sleeping_until = -NEVER
            now = trio.current_time()
            while timers and timers[0][0] <= now:
                when, _, tunnel = heapq.heappop(timers)
                if tunnel.closed or when != tunnel.timer_at:
                    continue
                tunnel.timer_at = NEVER
                self._expire(tunnel, now)
                if not tunnel.closed:
                    self._schedule(tunnel)

    def _expire(self, tunnel: Tunnel, now: float) -> None:
        if tunnel.deadline <= now:
            self._close(tunnel, tunnel.closing or tunnel.drain_reason)
        elif tunnel.closing is not None:
            return
        elif self.idle_timeout > 0 and tunnel.stats.last_activity + self.idle_timeout <= now:
            self.close(tunnel, CloseReason.IDLE_TIMEOUT)
        elif (
            self.half_close_timeout > 0
            and (tunnel.up.shut or tunnel.down.shut)
            and tunnel.stats.last_activity + self.half_close_timeout <= now
        ):
            self.close(tunnel, CloseReason.HALF_CLOSE_TIMEOUT)
        elif tunnel.expires_at <= now:
            self.close(tunnel, CloseReason.MAX_LIFETIME)
        elif tunnel.credential_at <= now:
            self.close(tunnel, CloseReason.CREDENTIAL_EXPIRED)
        elif tunnel.drain_at <= now:
            self.close(tunnel, tunnel.drain_reason)
