"""What a worker process of ``workers = N`` needs besides ``serve``.

The supervisor (``tunnel.supervisor``) starts each worker as ``python -P -m tunnel worker``, with
the effective configuration as TOML on stdin and the read end of a "lifeline" pipe whose write end
only the supervisor holds. Nobody ever writes to that pipe: it reads end-of-file exactly when the
supervisor is gone (even after SIGKILL, when it could not stop its workers), and the worker then
stops instead of serving on as an orphan nobody supervises.

Each worker also has a "link", one end of a socket pair whose other end the supervisor keeps,
carrying messages each way (``message``/``Messages``): the supervisor hands every worker a new
configuration after it read and checked the file once (a reload), and worker 1, which serves
the public admin listener, asks the supervisor for a reload on ``POST /reload`` and gets the
outcome back.
"""

from __future__ import annotations

import array
import contextlib
import json
import logging
import os
import socket
from collections import deque
from typing import Any

import trio

from tunnel.app import Control
from tunnel.config import Config
from tunnel.errors import ConfigError
from tunnel.logs import LOGGER_NAME, fields
from tunnel.net.admin import ReloadRefused
from tunnel.net.handoff import HandoffError, descriptors_in
from tunnel.net.listener import ListenError
from tunnel.successor import GO_SECONDS

log = logging.getLogger(LOGGER_NAME)

WORKER_COMMAND = "worker"
"""The hidden ``tunnel`` subcommand that runs one worker."""
TICKET_OPTION = "--ticket-secret-fd"
"""The worker's option: a pipe holding the supervisor's TLS ticket key secret."""

_READ_SIZE = 512


class WorkerTag(logging.Filter):
    """Adds ``worker=N`` to every record: N processes share one stderr, and an operator needs to
    tell their lines apart. The number, unlike the pid, survives a restart of the worker."""

    def __init__(self, number: int) -> None:
        super().__init__()
        self.number = number

    def filter(self, record: logging.LogRecord) -> bool:
        record.fields = {**getattr(record, "fields", {}), "worker": self.number}
        return True


def tag_logs(number: int) -> None:
    """Tag every line of this process's tunnel logger (after ``setup_logging``) as worker N."""
    for handler in logging.getLogger(LOGGER_NAME).handlers:
        handler.addFilter(WorkerTag(number))


async def wait_for_supervisor_exit(lifeline: int) -> None:
    """Return when the supervisor is gone: the lifeline pipe ``lifeline`` reads end-of-file.

    Takes ownership of the descriptor. Bytes, which the supervisor never sends, are ignored.
    """
    async with trio.lowlevel.FdStream(lifeline) as stream:
        while await stream.receive_some(_READ_SIZE):
            pass


CONFIG = b"C"
"""Supervisor to worker: a configuration (TOML) to serve from now on."""
RELOAD = b"R"
"""Worker to supervisor: read the configuration file again and hand it to every worker."""
UPGRADE = b"U"
"""Worker to supervisor: hand off to a new supervisor (``POST /upgrade``)."""
OUTCOME = b"O"
"""Supervisor to worker: how a ``RELOAD`` or ``UPGRADE`` went, as JSON ``{"status": ...}``."""
HAND_OFF = b"H"
"""Supervisor to worker, with one descriptor: pass your listeners and tunnels to the new
worker at the other end of it (``tunnel.successor.pass_over``)."""
PREPARED = b"P"
"""Worker to supervisor: the new worker is ready (``{"ready": true}``) or the exchange failed
(``{"ready": false, "error": ...}``)."""
GO = b"G"
"""Supervisor to worker: ``{"go": true}`` once every new worker is ready, else false."""
DONE = b"D"
"""Worker to supervisor: the tunnels sent and kept (this worker now drains and exits)."""
HANDOFF_ENDED = b"E"
"""Supervisor to worker 1: a hand-off it refused or called off, for the metrics, as JSON
``{"outcome": "refused" | "failed"}``."""
HANDOFF_OUTCOMES = frozenset({"refused", "failed"})
MAX_MESSAGE = 16 * 1024 * 1024
RELOAD_TIMEOUT = 30.0
"""How long worker 1 waits for the supervisor's answer to a reload it asked for."""
UPGRADE_TIMEOUT = 2 * GO_SECONDS
"""How long worker 1 waits for the supervisor's answer to a hand-off it asked for: the new
supervisor starts its workers, each takes over, then the tunnels move."""
_FDS_SPACE = socket.CMSG_SPACE(4 * array.array("i").itemsize)


def message(kind: bytes, body: bytes = b"") -> bytes:
    """One message on a link: its kind, its length (4 bytes, big-endian) and its body."""
    return kind + len(body).to_bytes(4, "big") + body


class Messages:
    """Splits the bytes received on a link into ``(kind, body)`` messages (sans-io)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """Raises ``ValueError`` on a message over ``MAX_MESSAGE`` (the link is broken)."""
        self._buffer += data
        found = []
        while len(self._buffer) >= 5:
            length = int.from_bytes(self._buffer[1:5], "big")
            if length > MAX_MESSAGE:
                raise ValueError(f"link message of {length} bytes")
            if len(self._buffer) < 5 + length:
                break
            found.append((bytes(self._buffer[:1]), bytes(self._buffer[5 : 5 + length])))
            del self._buffer[: 5 + length]
        return found


class SupervisorLink:
    """The worker's end of its link to the supervisor."""

    def __init__(self, fd: int) -> None:
        self._socket = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))
        self._lock = trio.Lock()
        self._sending = trio.Lock()
        self._outcomes_in, self._outcomes = trio.open_memory_channel[bytes](1)
        self._go_in, self._go = trio.open_memory_channel[bool](1)
        self._fds: deque[int] = deque()

    async def serve(self, control: Control) -> None:
        """Apply every configuration the supervisor hands over and take part in its
        hand-offs; return when the link closes (the supervisor is gone: the lifeline says so
        too)."""
        messages = Messages()
        try:
            async with trio.open_nursery() as nursery:
                while data := await self._receive():
                    for kind, body in messages.feed(data):
                        if kind == CONFIG:
                            await _apply(control, body)
                        elif kind == OUTCOME:
                            self._outcomes_in.send_nowait(body)
                        elif kind == HAND_OFF and self._fds:
                            peer = socket.socket(fileno=self._fds.popleft())
                            nursery.start_soon(self._hand_off, control, peer)
                        elif kind == GO:
                            with contextlib.suppress(trio.WouldBlock):
                                self._go_in.send_nowait(json.loads(body).get("go") is True)
                        elif kind == HANDOFF_ENDED:
                            outcome = json.loads(body).get("outcome")
                            if outcome in HANDOFF_OUTCOMES:
                                nursery.start_soon(control.count_hand_off, outcome)
                nursery.cancel_scope.cancel()
        finally:
            self._socket.close()
            while self._fds:
                os.close(self._fds.popleft())

    async def _receive(self) -> bytes:
        """The next bytes from the supervisor; descriptors that come with them are queued
        (a ``HAND_OFF`` message takes the next one)."""
        data, ancillary, _, _ = await self._socket.recvmsg(
            65536, _FDS_SPACE, socket.MSG_CMSG_CLOEXEC
        )
        self._fds.extend(descriptors_in(ancillary))
        return bytes(data)

    async def _send(self, data: bytes) -> None:
        async with self._sending:
            view = memoryview(data)
            while view:
                view = view[await self._socket.send(view) :]

    async def _hand_off(self, control: Control, peer: socket.socket) -> None:
        """This worker's part in the supervisor's hand-off: ``PREPARED`` once the new worker
        is ready, the supervisor's ``GO`` decides, ``DONE`` with what moved."""
        prepared = False
        while True:  # a no from a hand-off called off before this worker asked
            try:
                self._go.receive_nowait()
            except trio.WouldBlock:
                break

        async def commit() -> bool:
            nonlocal prepared
            prepared = True
            await self._send(message(PREPARED, json.dumps({"ready": True}).encode()))
            return await self._go.receive()

        try:
            outcome = await control.hand_over(peer, commit, "supervisor")
        except (HandoffError, OSError, ReloadRefused) as error:
            # The supervisor logs the hand-off's failure once, with this worker's reason.
            text = str(error) or type(error).__name__
            log.debug("this worker did not hand off; it keeps serving", extra=fields(error=text))
            if not prepared:
                await self._send(
                    message(PREPARED, json.dumps({"ready": False, "error": text}).encode())
                )
            return
        await self._send(message(DONE, json.dumps(outcome).encode()))
        async with self._lock:
            pass  # worker 1 answers the POST /upgrade that asked for this before it stops
        control.stop()

    async def request_reload(self) -> dict[str, Any]:
        """Ask the supervisor to reload (``POST /reload`` with workers); its outcome.

        Raises:
            ReloadRefused: the supervisor refused (a bad file), or did not answer.
        """
        return await self._request(RELOAD, RELOAD_TIMEOUT, "reload")

    async def request_upgrade(self) -> dict[str, Any]:
        """Ask the supervisor for a live hand-off (``POST /upgrade`` with workers); its
        outcome.

        Raises:
            ReloadRefused: the supervisor refused (a bad file, a hand-off that failed), or
                did not answer.
        """
        return await self._request(UPGRADE, UPGRADE_TIMEOUT, "hand-off")

    async def _request(self, kind: bytes, within: float, what: str) -> dict[str, Any]:
        async with self._lock:
            await self._send(message(kind))
            with trio.move_on_after(within):
                outcome = json.loads(await self._outcomes.receive())
                if outcome.get("status") != 200:
                    raise ReloadRefused(outcome.get("status", 500), outcome.get("error", ""))
                document: dict[str, Any] = outcome.get("document", {})
                return document
            raise ReloadRefused(504, f"the supervisor did not answer the {what}")


async def _apply(control: Control, body: bytes) -> None:
    """Serve the configuration the supervisor handed over; a failure is this worker's alone
    (a port it cannot bind, say) and is logged, the running configuration staying."""
    try:
        await control.reload(Config.from_toml(body.decode("utf-8")))
    except (ConfigError, ListenError, ReloadRefused) as error:
        log.error(
            "this worker could not apply the new configuration; it keeps the running one",
            extra=fields(error=str(error)),
        )
