"""One client connection, from the first byte to the close: handshake, backend, relay.

Every error is caught here and answered or logged: one bad connection never reaches the
listener's nursery.
"""

from __future__ import annotations

import logging
import socket

import h11
import trio

from tunnel.config import (
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
from tunnel.core.response import error_response
from tunnel.core.rewrite import Forwarding, rewrite_request
from tunnel.core.session import BackendReply, ClientClosed, ReplyProgress, RequestHead
from tunnel.errors import (
    BackendTimeout,
    BackendUnreachable,
    NoRoute,
    Overloaded,
    RequestTimeout,
    TunnelError,
)
from tunnel.logs import LOGGER_NAME, fields
from tunnel.net import backend as backends
from tunnel.net.engine import Engine, Tunnel
from tunnel.net.relay import RelayStats, relay
from tunnel.policy.balancer import RoundRobin
from tunnel.policy.routing import match_route

log = logging.getLogger(LOGGER_NAME)

READ_SIZE = 16 * KiB
MAX_REPLY_HEAD = 64 * KiB
LINGER_SECONDS = 2.0
LINGER_BYTES = 256 * KiB


class Handler:
    """Serves connections for one configuration. Call it with each accepted stream."""

    def __init__(
        self, config: Config, *, scheme: str = "http", engine: Engine | None = None
    ) -> None:
        self.config = config
        self.scheme = scheme
        self.engine = engine
        """Relays plain-socket tunnels once they are established; None pumps them in tasks."""
        self._balancers = {route.name: RoundRobin(route.backends) for route in config.routes}
        self._active = 0
        """Connections past the handshake (connecting or tunnelling), bounded by max_tunnels."""

    async def __call__(self, stream: trio.SocketStream) -> None:
        peer_ip, client = _peer(stream)
        try:
            await self._serve(stream, peer_ip, client)
        except ClientClosed:
            log.debug("client left before sending a request", extra=fields(client=client))
        except Exception:
            log.exception(
                "internal error while serving a connection; the connection is closed",
                extra=fields(client=client),
            )
        finally:
            await stream.aclose()

    async def _serve(self, stream: trio.SocketStream, peer_ip: str, client: str) -> None:
        server = self.config.server
        head = RequestHead(server.max_header_bytes)
        try:
            request = await _read_request(stream, head, server.handshake_timeout)
            upgrade = validate_request(request)
            route = match_route(self.config.routes, upgrade.hostname, upgrade.path)
            if route is None:
                raise NoRoute(f"no route for host {upgrade.hostname!r} and path {upgrade.path!r}")
            token = choose_upgrade(upgrade, route.upgrades)
            key = check_websocket(request) if token == "websocket" else None
            if self._active >= server.max_tunnels:
                raise Overloaded(server.max_tunnels)
        except TunnelError as error:
            await self._refuse(stream, client, error)
            return
        self._active += 1
        handed_off = False
        try:
            handed_off = await self._forward(
                stream, peer_ip, client, route, upgrade, token, key, head.leftover
            )
        finally:
            if not handed_off:
                self._active -= 1

    async def _forward(
        self,
        stream: trio.SocketStream,
        peer_ip: str,
        client: str,
        route: RouteConfig,
        upgrade: UpgradeRequest,
        token: str,
        key: str | None,
        leftover: bytes,
    ) -> bool:
        """Returns True when the tunnel was handed to the engine, which now owns both sockets
        and the ``max_tunnels`` slot."""
        server = self.config.server
        try:
            backend, backend_stream = await backends.connect_first(
                self._balancers[route.name].candidates(), server.connect_timeout, client
            )
        except TunnelError as error:
            await self._refuse(stream, client, error, route=route.name)
            return False
        try:
            hop = Forwarding(
                peer_ip=peer_ip,
                scheme=self.scheme,
                trusted_proxies=server.trusted_proxies,
                backend_host=None if route.preserve_host else _host_header(backend),
                path_prefix=route.path_prefix,
                backend_path=backend.path,
            )
            reply = BackendReply(rewrite_request(upgrade, token, hop), token, key, MAX_REPLY_HEAD)
            try:
                progress = await _ask_backend(
                    backend_stream, reply, server.response_timeout, backend
                )
            except TunnelError as error:
                await self._refuse(stream, client, error, route=route.name, backend=backend.name)
                return False
            if not progress.switched:
                await self._relay_refusal(
                    stream, backend_stream, reply, progress, client, route, backend
                )
                return False
            if self.engine is not None:
                self._hand_off(
                    self.engine, stream, backend_stream, progress, leftover, client, route, backend
                )
                return True
            await self._tunnel(stream, backend_stream, progress, leftover, client, route, backend)
            return False
        finally:
            await backend_stream.aclose()

    def _hand_off(
        self,
        engine: Engine,
        stream: trio.SocketStream,
        backend_stream: trio.SocketStream,
        progress: ReplyProgress,
        leftover: bytes,
        client: str,
        route: RouteConfig,
        backend: BackendConfig,
    ) -> None:
        """Give both sockets to the engine: from here on no task serves this tunnel."""
        started = trio.current_time()
        log.info(
            "tunnel opened", extra=fields(client=client, route=route.name, backend=backend.name)
        )

        def closed(tunnel: Tunnel) -> None:
            self._active -= 1
            stats = tunnel.stats
            log.info(
                "tunnel closed",
                extra=fields(
                    client=client,
                    route=route.name,
                    backend=backend.name,
                    bytes_up=stats.bytes_up,
                    bytes_down=stats.bytes_down,
                    duration=f"{trio.current_time() - started:.3f}s",
                    reason=stats.close_reason,
                ),
            )

        engine.adopt(
            _detach(stream),
            _detach(backend_stream),
            RelayStats(),
            closed,
            to_client=progress.forward + progress.leftover,
            to_backend=leftover,
        )

    async def _tunnel(
        self,
        stream: trio.SocketStream,
        backend_stream: trio.SocketStream,
        progress: ReplyProgress,
        leftover: bytes,
        client: str,
        route: RouteConfig,
        backend: BackendConfig,
    ) -> None:
        started = trio.current_time()
        log.info(
            "tunnel opened", extra=fields(client=client, route=route.name, backend=backend.name)
        )
        stats = RelayStats()
        try:
            await stream.send_all(progress.forward + progress.leftover)
            stats.bytes_down += len(progress.leftover)
            if leftover:
                await backend_stream.send_all(leftover)
                stats.bytes_up += len(leftover)
            await relay(
                stream, backend_stream, idle_timeout=self.config.server.idle_timeout, stats=stats
            )
        except trio.BrokenResourceError:
            stats.close_reason = "reset during hand-off"
        finally:
            log.info(
                "tunnel closed",
                extra=fields(
                    client=client,
                    route=route.name,
                    backend=backend.name,
                    bytes_up=stats.bytes_up,
                    bytes_down=stats.bytes_down,
                    duration=f"{trio.current_time() - started:.3f}s",
                    reason=stats.close_reason or "shutdown",
                ),
            )

    async def _relay_refusal(
        self,
        stream: trio.SocketStream,
        backend_stream: trio.SocketStream,
        reply: BackendReply,
        progress: ReplyProgress,
        client: str,
        route: RouteConfig,
        backend: BackendConfig,
    ) -> None:
        """Pass a non-101 reply to the client verbatim, then close: no tunnel opens."""
        log.info(
            "backend refused the upgrade; relaying its answer and closing",
            extra=fields(
                client=client, route=route.name, backend=backend.name, status=progress.status
            ),
        )
        timeout = self.config.server.response_timeout
        try:
            await stream.send_all(progress.forward)
            while not progress.complete:
                with trio.move_on_after(timeout) as scope:
                    data = await backend_stream.receive_some(READ_SIZE)
                if scope.cancelled_caught:
                    return
                progress = reply.feed(data)
                await stream.send_all(progress.forward)
        except (TunnelError, trio.BrokenResourceError):
            return
        await backend_stream.aclose()
        await _linger(stream)

    async def _refuse(
        self, stream: trio.SocketStream, client: str, error: TunnelError, **context: str
    ) -> None:
        log.warning(
            "request refused",
            extra=fields(client=client, status=error.status, reason=error.message, **context),
        )
        with trio.move_on_after(LINGER_SECONDS):
            try:
                await stream.send_all(error_response(error))
            except trio.BrokenResourceError:
                return
        await _linger(stream)


async def _read_request(
    stream: trio.SocketStream, head: RequestHead, handshake_timeout: float
) -> h11.Request:
    with trio.move_on_after(handshake_timeout):
        while True:
            try:
                data = await stream.receive_some(READ_SIZE)
            except trio.BrokenResourceError as exc:
                raise ClientClosed from exc
            request = head.feed(data)
            if request is not None:
                return request
    raise RequestTimeout(
        "the request head did not arrive within handshake_timeout "
        f"({format_duration(handshake_timeout)})"
    )


async def _ask_backend(
    stream: trio.SocketStream, reply: BackendReply, response_timeout: float, backend: BackendConfig
) -> ReplyProgress:
    """Send the rewritten request and read until the reply's status is known."""
    try:
        await stream.send_all(reply.request_bytes)
        with trio.move_on_after(response_timeout):
            while True:
                progress = reply.feed(await stream.receive_some(READ_SIZE))
                if progress.status is not None:
                    return progress
    except trio.BrokenResourceError as exc:
        raise BackendUnreachable(
            f"backend {backends.describe(backend)} reset the connection before replying"
        ) from exc
    raise BackendTimeout(
        f"backend {backends.describe(backend)} did not answer the upgrade within "
        "response_timeout "
        f"({format_duration(response_timeout)})"
    )


async def _linger(stream: trio.SocketStream) -> None:
    """Half-close, then read and discard what the client still sends, so that closing with
    unread bytes does not reset the connection before the client has read our answer."""
    try:
        await stream.send_eof()
        with trio.move_on_after(LINGER_SECONDS):
            discarded = 0
            while discarded < LINGER_BYTES:
                data = await stream.receive_some(READ_SIZE)
                if not data:
                    return
                discarded += len(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return


def _detach(stream: trio.SocketStream) -> socket.socket:
    """The stream's socket as a plain non-blocking ``socket.socket``; trio forgets it."""
    trio_socket = stream.socket
    family, kind, proto = trio_socket.family, trio_socket.type, trio_socket.proto
    trio.lowlevel.notify_closing(trio_socket)
    return socket.socket(family, kind, proto, fileno=trio_socket.detach())


def _peer(stream: trio.SocketStream) -> tuple[str, str]:
    """The client's IP address, and ``ip:port`` (``[ip]:port`` for IPv6) for log lines."""
    try:
        address = stream.socket.getpeername()
    except OSError:
        return "", "unknown"
    ip, port = address[0], address[1]
    return ip, join_host_port(ip, port)


def _host_header(backend: BackendConfig) -> str:
    """The backend's ``host[:port]`` as a Host value; port 80 is implied by ``ws://``."""
    address = join_host_port(backend.host, backend.port)
    return address.rpartition(":")[0] if backend.port == 80 else address
