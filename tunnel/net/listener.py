"""Opening the listening sockets and accepting connections onto the handler."""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence

import trio

from tunnel.config import Address, ListenerConfig
from tunnel.logs import LOGGER_NAME, fields
from tunnel.net import activation
from tunnel.net.activation import ActivationError, Inherited, InheritedSocket
from tunnel.net.handshakes import Handshakes, Ticket
from tunnel.net.sockio import no_delay

log = logging.getLogger(LOGGER_NAME)

# Accept errors that mean "out of descriptors or memory": wait and retry instead of dying.
_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
# Accept errors that belong to one connection that is already gone (it was reset before the
# accept, or a pending network error came with it): skip it and accept the next (accept(2)).
_CONNECTION_ERRNOS = {
    errno.ECONNABORTED,
    errno.EPROTO,
    errno.EPERM,
    errno.ENETDOWN,
    errno.ENOPROTOOPT,
    errno.EHOSTDOWN,
    errno.ENONET,
    errno.EHOSTUNREACH,
    errno.EOPNOTSUPP,
    errno.ENETUNREACH,
}
ACCEPT_BACKOFF_SECONDS = 0.1
ACCEPT_BATCH = 16
"""Connections accepted per turn before the new handlers get to run: under a flood of
connections a client's head is read before a hundred newer ones can push it out of
``max_handshakes`` (with no cap, 1 of 4 real upgrades was shed among 400 reconnecting slow
clients; with 16, none)."""


class ListenError(OSError):
    """A listening address could not be bound; the message names it and the cause."""


async def open_listeners(
    configs: Sequence[ListenerConfig], *, reuse_port: bool = False
) -> list[trio.SocketListener]:
    """Bind every configured address (``:port`` binds all interfaces, IPv4 and IPv6).

    ``reuse_port`` sets SO_REUSEPORT before each bind, so that the worker processes of
    ``workers = N`` each listen on the same ports and the kernel spreads connections among them.
    Off by default: without it a second tunnel on the same port fails loudly instead of sharing.
    An address this process inherited a listening socket for is not bound: see
    ``open_listener_groups``.
    """
    groups = await open_listener_groups(configs, reuse_port=reuse_port)
    return [listener for group in groups for listener in group]


async def open_listener_groups(
    configs: Sequence[ListenerConfig],
    *,
    reuse_port: bool = False,
    inherited: Inherited | None = None,
) -> list[list[trio.SocketListener]]:
    """``open_listeners``, keeping which sockets belong to which configured listener (one
    ``:port`` may be two sockets), since listeners differ in TLS and redirects.

    A listener whose address matches sockets this process inherited (systemd socket activation,
    or the supervisor's ``--listen-fd``; ``inherited`` defaults to ``activation.inherited()``)
    accepts on duplicates of those instead of binding, with or without ``reuse_port``: every
    worker then accepts on the one inherited socket. The others bind as usual.

    Raises:
        ListenError: an address cannot be bound, or an inherited descriptor is not a listening
            TCP socket (naming the fd and what to do).
    """
    source = _process_inherited() if inherited is None else inherited
    if source.settled:  # nothing left to match: no name to resolve, so no thread either
        claimed = take_inherited(configs, source)
    else:
        claimed = await trio.to_thread.run_sync(take_inherited, configs, source)
    groups: list[list[trio.SocketListener]] = []
    try:
        for config, taken in zip(configs, claimed, strict=True):
            if taken:
                groups.append([_from_inherited(sock) for sock in taken])
            elif reuse_port:
                sockets = await trio.to_thread.run_sync(bind_shared, config.listen, True)
                groups.append(
                    [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in sockets]
                )
            else:
                groups.append(await _open(config.listen))
    except BaseException:
        for group in groups:
            for listener in group:
                await listener.aclose()
        raise
    return groups


def take_inherited(
    configs: Sequence[ListenerConfig], inherited: Inherited | None = None
) -> list[list[InheritedSocket]]:
    """Blocking (a host name may be resolved): for each listener, the inherited sockets it
    accepts on, from ``inherited`` or this process's (``activation.inherited()``); the first
    call settles them (``Inherited.claim``).

    Raises:
        ListenError: an inherited descriptor is not a listening TCP socket, or the variables
            announcing them are wrong; the message names the fd or the variable.
    """
    source = _process_inherited() if inherited is None else inherited
    return source.claim([config.listen for config in configs])


def _process_inherited() -> Inherited:
    try:
        return activation.inherited()
    except ActivationError as exc:
        raise ListenError(exc.errno or 0, exc.strerror or str(exc)) from exc


def _from_inherited(inherited: InheritedSocket) -> trio.SocketListener:
    """A listener on a duplicate: closing it leaves the inherited descriptor open."""
    sock = inherited.sock.dup()
    sock.setblocking(False)
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


async def _open(address: Address) -> list[trio.SocketListener]:
    try:
        return await trio.open_tcp_listeners(address.port, host=address.host or None)
    except OSError as exc:
        raise listen_error(address, exc) from exc


LISTEN_BACKLOG = 0xFFFF
"""As deep as the kernel allows (it clamps to net.core.somaxconn), the same as trio's default."""


def bind_shared(address: Address, listen: bool) -> list[socket.socket]:
    """Blocking: bind every address ``address`` resolves to with SO_REUSEADDR and SO_REUSEPORT.

    The supervisor calls it with ``listen=False`` to reserve the ports and learn what port 0
    became: a bound socket that does not listen is not in the kernel's reuseport group, so it
    takes no share of the connections. Workers call it (through ``open_listeners``) with
    ``listen=True``. Every socket of one address gets the same port, so ``:0`` ends up as one
    concrete port on IPv4 and IPv6 alike.

    Raises:
        ListenError: naming the address and the cause, as ``open_listeners`` does.
    """
    try:
        infos = socket.getaddrinfo(
            address.host or None, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as exc:
        raise listen_error(address, exc) from exc
    sockets: list[socket.socket] = []
    port = address.port
    try:
        for family, kind, proto, _, sockaddr in infos:
            try:
                sock = socket.socket(family, kind, proto)
            except OSError as exc:
                if exc.errno == errno.EAFNOSUPPORT:  # e.g. IPv6 switched off on this machine
                    continue
                raise
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((sockaddr[0], port, *sockaddr[2:]))
            port = sock.getsockname()[1]
            if listen:
                sock.listen(LISTEN_BACKLOG)
        if not sockets:
            raise OSError(errno.EAFNOSUPPORT, "no usable address family for this address")
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise listen_error(address, exc) from exc
    return sockets


def listen_error(address: Address, exc: OSError) -> ListenError:
    """``cannot listen on ADDR: <kernel's reason>; <what to do>``, for any bind failure."""
    hint = {
        errno.EADDRINUSE: "another process holds this port; stop it or pick another port",
        errno.EACCES: "ports below 1024 need root or CAP_NET_BIND_SERVICE",
        errno.EADDRNOTAVAIL: "this machine has no such address",
    }.get(exc.errno or 0, "")
    message = f"cannot listen on {address}: {exc.strerror or exc}"
    return ListenError(exc.errno or 0, f"{message}{'; ' + hint if hint else ''}")


def bound_address(listener: trio.SocketListener) -> str:
    """``host:port`` the listener really bound (port 0 resolved)."""
    host, port = listener.socket.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def accept_loop(
    listener: trio.SocketListener,
    handler: Callable[[socket.socket, tuple[str, int], Ticket | None], Awaitable[None]],
    nursery: trio.Nursery,
    handshakes: Handshakes | None = None,
) -> None:
    """Accept forever, starting one handler task per connection in ``nursery``.

    Accepts run on a duplicate of the listening descriptor as a plain socket: one wake-up
    accepts every pending connection, and each arrives as the non-blocking ``socket.socket``
    the handler and the relay engine work with, with no stream object built and thrown away.
    Accepted sockets inherit ``TCP_NODELAY`` from the listening socket. With ``handshakes``,
    each connection gets its ticket here, before its task exists: one over the bound is closed
    at once, or the oldest slow one is, so a flood of connections cannot hold more descriptors
    than the bound however many one wake-up accepts.
    """
    trio_socket = listener.socket
    accepting = socket.socket(
        trio_socket.family, trio_socket.type, trio_socket.proto, fileno=os.dup(trio_socket.fileno())
    )
    accepting.setblocking(False)
    no_delay(accepting)
    try:
        while True:
            await trio.lowlevel.wait_readable(accepting)
            for _ in range(ACCEPT_BATCH):
                try:
                    sock, peer = accepting.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in _CONNECTION_ERRNOS:
                        continue
                    if exc.errno not in _RESOURCE_ERRNOS:
                        raise
                    log.error(
                        "accept failed; out of file descriptors or memory, retrying shortly",
                        extra=fields(listener=bound_address(listener), error=str(exc)),
                    )
                    await trio.sleep(ACCEPT_BACKOFF_SECONDS)
                    break
                try:
                    sock.setblocking(False)
                except OSError:
                    sock.close()
                    continue
                ticket = None
                if handshakes is not None:
                    ticket = handshakes.enter(sock)
                    if ticket is None:
                        sock.close()
                        continue
                nursery.start_soon(handler, sock, peer, ticket)
    finally:
        trio.lowlevel.notify_closing(accepting)
        accepting.close()
