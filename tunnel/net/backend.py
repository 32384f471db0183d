"""Connecting to backends, failing over along the balancer's order."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import trio

from tunnel.config import BackendConfig
from tunnel.errors import BackendTimeout, BackendUnreachable
from tunnel.logs import LOGGER_NAME, fields

log = logging.getLogger(LOGGER_NAME)


async def connect(backend: BackendConfig, connect_timeout: float) -> trio.SocketStream:
    """Open a TCP connection to ``backend`` within ``connect_timeout`` seconds.

    Raises:
        BackendTimeout: 504, no connection within the timeout.
        BackendUnreachable: 502, refused, unreachable or unresolvable.
    """
    with trio.move_on_after(connect_timeout):
        try:
            return await trio.open_tcp_stream(backend.host, backend.port)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise BackendUnreachable(
                f"backend {backend.name} ({backend.host}:{backend.port}) refused or unreachable:"
                f" {reason}"
            ) from exc
    raise BackendTimeout(
        f"backend {backend.name} ({backend.host}:{backend.port}) did not accept the connection"
        f" within connect_timeout ({connect_timeout:g}s)"
    )


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
