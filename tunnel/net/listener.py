"""Opening the listening sockets and accepting connections onto the handler."""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable, Sequence

import trio

from tunnel.config import Address, ListenerConfig
from tunnel.logs import LOGGER_NAME, fields

log = logging.getLogger(LOGGER_NAME)

# Accept errors that mean "out of descriptors or memory": wait and retry instead of dying.
_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
ACCEPT_BACKOFF_SECONDS = 0.1


class ListenError(OSError):
    """A listening address could not be bound; the message names it and the cause."""


async def open_listeners(configs: Sequence[ListenerConfig]) -> list[trio.SocketListener]:
    """Bind every configured address (``:port`` binds all interfaces, IPv4 and IPv6)."""
    listeners: list[trio.SocketListener] = []
    try:
        for config in configs:
            listeners += await _open(config.listen)
    except BaseException:
        for listener in listeners:
            await listener.aclose()
        raise
    return listeners


async def _open(address: Address) -> list[trio.SocketListener]:
    try:
        return await trio.open_tcp_listeners(address.port, host=address.host or None)
    except OSError as exc:
        hint = {
            errno.EADDRINUSE: "another process holds this port; stop it or pick another port",
            errno.EACCES: "ports below 1024 need root or CAP_NET_BIND_SERVICE",
            errno.EADDRNOTAVAIL: "this machine has no such address",
        }.get(exc.errno or 0, "")
        message = f"cannot listen on {address}: {exc.strerror or exc}"
        raise ListenError(exc.errno or 0, f"{message}{'; ' + hint if hint else ''}") from exc


def bound_address(listener: trio.SocketListener) -> str:
    """``host:port`` the listener really bound (port 0 resolved)."""
    host, port = listener.socket.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def accept_loop(
    listener: trio.SocketListener,
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    nursery: trio.Nursery,
) -> None:
    """Accept forever, starting one handler task per connection in ``nursery``."""
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno not in _RESOURCE_ERRNOS:
                raise
            log.error(
                "accept failed; out of file descriptors or memory, retrying shortly",
                extra=fields(listener=bound_address(listener), error=str(exc)),
            )
            await trio.sleep(ACCEPT_BACKOFF_SECONDS)
            continue
        nursery.start_soon(handler, stream)
