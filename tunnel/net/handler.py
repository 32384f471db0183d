"""One client connection, from the first byte to the close: handshake, backend, hand-off.

Every error is caught here and answered or logged: one bad connection never reaches the
listener's nursery. Connections are plain non-blocking ``socket.socket`` objects, or
``TLSConn`` over one, driven through ``sockio`` (syscall first, wait only on ``EAGAIN``); after
the 101 both go to the relay engine and the connection's task ends.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import socket
import ssl
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import count

import h11
import trio

from tunnel.config import (
    DEFAULT_PORTS,
    BackendConfig,
    Config,
    KiB,
    RouteConfig,
    format_duration,
    join_host_port,
)
from tunnel.core.handshake import (
    UpgradeRequest,
    check_websocket,
    choose_upgrade,
    validate_request,
)
from tunnel.core.hashkey import hash_key
from tunnel.core.headers import lowered_values
from tunnel.core.proxy_protocol import build as proxy_header
from tunnel.core.redirect import https_redirect
from tunnel.core.response import error_response, with_header
from tunnel.core.rewrite import Forwarding, ForwardRequest, client_ip, is_trusted, rewrite_request
from tunnel.core.session import BackendReply, ClientClosed, ReplyProgress, RequestHead
from tunnel.errors import (
    BackendTimeout,
    BackendUnreachable,
    BadProxyHeader,
    HandshakeError,
    NoRoute,
    Overloaded,
    RequestTimeout,
    TunnelError,
)
from tunnel.logs import LOGGER_NAME, Seconds, fields
from tunnel.metrics import LatencyHistogram
from tunnel.net import backend as backends
from tunnel.net.engine import Engine, Tunnel
from tunnel.net.guard import Guarding, Pass, Refused, RouteGuard
from tunnel.net.handshakes import Handshakes, Ticket
from tunnel.net.proxy_header import read_proxy_header
from tunnel.net.sockio import Conn, drain, receive_some, send_all
from tunnel.net.tls import ServerTLS, handshake, peer_subject, tls_failure
from tunnel.net.tlsconn import TLSConn
from tunnel.net.upstream import TunnelRecord, Upstream
from tunnel.policy.lifecycle import tunnel_lifetime
from tunnel.policy.routing import RouteTable
from tunnel.policy.sticky import cookie_values, set_cookie, sign, strip_cookie, verify
from tunnel.reasons import CloseReason

log = logging.getLogger(LOGGER_NAME)

READ_SIZE = 16 * KiB
MAX_REPLY_HEAD = 64 * KiB
LINGER_SECONDS = 2.0
LINGER_BYTES = 256 * KiB
STICKY_COOKIES_TRIED = 4
"""Sticky cookies of the route's name checked per request (a browser sends one)."""
PLAIN_HTTP_ON_TLS = "plain HTTP was sent to a TLS port; use https:// or wss://"


@dataclass(frozen=True, slots=True)
class Entry:
    """What differs between listeners: TLS termination, or a redirect to HTTPS."""

    tls: ServerTLS | None = None
    redirect_port: int | None = None
    """Set for ``redirect_https``: the port of the https:// URLs clients are sent to."""
    proxy_protocol: bool = False
    """Connections start with a PROXY header (believed only from ``trusted_proxies``)."""

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"


PLAIN = Entry()


@dataclass(frozen=True, slots=True)
class _Client:
    """The connection being served, as the backend side needs it."""

    ip: str
    address: str
    """``ip:port``, as logs name the client."""
    entry: Entry
    added: tuple[tuple[bytes, bytes], ...]
    """Headers the proxy vouches for (a verified client certificate's subject)."""
    accepted_at: float
    port: int = 0
    local: tuple[str, int] | None = None
    """The address the client connected to, when a PROXY header named it."""
    sock: socket.socket | None = None
    """The client's socket, for its local address (``send_proxy_protocol``)."""

    def destination(self) -> tuple[str, int]:
        """Where the client connected to: the PROXY header's word, else the socket's."""
        if self.local is None and self.sock is not None:
            name = self.sock.getsockname()
            return str(name[0]), int(name[1])
        return self.local or ("0.0.0.0", 0)


@dataclass(slots=True)
class Tally:
    """What a server counts outside any one route."""

    unrouted: Counter[int] = field(default_factory=Counter)
    """Answers given before a route was known (400, 404, 408, redirects...), by status."""
    handshake: LatencyHistogram = field(default_factory=LatencyHistogram)
    """Accept to 101, of every tunnel opened."""
    active: int = 0
    """Connections past the handshake (connecting or tunnelling), bounded by max_tunnels."""
    ids: count[int] = field(default_factory=lambda: count(1))
    """Tunnel ids, unique within the process."""
    proxy_refused: int = 0
    """Connections closed for a missing, malformed or untrusted PROXY header."""
    handshakes: Handshakes = field(default_factory=Handshakes)
    """Connections not yet tunnels, bounded by max_handshakes."""
    left_early: int = 0
    """Clients that left while their backend was still answering the upgrade."""


class Handler:
    """Serves connections for one configuration. Call it with each accepted socket.

    Per-route state lives in the upstreams it is given; the handler only asks a route's
    upstream for backends and reports what became of the connection.
    """

    def __init__(
        self,
        config: Config,
        engine: Engine,
        upstreams: Mapping[str, Upstream],
        tally: Tally,
        guarding: Guarding | None = None,
        guards: Mapping[str, RouteGuard] | None = None,
    ) -> None:
        self.config = config
        self.engine = engine
        self.upstreams = upstreams
        self.tally = tally
        self.routes = RouteTable.build(config.routes)
        self.guarding = guarding
        tally.handshakes.configure(config.server.max_handshakes)
        self.guards: Mapping[str, RouteGuard] = guards or {}
        """Routes with access rules, limits or auth (``Guarding.guards``); the others skip the
        guard."""

    async def __call__(
        self,
        sock: socket.socket,
        peer: tuple[str, int],
        entry: Entry = PLAIN,
        ticket: Ticket | None = None,
    ) -> None:
        """Serve one accepted, prepared (non-blocking) client socket; closes it unless the
        tunnel was handed to the engine."""
        client = join_host_port(peer[0], peer[1])
        handed_off = False
        handshakes = self.tally.handshakes
        if ticket is None:
            ticket = handshakes.enter(sock)
            if ticket is None:
                sock.close()
                return
        try:
            accepted_at = trio.current_time()
            server = self.config.server
            head = RequestHead(server.max_header_bytes, server.max_headers, server.allow_bare_lf)
            first: h11.Request | TunnelError | None = None
            if entry.tls is None and not entry.proxy_protocol:
                try:
                    first = _head_at_once(sock, head)
                except TunnelError as error:
                    first = error
            if isinstance(first, h11.Request):
                # The whole head came with the accept: nothing was waited for, and from here on
                # nothing waits for the client, so max_handshakes has nothing to cut short.
                handed_off = await self._serve(
                    sock, peer, None, client, entry, accepted_at, ticket, head, first
                )
                return
            with ticket.scope:
                local: tuple[str, int] | None = None
                if entry.proxy_protocol:
                    said = await self._proxy_header(sock, peer, client, accepted_at)
                    if said is None:
                        return
                    peer, local = said
                    client = join_host_port(peer[0], peer[1])
                handed_off = await self._serve(
                    sock, peer, local, client, entry, accepted_at, ticket, head, first
                )
        except ClientClosed as closed:
            log.debug(
                "client left before completing its request; nothing answered",
                extra=fields(client=client, bytes_received=closed.received),
            )
        except Exception:
            log.exception(
                "internal error while serving a connection; the connection is closed",
                extra=fields(client=client),
            )
        finally:
            handshakes.leave(ticket)
            if not handed_off:
                sock.close()

    async def _proxy_header(
        self, sock: socket.socket, peer: tuple[str, int], client: str, accepted_at: float
    ) -> tuple[tuple[str, int], tuple[str, int] | None] | None:
        """The client's and the local address as a trusted PROXY header names them (the
        peer's own where it says UNKNOWN or LOCAL); None, logged, when the connection must be
        closed unanswered."""
        server = self.config.server
        try:
            if not is_trusted(peer[0], server.trusted_proxies):
                raise BadProxyHeader(
                    f"{peer[0]} is not in trusted_proxies, so its PROXY header cannot be "
                    "believed; add the load balancer's address to [server] trusted_proxies"
                )
            header = await read_proxy_header(sock, accepted_at + server.handshake_timeout)
        except BadProxyHeader as error:
            self.tally.proxy_refused += 1
            log.warning(
                "PROXY header refused; connection closed",
                extra=fields(client=client, reason=error.message),
            )
            return None
        except OSError:
            return None
        return header.source or peer, header.destination

    async def _serve(
        self,
        sock: socket.socket,
        peer: tuple[str, int],
        local: tuple[str, int] | None,
        client: str,
        entry: Entry,
        accepted_at: float,
        ticket: Ticket,
        head: RequestHead,
        first: h11.Request | TunnelError | None,
    ) -> bool:
        """``first``: the request, or the refusal, of a head that came whole with the accept
        (``_head_at_once``); None to read it (after the TLS handshake, if any)."""
        peer_ip = peer[0]
        server = self.config.server
        tally = self.tally
        deadline = accepted_at + server.handshake_timeout
        conn: Conn = sock
        added: tuple[tuple[bytes, bytes], ...] = ()
        if entry.tls is not None:
            conn = tls = TLSConn(sock, entry.tls.context, server_side=True)
            failure = await _tls_handshake(tls, deadline, client, server.handshake_timeout)
            if failure is not None:
                if _is_plain_http(failure):
                    await self._refuse(sock, client, HandshakeError(PLAIN_HTTP_ON_TLS), None)
                return False
            if header := entry.tls.settings.client_subject_header:
                added = ((header.encode("latin-1"), peer_subject(tls).encode("latin-1")),)
        upstream: Upstream | None = None
        try:
            if isinstance(first, TunnelError):
                raise first
            request = first or await _read_request(conn, head, server.handshake_timeout, deadline)
            ticket.waiting_on_client = False
            if entry.redirect_port is not None:
                await self._refuse(
                    conn, client, https_redirect(request, entry.redirect_port), None, redirect=True
                )
                return False
            upgrade = validate_request(request, head.fields)
            route = self.routes.match(upgrade.hostname, upgrade.path)
            if route is None:
                raise NoRoute(f"no route for host {upgrade.hostname!r} and path {upgrade.path!r}")
            upstream = self.upstreams[route.name]
            token = choose_upgrade(upgrade, route.upgrades)
            key = check_websocket(request, upgrade.fields) if token == "websocket" else None
            if tally.active >= server.max_tunnels:
                raise Overloaded(server.max_tunnels)
        except TunnelError as error:
            await self._refuse(conn, client, error, upstream)
            return False
        admitted: Pass | None = None
        guard = self.guards.get(route.name)
        guarding = self.guarding
        if guard is not None or (guarding is not None and guarding.admission is not None):
            try:
                if guarding is not None and guarding.admission is not None:
                    guarding.admit()
                if guard is not None:
                    admitted = await guard.admit(
                        upgrade, client_ip(peer_ip, upgrade.fields, server.trusted_proxies)
                    )
            except Refused as refused:
                upstream.refused(refused.rule)
                await self._refuse(conn, client, refused.error, upstream, rule=refused.rule)
                return False
            if admitted is not None:
                upgrade = admitted.request
        tally.active += 1
        handed_off = False
        try:
            handed_off = await self._forward(
                conn,
                _Client(peer_ip, client, entry, added, accepted_at, peer[1], local, sock),
                upstream,
                upgrade,
                token,
                key,
                head.leftover,
                guard,
                admitted,
            )
        finally:
            if not handed_off:
                tally.active -= 1
                _give_back(guard, admitted)
        return handed_off

    async def _forward(
        self,
        sock: Conn,
        client: _Client,
        upstream: Upstream,
        upgrade: UpgradeRequest,
        token: str,
        websocket_key: str | None,
        leftover: bytes,
        guard: RouteGuard | None = None,
        admitted: Pass | None = None,
    ) -> bool:
        """Returns True when the tunnel was handed to the engine, which now owns both sockets,
        the ``max_tunnels`` slot and the guard's slots."""
        server = self.config.server
        route = upstream.route
        vouched = client.added
        if admitted is not None and admitted.identity is not None:
            header = route.auth.identity_header.encode("latin-1")
            vouched += ((header, admitted.identity.subject.encode("latin-1")),)
        replies: list[BackendReply] = []
        key: bytes | None = None
        preferred: str | None = None
        if route.balance == "hash":
            key = hash_key(
                route.hash_key,
                peer_ip=client_ip(client.ip, upgrade.fields, server.trusted_proxies),
                headers=upgrade.fields,
                target=upgrade.target.encode("latin-1"),
            )
        elif route.balance == "cookie":
            preferred = _sticky_backend(upgrade, route)

        def request_for(backend: BackendConfig) -> bytes:
            hop = Forwarding(
                peer_ip=client.ip,
                scheme=client.entry.scheme,
                trusted_proxies=server.trusted_proxies,
                backend_host=None if route.preserve_host else _host_header(backend),
                path_prefix=route.path_prefix,
                backend_path=backend.path,
                added=vouched,
            )
            forward = rewrite_request(upgrade, token, hop)
            if route.sticky_cookie.strip:
                forward = _without_cookie(forward, route.sticky_cookie.name)
            if guard is not None:
                forward = guard.access.strip_headers(forward)
            replies.append(BackendReply(forward, token, websocket_key, MAX_REPLY_HEAD))
            if backend.send_proxy_protocol:
                return (
                    proxy_header(
                        backend.send_proxy_protocol, (client.ip, client.port), client.destination()
                    )
                    + replies[-1].request_bytes
                )
            return replies[-1].request_bytes

        def failed(backend: BackendConfig) -> None:
            upstream.connect_failed(backend, trio.current_time())

        try:
            backend, backend_sock = await backends.connect_first(
                upstream.candidates(trio.current_time(), key=key, preferred=preferred),
                server.connect_timeout,
                client.address,
                request_for,
                upstream.tls,
                route.backend_tls.server_name,
                failed=failed,
            )
        except TunnelError as error:
            _give_back(guard, admitted)
            await self._refuse(sock, client.address, error, upstream)
            return False
        upstream.connected(backend, trio.current_time())
        handed_off = False
        try:
            reply = replies[-1]
            try:
                waited = await _reply_unless_client_leaves(
                    sock, backend_sock, reply, server.response_timeout, backend
                )
            except TunnelError as error:
                _give_back(guard, admitted)
                await self._refuse(sock, client.address, error, upstream, backend=backend.name)
                return False
            if waited is None:
                self.tally.left_early += 1
                log.info(
                    "client left while the backend was answering the upgrade; backend "
                    "connection closed",
                    extra=fields(client=client.address, route=upstream.name, backend=backend.name),
                )
                return False
            progress, sent_meanwhile = waited
            leftover += sent_meanwhile
            if not progress.switched:
                _give_back(guard, admitted)
                await self._relay_refusal(
                    sock, backend_sock, reply, progress, client.address, upstream, backend
                )
                return False
            reply_head = progress.forward
            if route.balance == "cookie" and preferred != backend.name:
                reply_head = with_header(
                    reply_head, b"Set-Cookie", _sticky_cookie(route, backend, client)
                )
            self._hand_off(
                sock,
                backend_sock,
                progress,
                reply_head,
                leftover,
                client,
                upstream,
                backend,
                websocket_key is not None,
                guard,
                admitted,
            )
            handed_off = True
            return True
        finally:
            if not handed_off:
                backend_sock.close()

    def _hand_off(
        self,
        sock: Conn,
        backend_sock: Conn,
        progress: ReplyProgress,
        reply_head: bytes,
        leftover: bytes,
        client: _Client,
        upstream: Upstream,
        backend: BackendConfig,
        websocket: bool,
        guard: RouteGuard | None,
        admitted: Pass | None,
    ) -> None:
        """Give both sockets to the engine: from here on no task serves this tunnel."""
        now = trio.current_time()
        time_to_101 = now - client.accepted_at
        record = TunnelRecord(
            str(next(self.tally.ids)), client.address, upstream.name, backend.name, now
        )
        upstream.answered(101)
        upstream.opened(record, backend)
        self.tally.handshake.observe(time_to_101)
        log.info(
            "tunnel opened",
            extra=fields(
                client=client.address,
                route=upstream.name,
                backend=backend.name,
                status=101,
                time_to_101=Seconds(time_to_101),
                tunnel=record.id,
            ),
        )

        held = _Held(self.tally, upstream, record, guard, admitted)
        record.on_leave = held
        if admitted is not None:
            record.slots = admitted.keys
        server = self.config.server
        expires_at: float | None = None
        identity = None if admitted is None else admitted.identity
        if (
            identity is not None
            and identity.expires_at is not None
            and upstream.route.auth.close_on_expiry
        ):
            expires_at = now + max(0.0, identity.expires_at - time.time())
        record.handle = self.engine.adopt(
            sock,
            backend_sock,
            record.stats,
            held.closed,
            reply_head=reply_head,
            to_client=progress.leftover,
            to_backend=leftover,
            websocket=websocket,
            lifetime=tunnel_lifetime(server.max_lifetime, server.lifetime_jitter, random.random()),
            expires_at=expires_at,
        )
        if not upstream.serves(backend):
            # A reload removed this route or backend while the handshake ran.
            self.engine.drain((record.handle,), CloseReason.DRAIN, server.drain_timeout)

    async def _relay_refusal(
        self,
        sock: Conn,
        backend_sock: Conn,
        reply: BackendReply,
        progress: ReplyProgress,
        client: str,
        upstream: Upstream,
        backend: BackendConfig,
    ) -> None:
        """Pass a non-101 reply to the client verbatim, then close: no tunnel opens."""
        if progress.status is not None:
            upstream.answered(progress.status)
        log.info(
            "backend refused the upgrade; relaying its answer and closing",
            extra=fields(
                client=client, route=upstream.name, backend=backend.name, status=progress.status
            ),
        )
        try:
            timeout = self.config.server.response_timeout
            with trio.fail_after(timeout):
                await send_all(sock, progress.forward)
            while not progress.complete:
                # Each step is bounded, not the whole body: a large refusal may take a while.
                with trio.fail_after(timeout):
                    progress = reply.feed(await receive_some(backend_sock, READ_SIZE))
                    await send_all(sock, progress.forward)
        except (TunnelError, OSError, trio.TooSlowError):
            return
        backend_sock.close()
        await _linger(sock)

    async def _refuse(
        self,
        sock: Conn,
        client: str,
        error: TunnelError,
        upstream: Upstream | None,
        *,
        redirect: bool = False,
        rule: str | None = None,
        **context: str,
    ) -> None:
        """Answer ``error`` and close; counted on ``upstream``, or as unrouted before a route
        was known. ``redirect``: the answer of a ``redirect_https`` listener (308, or 426
        naming the wss:// URL), which is routine, not a warning."""
        if upstream is None:
            self.tally.unrouted[error.status] += 1
        else:
            upstream.answered(error.status)
            context["route"] = upstream.name
        if redirect and error.status in (308, 426):
            log.info(
                "request redirected",
                extra=fields(client=client, status=error.status, reason=error.message),
            )
        else:
            log.warning(
                "request refused",
                extra=fields(
                    client=client,
                    status=error.status,
                    reason=error.message,
                    rule=rule,
                    **context,
                ),
            )
        try:
            with trio.fail_after(LINGER_SECONDS):
                await send_all(sock, error_response(error))
        except (OSError, trio.TooSlowError):
            return
        await _linger(sock)


class _Held:
    """What an open tunnel holds in this process (a ``max_tunnels`` slot, the guard's slots)
    and gives back when it leaves: called with no argument when it is handed to another
    process (``TunnelRecord.on_leave``), ``closed`` when the engine closes it. One small
    object per tunnel where two closures and their six cells cost about 0.5 KiB more per idle
    tunnel."""

    __slots__ = ("admitted", "guard", "record", "tally", "upstream")

    def __init__(
        self,
        tally: Tally,
        upstream: Upstream,
        record: TunnelRecord,
        guard: RouteGuard | None,
        admitted: Pass | None,
    ) -> None:
        self.tally = tally
        self.upstream = upstream
        self.record = record
        self.guard = guard
        self.admitted = admitted

    def __call__(self) -> None:
        self.tally.active -= 1
        _give_back(self.guard, self.admitted)

    def closed(self, tunnel: Tunnel) -> None:
        self()
        self.upstream.closed(self.record)
        log_closed(self.record, tunnel)


def log_closed(record: TunnelRecord, tunnel: Tunnel) -> None:
    """The ``tunnel closed`` line: the record's names, the engine's counters, the whole
    duration (since the 101, in whichever process it was)."""
    stats = tunnel.stats
    log.info(
        "tunnel closed",
        extra=fields(
            client=record.client,
            route=record.route,
            backend=record.backend,
            tunnel=record.id,
            bytes_up=stats.bytes_up,
            bytes_down=stats.bytes_down,
            duration=Seconds(trio.current_time() - record.opened_at),
            reason=stats.close_reason,
        ),
    )


async def _tls_handshake(
    conn: TLSConn, deadline: float, client: str, limit: float
) -> BaseException | None:
    """The client's TLS handshake, inside the same ``handshake_timeout`` as the request head.
    Returns why it failed (logged, unless it was plain HTTP, which the caller answers), and the
    connection is then closed."""
    try:
        with trio.fail_at(deadline):
            await handshake(conn)
    except trio.TooSlowError as exc:
        log.info(
            "TLS handshake timed out; closing",
            extra=fields(client=client, handshake_timeout=format_duration(limit)),
        )
        return exc
    except OSError as exc:  # ssl.SSLError included
        if not _is_plain_http(exc):
            log.info("TLS handshake failed", extra=fields(client=client, reason=tls_failure(exc)))
        return exc
    return None


def _is_plain_http(failure: BaseException) -> bool:
    """OpenSSL saw an HTTP request line where a TLS ClientHello belongs."""
    return isinstance(failure, ssl.SSLError) and failure.reason == "HTTP_REQUEST"


def _head_at_once(sock: socket.socket, head: RequestHead) -> h11.Request | None:
    """The request, when one read gets its whole head (most clients send it before the accept
    is even seen); None when the head is not all there yet.

    Raises:
        TunnelError: the head is refused (``RequestHead.feed``).
        ClientClosed: the client closed or reset before completing its head.
    """
    try:
        data = sock.recv(READ_SIZE)
    except BlockingIOError:
        return None
    except OSError as exc:
        raise ClientClosed(head.received) from exc
    return head.feed(data)


async def _read_request(
    sock: Conn, head: RequestHead, handshake_timeout: float, deadline: float
) -> h11.Request:
    """The request head; most clients send it before the accept is even seen, so one read is
    tried before any timer is set up."""
    try:
        try:
            request = head.feed(sock.recv(READ_SIZE))
        except BlockingIOError:
            request = None
        if request is not None:
            return request
        with trio.fail_at(deadline):
            while True:
                request = head.feed(await receive_some(sock, READ_SIZE))
                if request is not None:
                    return request
    except OSError as exc:
        raise ClientClosed(head.received) from exc
    except trio.TooSlowError:
        raise RequestTimeout(
            "the request head did not arrive within handshake_timeout "
            f"({format_duration(handshake_timeout)})"
        ) from None


async def _read_reply(
    sock: Conn, reply: BackendReply, backend: BackendConfig, *, wait_first: bool = False
) -> ReplyProgress:
    """Read until the reply's status is known (the request went out with the connect); the
    caller bounds the wait. ``wait_first``: a read just found nothing there."""
    try:
        if wait_first:
            await trio.lowlevel.wait_readable(sock)
        while True:
            progress = reply.feed(await receive_some(sock, READ_SIZE))
            if progress.status is not None:
                return progress
    except OSError as exc:
        raise _reset(backend) from exc


def _reset(backend: BackendConfig) -> BackendUnreachable:
    return BackendUnreachable(
        f"backend {backends.describe(backend)} reset the connection before replying"
    )


WATCHED_BYTES = 64 * KiB
"""Client bytes read (and kept for the backend) while its reply is awaited; past this the
client is no longer watched, and a client that sends that much before a 101 is not idle."""
REPLY_GRACE_SECONDS = 0.05
"""A backend that answers within this long is waited for alone; after it, the client is
watched too. Most answers come within a millisecond, and a second task per upgrade would cost
more than the rest of the wait (an eighth of an upgrade's instructions)."""


async def _reply_unless_client_leaves(
    sock: Conn,
    backend_sock: Conn,
    reply: BackendReply,
    response_timeout: float,
    backend: BackendConfig,
) -> tuple[ReplyProgress, bytes] | None:
    """The backend's reply within ``response_timeout``, with what the client sent meanwhile
    (bytes for the backend once the tunnel opens); None when the client closed or reset
    first, so that its slot and the backend connection are freed at once rather than at
    ``response_timeout``.

    Raises:
        BackendTimeout: 504, no status within ``response_timeout``.
        BackendUnreachable: 502, the backend reset the connection.
    """
    try:
        data = backend_sock.recv(READ_SIZE)
    except BlockingIOError:
        data = None
    except OSError as exc:
        raise _reset(backend) from exc
    if data is not None:
        # A near backend may have answered already: then no timer is needed at all.
        early = reply.feed(data)
        if early.status is not None:
            return early, b""
    now = trio.current_time()
    deadline = now + response_timeout
    with trio.move_on_at(min(deadline, now + REPLY_GRACE_SECONDS)):
        return await _read_reply(backend_sock, reply, backend, wait_first=data is None), b""
    sent = bytearray()
    failure: TunnelError | None = None
    progress: ReplyProgress | None = None
    left = False
    async with trio.open_nursery() as nursery:

        async def watch_client() -> None:
            nonlocal left
            try:
                while len(sent) < WATCHED_BYTES:
                    data = await receive_some(sock, READ_SIZE)
                    if not data:
                        break
                    sent.extend(data)
                else:
                    return
            except OSError:
                pass
            left = True
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch_client)
        with trio.move_on_at(deadline):
            try:
                progress = await _read_reply(backend_sock, reply, backend)
            except TunnelError as error:
                failure = error
        nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
    if progress is not None:
        return progress, bytes(sent)
    if left:
        return None
    raise BackendTimeout(
        f"backend {backends.describe(backend)} did not answer the upgrade within "
        f"response_timeout ({format_duration(response_timeout)})"
    )


async def _linger(sock: Conn) -> None:
    """Half-close, then read and discard what the client still sends, so that closing with
    unread bytes does not reset the connection before the client has read our answer."""
    try:
        sock.shutdown(socket.SHUT_WR)
        with trio.move_on_after(LINGER_SECONDS):
            await drain(sock)
            discarded = 0
            while discarded < LINGER_BYTES:
                data = await receive_some(sock, READ_SIZE)
                if not data:
                    return
                discarded += len(data)
    except OSError:
        return


def _give_back(guard: RouteGuard | None, admitted: Pass | None) -> None:
    """Free the guard's slots before a refusal lingers (giving them back twice, as the
    handshake's end does again, is harmless)."""
    if guard is not None and admitted is not None:
        guard.release(admitted)


def _sticky_backend(upgrade: UpgradeRequest, route: RouteConfig) -> str | None:
    """The backend a valid sticky cookie of this route names; forged, stale or foreign
    cookies are ignored (and replaced by the 101's Set-Cookie)."""
    cookie = route.sticky_cookie
    secret = cookie.secret.encode("utf-8")
    found = cookie_values(lowered_values(upgrade.fields, b"cookie"), cookie.name)
    # A few at most: each costs an HMAC, and a head full of copies must not buy a client
    # thousands of them.
    for value in found[:STICKY_COOKIES_TRIED]:
        backend = verify(value, route.name, secret)
        if backend is not None:
            return backend
    return None


def _sticky_cookie(route: RouteConfig, backend: BackendConfig, client: _Client) -> bytes:
    cookie = route.sticky_cookie
    return set_cookie(
        cookie.name,
        sign(route.name, backend.name, cookie.secret.encode("utf-8")),
        secure=client.entry.tls is not None,
        max_age=cookie.max_age,
    )


def _without_cookie(forward: ForwardRequest, name: str) -> ForwardRequest:
    """``forward`` without the sticky cookie (``sticky_cookie.strip``)."""
    fields: list[tuple[bytes, bytes]] = []
    for field_name, value in forward.fields:
        if field_name.lower() == b"cookie":
            stripped = strip_cookie(value, name)
            if stripped is not None:
                fields.append((field_name, stripped))
        else:
            fields.append((field_name, value))
    return dataclasses.replace(forward, fields=fields)


def _host_header(backend: BackendConfig) -> str:
    """The backend's ``host[:port]`` as a Host value; the scheme's own port is left out."""
    address = join_host_port(backend.host, backend.port)
    return address.rpartition(":")[0] if backend.port == DEFAULT_PORTS[backend.scheme] else address
