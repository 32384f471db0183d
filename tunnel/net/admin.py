"""The admin listener (issue 10): health, metrics, statistics and closing tunnels over HTTP/1.1.

It is off unless ``[admin] listen`` or ``--admin`` names an address, and belongs on localhost: it
has no authentication and can close tunnels. The server knows nothing of the proxy; it asks an
``AdminSource`` (the running server) for every answer, so it only ever shows the source's
snapshots. Endpoints::

    GET  /healthz              200 "ok" while serving, 503 "draining"
    GET  /metrics              the source's Prometheus exposition, passed through
    GET  /stats.json           the source's statistics document
    GET  /stats                a page that redraws itself from /stats.json (``stats_page``)
    GET  /                     302 to /stats
    POST /tunnels/<id>/close   200 {"closed": id}, 404 {"error": ...} when no such tunnel
    POST /backends/<route>/<backend>/drain
                               200 {"route", "backend", "state", "open_tunnels"}: the backend
                               takes no new tunnels, its open ones stay; 404 {"error": ...}
                               when the route has no such backend (names are percent-decoded
                               path segments)
    POST /backends/<route>/<backend>/enable
                               the same, and the backend takes new tunnels again
    POST /reload               200 {"reloaded": true, ...}; 400 {"error": ...} for a bad file
    POST /upgrade              200 {"handed_off": true, "pid", ...}: live hand-off to a new
                               process; 400 for a bad file, 409 when it cannot be done
                               (the running configuration stays), 409 without a file, 503
                               while stopping

HEAD is answered wherever GET is. One trio task per connection; each connection is bounded: the
request head (8 KiB, else 431), the time to receive one request (10 s, then the connection
closes), the body (64 KiB, else 413) and the requests on it (100). A bad request gets its 4xx and
the connection closes; a failing source gets a 500 and a log line; neither touches other
connections. A POST whose ``Origin`` names another site gets 403, so a web page cannot make the
operator's browser close tunnels.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import re
import socket
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus
from typing import Any, Protocol

import h11
import trio

from tunnel.config import Address, join_host_port
from tunnel.core.headers import parse_host, values
from tunnel.errors import HandshakeError
from tunnel.logs import LOGGER_NAME, fields
from tunnel.net import stats_page
from tunnel.net.listener import listen_error

log = logging.getLogger(LOGGER_NAME)

MAX_HEAD_BYTES = 8 * 1024
MAX_BODY_BYTES = 64 * 1024
REQUEST_TIMEOUT_SECONDS = 10.0
"""From waiting for a request to its last body byte, so a slow client cannot hold a task."""
MAX_REQUESTS_PER_CONNECTION = 100
MAX_CONNECTIONS = 64
"""Admin connections served at once; more wait in the kernel's backlog."""
LINGER_SECONDS = 1.0
"""After refusing a request, how long unread bytes are drained, so that closing with them
unread does not reset the connection before the client has read the refusal."""
RECEIVE_BYTES = 8 * 1024
ACCEPT_BACKOFF_SECONDS = 0.1
ADMIN_BACKLOG = 128
_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}

_CLOSE_PATH = re.compile(r"/tunnels/([A-Za-z0-9_-]+)/close")
_BACKEND_PATH = re.compile(r"/backends/([^/]+)/([^/]+)/(drain|enable)")
HEAD_TOO_LARGE = f"request head over {MAX_HEAD_BYTES} bytes"
BODY_TOO_LARGE = f"request body over {MAX_BODY_BYTES} bytes"
_TEXT = "text/plain; charset=utf-8"
_JSON = "application/json"


class AdminSource(Protocol):
    """What the admin listener asks of the running server: one process's generation, or, with
    workers, a view that asks every worker (hence coroutines).

    ``healthy()`` is False while draining (/healthz says 503, so load balancers send new clients
    elsewhere); ``stats()`` is the /stats.json document (DESIGN.md, "Admin listener");
    ``metrics()`` is the Prometheus exposition body and its content type; ``close_tunnel(id)``
    closes an open tunnel (reason ``admin``) and is False when there is no such tunnel.
    ``drain_backend(route, backend)`` stops new tunnels to a backend (its open ones stay) and
    ``enable_backend`` lets them come again; both return ``{"route", "backend", "state",
    "open_tunnels"}``, or None when the route has no such backend.
    """

    async def healthy(self) -> bool: ...
    async def stats(self) -> dict[str, Any]: ...
    async def metrics(self) -> tuple[bytes, str]: ...
    async def close_tunnel(self, tunnel_id: str) -> bool: ...
    async def reload_config(self) -> dict[str, Any]: ...
    async def upgrade(self) -> dict[str, Any]: ...
    async def drain_backend(self, route: str, backend: str) -> dict[str, Any] | None: ...
    async def enable_backend(self, route: str, backend: str) -> dict[str, Any] | None: ...


class ReloadRefused(Exception):
    """``reload_config`` did not reload: ``status`` and a message for the operator."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class Reply:
    """One response, before h11 frames it."""

    status: int
    body: bytes
    content_type: str = _TEXT
    headers: tuple[tuple[str, str], ...] = ()


class Refused(Exception):
    """A request this server will not read to the end; the connection closes after the reply."""

    def __init__(self, status: int, message: str, *, head_only: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.head_only = head_only


def _text(status: int, text: str, *headers: tuple[str, str]) -> Reply:
    return Reply(status, text.encode("utf-8"), _TEXT, headers)


def _json(status: int, document: Any) -> Reply:
    return Reply(status, json.dumps(document).encode("utf-8") + b"\n", _JSON)


async def _close(source: AdminSource, tunnel_id: str) -> Reply:
    if await source.close_tunnel(tunnel_id):
        return _json(200, {"closed": tunnel_id})
    return _json(404, {"error": f"no open tunnel with id {tunnel_id}"})


async def _backend(source: AdminSource, route: str, backend: str, action: str) -> Reply:
    change = source.drain_backend if action == "drain" else source.enable_backend
    state = await change(route, backend)
    if state is None:
        return _json(404, {"error": f"no backend {backend} in route {route}"})
    return _json(200, state)


async def _reload(source: AdminSource) -> Reply:
    try:
        return _json(200, await source.reload_config())
    except ReloadRefused as refused:
        return _json(refused.status, {"error": refused.message})


async def _upgrade(source: AdminSource) -> Reply:
    try:
        return _json(200, await source.upgrade())
    except ReloadRefused as refused:
        return _json(refused.status, {"error": refused.message})


Handler = Callable[[AdminSource], Awaitable[Reply]]
_PAGE = Reply(200, stats_page.PAGE, "text/html; charset=utf-8", stats_page.HEADERS)


async def _healthz(source: AdminSource) -> Reply:
    return _text(200, "ok\n") if await source.healthy() else _text(503, "draining\n")


async def _metrics(source: AdminSource) -> Reply:
    return Reply(200, *await source.metrics())


async def _stats_json(source: AdminSource) -> Reply:
    return _json(200, await source.stats())


async def _stats_page(_: AdminSource) -> Reply:
    return _PAGE


async def _root(_: AdminSource) -> Reply:
    return _text(302, "see /stats\n", ("Location", "/stats"))


_PAGES: dict[str, Handler] = {
    "/healthz": _healthz,
    "/metrics": _metrics,
    "/stats.json": _stats_json,
    "/stats": _stats_page,
    "/": _root,
}
"""Read-only endpoints: GET and HEAD."""


def resolve(method: str, path: str) -> Handler | Reply:
    """The handler for ``method`` on ``path``, or the 404/405 reply when there is none."""
    allowed: tuple[str, ...]
    handler: Handler
    if match := _CLOSE_PATH.fullmatch(path):
        allowed, handler = ("POST",), partial(_close, tunnel_id=match[1])
    elif match := _BACKEND_PATH.fullmatch(path):
        route, backend = (urllib.parse.unquote(name) for name in match.group(1, 2))
        allowed = ("POST",)
        handler = partial(_backend, route=route, backend=backend, action=match[3])
    elif path == "/reload":
        allowed, handler = ("POST",), _reload
    elif path == "/upgrade":
        allowed, handler = ("POST",), _upgrade
    elif path in _PAGES:
        allowed, handler = ("GET", "HEAD"), _PAGES[path]
    else:
        return _text(404, f"no admin endpoint at {path}\n")
    if method not in allowed:
        allow = ", ".join(allowed)
        return _text(405, f"{path} allows {allow}\n", ("Allow", allow))
    return handler


def _rebound(request: h11.Request, stream: trio.SocketStream) -> bool:
    """A request to a loopback listener whose Host names a host name other than localhost.

    Only a browser sends one: a page of another site whose name was re-pointed at 127.0.0.1
    (DNS rebinding), which would otherwise read /stats.json and, with its own origin in both
    Origin and Host, pass the cross-site check. Clients on this machine name the listener by
    address or as localhost. A listener bound elsewhere is reachable by name on purpose (and
    warned about at start).
    """
    local = stream.socket.getsockname()
    if not isinstance(local, tuple) or not ipaddress.ip_address(local[0]).is_loopback:
        return False
    hosts = values(request.headers, b"host")
    try:
        name, _ = parse_host(hosts[0].decode("latin-1")) if hosts else ("", "")
    except HandshakeError:
        return True
    if name == "localhost":
        return False
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return True
    return False


def _cross_site(request: h11.Request) -> bool:
    """Whether a browser sent this request from a page of another origin than this server."""
    origins = values(request.headers, b"origin")
    hosts = values(request.headers, b"host")
    if not origins:
        return False
    origin = origins[0].decode("latin-1")
    return not hosts or origin != "http://" + hosts[0].decode("latin-1")


async def respond(request: h11.Request, source: AdminSource, client: str) -> Reply:
    """Answer one complete request; a failing source is logged and answered with 500."""
    method = request.method.decode("ascii")
    path = request.target.decode("latin-1").partition("?")[0]
    found = resolve(method, path)
    if isinstance(found, Reply):
        return found
    if method == "POST" and _cross_site(request):
        return _text(403, "cross-site request refused\n")
    try:
        return await found(source)
    except Exception as exc:
        log.warning(
            "admin request failed",
            extra=fields(client=client, path=path, error=f"{type(exc).__name__}: {exc}"),
            exc_info=exc,
        )
        return _text(500, "internal error; see the tunnel log\n")


def _head_size(request: h11.Request) -> int:
    """The size of the head as h11 kept it: at most what the client sent (h11 strips spaces)."""
    line = len(request.method) + len(request.target) + len(b"  HTTP/1.1\r\n")
    return line + sum(len(name) + len(value) + 4 for name, value in request.headers) + 2


async def _next_event(connection: h11.Connection, stream: trio.SocketStream) -> Any:
    while (event := connection.next_event()) is h11.NEED_DATA:
        connection.receive_data(await stream.receive_some(RECEIVE_BYTES))
    return event


async def read_request(connection: h11.Connection, stream: trio.SocketStream) -> h11.Request | None:
    """The next request with its body read and dropped; None when the client closed.

    Raises:
        Refused: 400 for what h11 cannot parse, 431 for a head over ``MAX_HEAD_BYTES``, 413 for
            a body over ``MAX_BODY_BYTES``.
    """
    head_only = False
    try:
        event = await _next_event(connection, stream)
        if not isinstance(event, h11.Request):
            return None  # ConnectionClosed
        head_only = event.method == b"HEAD"
        if _head_size(event) > MAX_HEAD_BYTES:
            raise Refused(431, HEAD_TOO_LARGE, head_only=head_only)
        if connection.they_are_waiting_for_100_continue:
            await stream.send_all(
                _send(connection, h11.InformationalResponse(status_code=100, headers=[]))
            )
        received = 0
        while not isinstance(body := await _next_event(connection, stream), h11.EndOfMessage):
            if isinstance(body, h11.Data):
                received += len(body.data)
                if received > MAX_BODY_BYTES:
                    raise Refused(413, BODY_TOO_LARGE, head_only=head_only)
        return event
    except h11.RemoteProtocolError as exc:
        status = exc.error_status_hint
        message = HEAD_TOO_LARGE if status == 431 else f"bad request: {exc}"
        raise Refused(status, message, head_only=head_only) from exc


async def send_reply(
    connection: h11.Connection,
    stream: trio.SocketStream,
    reply: Reply,
    *,
    head_only: bool = False,
    close: bool = False,
) -> None:
    """Send ``reply``; its body is left out when the request was a HEAD (``head_only``)."""
    headers = [
        ("Content-Type", reply.content_type),
        ("Content-Length", str(len(reply.body))),
        ("Cache-Control", "no-store"),
        ("X-Content-Type-Options", "nosniff"),
        *reply.headers,
    ]
    if close:
        headers.append(("Connection", "close"))
    phrase = HTTPStatus(reply.status).phrase.encode("ascii")
    data = _send(connection, h11.Response(status_code=reply.status, headers=headers, reason=phrase))
    if reply.body and not head_only:
        data += _send(connection, h11.Data(data=reply.body))
    data += _send(connection, h11.EndOfMessage())
    await stream.send_all(data)


def _send(connection: h11.Connection, event: h11.Event) -> bytes:
    return connection.send(event) or b""


async def _linger(stream: trio.SocketStream) -> None:
    """Half-close, then drop what the client still sends for up to ``LINGER_SECONDS``."""
    with trio.move_on_after(LINGER_SECONDS):
        await stream.send_eof()
        for _ in range(MAX_BODY_BYTES // RECEIVE_BYTES):
            if not await stream.receive_some(RECEIVE_BYTES):
                break


async def serve_connection(stream: trio.SocketStream, source: AdminSource) -> None:
    """Serve up to ``MAX_REQUESTS_PER_CONNECTION`` requests on ``stream``, then close it.

    Never raises (but Cancelled): a client that leaves mid-reply is no error, and anything else
    is logged, so that one connection cannot stop the admin listener.
    """
    client = _peer(stream)
    async with stream:
        try:
            await _converse(stream, source, client)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            log.debug("admin client left", extra=fields(client=client))
        except Exception as exc:
            log.warning(
                "admin connection failed",
                extra=fields(client=client, error=f"{type(exc).__name__}: {exc}"),
                exc_info=exc,
            )


async def _converse(stream: trio.SocketStream, source: AdminSource, client: str) -> None:
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    for number in range(1, MAX_REQUESTS_PER_CONNECTION + 1):
        again = False
        with trio.move_on_after(REQUEST_TIMEOUT_SECONDS):
            last = number == MAX_REQUESTS_PER_CONNECTION
            again = await _exchange(connection, stream, source, client, last=last)
        if not again:
            return
        connection.start_next_cycle()


async def _exchange(
    connection: h11.Connection,
    stream: trio.SocketStream,
    source: AdminSource,
    client: str,
    *,
    last: bool,
) -> bool:
    """Read one request and answer it; whether the connection may carry another."""
    try:
        request = await read_request(connection, stream)
    except Refused as refusal:
        log.debug("admin request refused", extra=fields(client=client, error=str(refusal)))
        if connection.our_state in {h11.IDLE, h11.SEND_RESPONSE}:
            reply = _text(refusal.status, f"{refusal}\n")
            await send_reply(connection, stream, reply, head_only=refusal.head_only, close=True)
            await _linger(stream)
        return False
    if request is None:
        return False
    if _rebound(request, stream):
        reply = _text(421, "this admin listener answers to localhost and IP addresses only\n")
    else:
        reply = await respond(request, source, client)
    await send_reply(connection, stream, reply, head_only=request.method == b"HEAD", close=last)
    return connection.our_state is h11.DONE and connection.their_state is h11.DONE


def _peer(stream: trio.SocketStream) -> str:
    """``host:port`` of a TCP client; ``local`` on a Unix socket (a worker's private one)."""
    try:
        name = stream.socket.getpeername()
    except OSError:
        return "?"
    if not isinstance(name, tuple):
        return "local"
    return join_host_port(name[0], name[1])


async def serve_admin(
    listener: trio.SocketListener,
    source: AdminSource,
    accepting: trio.CancelScope | None = None,
) -> None:
    """Accept admin connections on ``listener`` until cancelled, one task each, at most
    ``MAX_CONNECTIONS`` at once; the listener is closed on the way out. Cancelling
    ``accepting`` stops the accepts and closes the listener, and the connections under way
    finish (a live hand-off's ``POST /upgrade`` among them)."""
    slots = trio.Semaphore(MAX_CONNECTIONS)
    accepting = accepting if accepting is not None else trio.CancelScope()

    async def serve_one(stream: trio.SocketStream) -> None:
        try:
            await serve_connection(stream, source)
        finally:
            slots.release()

    async with listener, trio.open_nursery() as nursery:
        with accepting:
            while True:
                await slots.acquire()
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    slots.release()
                    if exc.errno not in _RESOURCE_ERRNOS:
                        raise
                    log.error("admin accept failed, retrying shortly", extra=fields(error=str(exc)))
                    await trio.sleep(ACCEPT_BACKOFF_SECONDS)
                    continue
                nursery.start_soon(serve_one, stream)
        await listener.aclose()


async def open_admin_listener(address: str | Address) -> trio.SocketListener:
    """Listen on ``address`` (``host:port``; port 0 picks one): the first address the host
    resolves to, so ``localhost`` is one socket.

    Raises:
        ConfigError: ``address`` is not ``host:port``.
        ListenError: it cannot be bound (the message names it and the cause).
    """
    if isinstance(address, str):
        address = Address.parse(address, "admin.listen")
    try:
        listeners = await trio.open_tcp_listeners(address.port, host=address.host or None)
    except OSError as exc:
        raise listen_error(address, exc) from exc
    for extra in listeners[1:]:
        await extra.aclose()
    announce(listeners[0].socket)
    return listeners[0]


def bind_admin(address: Address) -> socket.socket:
    """Blocking: a listening socket on ``address``, for the supervisor of ``workers = N``,
    which holds it while worker 1 serves it. Logged as ``announce`` says.

    Raises:
        ListenError: it cannot be bound (the message names it and the cause).
    """
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            address.host or None, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise listen_error(address, exc) from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(ADMIN_BACKLOG)
    except OSError as exc:
        sock.close()
        raise listen_error(address, exc) from exc
    announce(sock)
    return sock


def announce(sock: socket.socket | trio.socket.SocketType) -> None:
    """Log where the admin listener listens, and warn when other machines can reach it."""
    host, port = sock.getsockname()[:2]
    address = join_host_port(host, port)
    log.info("admin listening", extra=fields(address=address))
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        log.warning(
            "the admin listener is reachable from other machines and has no authentication; "
            "bind it to 127.0.0.1 or ::1",
            extra=fields(address=address, key="admin.listen"),
        )
