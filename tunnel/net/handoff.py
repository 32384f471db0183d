"""Live hand-off: what an established tunnel is besides its two descriptors, and how tunnels
and listening sockets move to another process over a Unix socket (``SCM_RIGHTS``).

``TunnelState`` is the engine's side (``Engine.export``, ``Engine.adopt_state``): bytes read but
not yet written, half-closes, counters and deadlines, every time as a duration, since trio's
clock means nothing in another process. The wire carries batches over a connected
``AF_UNIX``/``SOCK_STREAM`` socket. Each message is a 12-byte header (magic, version, kind,
descriptor count, body length) and a JSON body; its descriptors ride on its first ``sendmsg``.
A stream socket may split or join messages on receipt, so descriptors are queued as they come
and each message takes the count its header names, in order: a record's sockets are always its
own. The sender ends with an ``end`` message giving the total; the receiver answers with an
``ack`` once it holds every descriptor, so a sender that returns may close its copies.

Bounded against a broken or hostile peer: a wrong magic or version, an unknown kind, more than
``MAX_FDS`` descriptors or ``MAX_BODY`` bytes in one message, a truncated control message
(``MSG_CTRUNC``), descriptors that do not match the records, a body that is not the expected
JSON, or ``stall`` seconds without a whole message all raise ``HandoffError``, and every
descriptor received so far is closed. Memory is bounded by one message; the records of a
hand-off by the descriptor limit (each brings one or two, and running out is ``MSG_CTRUNC``).
"""

from __future__ import annotations

import array
import base64
import binascii
import json
import math
import os
import socket
import struct
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from tunnel.core.wsframes import FramePosition, FrameTracker
from tunnel.errors import TunnelError
from tunnel.reasons import CloseReason

MAGIC = b"TNHO"
VERSION = 1
HEADER = struct.Struct("!4sBBHI")
"""Magic, version, kind, descriptors attached, body length."""
MAX_FDS = 252
"""Descriptors per message: the kernel's ``SCM_MAX_FD`` is 253, and a tunnel takes two."""
MAX_BODY = 16 * 1024 * 1024
"""A body longer than this is refused before anything is allocated for it."""
BATCH_BODY = 1024 * 1024
"""A batch stops growing past this many body bytes (one record always goes)."""
RECV_CHUNK = 256 * 1024
_FDS_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
STALL = 10.0
"""Seconds a peer may take over one message before the hand-off fails."""

_TUNNELS, _LISTENERS, _END, _ACK = 1, 2, 3, 4
_Item = TypeVar("_Item")
_KINDS = {_TUNNELS: "tunnels", _LISTENERS: "listeners", _END: "end", _ACK: "ack"}


class HandoffError(TunnelError):
    """The hand-off socket's peer broke the protocol, stalled or went away."""

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True, slots=True)
class FlowState:
    """One direction of a tunnel (``up``: client to backend; ``down``: back)."""

    pending: bytes = b""
    """Read from the source, not yet written to the destination, in order (parked bytes, then
    what sat in a splice pipe)."""
    eof: bool = False
    """The source's EOF was read."""
    shut: bool = False
    """The destination's write side is shut (the EOF passed on; nothing follows)."""
    frames: FramePosition | None = None
    """The frame tracker's position (WebSocket tunnels whose frames are tracked)."""


@dataclass(frozen=True, slots=True)
class TunnelState:
    """A tunnel without its descriptors; durations in seconds, None where there is no
    deadline. ``meta`` is the caller's (id, client, route, backend...), carried untouched."""

    up: FlowState
    down: FlowState
    bytes_up: int = 0
    bytes_down: int = 0
    close_reason: str | None = None
    """Set once a source's EOF was read (``client_eof`` or ``backend_eof``)."""
    age: float = 0.0
    """Seconds since the tunnel was opened (``Engine.adopt``)."""
    idle: float = 0.0
    """Seconds since its last byte either way."""
    lifetime: float | None = None
    """Seconds until ``max_lifetime`` closes it."""
    credential: float | None = None
    """Seconds until its credential expires."""
    drain: float | None = None
    """Seconds until a drain's polite close, with reason ``drain_reason``."""
    drain_reason: str = "drain"
    hard_stop: float | None = None
    """Seconds until a drain's end closes it at once."""
    meta: Mapping[str, str] = field(default_factory=dict)

    @property
    def websocket(self) -> bool:
        return self.up.frames is not None

    def to_json(self) -> str:
        return json.dumps(_state_to_dict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> TunnelState:
        """Raises:
        HandoffError: ``text`` is not a state ``to_json`` writes."""
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise HandoffError(f"tunnel state is not JSON: {exc}") from None
        return _state_from_dict(data)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _frames_to_dict(position: FramePosition | None) -> dict[str, Any] | None:
    if position is None:
        return None
    return {"left": position.left, "head": _b64(position.head), "close_seen": position.close_seen}


def _flow_to_dict(flow: FlowState) -> dict[str, Any]:
    return {
        "pending": _b64(flow.pending),
        "eof": flow.eof,
        "shut": flow.shut,
        "frames": _frames_to_dict(flow.frames),
    }


def _state_to_dict(state: TunnelState) -> dict[str, Any]:
    return {
        "up": _flow_to_dict(state.up),
        "down": _flow_to_dict(state.down),
        "bytes_up": state.bytes_up,
        "bytes_down": state.bytes_down,
        "close_reason": state.close_reason,
        "age": state.age,
        "idle": state.idle,
        "lifetime": state.lifetime,
        "credential": state.credential,
        "drain": state.drain,
        "drain_reason": state.drain_reason,
        "hard_stop": state.hard_stop,
        "meta": dict(state.meta),
    }


def _get(data: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(data, dict) or key not in data:
        raise HandoffError(f"{where}: {key} missing")
    value = data[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _types(kind)):
        raise HandoffError(f"{where}: {key} has the wrong type ({type(value).__name__})")
    return value


def _types(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _bytes(data: Any, key: str, where: str) -> bytes:
    try:
        return base64.b64decode(_get(data, key, str, where), validate=True)
    except binascii.Error:
        raise HandoffError(f"{where}: {key} is not base64") from None


def _count(data: Any, key: str, where: str) -> int:
    value: int = _get(data, key, int, where)
    if value < 0:
        raise HandoffError(f"{where}: {key} is negative")
    return value


def _seconds(data: Any, key: str, where: str) -> float | None:
    value = _get(data, key, (int, float, type(None)), where)
    if value is not None and not math.isfinite(value):
        raise HandoffError(f"{where}: {key} is not a finite number")
    return None if value is None else float(value)


def _reason(data: Any, key: str, where: str, kind: type | tuple[type, ...]) -> Any:
    value = _get(data, key, kind, where)
    if value is not None and value not in CloseReason.__members__.values():
        raise HandoffError(f"{where}: {key} {value!r} is not a close reason")
    return value


def _frames_from_dict(data: Any, where: str) -> FramePosition | None:
    if data is None:
        return None
    position = FramePosition(
        _count(data, "left", where),
        _bytes(data, "head", where),
        _get(data, "close_seen", bool, where),
    )
    try:
        FrameTracker.resume(position)
    except ValueError as exc:
        raise HandoffError(f"{where}: {exc}") from None
    return position


def _flow_from_dict(data: Any, where: str) -> FlowState:
    return FlowState(
        _bytes(data, "pending", where),
        _get(data, "eof", bool, where),
        _get(data, "shut", bool, where),
        _frames_from_dict(_get(data, "frames", (dict, type(None)), where), f"{where}.frames"),
    )


def _state_from_dict(data: Any) -> TunnelState:
    where = "tunnel state"
    up = _flow_from_dict(_get(data, "up", dict, where), f"{where}.up")
    down = _flow_from_dict(_get(data, "down", dict, where), f"{where}.down")
    if (up.frames is None) != (down.frames is None):
        raise HandoffError(f"{where}: frames are tracked in one direction only")
    meta = _get(data, "meta", dict, where)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise HandoffError(f"{where}: meta holds a value that is not a string")
    age = _seconds(data, "age", where)
    idle = _seconds(data, "idle", where)
    if age is None or idle is None:
        raise HandoffError(f"{where}: age and idle are required")
    return TunnelState(
        up=up,
        down=down,
        bytes_up=_count(data, "bytes_up", where),
        bytes_down=_count(data, "bytes_down", where),
        close_reason=_reason(data, "close_reason", where, (str, type(None))),
        age=age,
        idle=idle,
        lifetime=_seconds(data, "lifetime", where),
        credential=_seconds(data, "credential", where),
        drain=_seconds(data, "drain", where),
        drain_reason=_reason(data, "drain_reason", where, str),
        hard_stop=_seconds(data, "hard_stop", where),
        meta=meta,
    )


# --- the wire ----------------------------------------------------------------------------------

TunnelItem = tuple[socket.socket, socket.socket, TunnelState]
"""``(client, backend, state)``: what ``Engine.export`` returns and ``adopt_state`` takes."""
ListenerItem = tuple[socket.socket, Mapping[str, str]]
"""A listening socket and the caller's description of it (its address, TLS, PROXY...)."""


async def send_tunnels(
    sock: socket.socket, tunnels: Iterable[TunnelItem], *, stall: float = STALL
) -> int:
    """Send every tunnel's descriptors and state; return once the peer (``receive_tunnels``)
    holds them all, with the count sent. The sender's sockets stay open: close them then
    (the peer's copies keep the connections), or, when this raises, adopt them back.

    Raises:
        HandoffError: the peer stalled (``stall`` seconds over one message), went away, or
            answered with something other than the count sent.
    """
    records = (
        (_state_to_dict(state), (client.fileno(), backend.fileno()))
        for client, backend, state in tunnels
    )
    return await _send_all(sock, _TUNNELS, records, stall)


async def receive_tunnels(sock: socket.socket, *, stall: float = STALL) -> list[TunnelItem]:
    """Receive what ``send_tunnels`` sends, up to its end, and acknowledge it once every record
    is checked. The sockets are new descriptors of this process, non-blocking and
    close-on-exec, each with its own state.

    Raises:
        HandoffError: see the module; nothing received is left open then, and no
            acknowledgement was sent (the sender still owns every tunnel).
    """

    def build(record: Any, fds: list[int]) -> TunnelItem:
        state = _state_from_dict(record)
        client, backend = _sockets(fds)
        return client, backend, state

    def discard(item: TunnelItem) -> None:
        item[0].close()
        item[1].close()

    return await _receive_all(sock, _TUNNELS, 2, stall, build, discard)


async def send_listeners(
    sock: socket.socket, listeners: Iterable[ListenerItem], *, stall: float = STALL
) -> int:
    """``send_tunnels`` for listening sockets: each with a ``dict[str, str]`` of the caller's."""
    records = ((dict(meta), (listener.fileno(),)) for listener, meta in listeners)
    return await _send_all(sock, _LISTENERS, records, stall)


async def receive_listeners(
    sock: socket.socket, *, stall: float = STALL
) -> list[tuple[socket.socket, dict[str, str]]]:
    """``receive_tunnels`` for ``send_listeners``: non-blocking listening sockets.

    Raises:
        HandoffError: see the module; also a description that is not strings to strings, or
            a descriptor that is not a listening stream socket.
    """

    def build(record: Any, fds: list[int]) -> tuple[socket.socket, dict[str, str]]:
        if not isinstance(record, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in record.items()
        ):
            raise HandoffError("listener description is not a table of strings")
        (listener,) = _sockets(fds)
        if not listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            listener.detach()
            raise HandoffError("a listener descriptor is not listening")
        return listener, record

    def discard(item: tuple[socket.socket, dict[str, str]]) -> None:
        item[0].close()

    return await _receive_all(sock, _LISTENERS, 1, stall, build, discard)


def descriptors_in(ancillary: Iterable[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors an ``SCM_RIGHTS`` control message of ``recvmsg`` brought (now the
    caller's to close)."""
    found: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            found.extend(fds)
    return found


def _sockets(fds: Sequence[int]) -> list[socket.socket]:
    """Non-blocking stream sockets over ``fds``; on an error none of them is closed (the
    caller closes the descriptors)."""
    made: list[socket.socket] = []
    try:
        for fd in fds:
            try:
                sock = socket.socket(fileno=fd)
            except OSError as exc:
                raise HandoffError(f"a descriptor received is not a socket: {exc}") from None
            made.append(sock)
            if sock.type != socket.SOCK_STREAM:
                raise HandoffError("a descriptor received is not a stream socket")
            sock.setblocking(False)
    except BaseException:
        for sock in made:
            sock.detach()
        raise
    return made


def _close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        os.close(fd)


async def _send_all(
    sock: socket.socket,
    kind: int,
    records: Iterable[tuple[Any, tuple[int, ...]]],
    stall: float,
) -> int:
    sock.setblocking(False)
    sent = 0
    batch: list[Any] = []
    fds: list[int] = []
    size = 0
    for record, descriptors in records:
        encoded = json.dumps(record, separators=(",", ":"))
        if batch and (len(fds) + len(descriptors) > MAX_FDS or size + len(encoded) > BATCH_BODY):
            await _send_batch(sock, kind, batch, fds, stall)
            sent += len(batch)
            batch, fds, size = [], [], 0
        batch.append(encoded)
        fds.extend(descriptors)
        size += len(encoded) + 1
    if batch:
        await _send_batch(sock, kind, batch, fds, stall)
        sent += len(batch)
    await _send(sock, _END, json.dumps({"count": sent}).encode(), (), stall)
    reader = _Reader(sock, stall)
    try:
        _, body = await reader.message(expect=(_ACK,))
        count = _get(_json(body, "ack"), "count", int, "ack")
        if count != sent:
            raise HandoffError(f"the peer acknowledged {count} records of {sent}")
        reader.finish()
    finally:
        reader.close()
    return sent


async def _send_batch(
    sock: socket.socket, kind: int, batch: list[str], fds: list[int], stall: float
) -> None:
    body = ("[" + ",".join(batch) + "]").encode()
    if len(body) > MAX_BODY:
        raise HandoffError(f"one record is larger than {MAX_BODY} bytes")
    await _send(sock, kind, body, fds, stall)


async def _send(
    sock: socket.socket, kind: int, body: bytes, fds: Sequence[int], stall: float
) -> None:
    view = memoryview(HEADER.pack(MAGIC, VERSION, kind, len(fds), len(body)) + body)
    with trio.move_on_after(stall) as scope:
        while view:
            try:
                # The descriptors ride on the first bytes that leave; never again after.
                sent = socket.send_fds(sock, [view], fds) if fds else sock.send(view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
                continue
            except OSError as exc:
                raise HandoffError(f"hand-off socket failed while sending: {exc}") from None
            fds = ()
            view = view[sent:]
    if scope.cancelled_caught:
        raise HandoffError(f"the peer took no {_KINDS[kind]} message for {stall:g} s")


def _json(body: bytes, what: str) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HandoffError(f"{what} message is not JSON: {exc}") from None


async def _receive_all(
    sock: socket.socket,
    kind: int,
    per_record: int,
    stall: float,
    build: Callable[[Any, list[int]], _Item],
    discard: Callable[[_Item], None],
) -> list[_Item]:
    """Every record up to the end message, each made into an item with its ``per_record``
    descriptors by ``build`` (which leaves them open when it raises); the ack is sent once
    all are built. On an error every item is ``discard``ed and every other descriptor closed."""
    sock.setblocking(False)
    reader = _Reader(sock, stall)
    items: list[_Item] = []
    unbuilt: list[list[int]] = []
    try:
        while True:
            got, body = await reader.message(expect=(kind, _END))
            if got == _END:
                count = _get(_json(body, "end"), "count", int, "end")
                if count != len(items):
                    raise HandoffError(f"the peer sent {len(items)} records but counted {count}")
                reader.finish()
                break
            records = _json(body, _KINDS[kind])
            fds = reader.take()
            if not isinstance(records, list) or len(fds) != per_record * len(records):
                _close_fds(fds)
                raise HandoffError(
                    f"{_KINDS[kind]} message: {len(fds)} descriptors for "
                    f"{len(records) if isinstance(records, list) else 'no'} records"
                )
            unbuilt = [fds[i : i + per_record] for i in range(0, len(fds), per_record)]
            for i, record in enumerate(records):
                items.append(build(record, unbuilt[i]))
                unbuilt[i] = []
            unbuilt = []
        await _send(sock, _ACK, json.dumps({"count": len(items)}).encode(), (), stall)
    except BaseException:
        reader.close()
        for item in items:
            discard(item)
        for fds in unbuilt:
            _close_fds(fds)
        raise
    return items


class _Reader:
    """Messages from a stream socket whose descriptors arrive ahead of, or with, the bytes
    they belong to: both are queued, and each message takes its own count."""

    def __init__(self, sock: socket.socket, stall: float) -> None:
        self.sock = sock
        self.stall = stall
        self.data = bytearray()
        self.fds: deque[int] = deque()

    async def message(self, *, expect: tuple[int, ...]) -> tuple[int, bytes]:
        """The next message's kind and body; its descriptors wait in ``take``."""
        with trio.move_on_after(self.stall) as scope:
            await self._fill(HEADER.size)
            magic, version, kind, count, length = HEADER.unpack_from(self.data)
            if magic != MAGIC or version != VERSION:
                raise HandoffError(f"not a hand-off message (magic {magic!r}, version {version})")
            if kind not in expect:
                raise HandoffError(f"unexpected {_KINDS.get(kind, f'kind {kind}')} message")
            if count > MAX_FDS or length > MAX_BODY:
                raise HandoffError(f"message too large ({count} descriptors, {length} bytes)")
            await self._fill(HEADER.size + length)
        if scope.cancelled_caught:
            raise HandoffError(f"no whole hand-off message within {self.stall:g} s")
        body = bytes(self.data[HEADER.size : HEADER.size + length])
        del self.data[: HEADER.size + length]
        # Reads stop at the message's end, so what came with its bytes is all there is.
        if len(self.fds) != count:
            raise HandoffError(f"message named {count} descriptors, {len(self.fds)} came")
        return kind, body

    def take(self) -> list[int]:
        """The last message's descriptors, now the caller's to close."""
        fds = list(self.fds)
        self.fds.clear()
        return fds

    def finish(self) -> None:
        """The exchange is over: nothing more may have come."""
        if self.fds or self.data:
            raise HandoffError("the peer sent more than it counted")

    def close(self) -> None:
        _close_fds(self.fds)
        self.fds.clear()

    async def _fill(self, size: int) -> None:
        while len(self.data) < size:
            try:
                # Not socket.recv_fds: it drops its flags argument (3.11), so descriptors
                # would arrive without close-on-exec.
                data, ancillary, flags, _ = self.sock.recvmsg(
                    min(size - len(self.data), RECV_CHUNK), _FDS_SPACE, socket.MSG_CMSG_CLOEXEC
                )
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)
                continue
            except OSError as exc:
                raise HandoffError(f"hand-off socket failed while receiving: {exc}") from None
            self.fds.extend(descriptors_in(ancillary))
            if flags & socket.MSG_CTRUNC:
                raise HandoffError("descriptors were cut off (MSG_CTRUNC)")
            if not data:
                raise HandoffError("the peer closed the hand-off socket mid-message")
            self.data += data
