"""The ``tunnel`` command: run, check, demo. The only place with ``trio.run`` and ``sys.exit``."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click
import trio

from tunnel._version import __version__
from tunnel.app import serve
from tunnel.config import Address, Config
from tunnel.demo import run_demo
from tunnel.errors import ConfigError
from tunnel.logs import setup_logging
from tunnel.net.listener import ListenError


def _load(config_file: Path | None) -> Config:
    if config_file is None:
        return Config()
    return Config.from_file(config_file)


def _fail(message: str) -> None:
    click.echo(f"tunnel: {message}", err=True)
    sys.exit(1)


def _listen_failure(group: BaseExceptionGroup[ListenError]) -> str:
    """trio's nurseries wrap a bind error in an ExceptionGroup; show the first one plainly,
    without the ``[Errno N]`` prefix (the message already names the address and the cause)."""
    error: ListenError | BaseExceptionGroup[ListenError] = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
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
    help="host:port or ws://host:port[/path]; several are tried round-robin.",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default=None,
    help="Log line format (default: text, or the file's server.log_format).",
)
def run(
    config_file: Path | None,
    listen: tuple[str, ...],
    backend: tuple[str, ...],
    log_format: str | None,
) -> None:
    """Run the tunnel until interrupted (Ctrl-C or SIGTERM)."""
    try:
        config = _load(config_file).with_overrides(
            listen=listen, backends=backend, log_format=log_format
        )
    except ConfigError as error:
        _fail(f"configuration error: {error}")
        return
    setup_logging(config.server.log_format)
    try:
        trio.run(_run_until_signal, config)
    except* ListenError as group:
        _fail(_listen_failure(group))
    except* KeyboardInterrupt:
        pass


async def _run_until_signal(config: Config) -> None:
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            await nursery.start(serve, config)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


@main.command()
@click.option(
    "--config",
    "config_file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="TOML file to check.",
)
def check(config_file: Path) -> None:
    """Validate a configuration file and print the effective configuration."""
    try:
        config = Config.from_file(config_file)
    except ConfigError as error:
        _fail(f"{config_file}: {error}")
        return
    click.echo(config.to_toml(), nl=False)
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
    try:
        ok = trio.run(lambda: run_demo(address, once=once, report=click.echo))
    except* ListenError as group:
        _fail(_listen_failure(group))
    except* KeyboardInterrupt:
        pass
    if not ok:
        sys.exit(1)
