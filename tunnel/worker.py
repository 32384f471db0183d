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

import json
import logging
import socket
from typing import Any

import trio

from tunnel.app import Control
from tunnel.config import Config
from tunnel.errors import ConfigError
from tunnel.logs import LOGGER_NAME, fields
from tunnel.net.admin import ReloadRefused
from tunnel.net.listener import ListenError

log = logging.getLogger(LOGGER_NAME)

WORKER_COMMAND = "worker"
"""The hidden ``tunnel`` subcommand that runs one worker."""

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
OUTCOME = b"O"
"""Supervisor to worker: how a ``RELOAD`` went, as JSON ``{"status": ..., ...}``."""
MAX_MESSAGE = 16 * 1024 * 1024
RELOAD_TIMEOUT = 30.0
"""How long worker 1 waits for the supervisor's answer to a reload it asked for."""


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
        self._outcomes_in, self._outcomes = trio.open_memory_channel[bytes](1)

    async def serve(self, control: Control) -> None:
        """Apply every configuration the supervisor hands over; return when the link closes
        (the supervisor is gone: the lifeline says so too)."""
        messages = Messages()
        with self._socket:
            while data := await self._socket.recv(65536):
                for kind, body in messages.feed(data):
                    if kind == CONFIG:
                        await _apply(control, body)
                    elif kind == OUTCOME:
                        self._outcomes_in.send_nowait(body)

    async def request_reload(self) -> dict[str, Any]:
        """Ask the supervisor to reload (``POST /reload`` with workers); its outcome.

        Raises:
            ReloadRefused: the supervisor refused (a bad file), or did not answer.
        """
        async with self._lock:
            await self._socket.send(message(RELOAD))
            with trio.move_on_after(RELOAD_TIMEOUT):
                outcome = json.loads(await self._outcomes.receive())
                if outcome.get("status") != 200:
                    raise ReloadRefused(outcome.get("status", 500), outcome.get("error", ""))
                document: dict[str, Any] = outcome.get("document", {})
                return document
            raise ReloadRefused(504, "the supervisor did not answer the reload")


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
