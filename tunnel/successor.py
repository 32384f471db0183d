"""Live hand-off: start the next process and give it the listeners and every plain tunnel.

The running process (``hand_off``) checks the configuration as a reload would, starts
``python -m tunnel run`` with the same arguments and a private socket, and passes over it
(``pass_over``):

1. a hello (the next tunnel id, so ids stay unique across the two processes, and the secret
   of the TLS ticket keys, so clients resume their sessions on the new process);
2. the listening sockets (``SCM_RIGHTS``): both processes now hold them, so no connection is
   refused at any moment (the kernel keeps one accept queue per socket, whoever holds it);
3. the new process loads everything, says it is ready and waits for the go without
   accepting; the old one says go, stops accepting, exports every plain tunnel from its engine
   (``Engine.export``: the bytes read and not yet written, counters, deadlines, frame
   positions) and sends them; the new process accepts and adopts them into its own engine.

The go is the point of no return: until then the new process has served nothing, so calling
the hand-off off (a failure, or with ``workers = N`` another worker's successor not ready:
``tunnel.supervisor``) only stops it. Handshakes under way finish in the old process, and their
tunnels (and TLS tunnels, whose OpenSSL state cannot leave the process) stay there until they
end or ``drain_timeout`` passes: the old process then stops as on SIGTERM and exits 0. If the
new process does not start, say it is ready or take the tunnels within a bound, it is stopped
and the old process keeps serving everything (tunnels it had sent are adopted back).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import struct
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import trio

from tunnel.config import Address
from tunnel.errors import TunnelError
from tunnel.logs import LOGGER_NAME, Seconds, fields
from tunnel.net import tickets
from tunnel.net.activation import listen_fd_argument
from tunnel.net.handoff import (
    HandoffError,
    TunnelItem,
    receive_listeners,
    receive_tunnels,
    send_listeners,
    send_tunnels,
)
from tunnel.net.notify import notify
from tunnel.net.sockio import send_all

if TYPE_CHECKING:
    from tunnel.server import Generation

log = logging.getLogger(LOGGER_NAME)

HANDOFF_OPTION = "--handoff-fd"
START_SECONDS = 30.0
"""The new process must say it is ready within this long (it loads its configuration, binds
nothing, opens its admin listener)."""
STOP_SECONDS = 5.0
"""A new process that failed is given this long to exit after SIGTERM, then killed."""
SUMMARY_SECONDS = 5.0
"""After the tunnels, how long the new process waits for the hand-off's duration."""
GO_SECONDS = START_SECONDS + 30.0
"""A new process that said it is ready waits this long for the go, then gives up and exits
(the old one, which may be waiting for its other workers' successors, keeps serving)."""
_LENGTH = struct.Struct("!I")
MAX_MESSAGE = 64 * 1024


class HandoffRefused(TunnelError):
    """The hand-off did not happen; the running process keeps serving everything."""

    status = 409
    reason = "Conflict"


@dataclass(frozen=True, slots=True)
class HandedOff:
    """What a hand-off did, as ``POST /upgrade`` answers it."""

    pid: int
    tunnels_sent: int
    tunnels_kept: int
    seconds: float

    def log(self, by: str, **more: Any) -> None:
        """The hand-off's one line, in the old process."""
        log.info(
            "tunnels handed off to the new process",
            extra=fields(
                pid=self.pid,
                tunnels=self.tunnels_sent,
                kept=self.tunnels_kept,
                duration=Seconds(self.seconds),
                **more,
                by=by,
            ),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "handed_off": True,
            "pid": self.pid,
            "tunnels_sent": self.tunnels_sent,
            "tunnels_kept": self.tunnels_kept,
            "seconds": round(self.seconds, 3),
        }


async def _send_message(sock: socket.socket, message: dict[str, Any]) -> None:
    body = json.dumps(message).encode()
    await send_all(sock, _LENGTH.pack(len(body)) + body)


async def _receive_message(sock: socket.socket, within: float) -> dict[str, Any]:
    """One length-prefixed JSON object; ``HandoffError`` on EOF, garbage or after ``within``
    seconds."""
    data = b""
    try:
        with trio.fail_after(within):
            while True:
                if len(data) >= _LENGTH.size:
                    (size,) = _LENGTH.unpack_from(data)
                    if size > MAX_MESSAGE:
                        raise HandoffError(f"a hand-off message of {size} bytes is too long")
                    if len(data) >= _LENGTH.size + size:
                        break
                # Read only what this message needs: the descriptors of the next one must
                # stay in the socket for the SCM_RIGHTS reader.
                want = (
                    _LENGTH.size - len(data)
                    if len(data) < _LENGTH.size
                    else _LENGTH.size + size - len(data)
                )
                try:
                    chunk = sock.recv(want)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(sock)
                    continue
                if not chunk:
                    raise HandoffError("the other process closed the hand-off socket")
                data += chunk
    except trio.TooSlowError:
        raise HandoffError(f"no hand-off message within {within:g}s") from None
    try:
        message = json.loads(data[_LENGTH.size :])
    except ValueError as error:
        raise HandoffError(f"a hand-off message is not JSON: {error}") from None
    if not isinstance(message, dict):
        raise HandoffError("a hand-off message is not a JSON object")
    return message


def successor_command(argv: Sequence[str], fd: int) -> list[str]:
    """The installed tunnel run again with the same arguments, and the hand-off socket."""
    return [sys.executable, "-m", "tunnel", *argv, HANDOFF_OPTION, str(fd)]


async def hand_off(
    generation: Generation,
    argv: Sequence[str],
    listeners: Sequence[tuple[str, Address, trio.socket.SocketType]],
    stop_accepting: Callable[[], Awaitable[None]],
    *,
    by: str,
) -> HandedOff:
    """Start the next process and give it the listeners and the plain tunnels (see the
    module). ``stop_accepting`` is awaited once the new process may accept.

    Raises:
        HandoffRefused: the new process could not be started or did not take over; the old
            one keeps serving everything (one error line says why).
    """
    started = trio.current_time()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    command = successor_command(argv, theirs.fileno())
    try:
        process = await trio.lowlevel.open_process(command, pass_fds=(theirs.fileno(),))
    except OSError as error:
        ours.close()
        theirs.close()
        raise _refused(f"cannot start {command[0]}: {error}", by) from error
    theirs.close()
    try:
        sent, kept = await pass_over(ours, generation, listeners, stop_accepting, started=started)
    except (HandoffError, OSError) as error:
        await _stop(process)
        raise _refused(f"the new process did not start: {error}", by) from error
    finally:
        ours.close()
    outcome = HandedOff(process.pid, sent, kept, trio.current_time() - started)
    outcome.log(by)
    return outcome


async def pass_over(
    sock: socket.socket,
    generation: Generation,
    listeners: Sequence[tuple[str, Address, trio.socket.SocketType]],
    stop_accepting: Callable[[], Awaitable[None]],
    commit: Callable[[], Awaitable[bool]] | None = None,
    *,
    started: float | None = None,
) -> tuple[int, int]:
    """The old process's side of the exchange on ``sock`` (the caller closes it): the hello,
    the listeners, the new process's ready; then ``commit`` (a supervisor waits there until
    every worker's successor is ready: False calls the hand-off off); the go, after which
    this process stops accepting and sends its plain tunnels. Returns the tunnels sent and
    kept. The new process is told how long it took from ``started`` (trio's clock; by default
    the call), for its ``tunnel_handoff_last_duration_seconds``.

    Raises:
        HandoffError, OSError: before the go; nothing changed here (the new process, told
            nothing, stops).
    """
    started = trio.current_time() if started is None else started
    hello = {"next_id": generation.reserve_ids(), "ticket_secret": tickets.current_secret().hex()}
    await _send_message(sock, hello)
    await send_listeners(
        sock,
        [
            (cast(socket.socket, listener), {kind: str(address)})
            for kind, address, listener in listeners
        ],
    )
    ready = await _receive_message(sock, START_SECONDS)
    if ready.get("ready") is not True:
        raise HandoffError(f"the new process answered {ready!r}")
    if commit is not None and not await commit():
        raise HandoffError("the hand-off was called off")
    await _send_message(sock, {"go": True})
    await stop_accepting()
    items, kept = generation.export_tunnels()
    try:
        sent = await send_tunnels(sock, items)
    except (HandoffError, OSError) as error:
        generation.adopt_tunnels(items)
        log.error(
            "hand-off of the open tunnels failed; they stay in this process, which stops "
            "accepting (the new process serves new connections)",
            extra=fields(error=str(error)),
        )
        return 0, kept + len(items)
    for client, backend, _ in items:
        client.close()
        backend.close()
    with contextlib.suppress(OSError):
        await _send_message(sock, {"seconds": trio.current_time() - started})
    return sent, kept


def _refused(reason: str, by: str) -> HandoffRefused:
    log.error(
        "hand-off failed; this process keeps serving everything",
        extra=fields(error=reason, by=by),
    )
    return HandoffRefused(reason)


async def _stop(process: trio.Process) -> None:
    """Stop a successor that failed: SIGTERM, then SIGKILL after ``STOP_SECONDS``."""
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(STOP_SECONDS):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


@dataclass
class Successor:
    """The new process's end of a hand-off: the socket, and what the old process said."""

    sock: socket.socket
    next_id: int = 1
    admin: tuple[Address, socket.socket] | None = None
    """The old process's admin listener, when it had one."""
    main: bool = True
    """Whether this process becomes the service's main process (a worker does not: its
    supervisor does)."""

    @classmethod
    async def connect(cls, fd: int, *, main: bool = True) -> tuple[Successor, list[str]]:
        """Before serving: the hello and the listeners, as ``--listen-fd`` values for
        ``activation.take_from_supervisor``."""
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        successor = cls(sock, main=main)
        hello = await _receive_message(sock, START_SECONDS)
        successor.next_id = int(hello.get("next_id", 1))
        if main:  # a worker has its supervisor's, which its restarts get too
            with contextlib.suppress(ValueError):  # an unusable one: this process makes its own
                tickets.use_secret(bytes.fromhex(str(hello.get("ticket_secret", ""))))
        values = []
        for listener, meta in await receive_listeners(sock):
            if "admin" in meta:
                successor.admin = (Address.parse(meta["admin"], "hand-off admin"), listener)
                continue
            address = Address.parse(meta["listen"], "hand-off listener")
            values.append(listen_fd_argument(address, listener.detach()))
        return successor, values

    async def wait_for_go(self) -> None:
        """Say ready (everything is loaded, nothing accepted yet) and wait for the old
        process's go; from then on this process accepts (and, as the main process, tells
        systemd so).

        Raises:
            HandoffError: no go within ``GO_SECONDS`` (the old process keeps serving).
        """
        await _send_message(self.sock, {"ready": True, "pid": os.getpid()})
        go = await _receive_message(self.sock, GO_SECONDS)
        if go.get("go") is not True:
            raise HandoffError(f"the old process answered {go!r}")
        if self.main:
            notify(f"MAINPID={os.getpid()}")

    async def take_over(self, generation: Generation) -> None:
        """Adopt the tunnels the old process sends (after the go)."""
        try:
            items = await receive_tunnels(self.sock)
        except HandoffError as error:
            self.sock.close()
            log.error(
                "no tunnels taken from the old process; it keeps them",
                extra=fields(error=str(error)),
            )
            return
        generation.adopt_tunnels(items)
        generation.handoff_tunnels["received"] += len(items)
        try:
            summary = await _receive_message(self.sock, SUMMARY_SECONDS)
            generation.handoff_seconds = float(summary.get("seconds", 0.0))
        except (HandoffError, TypeError, ValueError):
            pass  # only the duration's gauge misses it
        finally:
            self.sock.close()
        log.info("tunnels taken over from the old process", extra=fields(tunnels=len(items)))


__all__ = ["HandedOff", "HandoffRefused", "Successor", "TunnelItem", "hand_off", "pass_over"]
