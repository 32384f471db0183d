"""``workers = N``: one supervisor process and N worker processes sharing the listening ports.

The supervisor first binds every listening address itself, with SO_REUSEADDR and SO_REUSEPORT
but without listening: a busy port is reported before any worker starts, port 0 becomes one
concrete port, and the ports stay reserved while workers come and go. It must not listen, since
a listening socket in the reuseport group would get its share of connections and never accept
them.

Each worker is ``python -P -m tunnel worker`` serving the effective configuration (read from its
stdin: the concrete ports, ``workers = 1``) on its own listening sockets with SO_REUSEPORT, so the
kernel spreads new connections among the workers; ``-P`` keeps the current directory off its
``sys.path``, so a ``tunnel/`` folder there never shadows the installed package. Workers never
talk to each other or to the supervisor; the supervisor only starts, signals, reaps and restarts
them:

- SIGTERM or SIGINT: SIGTERM to every worker, wait up to ``STOP_SECONDS``, SIGKILL what is left,
  return 0. A second SIGTERM or SIGINT skips the wait.
- SIGHUP: passed on to every worker.
- A worker that exits on its own is restarted after a backoff (``tunnel.policy.restart``); when
  every worker keeps failing to start, the supervisor gives up and returns 1.

It is synchronous on purpose: one ``select`` on a pipe that receives the signal numbers
(``signal.set_wakeup_fd``, SIGCHLD included) waits for a signal, a worker's exit or the next
restart, and nothing else runs in this process.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from types import FrameType

from tunnel.config import Address, AdminConfig, Config
from tunnel.logs import LOGGER_NAME, Seconds, fields
from tunnel.net import activation
from tunnel.net.admin import bind_admin
from tunnel.net.listener import bind_shared, take_inherited
from tunnel.policy.restart import RestartPolicy
from tunnel.worker import WORKER_COMMAND

log = logging.getLogger(LOGGER_NAME)

STOP_SECONDS = 10.0
"""How long stopping workers get after SIGTERM before they are killed."""
KILL_WAIT_SECONDS = 5.0
"""Bound on waiting for a killed worker to be reaped (SIGKILL cannot be caught; this is slack)."""

STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})
WORKER_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
"""Blocked while a worker is spawned: a signal sent before the worker's trio handlers exist stays
pending instead of killing it (SIGHUP's default action) or raising KeyboardInterrupt; the worker
unblocks them once it handles them."""
_WAKE_SIGNALS = (*WORKER_SIGNALS, signal.SIGCHLD)


def run_workers(config: Config) -> int:
    """Serve ``config`` with ``config.server.workers`` processes; block until SIGTERM or SIGINT.

    The one-process counterpart of ``await serve(config)`` for ``workers`` > 1. Call it from the
    main thread: it installs handlers for SIGTERM, SIGINT, SIGHUP and SIGCHLD (restored on
    return). Workers log to this process's stderr, each line tagged ``worker=N``.

    Listening sockets this process inherited (systemd socket activation) are not bound: every
    worker gets them (``--listen-fd``) and accepts on them, with no SO_REUSEPORT.

    Returns:
        The exit status: 0 after a requested stop, 1 when the workers could not be started.

    Raises:
        ListenError: when a listening address cannot be bound, or an inherited descriptor is
            not a listening TCP socket; no worker was started.
    """
    reserved: list[socket.socket] = []
    cleanup = ExitStack()
    try:
        listeners = []
        # Inherited sockets (systemd socket activation) are not bound again: ``_start`` passes
        # them to every worker, which all accept on them.
        inherited = take_inherited(config.listeners)
        for listener, taken in zip(config.listeners, inherited, strict=True):
            if taken:
                listeners.append(listener)
                continue
            sockets = bind_shared(listener.listen, listen=False)
            reserved += sockets
            port = sockets[0].getsockname()[1]
            listeners.append(
                dataclasses.replace(listener, listen=Address(listener.listen.host, port))
            )
        worker_config = dataclasses.replace(
            config,
            listeners=tuple(listeners),
            server=dataclasses.replace(config.server, workers=1),
            admin=AdminConfig(),
        )
        admin = None
        if config.admin.listen is not None:
            admin = _AdminPlan(bind_admin(config.admin.listen), tempfile.mkdtemp(prefix="tunnel-"))
            reserved.append(admin.listener)
            cleanup.callback(shutil.rmtree, admin.directory, ignore_errors=True)
        log.info(
            "starting workers",
            extra=fields(
                workers=config.server.workers,
                pid=os.getpid(),
                listen=",".join(str(listener.listen) for listener in listeners),
            ),
        )
        with _signal_pipe() as wakeups, _lifeline() as lifeline:
            supervisor = _Supervisor(worker_config.to_toml().encode(), wakeups, lifeline, admin)
            return supervisor.run(config.server.workers)
    finally:
        for sock in reserved:
            sock.close()
        cleanup.close()


def describe_exit(returncode: int) -> str:
    """A worker's exit in operator language: ``exited with status 1``, ``killed by SIGKILL``."""
    if returncode >= 0:
        return f"exited with status {returncode}"
    try:
        return f"killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"killed by signal {-returncode}"


@dataclass(slots=True)
class _Slot:
    """Worker number ``number``: its current process, if any, and its restart bookkeeping."""

    number: int
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restart_at: float | None = 0.0
    """When to start the next process; None while one runs. 0 = at once."""
    restarts: RestartPolicy = field(default_factory=RestartPolicy)


@dataclass(frozen=True, slots=True)
class _AdminPlan:
    """The admin listener of N workers: this process holds the listening socket, which worker 1
    serves; every worker also answers for itself on a Unix socket in ``directory`` (0700)."""

    listener: socket.socket
    directory: str


class _Supervisor:
    def __init__(
        self, config_toml: bytes, wakeups: int, lifeline: int, admin: _AdminPlan | None = None
    ) -> None:
        self._config_toml = config_toml
        self._wakeups = wakeups
        self._lifeline = lifeline
        self._admin = admin
        self._slots: list[_Slot] = []

    def run(self, workers: int) -> int:
        self._slots = [_Slot(number) for number in range(1, workers + 1)]
        received: list[int] = []
        while True:
            for signum in received:
                if signum in STOP_SIGNALS:
                    self._stop(signal.Signals(signum).name)
                    return 0
                if signum == signal.SIGHUP:
                    self._forward_hangup()
            self._reap_unexpected(time.monotonic())
            if all(slot.process is None and slot.restarts.cannot_start for slot in self._slots):
                log.error(
                    "workers cannot start; giving up",
                    extra=fields(
                        workers=workers,
                        reason="every worker exited within a second of its start, "
                        "three times in a row; see their errors above",
                    ),
                )
                return 1
            now = time.monotonic()
            for slot in self._slots:
                if slot.restart_at is not None and slot.restart_at <= now:
                    self._start(slot, now)
            received = _wait(self._wakeups, self._next_restart(time.monotonic()))

    def _start(self, slot: _Slot, now: float) -> None:
        command = [
            sys.executable,
            # Safe path: ``-m`` would put the current directory first on sys.path, and a
            # ``tunnel/`` folder there (``tunnel/certs/``, say) would shadow the package.
            "-P",
            "-m",
            "tunnel",
            WORKER_COMMAND,
            "--number",
            str(slot.number),
            "--lifeline",
            str(self._lifeline),
        ]
        inherited = [self._lifeline]
        for address, fd in activation.inherited().assigned():  # as taken by run_workers
            command += [activation.WORKER_OPTION, activation.listen_fd_argument(address, fd)]
            inherited.append(fd)
        if self._admin is not None:
            command += ["--admin-dir", self._admin.directory, "--of", str(len(self._slots))]
            if slot.number == 1:
                command += ["--admin-fd", str(self._admin.listener.fileno())]
                inherited.append(self._admin.listener.fileno())
        # The config goes in an unlinked temporary file rather than a pipe: the worker reads it
        # whenever it is ready, the supervisor never blocks on a slow starter, and nothing is
        # left on disk, whatever happens to either process.
        with tempfile.TemporaryFile() as config_file:
            config_file.write(self._config_toml)
            config_file.seek(0)
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_SIGNALS)
            try:
                process = subprocess.Popen(
                    command,
                    stdin=config_file,
                    pass_fds=inherited,
                    # Its own process group: Ctrl-C in a terminal reaches the supervisor only,
                    # which stops the workers in order instead of racing them.
                    process_group=0,
                )
            except OSError as exc:
                wait = slot.restarts.exited(uptime=0.0)
                slot.restart_at = now + wait
                log.error(
                    "worker could not be started",
                    extra=fields(worker=slot.number, error=str(exc), restart_in=Seconds(wait)),
                )
                return
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        slot.process, slot.started, slot.restart_at = process, now, None
        log.info("worker started", extra=fields(worker=slot.number, pid=process.pid))

    def _reap_unexpected(self, now: float) -> None:
        for slot in self._slots:
            if slot.process is None or (returncode := slot.process.poll()) is None:
                continue
            uptime = now - slot.started
            wait = slot.restarts.exited(uptime)
            log.warning(
                "worker exited unexpectedly",
                extra=fields(
                    worker=slot.number,
                    pid=slot.process.pid,
                    status=describe_exit(returncode),
                    uptime=Seconds(uptime),
                    restart_in=Seconds(wait),
                ),
            )
            slot.process, slot.restart_at = None, now + wait

    def _next_restart(self, now: float) -> float | None:
        due = [slot.restart_at for slot in self._slots if slot.restart_at is not None]
        return max(0.0, min(due) - now) if due else None

    def _running(self) -> list[tuple[int, subprocess.Popen[bytes]]]:
        return [(s.number, s.process) for s in self._slots if s.process is not None]

    def _forward_hangup(self) -> None:
        running = self._running()
        log.info(
            "SIGHUP received; passing it on to the workers", extra=fields(workers=len(running))
        )
        for _, process in running:
            process.send_signal(signal.SIGHUP)  # no-op if already reaped, so never a stale pid

    def _stop(self, reason: str) -> None:
        running = self._running()
        log.info("stopping workers", extra=fields(signal=reason, workers=len(running)))
        for _, process in running:
            process.terminate()
        deadline = time.monotonic() + STOP_SECONDS
        why = f"still running {STOP_SECONDS:g}s after SIGTERM"
        while True:
            for number, process in running:
                if process.poll() is not None:
                    self._stopped(number, process)
            running = [
                (number, process) for number, process in running if process.returncode is None
            ]
            left = deadline - time.monotonic()
            if not running or left <= 0:
                break
            if STOP_SIGNALS.intersection(_wait(self._wakeups, left)):
                why = "a second stop signal arrived"
                break
        for number, process in running:
            log.warning("killing worker", extra=fields(worker=number, pid=process.pid, reason=why))
            process.kill()
            try:
                process.wait(KILL_WAIT_SECONDS)
            except subprocess.TimeoutExpired:
                log.error(
                    "killed worker did not exit; leaving it",
                    extra=fields(worker=number, pid=process.pid),
                )
                continue
            self._stopped(number, process)
        for slot in self._slots:
            slot.process, slot.restart_at = None, None

    @staticmethod
    def _stopped(number: int, process: subprocess.Popen[bytes]) -> None:
        assert process.returncode is not None
        log.info(
            "worker stopped",
            extra=fields(worker=number, pid=process.pid, status=describe_exit(process.returncode)),
        )


@contextmanager
def _signal_pipe() -> Iterator[int]:
    """Yield a descriptor that becomes readable with one byte per signal received (the signal's
    number), for ``_WAKE_SIGNALS``; restore the previous handlers afterwards."""
    read_end, write_end = os.pipe()
    for end in (read_end, write_end):
        os.set_blocking(end, False)
    previous_handlers = {signum: signal.signal(signum, _note) for signum in _WAKE_SIGNALS}
    previous_fd = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    try:
        yield read_end
    finally:
        signal.set_wakeup_fd(previous_fd)
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
        os.close(read_end)
        os.close(write_end)


def _note(signum: int, frame: FrameType | None) -> None:
    """The Python-level handler: nothing to do, the signal's byte is already in the pipe."""


def _wait(wakeups: int, timeout: float | None) -> list[int]:
    """Wait up to ``timeout`` seconds (None: no limit) for signals; return those received."""
    select.select([wakeups], [], [], timeout)
    try:
        return list(os.read(wakeups, 4096))
    except BlockingIOError:
        return []


@contextmanager
def _lifeline() -> Iterator[int]:
    """Yield the read end of a pipe that every worker inherits and nobody writes to: when this
    process ends, for whatever reason, the kernel closes the write end and each worker reads
    end-of-file and stops (``tunnel.worker.wait_for_supervisor_exit``)."""
    read_end, write_end = os.pipe()
    try:
        yield read_end
    finally:
        os.close(read_end)
        os.close(write_end)
