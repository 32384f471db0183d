"""What one supervisor of ``workers = N`` gives the next at a live hand-off, and the wire.

A worker's listening sockets and tunnels go from old worker i to new worker i directly, over a
socket pair the old supervisor makes for each (``tunnel.successor``). What the supervisor
itself holds goes over the hand-off socket to the new supervisor, in one exchange before it
starts its workers (an ``Inheritance``):

- the addresses it reserved (bound, not listening: ``tunnel.supervisor._Ports``), so that the
  new supervisor's workers use the same concrete ports (port 0 included);
- the listening sockets systemd gave it (socket activation), which every worker accepts on;
- the admin listener, whose accept queue must outlive the old process;
- the new end of each worker's socket pair, by worker number;
- the secret the TLS ticket keys are derived from (``tunnel.net.tickets``), so that clients
  resume their sessions across the hand-off too.

Then, on the same socket, ``{"committed": true}`` once every new worker is ready and the old
ones were told to go: from then on the new supervisor is the service's (it writes the pid file
and tells systemd ``MAINPID``). End-of-file before that means the hand-off was called off: the
new supervisor stops its workers, which have served nothing, and exits.

Synchronous, blocking with deadlines: both ends are supervisors, which run no event loop. Each
message is a 4-byte length and a JSON object, its descriptors on its first byte
(``SCM_RIGHTS``); at most ``MAX_FDS`` per message, so a large inheritance is several messages,
the last one saying ``"end": true``.
"""

from __future__ import annotations

import array
import json
import os
import select
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tunnel.config import Address
from tunnel.errors import ConfigError
from tunnel.net import tickets
from tunnel.net.handoff import HandoffError, descriptors_in

MAX_FDS = 200
"""Descriptors in one message (the kernel takes at most 253 in one ``sendmsg``)."""
MAX_BODY = 1024 * 1024
RECEIVE_SECONDS = 30.0
"""Bound on receiving the inheritance: the old supervisor sends it right after starting this
one."""
_LENGTH = struct.Struct("!I")
_FDS_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


@dataclass
class Inheritance:
    """What the old supervisor passes on: every socket belongs to the receiver."""

    ticket_secret: bytes = b""
    reserved: dict[Address, tuple[Address, list[socket.socket]]] = field(default_factory=dict)
    """Configured address → (concrete address, the bound sockets)."""
    inherited: list[tuple[Address, int]] = field(default_factory=list)
    """Listening sockets from systemd, by listener address (descriptors)."""
    admin: tuple[Address, socket.socket] | None = None
    pairs: dict[int, socket.socket] = field(default_factory=dict)
    """Worker number → the new worker's end of its socket pair with the old worker."""

    def close(self) -> None:
        """Close everything not taken yet."""
        for _, sockets in self.reserved.values():
            for sock in sockets:
                sock.close()
        for _, fd in self.inherited:
            os.close(fd)
        if self.admin is not None:
            self.admin[1].close()
        for sock in self.pairs.values():
            sock.close()
        self.reserved, self.inherited, self.admin, self.pairs = {}, [], None, {}


def send_inheritance(
    sock: socket.socket,
    ticket_secret: bytes,
    reserved: dict[Address, tuple[Address, list[socket.socket]]],
    inherited: Sequence[tuple[Address, int]],
    admin: tuple[Address, socket.socket] | None,
    pairs: dict[int, socket.socket],
    within: float,
) -> None:
    """Send all of it (the caller then closes its copies of the pair ends).

    Raises:
        HandoffError: the new supervisor did not take it within ``within`` seconds.
    """
    records: list[tuple[dict[str, Any], int]] = []
    for configured, (concrete, sockets) in reserved.items():
        for sock_ in sockets:
            records.append(
                (
                    {"kind": "reserved", "listen": str(configured), "bound": str(concrete)},
                    sock_.fileno(),
                )
            )
    records += [({"kind": "inherited", "listen": str(address)}, fd) for address, fd in inherited]
    if admin is not None:
        records.append(({"kind": "admin", "listen": str(admin[0])}, admin[1].fileno()))
    records += [({"kind": "worker", "number": n}, pair.fileno()) for n, pair in pairs.items()]
    deadline = time.monotonic() + within
    chunks = [records[i : i + MAX_FDS] for i in range(0, len(records), MAX_FDS)] or [[]]
    for i, chunk in enumerate(chunks):
        body: dict[str, Any] = {"sockets": [meta for meta, _ in chunk], "end": i == len(chunks) - 1}
        if i == 0:
            body["ticket_secret"] = ticket_secret.hex()
        send_message(sock, body, [fd for _, fd in chunk], deadline)


def receive_inheritance(sock: socket.socket, within: float = RECEIVE_SECONDS) -> Inheritance:
    """What ``send_inheritance`` sent.

    Raises:
        HandoffError: nothing whole within ``within`` seconds, or not what was expected;
            every descriptor received is closed then.
    """
    deadline = time.monotonic() + within
    inheritance = Inheritance()
    try:
        while True:
            body, fds = receive_message(sock, deadline)
            if "ticket_secret" in body:
                inheritance.ticket_secret = _secret(body["ticket_secret"], fds)
            metas = body.get("sockets")
            if not isinstance(metas, list) or len(metas) != len(fds):
                for fd in fds:
                    os.close(fd)
                raise HandoffError(f"{len(fds)} descriptors came for {body.get('sockets')!r}")
            for meta, fd in zip(metas, fds, strict=True):
                _take(inheritance, meta, fd)
            if body.get("end") is True:
                return inheritance
    except BaseException:
        inheritance.close()
        raise


def _secret(text: Any, fds: list[int]) -> bytes:
    try:
        secret = bytes.fromhex(str(text))
    except ValueError:
        secret = b""
    if len(secret) != tickets.SECRET_SIZE:
        _close(fds)
        raise HandoffError("the TLS ticket key secret handed over is not 32 bytes of hex")
    return secret


def _take(inheritance: Inheritance, meta: Any, fd: int) -> None:
    kind = meta.get("kind") if isinstance(meta, dict) else None
    if kind == "inherited":
        try:
            inheritance.inherited.append((_address(meta, "listen"), fd))
        except BaseException:
            os.close(fd)
            raise
        return
    try:
        sock = socket.socket(fileno=fd)
    except OSError as error:
        os.close(fd)
        raise HandoffError(f"an inherited descriptor is not a socket: {error}") from None
    try:
        if kind == "reserved":
            configured = _address(meta, "listen")
            concrete = _address(meta, "bound")
            inheritance.reserved.setdefault(configured, (concrete, []))[1].append(sock)
        elif kind == "admin":
            inheritance.admin = (_address(meta, "listen"), sock)
        elif kind == "worker" and isinstance(meta.get("number"), int):
            inheritance.pairs[meta["number"]] = sock
        else:
            raise HandoffError(f"an inherited socket described as {meta!r}")
    except BaseException:
        sock.close()
        raise


def _address(meta: dict[str, Any], key: str) -> Address:
    try:
        return Address.parse(str(meta.get(key)), "hand-off")
    except ConfigError as error:
        raise HandoffError(f"an inherited socket's {key} is not an address: {error}") from None


def send_message(
    sock: socket.socket, body: dict[str, Any], fds: Sequence[int], deadline: float
) -> None:
    """One message, its descriptors on its first byte.

    Raises:
        HandoffError: the peer did not take it by ``deadline`` (``time.monotonic``) or is gone.
    """
    encoded = json.dumps(body).encode()
    view = memoryview(_LENGTH.pack(len(encoded)) + encoded)
    try:
        while view:
            _wait(sock, deadline, writable=True)
            sent = socket.send_fds(sock, [view], list(fds)) if fds else sock.send(view)
            fds = ()
            view = view[sent:]
    except OSError as error:
        raise HandoffError(f"the hand-off socket failed while sending: {error}") from None


def receive_message(sock: socket.socket, deadline: float) -> tuple[dict[str, Any], list[int]]:
    """One message and its descriptors (close-on-exec; the caller's).

    Raises:
        HandoffError: end-of-file, garbage, or nothing whole by ``deadline``.
    """
    fds: list[int] = []
    try:
        head = _receive_exactly(sock, _LENGTH.size, deadline, fds)
        (size,) = _LENGTH.unpack(head)
        if size > MAX_BODY:
            raise HandoffError(f"a hand-off message of {size} bytes is too long")
        body = json.loads(_receive_exactly(sock, size, deadline, fds))
        if not isinstance(body, dict):
            raise HandoffError("a hand-off message is not a JSON object")
    except ValueError as error:
        _close(fds)
        raise HandoffError(f"a hand-off message is not JSON: {error}") from None
    except BaseException:
        _close(fds)
        raise
    return body, fds


def _receive_exactly(sock: socket.socket, size: int, deadline: float, fds: list[int]) -> bytes:
    data = b""
    while len(data) < size:
        _wait(sock, deadline, writable=False)
        try:
            chunk, ancillary, flags, _ = sock.recvmsg(
                size - len(data), _FDS_SPACE, socket.MSG_CMSG_CLOEXEC
            )
        except BlockingIOError:
            continue
        except OSError as error:
            raise HandoffError(f"the hand-off socket failed while receiving: {error}") from None
        fds.extend(descriptors_in(ancillary))
        if flags & socket.MSG_CTRUNC:
            raise HandoffError("descriptors were cut off (MSG_CTRUNC)")
        if not chunk:
            raise HandoffError("the other supervisor closed the hand-off socket")
        data += chunk
    return data


def _wait(sock: socket.socket, deadline: float, *, writable: bool) -> None:
    left = deadline - time.monotonic()
    ready = (
        select.select([], [sock], [], max(0.0, left))[1]
        if writable
        else select.select([sock], [], [], max(0.0, left))[0]
    )
    if not ready:
        raise HandoffError("the other supervisor did not answer in time")


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
    fds.clear()
