"""Connecting to backends, failing over along the balancer's order."""

from __future__ import annotations

import errno
import functools
import logging
import os
import socket
import ssl
from collections.abc import Callable, Sequence
from typing import Any

import trio

from tunnel.config import BackendConfig, is_ip_address, join_host_port
from tunnel.errors import BackendTimeout, BackendUnreachable, OutOfResources
from tunnel.logs import LOGGER_NAME, fields
from tunnel.net.sockio import Conn, send_all, stream_socket
from tunnel.net.tls import handshake, tls_failure
from tunnel.net.tlsconn import TLSConn

log = logging.getLogger(LOGGER_NAME)

Address = tuple[int, Any]
"""``(family, sockaddr)`` as ``getaddrinfo`` returns them."""


def describe(backend: BackendConfig) -> str:
    """``name (host:port)``, or just ``host:port`` when the name is the address."""
    address = join_host_port(backend.host, backend.port)
    return address if backend.name == address else f"{backend.name} ({address})"


LOCAL_SHORTAGE = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
"""Errors that are this process's shortage, not the backend's refusal."""


async def connect(
    backend: BackendConfig,
    connect_timeout: float,
    first_bytes: bytes,
    tls: ssl.SSLContext | None = None,
    server_name: str = "",
) -> Conn:
    """Connect to ``backend`` and send ``first_bytes`` within ``connect_timeout`` seconds.

    The send is tried right after the non-blocking ``connect``: on loopback and fast networks the
    connection is up by then, so no wait is needed at all, and a refusal surfaces as the send's
    error. A numeric address is used directly; a name is resolved and its addresses are tried in
    order (no happy eyeballs: backends are near, and the error stays the kernel's own). With
    ``tls`` (a ``wss://`` backend) the TLS handshake, which verifies the certificate for
    ``server_name`` or the backend's host, is part of the connect.

    Raises:
        BackendTimeout: 504, no connection within the timeout.
        BackendUnreachable: 502, refused, unreachable or unresolvable, or its TLS handshake
            failed (the message says why, such as the certificate's verification error).
        OutOfResources: 503, this process could not make the socket (out of descriptors).
    """
    deadline = trio.current_time() + connect_timeout
    failure: OSError | None = None
    try:
        for address in await _addresses(backend, deadline):
            try:
                if tls is not None:
                    return await _connect_tls(
                        address, first_bytes, deadline, tls, server_name or backend.host, backend
                    )
                return await _connect_and_send(address, first_bytes, deadline)
            except OSError as exc:
                if exc.errno in LOCAL_SHORTAGE:
                    raise OutOfResources(f"open a connection to {describe(backend)}", exc) from exc
                failure = exc
    except trio.TooSlowError:
        raise BackendTimeout(
            f"backend {describe(backend)} did not accept the connection"
            f" within connect_timeout ({connect_timeout:g}s)"
        ) from None
    reason = failure.strerror if failure is not None and failure.strerror else str(failure)
    raise BackendUnreachable(f"backend {describe(backend)} refused or unreachable: {reason}")


@functools.lru_cache(maxsize=1024)
def _numeric_family(host: str) -> int | None:
    """The address family of a numeric host, None for a name; cached, as backends repeat."""
    if not is_ip_address(host):
        return None
    return socket.AF_INET6 if ":" in host else socket.AF_INET


async def _addresses(backend: BackendConfig, deadline: float) -> list[Address]:
    family = _numeric_family(backend.host)
    if family is not None:
        return [(family, (backend.host, backend.port))]
    try:
        with trio.fail_at(deadline):
            infos = await trio.socket.getaddrinfo(
                backend.host, backend.port, type=socket.SOCK_STREAM
            )
    except socket.gaierror as exc:
        raise BackendUnreachable(
            f"backend {describe(backend)} refused or unreachable: {exc.strerror or exc}"
        ) from exc
    return [(family, sockaddr) for family, _, _, _, sockaddr in infos]


async def _connect_and_send(address: Address, first_bytes: bytes, deadline: float) -> socket.socket:
    family, sockaddr = address
    sock = stream_socket(family)
    try:
        error = sock.connect_ex(sockaddr)
        if error not in (0, errno.EINPROGRESS):
            raise OSError(error, os.strerror(error))
        try:
            sent = sock.send(first_bytes)
        except BlockingIOError:
            with trio.fail_at(deadline):
                await trio.lowlevel.wait_writable(sock)
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                raise OSError(error, os.strerror(error)) from None
            sent = 0
        if sent < len(first_bytes):
            with trio.fail_at(deadline):
                await send_all(sock, first_bytes[sent:])
    except BaseException:
        sock.close()
        raise
    return sock


async def _connect_tls(
    address: Address,
    first_bytes: bytes,
    deadline: float,
    context: ssl.SSLContext,
    server_name: str,
    backend: BackendConfig,
) -> TLSConn:
    family, sockaddr = address
    sock = stream_socket(family)
    try:
        error = sock.connect_ex(sockaddr)
        if error == errno.EINPROGRESS:
            with trio.fail_at(deadline):
                await trio.lowlevel.wait_writable(sock)
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise OSError(error, os.strerror(error))
        conn = TLSConn(sock, context, server_side=False, server_hostname=server_name)
        with trio.fail_at(deadline):
            try:
                await handshake(conn)
            except ssl.SSLError as exc:
                raise BackendUnreachable(
                    f"backend {describe(backend)}: TLS handshake failed: {tls_failure(exc)}"
                ) from exc
            await send_all(conn, first_bytes)
    except BaseException:
        sock.close()
        raise
    return conn


async def connect_first(
    candidates: Sequence[BackendConfig],
    connect_timeout: float,
    client: str,
    first_bytes: Callable[[BackendConfig], bytes],
    tls: ssl.SSLContext | None = None,
    server_name: str = "",
    *,
    failed: Callable[[BackendConfig], None] | None = None,
) -> tuple[BackendConfig, Conn]:
    """Try each candidate in order, sending it ``first_bytes(backend)``; the first that accepts
    wins. ``tls`` and ``server_name`` apply to its ``wss://`` candidates; ``failed`` is told of
    each backend that did not accept.

    Raises, when all fail, an error whose message (for the log; clients get a generic body)
    names every backend tried and why it failed: ``BackendTimeout`` (504) only if every
    attempt timed out, ``BackendUnreachable`` (502) otherwise.
    """
    errors: list[BackendUnreachable | BackendTimeout] = []
    for backend in candidates:
        try:
            return backend, await connect(
                backend,
                connect_timeout,
                first_bytes(backend),
                tls if backend.tls else None,
                server_name,
            )
        except (BackendUnreachable, BackendTimeout) as exc:
            errors.append(exc)
            if failed is not None:
                failed(backend)
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
    if len(errors) == 1:
        raise errors[0]
    failure = (
        BackendTimeout
        if all(isinstance(e, BackendTimeout) for e in errors)
        else (BackendUnreachable)
    )
    raise failure(
        f"no backend accepted the connection ({len(errors)} tried): "
        + "; ".join(error.message for error in errors)
    )
