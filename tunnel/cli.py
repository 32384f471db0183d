"""The ``tunnel`` command: run, check, demo, cert, drain, enable. The only place with ``trio.run``
and ``sys.exit``."""

from __future__ import annotations

import dataclasses
import http.client
import json
import logging
import math
import os
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import click
import trio

from tunnel._version import __version__
from tunnel.app import Control, Loader, WorkerAdmin, check_tls, serve_until_signal
from tunnel.certs import DEFAULT_DAYS, trust_instructions, write_dev_certificates
from tunnel.config import MAX_WORKERS, Address, Config, format_duration, parse_duration
from tunnel.demo import run_demo
from tunnel.errors import ConfigError
from tunnel.logs import LOGGER_NAME, setup_logging
from tunnel.net import tickets
from tunnel.net.activation import WORKER_OPTION, parse_listen_fd, take_from_supervisor
from tunnel.net.handoff import HandoffError
from tunnel.net.listener import ListenError
from tunnel.pidfile import remove_pid_file, write_pid_file
from tunnel.successor import HANDOFF_OPTION, Successor
from tunnel.supervisor import run_workers
from tunnel.worker import (
    TICKET_OPTION,
    WORKER_COMMAND,
    SupervisorLink,
    tag_logs,
    wait_for_supervisor_exit,
)

log = logging.getLogger(LOGGER_NAME)


def _in_file(config_file: Path, error: ConfigError) -> str:
    """``FILE: key: problem``, naming the file once: an error about the whole file (it cannot be
    read, it is not TOML) already has the path, or a placeholder, where the key goes."""
    if error.key in (str(config_file), "(file)"):
        return f"{config_file}: {error.problem}"
    return f"{config_file}: {error}"


def _fail(message: str) -> None:
    click.echo(f"tunnel: {message}", err=True)
    sys.exit(1)


_E = TypeVar("_E", bound=BaseException)


def _first(group: BaseExceptionGroup[_E]) -> _E:
    """The first error in ``group``: each trio nursery between ``trio.run`` and the error wraps
    it in one more group."""
    error: _E | BaseExceptionGroup[_E] = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def _listen_failure(group: BaseExceptionGroup[ListenError]) -> str:
    """A bind error plainly, without the ``[Errno N]`` prefix (the message already names the
    address and the cause)."""
    error = _first(group)
    return error.strerror or str(error)


@click.group()
@click.version_option(__version__, prog_name="tunnel")
def main() -> None:
    """An edge proxy for WebSocket (HTTP/1.1 Upgrade) connections."""


@main.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="TOML configuration file.",
)
@click.option(
    "--listen",
    multiple=True,
    metavar="ADDR",
    help="host:port, [v6]:port or :port to accept clients on (repeatable).",
)
@click.option(
    "--backend",
    multiple=True,
    metavar="URL",
    help="host:port, ws://host:port[/path] or wss://host:port[/path]; several are tried "
    "round-robin.",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default=None,
    help="Log line format (default: text, or the file's server.log_format).",
)
@click.option(
    "--workers",
    type=int,
    default=None,
    metavar="N",
    help="Processes sharing the listening ports (default 1, or the file's server.workers).",
)
@click.option(
    "--tls-cert",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    metavar="PEM",
    help="Certificate chain: every listener serves TLS (wss://) with it. Needs --tls-key.",
)
@click.option(
    "--tls-key",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    metavar="PEM",
    help="Private key of --tls-cert.",
)
@click.option(
    "--admin",
    default=None,
    metavar="ADDR",
    help="host:port of the admin listener (/healthz, /metrics, /stats); replaces the file's "
    "[admin] listen. Bind it to 127.0.0.1: it has no authentication.",
)
@click.option(HANDOFF_OPTION, "handoff_fd", type=click.IntRange(0), default=None, hidden=True)
def run(
    config_file: Path | None,
    listen: tuple[str, ...],
    backend: tuple[str, ...],
    log_format: str | None,
    workers: int | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    admin: str | None,
    handoff_fd: int | None,
) -> None:
    """Run the tunnel until interrupted (Ctrl-C or SIGTERM), then drain the open tunnels
    (server.drain_timeout; a second signal closes them at once).

    SIGHUP reads the configuration file again and applies it without dropping the tunnels of
    unchanged routes (without a file: reloads TLS files); it never stops the tunnel. SIGUSR2
    starts the installed tunnel again and hands it the listeners and the open tunnels. With
    more than one worker this process supervises the workers (see docs/operations.md).
    """
    overrides = partial(
        Config.with_overrides,
        listen=listen,
        backends=backend,
        log_format=log_format,
        workers=workers,
        tls_cert=None if tls_cert is None else str(tls_cert),
        tls_key=None if tls_key is None else str(tls_key),
        admin=admin,
    )
    loader = None if config_file is None else partial(_load, config_file, overrides)
    loaded = Config()
    if config_file is not None:
        try:
            loaded = Config.from_file(config_file, partial=True)
        except ConfigError as error:
            _fail(f"configuration error: {_in_file(config_file, error)}")
            return
    try:
        config = overrides(loaded)
    except ConfigError as error:
        _fail(f"configuration error: {error}")
        return
    setup_logging(config.server.log_format)
    argv = _handoff_argv(sys.argv[1:])
    if config.server.workers > 1:
        # A supervisor started by a hand-off writes its PID once it has taken over.
        with _pid_file(config.server.pid_file, write=handoff_fd is None):
            status = 0
            try:
                check_tls(config)  # here, once, rather than in every worker it would stop
                status = run_workers(config, loader, argv=argv, handoff_fd=handoff_fd)
            except ConfigError as error:
                _fail(f"configuration error: {error}")
            except ListenError as error:
                _fail(error.strerror or str(error))
        sys.exit(status)
    control = Control(loader)
    control.argv = argv
    control.pid_file = config.server.pid_file
    if handoff_fd is not None:
        successor, listen_fds = trio.run(Successor.connect, handoff_fd)
        take_from_supervisor(listen_fds)
        control.successor = successor
    _serve_in_this_process(config, loader=loader, control=control)


def _handoff_argv(argv: list[str]) -> list[str]:
    """This process's arguments without a hand-off descriptor of its own."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == HANDOFF_OPTION:
            skip = True
        elif not arg.startswith(HANDOFF_OPTION + "="):
            kept.append(arg)
    return kept


@contextmanager
def _pid_file(path: str, *, write: bool = True) -> Iterator[None]:
    """The supervisor's PID in ``path`` while it runs (a single process writes its own once
    it listens: ``serve``); removed at the end while it names this process."""
    if path and write:
        write_pid_file(path)
    try:
        yield
    finally:
        if path:
            remove_pid_file(path)


def _load(config_file: Path, overrides: Callable[[Config], Config]) -> Config:
    """The file read again with the command line's flags, as a reload applies it: every TLS
    file loaded too. Raises ``ConfigError`` naming the file and the key."""
    try:
        config = overrides(Config.from_file(config_file, partial=True))
        check_tls(config)
    except ConfigError as error:
        whole_file = error.key in (str(config_file), "(file)")
        raise ConfigError(str(config_file), error.problem if whole_file else str(error)) from None
    return config


@main.command(name=WORKER_COMMAND, hidden=True)
@click.option("--number", type=click.IntRange(1, MAX_WORKERS), required=True)
@click.option("--lifeline", type=click.IntRange(0), default=None)
@click.option("--admin-dir", default=None, help="Directory of the workers' admin sockets.")
@click.option("--of", "workers", type=click.IntRange(1, MAX_WORKERS), default=1)
@click.option("--admin-fd", type=click.IntRange(0), default=None)
@click.option(WORKER_OPTION, "listen_fds", multiple=True, metavar="ADDR=FD")
@click.option("--link", type=click.IntRange(0), default=None)
@click.option(HANDOFF_OPTION, "handoff_fd", type=click.IntRange(0), default=None)
@click.option(TICKET_OPTION, "ticket_secret_fd", type=click.IntRange(0), default=None)
def worker(
    number: int,
    lifeline: int | None,
    admin_dir: str | None,
    workers: int,
    admin_fd: int | None,
    listen_fds: tuple[str, ...],
    link: int | None,
    handoff_fd: int | None,
    ticket_secret_fd: int | None,
) -> None:
    """One worker of ``tunnel run --workers N``, started by its supervisor.

    The configuration arrives as TOML on stdin; ``--lifeline`` is the descriptor of a pipe that
    reads end-of-file when the supervisor is gone (see ``tunnel.worker``). With an admin
    listener, ``--admin-dir`` holds every worker's private admin socket and worker 1 gets the
    public listening socket as ``--admin-fd`` (see ``tunnel.federation``). Each ``--listen-fd
    ADDR=FD`` is a listening socket the supervisor inherited (systemd socket activation), which
    the listener ADDR accepts on instead of binding (see ``tunnel.net.activation``).
    ``--link`` is this worker's end of a socket pair to the supervisor, which hands over new
    configurations on a reload (see ``tunnel.worker``). ``--ticket-secret-fd`` is a pipe holding
    the secret every worker derives its TLS ticket keys from (``tunnel.net.tickets``).
    ``--handoff-fd`` is this worker's end of
    a hand-off from the same worker of the previous supervisor (see ``tunnel.successor``): its
    listening sockets, with their accept queues, and then its tunnels come from there.
    """
    if ticket_secret_fd is not None:
        try:
            tickets.use_secret(tickets.read_secret(ticket_secret_fd))
        except (OSError, ValueError) as error:
            _fail(f"worker {number}: no TLS ticket key secret from the supervisor: {error}")
            return
    control = None
    if handoff_fd is not None:
        with _exit_on_startup_errors():
            successor, handed = trio.run(partial(Successor.connect, handoff_fd, main=False))
        listen_fds = _merge_listen_fds(handed, listen_fds)
        control = Control()
        control.successor = successor
    take_from_supervisor(listen_fds)
    try:
        config = Config.from_toml(sys.stdin.buffer.read().decode("utf-8"))
    except ConfigError as error:
        _fail(f"worker {number}: configuration error: {error}")
        return
    setup_logging(config.server.log_format)
    tag_logs(number)
    admin = None
    if admin_dir is not None:
        admin = WorkerAdmin(admin_dir, number, workers, admin_fd)
    _serve_in_this_process(
        config, reuse_port=True, lifeline=lifeline, worker_admin=admin, link=link, control=control
    )


def _merge_listen_fds(handed: list[str], inherited: tuple[str, ...]) -> tuple[str, ...]:
    """The listening sockets a worker taken over accepts on: those its predecessor handed over,
    and those the supervisor passes for addresses not among them (a systemd socket the
    predecessor held is the same socket either way: the supervisor's copy is closed)."""
    addresses = {parse_listen_fd(value)[0] for value in handed}
    kept = list(handed)
    for value in inherited:
        address, fd = parse_listen_fd(value)
        if address in addresses:
            os.close(fd)
        else:
            kept.append(value)
    return tuple(kept)


def _serve_in_this_process(
    config: Config,
    *,
    reuse_port: bool = False,
    lifeline: int | None = None,
    worker_admin: WorkerAdmin | None = None,
    loader: Loader | None = None,
    link: int | None = None,
    control: Control | None = None,
) -> None:
    with _exit_on_startup_errors():
        trio.run(
            partial(
                _run_until_signal,
                config,
                reuse_port=reuse_port,
                lifeline=lifeline,
                worker_admin=worker_admin,
                loader=loader,
                link=link,
                control=control,
            )
        )


@contextmanager
def _exit_on_startup_errors() -> Iterator[None]:
    """Around ``trio.run``: a port that cannot be bound or a configuration the running system
    refuses exits 1 with its message, not a traceback; Ctrl-C is a normal way to stop."""
    try:
        yield
    except* ListenError as group:
        _fail(_listen_failure(group))
    except* ConfigError as group:
        _fail(f"configuration error: {_first(group)}")
    except* HandoffError as group:
        _fail(f"hand-off: {_first(group)}; the old process keeps serving and this one stops")
    except* KeyboardInterrupt:
        pass


async def _run_until_signal(
    config: Config,
    *,
    reuse_port: bool,
    lifeline: int | None,
    worker_admin: WorkerAdmin | None,
    loader: Loader | None,
    link: int | None = None,
    control: Control | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT (or, for a worker, until its supervisor is gone)."""
    control = control if control is not None else Control(loader)
    async with trio.open_nursery() as nursery:
        if lifeline is not None:
            nursery.start_soon(_stop_when_supervisor_exits, lifeline, nursery.cancel_scope)
        if link is not None:
            supervisor = SupervisorLink(link)
            nursery.start_soon(supervisor.serve, control)
            if worker_admin is not None:
                worker_admin = dataclasses.replace(
                    worker_admin,
                    reload=supervisor.request_reload,
                    upgrade=supervisor.request_upgrade,
                )
        await serve_until_signal(
            config, reuse_port=reuse_port, worker_admin=worker_admin, control=control
        )
        nursery.cancel_scope.cancel()


async def _stop_when_supervisor_exits(lifeline: int, scope: trio.CancelScope) -> None:
    await wait_for_supervisor_exit(lifeline)
    log.warning("supervisor is gone; stopping this worker")
    scope.cancel()


@main.command()
@click.option(
    "--config",
    "config_file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="TOML file to check.",
)
def check(config_file: Path) -> None:
    """Validate a configuration file (TLS files are loaded too) and print the effective
    configuration."""
    try:
        config = Config.from_file(config_file, partial=True)
        check_tls(config)
    except ConfigError as error:
        _fail(_in_file(config_file, error))
        return
    click.echo(config.to_toml(), nl=False)
    for note in config.missing():
        click.echo(f"# {config_file}: {note}", err=True)
    click.echo(f"# {config_file}: configuration is valid", err=True)


@main.command()
@click.option(
    "--listen",
    default="127.0.0.1:0",
    show_default=True,
    metavar="ADDR",
    help="Where the tunnel listens; port 0 picks a free port.",
)
@click.option("--once", is_flag=True, help="Run the self-check and exit (0 when it passed).")
def demo(listen: str, once: bool) -> None:
    """An echo backend behind the tunnel on localhost, with a self-check."""
    try:
        address = Address.parse(listen, "--listen")
    except ConfigError as error:
        _fail(str(error))
        return
    setup_logging("text")
    ok = True  # Ctrl-C while serving is a normal way to stop the demo
    with _exit_on_startup_errors():
        ok = trio.run(lambda: run_demo(address, once=once, report=click.echo))
    if not ok:
        sys.exit(1)


@main.command()
@click.option(
    "--host",
    "hosts",
    multiple=True,
    required=True,
    metavar="NAME",
    help="DNS name or IP address the certificate is for (repeatable); the first is its CN.",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for ca.pem, ca-key.pem, cert.pem and key.pem (made 0700 if new).",
)
@click.option(
    "--days",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Validity of the CA and the certificate (default 825, the longest Apple accepts).",
)
@click.option("--force", is_flag=True, help="Replace the files if they exist.")
def cert(hosts: tuple[str, ...], out_dir: Path, days: int | None, force: bool) -> None:
    """Make a development CA and a server certificate signed by it, and say how to trust it."""
    try:
        paths = write_dev_certificates(
            out_dir, hosts, days=DEFAULT_DAYS if days is None else days, overwrite=force
        )
    except ConfigError as error:
        _fail(str(error))
        return
    click.echo(f"CA certificate:          {paths.ca_cert}")
    click.echo(f"CA key (keep it secret): {paths.ca_key}")
    click.echo(f"certificate:             {paths.cert}")
    click.echo(f"key:                     {paths.key}")
    click.echo(f"valid for {', '.join(hosts)}")
    click.echo()
    click.echo(trust_instructions(paths), nl=False)


ADMIN_REQUEST_SECONDS = 10.0
"""Bound on one request of ``tunnel drain`` / ``tunnel enable`` to the admin listener."""
DRAIN_POLL_SECONDS = 0.5
"""How often ``tunnel drain --wait`` reads /stats.json."""
DEFAULT_DRAIN_WAIT = "5m"


class _AdminFailure(Exception):
    """The admin listener could not be reached or refused; the message says which."""


def _target(text: str) -> tuple[str, str]:
    """``ROUTE/BACKEND`` split at the first slash (a backend's default name is ``host:port``)."""
    route, slash, backend = text.partition("/")
    if not slash or not route or not backend:
        raise click.BadParameter(f"{text!r} is not ROUTE/BACKEND, e.g. chat/a", param_hint="target")
    return route, backend


def _admin_address(text: str) -> Address:
    try:
        return Address.parse(text, "--admin")
    except ConfigError as error:
        raise click.BadParameter(str(error.problem), param_hint="--admin") from None


def _admin_call(address: Address, method: str, path: str) -> tuple[int, Any]:
    """One request to the admin listener: (status, the JSON body, or its text when not JSON).

    Raises:
        _AdminFailure: it could not be reached or did not answer HTTP.
    """
    host = address.host or "127.0.0.1"
    connection = http.client.HTTPConnection(host, address.port, timeout=ADMIN_REQUEST_SECONDS)
    try:
        headers = {"Content-Length": "0"} if method == "POST" else {}
        connection.request(method, path, headers=headers)
        response = connection.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as error:
        raise _AdminFailure(f"admin listener {address} unreachable: {error}") from None
    finally:
        connection.close()
    try:
        return response.status, json.loads(body)
    except ValueError:
        return response.status, body.decode("utf-8", "replace").strip()


def _change_backend(address: Address, route: str, backend: str, action: str) -> dict[str, Any]:
    """POST drain or enable; the backend's state document, or ``_AdminFailure``."""
    quoted = "/".join(urllib.parse.quote(name, safe="") for name in (route, backend))
    status, answer = _admin_call(address, "POST", f"/backends/{quoted}/{action}")
    if status == 200 and isinstance(answer, dict):
        return answer
    if isinstance(answer, dict) and "error" in answer:
        answer = answer["error"]
    raise _AdminFailure(f"{action} {route}/{backend}: admin listener answered {status}: {answer}")


def _open_tunnels(address: Address, route: str, backend: str) -> int | None:
    """The backend's open tunnels in /stats.json; None when it is no longer listed there."""
    status, document = _admin_call(address, "GET", "/stats.json")
    if status != 200 or not isinstance(document, dict):
        raise _AdminFailure(f"admin listener answered {status} for /stats.json: {document}")
    for listed in document.get("routes", []):
        if listed.get("name") != route:
            continue
        for entry in listed.get("backends", []):
            if entry.get("name") == backend:
                return int(entry.get("open_tunnels", 0))
    return None


def _plural(count: int) -> str:
    return f"{count} open tunnel{'' if count == 1 else 's'}"


def _wait_drained(address: Address, route: str, backend: str, first: int, timeout: float) -> int:
    """Poll /stats.json until the backend has no open tunnels or ``timeout`` passes: what is
    left (0 when drained). Progress goes to stderr: one rewritten line on a terminal, else a
    line each time the count changes."""
    name = f"{route}/{backend}"
    terminal = sys.stderr.isatty()
    deadline = time.monotonic() + timeout
    left: int | None = first
    shown: int | None = None
    for _ in range(math.ceil(timeout / DRAIN_POLL_SECONDS) + 2):
        if not left:
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        if terminal:
            line = (
                f"\rwaiting: {name} has {_plural(left)} ({format_duration(round(remaining))} left)"
            )
            click.echo(line.ljust(72), nl=False, err=True)
        elif left != shown:
            click.echo(f"waiting: {name} has {_plural(left)}", err=True)
        shown = left
        time.sleep(min(DRAIN_POLL_SECONDS, remaining))
        left = _open_tunnels(address, route, backend)
    if terminal and shown is not None:
        click.echo(err=True)
    return left or 0


@main.command()
@click.argument("target", metavar="ROUTE/BACKEND")
@click.option(
    "--admin",
    "admin_address",
    required=True,
    metavar="ADDR",
    help="host:port of the running tunnel's admin listener.",
)
@click.option("--wait", is_flag=True, help="Wait until the backend has no open tunnels.")
@click.option(
    "--timeout",
    default=None,
    metavar="DUR",
    help=f"With --wait: give up (exit 1) after this long (default {DEFAULT_DRAIN_WAIT}).",
)
def drain(target: str, admin_address: str, wait: bool, timeout: str | None) -> None:
    """Stop sending new tunnels to BACKEND of ROUTE; its open tunnels stay until they end.

    With --wait, exits 0 once the backend has no open tunnels, or 1 when the timeout passes
    first. ``tunnel enable`` undoes it.
    """
    route, backend = _target(target)
    address = _admin_address(admin_address)
    if timeout is not None and not wait:
        raise click.UsageError("--timeout applies only with --wait")
    try:
        seconds = parse_duration(timeout or DEFAULT_DRAIN_WAIT, "--timeout")
    except ConfigError as error:
        raise click.BadParameter(error.problem, param_hint="--timeout") from None
    try:
        state = _change_backend(address, route, backend, "drain")
        open_now = int(state.get("open_tunnels", 0))
        click.echo(f"{route}/{backend}: {state.get('state')}, {_plural(open_now)}")
        if not wait:
            return
        left = _wait_drained(address, route, backend, open_now, seconds)
    except _AdminFailure as failure:
        _fail(str(failure))
        return
    if left:
        _fail(f"timed out after {format_duration(seconds)}: {route}/{backend} has {_plural(left)}")
        return
    click.echo(f"drained: {route}/{backend} has no open tunnels")


@main.command()
@click.argument("target", metavar="ROUTE/BACKEND")
@click.option(
    "--admin",
    "admin_address",
    required=True,
    metavar="ADDR",
    help="host:port of the running tunnel's admin listener.",
)
def enable(target: str, admin_address: str) -> None:
    """Send new tunnels to BACKEND of ROUTE again (after ``tunnel drain``)."""
    route, backend = _target(target)
    address = _admin_address(admin_address)
    try:
        state = _change_backend(address, route, backend, "enable")
    except _AdminFailure as failure:
        _fail(str(failure))
        return
    click.echo(
        f"{route}/{backend}: {state.get('state')}, {_plural(int(state.get('open_tunnels', 0)))}"
    )
