"""The composition root: open the listeners, build the running generation, serve."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
from dataclasses import dataclass
from functools import partial

import trio

from tunnel.config import Config
from tunnel.core.redirect import HTTPS_PORT
from tunnel.errors import ConfigError
from tunnel.logs import LOGGER_NAME, fields
from tunnel.net.admin import AdminSource, open_admin_listener, serve_admin
from tunnel.net.engine import splice_available
from tunnel.net.handler import Entry
from tunnel.net.listener import accept_loop, bound_address, open_listener_groups
from tunnel.net.tls import ServerTLS, backend_contexts, listener_tls
from tunnel.net.worker_admin import WorkersView, socket_path
from tunnel.server import Generation
from tunnel.stats import ListenerStatistics

log = logging.getLogger(LOGGER_NAME)

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""What ``serve_until_signal`` handles: the first two stop it, SIGHUP reloads certificates."""


class Control:
    """Asks a running ``serve`` to act: pass one in, then call it from anywhere in the same
    trio run (the CLI calls ``reload_certificates`` on SIGHUP)."""

    def __init__(self) -> None:
        self.certificates: list[ServerTLS] = []
        self.generation: Generation | None = None
        """The running generation, once ``serve`` has started: statistics, tunnels, admin."""

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


@dataclass(frozen=True, slots=True)
class WorkerAdmin:
    """How worker ``number`` of ``workers`` takes part in the admin listener: every worker
    answers for itself on a private Unix socket in ``directory``; worker 1 also serves the
    public address (the supervisor's listening socket ``public_fd``) with all workers merged."""

    directory: str
    number: int
    workers: int
    public_fd: int | None = None


def check_tls(config: Config) -> None:
    """Load every certificate, key and CA file the configuration names, as ``serve`` would;
    ``tunnel check`` calls it. Raises ``ConfigError`` naming the key and the file."""
    listener_tls(config)
    backend_contexts(config)


async def serve(
    config: Config,
    *,
    reuse_port: bool = False,
    control: Control | None = None,
    worker_admin: WorkerAdmin | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``config`` until cancelled.

    With ``[admin] listen``, the admin listener is bound first and served beside the tunnels;
    ``worker_admin`` is the part a worker of ``run_workers`` plays in it instead.

    With ``nursery.start(serve, config)`` the caller gets the bound listeners back once they
    accept connections (port 0 is resolved in ``listener.socket.getsockname()``).
    ``reuse_port`` lets several processes listen on the same ports (the workers of
    ``tunnel.supervisor.run_workers``); see ``open_listeners``.

    This is one process, whatever ``server.workers`` says: ``run_workers(config)`` is the
    entry point that starts a supervisor and that many processes.

    TLS certificates and keys are loaded before any port is bound (``ConfigError`` when one
    cannot be); ``control`` lets the caller reload them.
    """
    server = config.server
    if server.relay == "splice" and not splice_available():
        raise ConfigError("server.relay", "splice(2) is not available here; use auto or copy")
    certificates = listener_tls(config)
    watched = [tls for tls in certificates if tls is not None]
    if control is not None:
        control.certificates = watched
    groups = await open_listener_groups(config.listeners, reuse_port=reuse_port)
    listeners = [listener for group in groups for listener in group]
    admin: list[tuple[trio.SocketListener, WorkersView | None]] = []
    try:
        admin = await _admin_listeners(config, worker_admin)
        entries = _entries(config, groups, certificates)
        generation = Generation(config, _listener_statistics(config, groups))
        handler = generation.handler
        if control is not None:
            control.generation = generation
        async with trio.open_nursery() as connections:
            await connections.start(generation.engine.run)
            for listener in listeners:
                log.info(
                    "listening",
                    extra=fields(
                        address=bound_address(listener),
                        routes=",".join(route.name for route in config.routes),
                    ),
                )
            for group, entry in zip(groups, entries, strict=True):
                for listener in group:
                    connections.start_soon(
                        accept_loop, listener, partial(handler, entry=entry), connections
                    )
            if watched and server.cert_check_interval > 0:
                connections.start_soon(_watch_certificates, watched, server.cert_check_interval)
            for admin_listener, view in admin:
                source: AdminSource = generation if view is None else view
                connections.start_soon(serve_admin, admin_listener, source)
            task_status.started(listeners)
    finally:
        with trio.CancelScope(shield=True):
            for listener in [*listeners, *(admin_listener for admin_listener, _ in admin)]:
                await listener.aclose()


async def _admin_listeners(
    config: Config, worker_admin: WorkerAdmin | None
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
            view = WorkersView(worker_admin.directory, worker_admin.workers)
            found.append((trio.SocketListener(public), view))
        return found
    address = config.admin.listen
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
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """``serve`` until SIGINT (Ctrl-C) or SIGTERM, then return: the clean stop of ``tunnel run``.

    With ``serve`` alone, Ctrl-C is a KeyboardInterrupt that the caller's nursery wraps in an
    exception group; here the signal is received as an event, and the caller's ``trio.run``
    simply returns. SIGHUP reloads the TLS files (``Control.reload_certificates``) and never
    stops it. Signal handlers need the main thread: elsewhere, use ``serve`` and cancel it.
    """
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(*SIGNALS) as signals:
            # A tunnel worker starts with these blocked (tunnel.supervisor), so that none arriving
            # before this receiver existed killed it; the receiver now holds any pending one.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
            control = Control()
            listeners = await nursery.start(
                partial(
                    serve, config, reuse_port=reuse_port, control=control, worker_admin=worker_admin
                )
            )
            task_status.started(listeners)
            async for signum in signals:
                if signum == signal.SIGHUP:
                    if control.has_tls:
                        log.info("SIGHUP received; reloading TLS certificates")
                        control.reload_certificates()
                    else:
                        log.info("SIGHUP received; no TLS files to reload, still serving")
                    continue
                log.info("stopping", extra=fields(signal=signal.Signals(signum).name))
                nursery.cancel_scope.cancel()
                break


def _listener_statistics(
    config: Config, groups: list[list[trio.SocketListener]]
) -> tuple[ListenerStatistics, ...]:
    return tuple(
        ListenerStatistics(
            bound_address(listener), settings.tls is not None, settings.redirect_https
        )
        for settings, group in zip(config.listeners, groups, strict=True)
        for listener in group
    )


def _entries(
    config: Config,
    groups: list[list[trio.SocketListener]],
    certificates: list[ServerTLS | None],
) -> list[Entry]:
    """One entry per listener. A ``redirect_https`` listener sends clients to the port of the
    first TLS listener, or to 443 when TLS is terminated elsewhere (a load balancer)."""
    https_port = next(
        (
            group[0].socket.getsockname()[1]
            for group, tls in zip(groups, certificates, strict=True)
            if tls is not None
        ),
        HTTPS_PORT,
    )
    return [
        Entry(tls=tls, redirect_port=https_port if settings.redirect_https else None)
        for settings, tls in zip(config.listeners, certificates, strict=True)
    ]


async def _watch_certificates(certificates: list[ServerTLS], interval: float) -> None:
    """Reload a listener's certificates when its files' contents change. Files are read in a
    thread: a slow disk must not stall the relay."""
    while True:
        await trio.sleep(interval)
        for tls in certificates:
            await trio.to_thread.run_sync(partial(tls.reload, force=False))
