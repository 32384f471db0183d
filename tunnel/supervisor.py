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
talk to each other; each has a link to the supervisor (``tunnel.worker``), which starts,
signals, reaps and restarts them:

- SIGTERM or SIGINT: SIGTERM to every worker, which drains its tunnels (``drain_timeout``);
  wait up to ``drain_timeout`` + ``STOP_SLACK_SECONDS``, SIGKILL what is left, return 0. A second
  SIGTERM or SIGINT is passed on (each worker then closes what is left at once) and the wait
  shrinks to ``KILL_WAIT_SECONDS``.
- SIGHUP, or a reload that worker 1 asks for (``POST /reload``): read the configuration file
  once with the ``loader``, check it (TLS files included) and reserve any new port, then hand it
  to every worker over its link (``tunnel.worker``); a bad file is one error line and nothing
  changes. Without a configuration file, SIGHUP is passed on (the workers reload TLS files).
- SIGUSR2, or a hand-off that worker 1 asks for (``POST /upgrade``): a live hand-off to a new
  supervisor started from the same command line (``tunnel.handover``): it gets this one's
  reserved ports, systemd sockets and admin listener, and each old worker passes its listeners
  and plain tunnels to the new worker of its number. Nothing moves unless every new worker is
  ready; then the old workers drain what stayed and exit, and so does this process (status 0).
- A worker that exits on its own is restarted after a backoff (``tunnel.policy.restart``); when
  every worker keeps failing to start, the supervisor gives up and returns 1.

It is synchronous on purpose: one ``select`` on a pipe that receives the signal numbers
(``signal.set_wakeup_fd``, SIGCHLD included) waits for a signal, a worker's exit or the next
restart, and nothing else runs in this process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
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
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from tunnel.config import Address, AdminConfig, Config
from tunnel.errors import ConfigError
from tunnel.handover import receive_inheritance, receive_message, send_inheritance, send_message
from tunnel.logs import LOGGER_NAME, Seconds, fields
from tunnel.net import activation, tickets
from tunnel.net.admin import bind_admin
from tunnel.net.handoff import HandoffError
from tunnel.net.listener import ListenError, bind_shared, take_inherited
from tunnel.net.notify import notify
from tunnel.pidfile import write_pid_file
from tunnel.policy.restart import RestartPolicy
from tunnel.successor import GO_SECONDS, HANDOFF_OPTION, HandedOff, HandoffRefused
from tunnel.worker import (
    CONFIG,
    DONE,
    GO,
    HAND_OFF,
    HANDOFF_ENDED,
    OUTCOME,
    PREPARED,
    RELOAD,
    TICKET_OPTION,
    UPGRADE,
    WORKER_COMMAND,
    Messages,
    message,
)

log = logging.getLogger(LOGGER_NAME)

STOP_SLACK_SECONDS = 7.0
"""Beyond ``drain_timeout``, how long stopping workers get after SIGTERM before they are killed:
a worker exits at most 2 s after its drain ends, and the rest is the time to start up Python's
exit on a loaded machine."""
LINK_SEND_SECONDS = 5.0
"""Bound on handing one message to a worker (it reads its link all the time)."""
KILL_WAIT_SECONDS = 5.0
"""Bound on waiting for a killed worker to be reaped (SIGKILL cannot be caught; this is slack)."""
DONE_SECONDS = 300.0
"""After the go, bound on waiting for every old worker to say how many tunnels it sent (10,000
tunnels take a few seconds; each stalled message fails on its own after 10 s)."""
HAND_OFF_POLL_SECONDS = 0.5
"""How often a waiting hand-off looks at the new supervisor's process."""

STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})
WORKER_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2})
"""Blocked while a worker is spawned: a signal sent before the worker's trio handlers exist stays
pending instead of killing it (SIGHUP's and SIGUSR2's default action) or raising
KeyboardInterrupt; the worker unblocks them once it handles them."""
_WAKE_SIGNALS = (*WORKER_SIGNALS, signal.SIGCHLD)


def run_workers(
    config: Config,
    loader: Callable[[], Config] | None = None,
    *,
    argv: Sequence[str] | None = None,
    handoff_fd: int | None = None,
) -> int:
    """Serve ``config`` with ``config.server.workers`` processes; block until SIGTERM or SIGINT.

    The one-process counterpart of ``await serve(config)`` for ``workers`` > 1. Call it from the
    main thread: it installs handlers for SIGTERM, SIGINT, SIGHUP and SIGCHLD (restored on
    return). Workers log to this process's stderr, each line tagged ``worker=N``.

    Listening sockets this process inherited (systemd socket activation) are not bound: every
    worker gets them (``--listen-fd``) and accepts on them, with no SO_REUSEPORT.

    ``loader`` reads the configuration again for a reload (SIGHUP, ``POST /reload``); it raises
    ``ConfigError``. ``argv`` are ``tunnel run``'s arguments, which a live hand-off (SIGUSR2,
    ``POST /upgrade``) starts again; ``handoff_fd`` is set in a supervisor started that way
    (``tunnel.handover``).

    Returns:
        The exit status: 0 after a requested stop, 1 when the workers could not be started.

    Raises:
        ListenError: when a listening address cannot be bound, or an inherited descriptor is
            not a listening TCP socket; no worker was started.
    """
    ports = _Ports()
    cleanup = ExitStack()
    predecessor = None
    try:
        handed_admin = None
        if handoff_fd is not None:
            predecessor, handed_admin = _Predecessor.connect(handoff_fd, ports)
            cleanup.callback(predecessor.close)
        worker_config = ports.worker_config(config)
        admin = None
        if config.admin.listen is not None:
            admin_listener = (
                handed_admin[1]
                if handed_admin is not None and handed_admin[0] == config.admin.listen
                else bind_admin(config.admin.listen)
            )
            admin = _AdminPlan(admin_listener, tempfile.mkdtemp(prefix="tunnel-"))
            cleanup.callback(admin.listener.close)
            cleanup.callback(shutil.rmtree, admin.directory, ignore_errors=True)
        log.info(
            "starting workers",
            extra=fields(
                workers=config.server.workers,
                pid=os.getpid(),
                listen=",".join(str(listener.listen) for listener in worker_config.listeners),
            ),
        )
        with _signal_pipe() as wakeups, _lifeline() as lifeline:
            supervisor = _Supervisor(config, worker_config, ports, wakeups, lifeline, admin, loader)
            supervisor.argv = None if argv is None else list(argv)
            supervisor.predecessor = predecessor
            return supervisor.run(config.server.workers)
    finally:
        ports.close()
        cleanup.close()


class _Ports:
    """The listening addresses reserved for the workers, by configured address: bound here
    (SO_REUSEPORT, not listening) so that a busy port fails before any worker starts and port 0
    becomes one concrete port that every worker, and every reload, uses."""

    def __init__(self) -> None:
        self._reserved: dict[Address, tuple[Address, list[socket.socket]]] = {}

    def worker_config(self, config: Config) -> Config:
        """``config`` as workers serve it: concrete ports, one process each, no admin listener
        of their own. Binds the addresses not reserved yet and releases those no longer
        configured (only once everything is bound: a failure changes nothing).

        Raises:
            ListenError: an address cannot be bound (or an inherited socket is not usable).
        """
        inherited = take_inherited(config.listeners)
        bound: dict[Address, tuple[Address, list[socket.socket]]] = {}
        listeners = []
        try:
            for listener, taken in zip(config.listeners, inherited, strict=True):
                # Inherited sockets (systemd socket activation) are not bound again: ``_start``
                # passes them to every worker, which all accept on them.
                if taken:
                    listeners.append(listener)
                    continue
                reserved = self._reserved.get(listener.listen) or bound.get(listener.listen)
                if reserved is None:
                    sockets = bind_shared(listener.listen, listen=False)
                    port = sockets[0].getsockname()[1]
                    reserved = (Address(listener.listen.host, port), sockets)
                    bound[listener.listen] = reserved
                listeners.append(dataclasses.replace(listener, listen=reserved[0]))
        except BaseException:
            for _, sockets in bound.values():
                for sock in sockets:
                    sock.close()
            raise
        self._reserved.update(bound)
        configured = {listener.listen for listener in config.listeners}
        for address in [a for a in self._reserved if a not in configured]:
            for sock in self._reserved.pop(address)[1]:
                sock.close()
        return dataclasses.replace(
            config,
            listeners=tuple(listeners),
            server=dataclasses.replace(config.server, workers=1),
            admin=AdminConfig(),
        )

    def adopt(self, reserved: dict[Address, tuple[Address, list[socket.socket]]]) -> None:
        """Take the addresses a previous supervisor reserved (a live hand-off): the same
        concrete ports, port 0 included."""
        self._reserved.update(reserved)

    @property
    def reserved(self) -> dict[Address, tuple[Address, list[socket.socket]]]:
        return self._reserved

    def close(self) -> None:
        for _, sockets in self._reserved.values():
            for sock in sockets:
                sock.close()
        self._reserved.clear()


def _closed(sock: socket.socket) -> bool:
    """Whether the peer of ``sock``, which never writes to it, has closed its end."""
    if not select.select([sock], [], [], 0)[0]:
        return False
    try:
        return sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _stop_process(process: subprocess.Popen[bytes]) -> None:
    """A new supervisor that failed: SIGTERM, then SIGKILL after ``KILL_WAIT_SECONDS``."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(KILL_WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


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
    link: socket.socket | None = None
    """The supervisor's end of this worker's link (``tunnel.worker``)."""
    messages: Messages = field(default_factory=Messages)


@dataclass(frozen=True, slots=True)
class _AdminPlan:
    """The admin listener of N workers: this process holds the listening socket, which worker 1
    serves; every worker also answers for itself on a Unix socket in ``directory`` (0700)."""

    listener: socket.socket
    directory: str


@dataclass
class _Predecessor:
    """In a supervisor started by a live hand-off: the socket to the old supervisor, until it
    commits, and the new end of each worker's pair with the old worker of its number."""

    sock: socket.socket | None
    pairs: dict[int, socket.socket]

    @classmethod
    def connect(
        cls, fd: int, ports: _Ports
    ) -> tuple[_Predecessor, tuple[Address, socket.socket] | None]:
        """Receive the old supervisor's inheritance: its reserved ports go to ``ports``, its
        systemd sockets to ``activation``; the admin listener is returned.

        Raises:
            HandoffError: the old supervisor sent nothing usable (it keeps serving).
        """
        sock = socket.socket(fileno=fd)
        try:
            inheritance = receive_inheritance(sock)
        except BaseException:
            sock.close()
            raise
        ports.adopt(inheritance.reserved)
        tickets.use_secret(inheritance.ticket_secret)
        activation.take_from_supervisor(
            [activation.listen_fd_argument(address, fd) for address, fd in inheritance.inherited]
        )
        return cls(sock, inheritance.pairs), inheritance.admin

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        for pair in self.pairs.values():
            pair.close()
        self.pairs.clear()


class _Supervisor:
    def __init__(
        self,
        config: Config,
        worker_config: Config,
        ports: _Ports,
        wakeups: int,
        lifeline: int,
        admin: _AdminPlan | None = None,
        loader: Callable[[], Config] | None = None,
    ) -> None:
        self._config = config
        self._config_toml = worker_config.to_toml().encode()
        self._ports = ports
        self._wakeups = wakeups
        self._lifeline = lifeline
        self._admin = admin
        self._loader = loader
        self._slots: list[_Slot] = []
        self.argv: list[str] | None = None
        """``tunnel run``'s arguments: what a hand-off starts again (None: no hand-off)."""
        self.predecessor: _Predecessor | None = None
        self._handing_off = False
        self._handed_off = False
        self._deferred: list[int] = []
        """Signals received while a hand-off waited, acted on after it."""
        self._replies: dict[int, tuple[bytes, dict[str, Any]]] = {}
        """Worker number → its last ``PREPARED`` or ``DONE`` message of a hand-off."""

    def run(self, workers: int) -> int:
        self._slots = [_Slot(number) for number in range(1, workers + 1)]
        received: list[int] = []
        try:
            while True:
                for signum in received:
                    if signum in STOP_SIGNALS:
                        self._stop(signal.Signals(signum).name)
                        return 0
                    if signum == signal.SIGHUP:
                        self._hangup()
                    if signum == signal.SIGUSR2:
                        log.info("SIGUSR2 received; handing off to a new supervisor")
                        self._hand_off("SIGUSR2")
                if self._handed_off:
                    # The old workers drain what stayed (TLS tunnels, handshakes) and exit.
                    self._stop("hand-off", signal_workers=False)
                    return 0
                if self.predecessor is not None and not self._follow_predecessor():
                    self._stop("hand-off called off")
                    return 1
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
                received = self._deferred + self._wait(self._next_restart(time.monotonic()))
                self._deferred = []
        finally:
            for slot in self._slots:
                self._unlink(slot)

    def _wait(self, timeout: float | None) -> list[int]:
        """Wait for signals and link messages (served here); the signals received."""
        links = {slot.link.fileno(): slot for slot in self._slots if slot.link is not None}
        watched = [self._wakeups, *links]
        if self.predecessor is not None and self.predecessor.sock is not None:
            watched.append(self.predecessor.sock.fileno())
        ready, _, _ = select.select(watched, [], [], timeout)
        for fd in ready:
            if fd in links:
                self._read_link(links[fd])
        return _drain_signals(self._wakeups)

    def _read_link(self, slot: _Slot) -> None:
        assert slot.link is not None
        try:
            data = slot.link.recv(65536)
            requests = slot.messages.feed(data) if data else None
        except (OSError, ValueError):
            requests = None
        if requests is None:
            # The worker is gone (or broke the protocol); its exit is reaped as usual.
            self._unlink(slot)
            return
        for kind, body in requests:
            if kind == RELOAD:
                outcome = (
                    {"status": 503, "error": "a hand-off is under way"}
                    if self._handing_off or self._handed_off
                    else self._reload(f"worker {slot.number} (POST /reload)")
                )
                self._send(slot, message(OUTCOME, json.dumps(outcome).encode()))
            elif kind == UPGRADE:
                outcome = self._hand_off(f"worker {slot.number} (POST /upgrade)")
                self._send(slot, message(OUTCOME, json.dumps(outcome).encode()))
            elif kind in (PREPARED, DONE):
                with contextlib.suppress(ValueError):
                    self._replies[slot.number] = (kind, json.loads(body))

    def _hangup(self) -> None:
        if self._loader is None:
            self._forward_hangup()
            return
        log.info("SIGHUP received; reloading")
        self._reload("SIGHUP")

    def _reload(self, why: str) -> dict[str, Any]:
        """Read and check the configuration once, then hand it to every worker; the outcome as
        ``POST /reload`` answers it. A bad file changes nothing."""
        if self._loader is None:
            return {"status": 409, "error": "started without a configuration file; nothing to read"}
        try:
            config = self._loader()
            config.check_reload(self._config)
            worker_config = self._ports.worker_config(config)
        except (ConfigError, ListenError) as error:
            text = error.strerror if isinstance(error, ListenError) else str(error)
            log.error(
                "configuration not reloaded; the running one stays",
                extra=fields(error=text or str(error), by=why),
            )
            return {"status": 400, "error": text or str(error)}
        before = {route.name for route in self._config.routes}
        after = {route.name for route in config.routes}
        self._config = config
        self._config_toml = worker_config.to_toml().encode()
        running = [slot for slot in self._slots if slot.link is not None]
        for slot in running:
            self._send(slot, message(CONFIG, self._config_toml))
        log.info(
            "configuration reloaded; handed to the workers",
            extra=fields(
                workers=len(running),
                by=why,
                routes=",".join(route.name for route in config.routes),
                routes_added=",".join(sorted(after - before)) or "-",
                routes_removed=",".join(sorted(before - after)) or "-",
            ),
        )
        return {
            "status": 200,
            "document": {
                "reloaded": True,
                "workers": len(running),
                "routes_added": sorted(after - before),
                "routes_removed": sorted(before - after),
            },
        }

    # Live hand-off (tunnel.handover): the old supervisor's side.

    def _hand_off(self, by: str) -> dict[str, Any]:
        """Start the installed tunnel again as a new supervisor and move every worker's
        listeners and tunnels to the new worker of its number; the outcome as ``POST
        /upgrade`` answers it. Nothing changes unless every new worker is ready: then the old
        workers are told to go, hand over and drain, and ``run`` waits for them and returns.
        """
        refused = self._hand_off_refused()
        if refused is not None:
            log.error(
                "hand-off refused; this process keeps serving", extra=fields(error=refused, by=by)
            )
            return {"status": 409, "error": refused}
        if self._loader is not None:
            try:
                self._loader().check_reload(self._config)
            except ConfigError as error:
                log.error(
                    "hand-off refused; the configuration does not load and this process keeps "
                    "serving",
                    extra=fields(error=str(error), by=by),
                )
                self._count_hand_off("refused")
                return {"status": 400, "error": str(error)}
        self._handing_off = True
        self._replies.clear()
        try:
            return self._hand_off_to_new_supervisor(by, time.monotonic())
        finally:
            self._handing_off = False

    def _hand_off_refused(self) -> str | None:
        if self.argv is None:
            return "started without `tunnel run`'s arguments: nothing to start again"
        if self._handing_off or self._handed_off:
            return "a hand-off is already under way"
        if self.predecessor is not None:
            return "this supervisor is still taking over from the previous one"
        waiting = [s.number for s in self._slots if s.process is None or s.link is None]
        if waiting:
            return f"worker {waiting[0]} is not running (it is being restarted); try again"
        return None

    def _hand_off_to_new_supervisor(self, by: str, started: float) -> dict[str, Any]:
        assert self.argv is not None
        ours, theirs = socket.socketpair()
        pairs = {slot.number: socket.socketpair() for slot in self._slots}
        command = [sys.executable, "-P", "-m", "tunnel", *self.argv, HANDOFF_OPTION]
        command.append(str(theirs.fileno()))
        process = None
        try:
            process = subprocess.Popen(command, pass_fds=[theirs.fileno()])
            theirs.close()
            admin = None
            if self._admin is not None and self._config.admin.listen is not None:
                admin = (self._config.admin.listen, self._admin.listener)
            send_inheritance(
                ours,
                tickets.current_secret(),
                self._ports.reserved,
                activation.inherited().assigned(),
                admin,
                {number: new for number, (_, new) in pairs.items()},
                LINK_SEND_SECONDS,
            )
            for slot in self._slots:
                if not self._send(slot, message(HAND_OFF), pairs[slot.number][0].fileno()):
                    raise HandoffError(f"worker {slot.number} did not take its part")
        except (OSError, HandoffError) as error:
            return self._call_off(f"cannot start the new supervisor: {error}", by, ours, process)
        finally:
            theirs.close()
            for old, new in pairs.values():
                old.close()
                new.close()
        problem = self._collect(PREPARED, time.monotonic() + GO_SECONDS, ours, process)
        if problem is not None:
            # A worker's pair breaks when the new supervisor dies: name the cause.
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(KILL_WAIT_SECONDS if _closed(ours) else 0)
            if process.returncode is not None:
                problem = f"the new supervisor {describe_exit(process.returncode)}"
            return self._call_off(problem, by, ours, process)
        for slot in self._slots:
            self._send(slot, message(GO, json.dumps({"go": True}).encode()))
        try:
            send_message(ours, {"committed": True}, (), time.monotonic() + LINK_SEND_SECONDS)
        except HandoffError as error:
            log.warning(
                "the new supervisor did not hear that it took over; it will stop when this one "
                "exits, and so would its workers",
                extra=fields(error=str(error), pid=process.pid),
            )
        ours.close()
        self._handed_off = True
        self._collect(DONE, time.monotonic() + DONE_SECONDS, None, None)
        sent = kept = 0
        for kind, body in self._replies.values():
            if kind == DONE:
                sent += int(body.get("sent", 0))
                kept += int(body.get("kept", 0))
        outcome = HandedOff(process.pid, sent, kept, time.monotonic() - started)
        outcome.log(by, workers=len(self._slots))
        document = outcome.to_json()
        return {"status": 200, "document": document}

    def _collect(
        self,
        kind: bytes,
        deadline: float,
        ours: socket.socket | None,
        process: subprocess.Popen[bytes] | None,
    ) -> str | None:
        """Wait until every worker sent ``kind`` (in ``_replies``); what went wrong, if
        anything: a worker's error, a worker or the new supervisor gone, a stop signal, the
        deadline."""
        while True:
            answered = {n: body for n, (k, body) in self._replies.items() if k == kind}
            failed = [(n, body) for n, body in answered.items() if body.get("ready") is False]
            if failed:
                number, body = failed[0]
                return f"worker {number}: {body.get('error', 'not ready')}"
            if len(answered) == len(self._slots):
                return None
            gone = [s.number for s in self._slots if s.link is None and s.number not in answered]
            if gone:
                return f"worker {gone[0]} exited during the hand-off"
            if process is not None and process.poll() is not None:
                return f"the new supervisor {describe_exit(process.returncode)}"
            left = deadline - time.monotonic()
            if left <= 0:
                waiting = sorted({slot.number for slot in self._slots} - answered.keys())
                return f"worker {waiting[0]} got no answer from its successor in time"
            if ours is not None and _closed(ours):
                return "the new supervisor closed the hand-off socket"
            received = self._wait(min(left, HAND_OFF_POLL_SECONDS))
            self._deferred += received
            if ours is not None and STOP_SIGNALS.intersection(received):
                return "a stop signal came first"

    def _call_off(
        self,
        problem: str,
        by: str,
        ours: socket.socket,
        process: subprocess.Popen[bytes] | None,
    ) -> dict[str, Any]:
        """Nothing moved: tell the workers no, stop the new supervisor (its workers served
        nothing), and keep serving."""
        for slot in self._slots:
            self._send(slot, message(GO, json.dumps({"go": False}).encode()))
        ours.close()
        if process is not None:
            _stop_process(process)
        # The workers still waiting for their successor now hear it is gone.
        self._collect(PREPARED, time.monotonic() + LINK_SEND_SECONDS, None, None)
        log.error(
            "hand-off failed; this process keeps serving everything",
            extra=fields(error=problem, by=by),
        )
        self._count_hand_off("failed")
        return {"status": HandoffRefused.status, "error": problem}

    def _count_hand_off(self, outcome: str) -> None:
        """The supervisor has no metrics of its own: worker 1 counts the outcome, once for
        the merged ``/metrics``."""
        body = json.dumps({"outcome": outcome}).encode()
        self._send(self._slots[0], message(HANDOFF_ENDED, body))  # worker 1

    # Live hand-off: the new supervisor's side.

    def _follow_predecessor(self) -> bool:
        """In a supervisor started by a hand-off: act on the old supervisor's word. False
        when it called the hand-off off (or a new worker died before the go): stop."""
        predecessor = self.predecessor
        assert predecessor is not None
        died = [
            slot.number
            for slot in self._slots
            if slot.started and slot.process is not None and slot.process.poll() is not None
        ]
        if died:
            log.error(
                "a new worker exited before the hand-off was done; this supervisor stops and "
                "the old one keeps serving",
                extra=fields(worker=died[0]),
            )
            return False
        if predecessor.sock is None or not select.select([predecessor.sock], [], [], 0)[0]:
            return True
        try:
            word, _ = receive_message(predecessor.sock, time.monotonic() + LINK_SEND_SECONDS)
        except HandoffError as error:
            word = {"error": str(error)}
        if word.get("committed") is not True:
            log.error(
                "the old supervisor called the hand-off off; it keeps serving and this one stops",
                extra=fields(error=word.get("error", repr(word))),
            )
            return False
        predecessor.close()
        self.predecessor = None
        if self._config.server.pid_file:
            write_pid_file(self._config.server.pid_file)
        notify(f"MAINPID={os.getpid()}")
        log.info("took over from the old supervisor", extra=fields(pid=os.getpid()))
        return True

    def _send(self, slot: _Slot, data: bytes, fd: int | None = None) -> bool:
        """Hand ``data`` (and the descriptor ``fd``) to a worker; one that does not take it
        within ``LINK_SEND_SECONDS`` is logged and skipped (it is stuck, and will be restarted
        if it dies). Whether it was sent."""
        if slot.link is None:
            return False
        try:
            slot.link.settimeout(LINK_SEND_SECONDS)
            if fd is not None:
                sent = socket.send_fds(slot.link, [data], [fd])
                data = data[sent:]
            slot.link.sendall(data)
            return True
        except OSError as exc:
            log.error(
                "could not hand a message to a worker",
                extra=fields(worker=slot.number, error=str(exc) or type(exc).__name__),
            )
            return False
        finally:
            slot.link.setblocking(False)

    @staticmethod
    def _unlink(slot: _Slot) -> None:
        if slot.link is not None:
            slot.link.close()
            slot.link = None
        slot.messages = Messages()

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
        self._unlink(slot)
        link, worker_end = socket.socketpair()
        command += ["--link", str(worker_end.fileno())]
        inherited = [self._lifeline, worker_end.fileno()]
        for address, fd in activation.inherited().assigned():  # as taken by run_workers
            command += [activation.WORKER_OPTION, activation.listen_fd_argument(address, fd)]
            inherited.append(fd)
        # Every worker derives the same TLS ticket keys, so a client resumes on any of them.
        ticket_secret = tickets.write_secret_to_pipe()
        command += [TICKET_OPTION, str(ticket_secret)]
        inherited.append(ticket_secret)
        pair = None if self.predecessor is None else self.predecessor.pairs.pop(slot.number, None)
        if pair is not None:
            command += [HANDOFF_OPTION, str(pair.fileno())]
            inherited.append(pair.fileno())
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
                link.close()
                wait = slot.restarts.exited(uptime=0.0)
                slot.restart_at = now + wait
                log.error(
                    "worker could not be started",
                    extra=fields(worker=slot.number, error=str(exc), restart_in=Seconds(wait)),
                )
                return
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                worker_end.close()
                os.close(ticket_secret)
                if pair is not None:
                    pair.close()
        link.setblocking(False)
        slot.link = link
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

    def _stop(self, reason: str, *, signal_workers: bool = True) -> None:
        """SIGTERM to every worker, which drains its tunnels and exits; kill what is left at
        the bound. A second stop signal is passed on (the workers close what is left at once)
        and shortens the wait to ``KILL_WAIT_SECONDS``. Without ``signal_workers`` the
        workers are already draining (after a hand-off): only wait for them."""
        running = self._running()
        bound = self._config.server.drain_timeout + STOP_SLACK_SECONDS
        log.info(
            "stopping workers" if signal_workers else "waiting for the workers to drain",
            extra=fields(signal=reason, workers=len(running), stop_timeout=Seconds(bound)),
        )
        hurried = False
        if signal_workers:
            for _, process in running:
                process.terminate()
        deadline = time.monotonic() + bound
        why = f"still running {bound:g}s after SIGTERM (drain_timeout + {STOP_SLACK_SECONDS:g}s)"
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
            if STOP_SIGNALS.intersection(self._wait(left)) and not hurried:
                hurried = True
                log.info(
                    "second stop signal; workers close their tunnels now",
                    extra=fields(workers=len(running)),
                )
                for _, process in running:
                    process.terminate()
                deadline = min(deadline, time.monotonic() + KILL_WAIT_SECONDS)
                why = f"still running {KILL_WAIT_SECONDS:g}s after a second stop signal"
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


def _drain_signals(wakeups: int) -> list[int]:
    """The signals received since the last call."""
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
