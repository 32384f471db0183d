"""The ``tunnel`` command: run, check, demo. The only place with ``trio.run`` and ``sys.exit``."""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TypeVar

import click
import trio

from tunnel._version import __version__
from tunnel.app import Control, Loader, WorkerAdmin, check_tls, serve_until_signal
from tunnel.certs import DEFAULT_DAYS, trust_instructions, write_dev_certificates
from tunnel.config import MAX_WORKERS, Address, Config
from tunnel.demo import run_demo
from tunnel.errors import ConfigError
from tunnel.logs import LOGGER_NAME, setup_logging
from tunnel.net.activation import WORKER_OPTION, take_from_supervisor
from tunnel.net.listener import ListenError
from tunnel.supervisor import run_workers
from tunnel.worker import WORKER_COMMAND, SupervisorLink, tag_logs, wait_for_supervisor_exit

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
def run(
    config_file: Path | None,
    listen: tuple[str, ...],
    backend: tuple[str, ...],
    log_format: str | None,
    workers: int | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    admin: str | None,
) -> None:
    """Run the tunnel until interrupted (Ctrl-C or SIGTERM), then drain the open tunnels
    (server.drain_timeout; a second signal closes them at once).

    SIGHUP reads the configuration file again and applies it without dropping the tunnels of
    unchanged routes (without a file: reloads TLS files); it never stops the tunnel. With more
    than one worker this process supervises the workers (see docs/operations.md).
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
    if config.server.workers > 1:
        try:
            check_tls(config)  # here, once, rather than in every worker it would stop
            status = run_workers(config, loader)
        except ConfigError as error:
            _fail(f"configuration error: {error}")
            return
        except ListenError as error:
            _fail(error.strerror or str(error))
            return
        sys.exit(status)
    _serve_in_this_process(config, loader=loader)


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
def worker(
    number: int,
    lifeline: int | None,
    admin_dir: str | None,
    workers: int,
    admin_fd: int | None,
    listen_fds: tuple[str, ...],
    link: int | None,
) -> None:
    """One worker of ``tunnel run --workers N``, started by its supervisor.

    The configuration arrives as TOML on stdin; ``--lifeline`` is the descriptor of a pipe that
    reads end-of-file when the supervisor is gone (see ``tunnel.worker``). With an admin
    listener, ``--admin-dir`` holds every worker's private admin socket and worker 1 gets the
    public listening socket as ``--admin-fd`` (see ``tunnel.federation``). Each ``--listen-fd
    ADDR=FD`` is a listening socket the supervisor inherited (systemd socket activation), which
    the listener ADDR accepts on instead of binding (see ``tunnel.net.activation``).
    ``--link`` is this worker's end of a socket pair to the supervisor, which hands over new
    configurations on a reload (see ``tunnel.worker``).
    """
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
        config, reuse_port=True, lifeline=lifeline, worker_admin=admin, link=link
    )


def _serve_in_this_process(
    config: Config,
    *,
    reuse_port: bool = False,
    lifeline: int | None = None,
    worker_admin: WorkerAdmin | None = None,
    loader: Loader | None = None,
    link: int | None = None,
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
) -> None:
    """Serve until SIGTERM or SIGINT (or, for a worker, until its supervisor is gone)."""
    control = Control(loader)
    async with trio.open_nursery() as nursery:
        if lifeline is not None:
            nursery.start_soon(_stop_when_supervisor_exits, lifeline, nursery.cancel_scope)
        if link is not None:
            supervisor = SupervisorLink(link)
            nursery.start_soon(supervisor.serve, control)
            if worker_admin is not None:
                worker_admin = dataclasses.replace(worker_admin, reload=supervisor.request_reload)
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
