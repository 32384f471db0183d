"""Non-blocking socket calls that try the syscall first and wait in trio only on ``EAGAIN``.

A handshake is a handful of small reads and writes that usually succeed at once; going through
trio's stream layer for each costs a reschedule and an ``epoll_ctl`` even then. These helpers
take plain non-blocking ``socket.socket`` objects, or ``TLSConn`` over one, which the relay
engine adopts afterwards without any conversion. Errors are the kernel's
(``ConnectionResetError``, ``BrokenPipeError``).
"""

from __future__ import annotations

import socket

import trio

from tunnel.net.tlsconn import TLSConn

Conn = socket.socket | TLSConn
"""A client or backend connection: a plain socket, or TLS over one; both raise
``BlockingIOError`` where they would block."""


async def receive_some(sock: Conn, max_bytes: int) -> bytes:
    """At most ``max_bytes``; ``b""`` at EOF."""
    while True:
        try:
            return sock.recv(max_bytes)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)


async def send_all(sock: Conn, data: bytes) -> None:
    """Write all of ``data``, waiting for room in the send buffer when it fills; over TLS, until
    the last record has reached the socket."""
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
    await drain(sock)


async def drain(sock: Conn) -> None:
    """Wait until a TLS connection's encrypted backlog (and a FIN queued behind it) has
    reached the socket; a plain socket has none."""
    if isinstance(sock, TLSConn):
        while not sock.flush():
            await trio.lowlevel.wait_writable(sock)


def no_delay(sock: socket.socket) -> None:
    """Turn off Nagle's delay: a WebSocket message must not wait for the ACK of the previous
    one. Set on a listening socket, it is inherited by every accepted connection."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def stream_socket(family: int) -> socket.socket:
    """A non-blocking TCP socket without Nagle's delay, made non-blocking at creation."""
    nonblocking = getattr(socket, "SOCK_NONBLOCK", 0)
    sock = socket.socket(family, socket.SOCK_STREAM | nonblocking)
    if not nonblocking:  # SOCK_NONBLOCK already gave Python's timeout 0 without an ioctl
        sock.setblocking(False)
    no_delay(sock)
    return sock
