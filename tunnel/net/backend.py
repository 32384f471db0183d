"""Connecting to backends, failing over along the balancer's order."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import trio

from tunnel.config import BackendConfig, is_ip_address, join_host_port
from tunnel.errors import BackendTimeout, BackendUnreachable
from tunnel.logs import LOGGER_NAME, fields

log = logging.getLogger(LOGGER_NAME)


def describe(backend: BackendConfig) -> str:
    """``name (host:port)``, or just ``host:port`` when the name is the address."""
    address = join_host_port(backend.host, backend.port)
    return address if backend.name == address else f"{backend.name} ({address})"


async def connect(backend: BackendConfig, connect_timeout: float) -> trio.SocketStream:
    """Open a TCP connection to ``backend`` within ``connect_timeout`` seconds.

    A numeric address is connected directly, without name resolution or happy eyeballs, so
    that the error is the kernel's own ("Connection refused").

    Raises:
        BackendTimeout: 504, no connection within the timeout.
        BackendUnreachable: 502, refused, unreachable or unresolvable.
    """
    with trio.move_on_after(connect_timeout):
        try:
            if is_ip_address(backend.host):
                return await _connect_numeric(backend.host, backend.port)
            return await trio.open_tcp_stream(backend.host, backend.port)
        except OSError as exc:
            raise BackendUnreachable(
                f"backend {describe(backend)} refused or unreachable: {_reason(exc)}"
            ) from exc
    raise BackendTimeout(
        f"backend {describe(backend)} did not accept the connection"
        f" within connect_timeout ({connect_timeout:g}s)"
    )


async def _connect_numeric(host: str, port: int) -> trio.SocketStream:
    family = trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET
    sock = trio.socket.socket(family, trio.socket.SOCK_STREAM)
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


def _reason(exc: OSError) -> str:
    """The first concrete cause: trio's resolver path wraps per-address errors in a group."""
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        for inner in cause.exceptions:
            if isinstance(inner, OSError) and inner.strerror:
                return inner.strerror
    return exc.strerror or str(exc)


async def connect_first(
    candidates: Sequence[BackendConfig], connect_timeout: float, client: str
) -> tuple[BackendConfig, trio.SocketStream]:
    """Try each candidate in order; the first that accepts wins.

    Raises the last backend's error when all fail: ``BackendTimeout`` (504) only if every
    attempt timed out, ``BackendUnreachable`` (502) otherwise.
    """
    errors: list[BackendUnreachable | BackendTimeout] = []
    for backend in candidates:
        try:
            return backend, await connect(backend, connect_timeout)
        except (BackendUnreachable, BackendTimeout) as exc:
            errors.append(exc)
            log.warning(
                "backend connect failed",
                extra=fields(
                    client=client,
                    backend=backend.name,
                    error=exc.message,
                    next="trying the next backend"
                    if len(errors) < len(candidates)
                    else "no backend left; answering the client",
                ),
            )
    if all(isinstance(e, BackendTimeout) for e in errors):
        raise errors[-1]
    raise BackendUnreachable(
        f"no backend accepted the connection ({len(errors)} tried): {errors[-1].message}"
    )
