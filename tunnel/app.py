"""The composition root: open the listeners, build the running generation, serve; drain on a
graceful stop and swap configurations on a reload."""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from tunnel.config import Address, Config, ListenerConfig
from tunnel.core.redirect import HTTPS_PORT
from tunnel.errors import ConfigError
from tunnel.logs import LOGGER_NAME, Seconds, fields
from tunnel.net.admin import AdminSource, ReloadRefused, open_admin_listener, serve_admin
from tunnel.net.auth_files import check_auth
from tunnel.net.handler import Entry
from tunnel.net.handshakes import Ticket
from tunnel.net.health_probe import run_health_checks
from tunnel.net.listener import (
    ListenError,
    accept_loop,
    bound_address,
    open_listener_groups,
)
from tunnel.net.pipes import splice_available
from tunnel.net.tls import ServerTLS, backend_contexts, listener_tls
from tunnel.net.worker_admin import WorkersView, socket_path
from tunnel.pidfile import remove_pid_file, write_pid_file
from tunnel.server import Generation, Reloaded
from tunnel.stats import ListenerStatistics
from tunnel.successor import START_SECONDS, HandoffRefused, Successor, hand_off, pass_over

log = logging.getLogger(LOGGER_NAME)

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR2)
"""What ``serve_until_signal`` handles: the first two stop it gracefully (a second one at
once), SIGHUP reloads the configuration, SIGUSR2 hands everything to a new process."""
STOP_MARGIN_SECONDS = 2.0
"""After a drain's end, how long a stop waits for the last closes to finish."""

Loader = Callable[[], Config]
"""Reads the configuration again (the file, with the command line's flags): what a reload
applies. Raises ``ConfigError``."""


class Control:
    """Asks a running ``serve`` to act: pass one in, then call it from anywhere in the same
    trio run. ``loader`` re-reads the configuration for ``reload_from_source`` (SIGHUP and
    ``POST /reload``); without one those reload the TLS files only."""

    def __init__(self, loader: Loader | None = None) -> None:
        self.loader = loader
        self.certificates: list[ServerTLS] = []
        self.generation: Generation | None = None
        """The running generation, once ``serve`` has started: statistics, tunnels, admin."""
        self.listeners: list[trio.SocketListener] = []
        """The listening sockets now (a reload may add and remove some)."""
        self.stopping = False
        self._stop = trio.Event()
        self._stopped = trio.Event()
        self._serving = trio.Event()
        self._runtime: _Runtime | None = None
        self.argv: list[str] | None = None
        """``tunnel run``'s arguments, set by the command line: what a hand-off starts again
        (without them, as under the Python API, there is nothing to hand off to)."""
        self.successor: Successor | None = None
        """Set in a process started by a hand-off: where its tunnels come from."""
        self.pid_file = ""
        self._handing_off = False
        self.admin: list[tuple[Address | None, trio.SocketListener, trio.CancelScope]] = []
        """This process's admin listener: handed to a new process with the others."""

    @property
    def has_tls(self) -> bool:
        """Whether there is anything for ``reload_certificates`` to load."""
        return bool(self.certificates) or (
            self.generation is not None and self.generation.reloads_backend_tls
        )

    def reload_certificates(self) -> int:
        """Load every TLS listener's files, and the routes' ``backend_tls`` files, again; the
        number of listeners now on new ones. Open tunnels are untouched; a pair that fails to
        load keeps the old one (logged)."""
        if self.generation is not None:
            self.generation.reload_backend_tls()
        return sum(tls.reload(force=True) for tls in self.certificates)

    def stop(self) -> None:
        """Stop gracefully: no new connections, ``/healthz`` 503, open tunnels drained within
        ``drain_timeout``; ``serve`` returns once the last one is gone. Cancel ``serve`` to
        stop at once instead."""
        self.stopping = True
        self._stop.set()

    async def wait_stopped(self) -> None:
        """Return once ``serve`` has returned or failed."""
        await self._stopped.wait()

    async def reload(self, config: Config) -> Reloaded:
        """Serve ``config`` from now on, without dropping a tunnel: see ``_Runtime.reload``.

        Raises:
            ReloadRefused: not running, or stopping.
            ConfigError, ListenError: ``config`` cannot run; nothing changed.
        """
        if self._runtime is None:
            raise ReloadRefused(503, "the tunnel is not running")
        return await self._runtime.reload(config)

    async def hand_off(self, by: str) -> dict[str, Any]:
        """Start the installed tunnel again as a new process and give it the listeners and
        every plain tunnel (``tunnel.successor``); then stop as on SIGTERM, serving the
        tunnels that stay (TLS ones, handshakes under way) until they end or
        ``drain_timeout`` passes. The configuration file is checked first, as a reload would.

        Raises:
            ReloadRefused: with the HTTP status for ``POST /upgrade``; nothing changed.
        """
        runtime, generation = self._runtime, self.generation
        if self.stopping or self._handing_off:
            raise ReloadRefused(503, "the tunnel is stopping or already handing off")
        if runtime is None or generation is None or self.argv is None:
            raise ReloadRefused(409, "a hand-off needs a process started by `tunnel run`")
        if runtime.config.server.workers > 1:
            raise ReloadRefused(409, "with workers > 1 the supervisor hands off (SIGUSR2 to it)")
        if self.loader is not None:
            try:
                config = await trio.to_thread.run_sync(self.loader)
                config.check_reload(runtime.config)
            except ConfigError as error:
                generation.handoffs["refused"] += 1
                log.error(
                    "hand-off refused; the configuration does not load and this process keeps "
                    "serving",
                    extra=fields(error=str(error), by=by),
                )
                raise ReloadRefused(400, str(error)) from error
        self._handing_off = True
        try:
            outcome = await hand_off(
                generation, self.argv, runtime.listening_sockets(), runtime.stop_accepting, by=by
            )
        except HandoffRefused as refused:
            generation.handoffs["failed"] += 1
            raise ReloadRefused(refused.status, refused.message) from refused
        finally:
            self._handing_off = False
        generation.handed_off(outcome.tunnels_sent, outcome.tunnels_kept, outcome.seconds)
        self.stop()
        return outcome.to_json()

    async def hand_over(
        self, sock: socket.socket, commit: Callable[[], Awaitable[bool]], by: str
    ) -> dict[str, Any]:
        """A worker's part in its supervisor's hand-off (``tunnel.supervisor``): pass the
        listeners and the plain tunnels to the new worker at the other end of ``sock``
        (``tunnel.successor.pass_over``; ``commit`` waits for the supervisor's go). Returns the
        tunnels sent and kept and the seconds it took; the caller then stops this worker.

        Raises:
            HandoffError, OSError: before the go; nothing changed and this worker keeps
                serving.
            ReloadRefused: stopping, or already handing off.
        """
        with trio.move_on_after(START_SECONDS):  # a hand-off asked for as this worker starts
            await self._serving.wait()
        runtime, generation = self._runtime, self.generation
        if runtime is None or generation is None:
            sock.close()
            raise ReloadRefused(503, f"this worker is not serving after {START_SECONDS:g}s")
        if self.stopping or self._handing_off:
            sock.close()
            raise ReloadRefused(503, "this worker is stopping or already handing off")
        started = trio.current_time()
        self._handing_off = True
        try:
            sent, kept = await pass_over(
                sock, generation, runtime.listening_sockets(), runtime.stop_accepting, commit
            )
        finally:
            self._handing_off = False
            sock.close()
        seconds = trio.current_time() - started
        generation.moved(sent, kept, seconds)
        log.debug(
            "this worker's tunnels handed to its successor",
            extra=fields(tunnels=sent, kept=kept, duration=Seconds(seconds), by=by),
        )
        return {"sent": sent, "kept": kept, "seconds": seconds}

    async def count_hand_off(self, outcome: str) -> None:
        """Count a hand-off the supervisor refused or called off (``tunnel_handoffs_total``):
        it tells worker 1 alone, so the merged metrics count it once. A worker told so while
        it starts counts it once it serves (a SIGUSR2 may come that early)."""
        with trio.move_on_after(START_SECONDS):
            await self._serving.wait()
        if self.generation is not None:
            self.generation.handoffs[outcome] += 1

    async def reload_from_source(self) -> dict[str, Any]:
        """Read the configuration again with ``loader`` and apply it (SIGHUP, ``POST
        /reload``); one log line either way. Without a loader, reload the TLS files only.
        Returns what changed, as ``POST /reload`` answers it.

        Raises:
            ReloadRefused: with the HTTP status for ``POST /reload``; the running
                configuration stays.
        """
        if self.stopping:
            raise ReloadRefused(503, "the tunnel is stopping; not reloading")
        if self.loader is None:
            if not self.has_tls:
                log.info("nothing to reload: no configuration file, no TLS files; still serving")
                return {"reloaded": False, "certificates": 0}
            reloaded = self.reload_certificates()
            log.info(
                "no configuration file to read again; TLS files reloaded",
                extra=fields(listeners=reloaded),
            )
            return {"reloaded": False, "certificates": reloaded}
        try:
            config = await trio.to_thread.run_sync(self.loader)
            outcome = await self.reload(config)
        except (ConfigError, ListenError) as error:
            message = error.strerror if isinstance(error, ListenError) else str(error)
            log.error(
                "configuration not reloaded; the running one stays",
                extra=fields(error=message or str(error)),
            )
            raise ReloadRefused(400, message or str(error)) from error
        return {
            "reloaded": True,
            "routes_added": list(outcome.added),
            "routes_removed": list(outcome.removed),
            "draining": outcome.draining,
        }


@dataclass(frozen=True, slots=True)
class WorkerAdmin:
    """How worker ``number`` of ``workers`` takes part in the admin listener: every worker
    answers for itself on a private Unix socket in ``directory``; worker 1 also serves the
    public address (the supervisor's listening socket ``public_fd``) with all workers merged."""

    directory: str
    number: int
    workers: int
    public_fd: int | None = None
    reload: Callable[[], Awaitable[dict[str, Any]]] | None = None
    """Asks the supervisor for a reload (``POST /reload`` on the public address)."""
    upgrade: Callable[[], Awaitable[dict[str, Any]]] | None = None
    """Asks the supervisor for a live hand-off (``POST /upgrade`` on the public address)."""


def check_tls(config: Config) -> None:
    """Load every certificate, key and CA file, and every route's auth key, secret and tokens
    file the configuration names, as ``serve`` would;
    ``tunnel check`` calls it. Raises ``ConfigError`` naming the key and the file."""
    listener_tls(config)
    backend_contexts(config)
    check_auth(config)


def _check_relay(config: Config) -> None:
    if config.server.relay == "splice" and not splice_available():
        raise ConfigError("server.relay", "splice(2) is not available here; use auto or copy")


@dataclass(eq=False)
class _Door:
    """One configured listener: its sockets, its TLS and the handler its connections go to.
    A reload that keeps the address keeps the sockets and changes the rest in place."""

    config: ListenerConfig
    sockets: list[trio.SocketListener]
    tls: ServerTLS | None
    entry: Entry = field(default_factory=Entry)
    handler: Any = None
    scopes: list[trio.CancelScope] = field(default_factory=list)

    def serve(self, sock: socket.socket, peer: tuple[str, int], ticket: Ticket | None) -> Any:
        """What the accept loop calls: the current handler, with this listener's entry."""
        return self.handler(sock, peer, self.entry, ticket)

    async def close(self) -> None:
        for scope in self.scopes:
            scope.cancel()
        with trio.CancelScope(shield=True):
            for listener in self.sockets:
                await listener.aclose()


class _Runtime:
    """What ``serve`` changes while it runs: the listeners and the generation."""

    def __init__(
        self,
        config: Config,
        generation: Generation,
        control: Control,
        reuse_port: bool,
        handshakes: trio.Nursery,
    ) -> None:
        self.config = config
        self.generation = generation
        self.control = control
        self.reuse_port = reuse_port
        self.handshakes = handshakes
        self.doors: list[_Door] = []
        self._lock = trio.Lock()

    def open(self, doors: list[_Door]) -> None:
        """Start accepting on ``doors`` (with the entries the whole set implies)."""
        self._arrange(doors)
        for door in doors:
            if door not in self.doors:
                self._start(door)
        self.doors = doors
        self.control.listeners = [listener for door in doors for listener in door.sockets]
        self.control.certificates = [door.tls for door in doors if door.tls is not None]

    def _arrange(self, doors: list[_Door]) -> None:
        """Entries and handler: a ``redirect_https`` listener sends clients to the port of
        the first TLS listener, or to 443 when TLS is terminated elsewhere (a load
        balancer)."""
        https_port = next(
            (door.sockets[0].socket.getsockname()[1] for door in doors if door.tls is not None),
            HTTPS_PORT,
        )
        for door in doors:
            door.entry = Entry(
                tls=door.tls,
                redirect_port=https_port if door.config.redirect_https else None,
                proxy_protocol=door.config.proxy_protocol,
            )
            door.handler = self.generation.handler

    def _start(self, door: _Door) -> None:
        for listener in door.sockets:
            log.info(
                "listening",
                extra=fields(
                    address=bound_address(listener),
                    routes=",".join(route.name for route in self.config.routes),
                ),
            )
            scope = trio.CancelScope()
            door.scopes.append(scope)
            self.handshakes.start_soon(self._accept, listener, door, scope)

    async def _accept(
        self, listener: trio.SocketListener, door: _Door, scope: trio.CancelScope
    ) -> None:
        with scope:
            await accept_loop(
                listener, door.serve, self.handshakes, self.generation.tally.handshakes
            )

    async def reload(self, config: Config) -> Reloaded:
        """Serve ``config`` from now on.

        Listeners whose address did not change keep their sockets, so no connection is refused
        during a reload; new ones are bound first and removed ones closed last. Every file and
        port the new configuration needs is loaded or bound before anything changes: if one
        fails, nothing does. Then the generation swaps handler and upstreams
        (``Generation.reload``) and the TLS files of kept listeners are read again.
        """
        async with self._lock:
            if self.control.stopping:
                raise ReloadRefused(503, "the tunnel is stopping; not reloading")
            _check_relay(config)
            config.check_reload(self.config)
            by_address = {door.config.listen: door for door in self.doors}
            planned: list[tuple[_Door, ListenerConfig, ServerTLS | None]] = []
            opened: list[_Door] = []
            reused: list[ServerTLS] = []
            try:
                for i, settings in enumerate(config.listeners):
                    door = by_address.get(settings.listen)
                    tls = None
                    if settings.tls is not None:
                        if (
                            door is not None
                            and door.tls is not None
                            and door.config.tls == settings.tls
                        ):
                            tls = door.tls
                            reused.append(tls)
                        else:
                            tls = ServerTLS(settings.tls, f"listeners[{i}].tls")
                    if door is None:
                        groups = await open_listener_groups([settings], reuse_port=self.reuse_port)
                        door = _Door(settings, groups[0], tls)
                        opened.append(door)
                    planned.append((door, settings, tls))
                statistics = _listener_statistics(
                    (settings, tls, door.sockets) for door, settings, tls in planned
                )
                outcome = self.generation.reload(config, statistics)
            except BaseException:
                for door in opened:
                    await door.close()
                raise
            # Kept doors take the new settings in place: their accept loops call door.serve.
            for door, settings, tls in planned:
                door.config, door.tls = settings, tls
            doors = [door for door, _, _ in planned]
            removed = [door for door in self.doors if door not in doors]
            self.config = config
            self.open(doors)
            for door in removed:
                log.info(
                    "listener closed by a reload",
                    extra=fields(address=",".join(bound_address(s) for s in door.sockets)),
                )
                await door.close()
            for tls in reused:
                await trio.to_thread.run_sync(partial(tls.reload, force=True))
            log.info(
                "configuration reloaded",
                extra=fields(
                    routes=",".join(route.name for route in config.routes),
                    routes_added=",".join(outcome.added) or "-",
                    routes_removed=",".join(outcome.removed) or "-",
                    listeners_opened=len(opened),
                    listeners_closed=len(removed),
                    tunnels_draining=outcome.draining,
                ),
            )
            return outcome

    def listening_sockets(self) -> list[tuple[str, Address, trio.socket.SocketType]]:
        """Every listening socket (``"listen"``, or ``"admin"`` for the admin listener) with
        the address it serves, for a hand-off."""
        found = [
            ("listen", door.config.listen, sock.socket)
            for door in self.doors
            for sock in door.sockets
        ]
        found += [
            ("admin", address, listener.socket)
            for address, listener, _ in self.control.admin
            if address is not None
        ]
        return found

    async def stop_accepting(self) -> None:
        """A hand-off's new process accepts now: close this one's listening sockets, the
        admin listener's too (the new process holds its own descriptors of them, so the
        sockets stay open); admin requests under way finish."""
        async with self._lock:
            for door in self.doors:
                await door.close()
            for _, _, accepting in self.control.admin:
                accepting.cancel()
            log.info("no longer accepting connections; the new process does")

    async def stop(self) -> float:
        """Begin a graceful stop; returns the drain's end (trio's clock)."""
        async with self._lock:
            end = self.generation.shut_down()
            tunnels = self.generation.engine.statistics().tunnels
            log.info(
                "no longer accepting connections; open tunnels drain",
                extra=fields(
                    tunnels=tunnels,
                    drain_timeout=Seconds(self.config.server.drain_timeout),
                ),
            )
            for door in self.doors:
                await door.close()
            return end

    async def watch_certificates(self) -> None:
        """Reload a listener's certificates when its files' contents change. Files are read
        in a thread: a slow disk must not stall the relay."""
        while True:
            interval = self.config.server.cert_check_interval
            await trio.sleep(interval if interval > 0 else math.inf)
            for tls in list(self.control.certificates):
                await trio.to_thread.run_sync(partial(tls.reload, force=False))


def _listener_statistics(
    listeners: Iterable[tuple[ListenerConfig, ServerTLS | None, list[trio.SocketListener]]],
) -> tuple[ListenerStatistics, ...]:
    return tuple(
        ListenerStatistics(bound_address(sock), tls is not None, settings.redirect_https)
        for settings, tls, sockets in listeners
        for sock in sockets
    )


class _LocalAdmin:
    """The admin listener's view of this process: the running generation, and reloads."""

    def __init__(self, control: Control) -> None:
        self.control = control

    @property
    def _generation(self) -> Generation:
        assert self.control.generation is not None
        return self.control.generation

    async def healthy(self) -> bool:
        return await self._generation.healthy()

    async def stats(self) -> dict[str, Any]:
        return await self._generation.stats()

    async def metrics(self) -> tuple[bytes, str]:
        return await self._generation.metrics()

    async def close_tunnel(self, tunnel_id: str) -> bool:
        return await self._generation.close_tunnel(tunnel_id)

    async def drain_backend(self, route: str, backend: str) -> dict[str, Any] | None:
        return await self._generation.drain_backend(route, backend)

    async def enable_backend(self, route: str, backend: str) -> dict[str, Any] | None:
        return await self._generation.enable_backend(route, backend)

    async def reload_config(self) -> dict[str, Any]:
        return await self.control.reload_from_source()

    async def upgrade(self) -> dict[str, Any]:
        return await self.control.hand_off("POST /upgrade")


async def serve(
    config: Config,
    *,
    reuse_port: bool = False,
    control: Control | None = None,
    worker_admin: WorkerAdmin | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``config`` until ``control.stop()`` (a graceful stop, then return) or cancelled
    (every tunnel closed at once).

    With ``[admin] listen``, the admin listener is bound first and served beside the tunnels;
    ``worker_admin`` is the part a worker of ``run_workers`` plays in it instead.

    With ``nursery.start(serve, config)`` the caller gets the bound listeners back once they
    accept connections (port 0 is resolved in ``listener.socket.getsockname()``).
    ``reuse_port`` lets several processes listen on the same ports (the workers of
    ``tunnel.supervisor.run_workers``); see ``open_listeners``.

    This is one process, whatever ``server.workers`` says: ``run_workers(config)`` is the
    entry point that starts a supervisor and that many processes.

    TLS certificates and keys are loaded before any port is bound (``ConfigError`` when one
    cannot be); ``control`` lets the caller reload them, or the whole configuration, and stop.
    """
    control = control if control is not None else Control()
    try:
        await _serve(config, reuse_port, control, worker_admin, task_status)
    finally:
        control._stopped.set()


async def _serve(
    config: Config,
    reuse_port: bool,
    control: Control,
    worker_admin: WorkerAdmin | None,
    task_status: trio.TaskStatus[list[trio.SocketListener]],
) -> None:
    _check_relay(config)
    certificates = listener_tls(config)
    groups = await open_listener_groups(config.listeners, reuse_port=reuse_port)
    doors = [
        _Door(settings, group, tls)
        for settings, group, tls in zip(config.listeners, groups, certificates, strict=True)
    ]
    admin: list[tuple[trio.SocketListener, WorkersView | None]] = []
    try:
        admin = await _admin_listeners(
            config,
            worker_admin,
            None if control.successor is None else control.successor.admin,
        )
        generation = Generation(
            config, _listener_statistics((d.config, d.tls, d.sockets) for d in doors)
        )
        control.generation = generation
        if control.successor is not None:
            generation.tally.ids = itertools.count(control.successor.next_id)
        async with trio.open_nursery() as services:
            await services.start(generation.engine.run)
            services.start_soon(run_health_checks, lambda: generation.upstreams.values())
            await services.start(generation.guarding.run)
            if control.successor is not None:
                # Everything is loaded: ready. Nothing is served before the old process's go.
                await control.successor.wait_for_go()
            for admin_listener, view in admin:
                source: AdminSource = _LocalAdmin(control) if view is None else view
                if worker_admin is not None and view is None:
                    source = generation
                accepting = trio.CancelScope()
                if view is None and worker_admin is None:
                    control.admin.append((config.admin.listen, admin_listener, accepting))
                elif view is not None:
                    # Worker 1's public listener: the supervisor hands it over itself, but a
                    # hand-off stops this worker accepting on it (``stop_accepting``).
                    control.admin.append((None, admin_listener, accepting))
                services.start_soon(serve_admin, admin_listener, source, accepting)
            async with trio.open_nursery() as handshakes:
                runtime = _Runtime(config, generation, control, reuse_port, handshakes)
                runtime.open(doors)
                control._runtime = runtime
                control._serving.set()
                services.start_soon(runtime.watch_certificates)
                task_status.started(control.listeners)
                if control.pid_file:
                    write_pid_file(control.pid_file)
                if control.successor is not None:
                    services.start_soon(control.successor.take_over, generation)
                await control._stop.wait()
                end = await runtime.stop()
                # Handshakes under way may still become tunnels (drained like the others),
                # within the same deadline.
                handshakes.cancel_scope.deadline = end
            with trio.move_on_at(end + STOP_MARGIN_SECONDS) as waited:
                await generation.engine.wait_empty()
            log.info(
                "stopped",
                extra=fields(
                    tunnels_left=generation.engine.statistics().tunnels,
                    drained=not waited.cancelled_caught,
                ),
            )
            services.cancel_scope.cancel()
        await generation.guarding.aclose()
        if control.pid_file:
            remove_pid_file(control.pid_file)
    finally:
        with trio.CancelScope(shield=True):
            for door in doors:
                for listener in door.sockets:
                    await listener.aclose()
            for listener in control.listeners:
                await listener.aclose()
            for admin_listener, _ in admin:
                await admin_listener.aclose()


async def _admin_listeners(
    config: Config,
    worker_admin: WorkerAdmin | None,
    inherited: tuple[Address, socket.socket] | None = None,
) -> list[tuple[trio.SocketListener, WorkersView | None]]:
    """The admin listeners to serve, each with the view it shows (None: this process's
    generation)."""
    if worker_admin is not None:
        private = await _unix_listener(socket_path(worker_admin.directory, worker_admin.number))
        found: list[tuple[trio.SocketListener, WorkersView | None]] = [(private, None)]
        if worker_admin.public_fd is not None:
            # The supervisor's listening socket, inherited: it stays open while workers come
            # and go, so admin clients wait in its backlog through a restart of worker 1.
            public = trio.socket.from_stdlib_socket(socket.socket(fileno=worker_admin.public_fd))
            view = WorkersView(
                worker_admin.directory,
                worker_admin.workers,
                reload=worker_admin.reload,
                upgrade=worker_admin.upgrade,
            )
            found.append((trio.SocketListener(public), view))
        return found
    address = config.admin.listen
    if inherited is not None:
        handed, sock = inherited
        if handed == address:
            return [(trio.SocketListener(trio.socket.from_stdlib_socket(sock)), None)]
        sock.close()
    if address is None:
        return []
    return [(await open_admin_listener(address), None)]


async def _unix_listener(path: str) -> trio.SocketListener:
    """A listening Unix socket at ``path``; the socket of a previous run of this worker (it
    died and was restarted) is replaced."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen()
    return trio.SocketListener(sock)


async def serve_until_signal(
    config: Config,
    *,
    reuse_port: bool = False,
    worker_admin: WorkerAdmin | None = None,
    loader: Loader | None = None,
    control: Control | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """``serve`` until SIGINT (Ctrl-C) or SIGTERM, then drain and return: the clean stop of
    ``tunnel run``. A second SIGINT or SIGTERM closes what is left at once.

    With ``serve`` alone, Ctrl-C is a KeyboardInterrupt that the caller's nursery wraps in an
    exception group; here the signal is received as an event, and the caller's ``trio.run``
    simply returns. SIGHUP reads the configuration again with ``loader`` and applies it
    (without one, it reloads the TLS files); it never stops the tunnel. Signal handlers need
    the main thread: elsewhere, use ``serve`` with a ``Control``.
    """
    control = control if control is not None else Control(loader)
    if loader is not None:
        control.loader = loader
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(*SIGNALS) as signals:
            # A tunnel worker starts with these blocked (tunnel.supervisor), so that none arriving
            # before this receiver existed killed it; the receiver now holds any pending one.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
            listeners = await nursery.start(
                partial(
                    serve, config, reuse_port=reuse_port, control=control, worker_admin=worker_admin
                )
            )
            task_status.started(listeners)
            nursery.start_soon(_obey_signals, signals, control, nursery.cancel_scope)
            await control.wait_stopped()
            nursery.cancel_scope.cancel()


async def _obey_signals(signals: Any, control: Control, scope: trio.CancelScope) -> None:
    async for signum in signals:
        if signum == signal.SIGHUP:
            log.info("SIGHUP received; reloading")
            with contextlib.suppress(ReloadRefused):
                await control.reload_from_source()
            continue
        if signum == signal.SIGUSR2:
            log.info("SIGUSR2 received; handing off to a new process")
            with contextlib.suppress(ReloadRefused):
                await control.hand_off("SIGUSR2")
            continue
        name = signal.Signals(signum).name
        if control.stopping:
            log.warning("second stop signal; closing every tunnel now", extra=fields(signal=name))
            scope.cancel()
            return
        log.info("stopping", extra=fields(signal=name))
        control.stop()
