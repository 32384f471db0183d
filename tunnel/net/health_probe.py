"""Active health checks (issue 12): probes of one backend, and the one task that runs them all.

A route with ``[routes.health] kind = "tcp"`` has each backend's port connected to; with
``kind = "websocket"`` a real RFC 6455 opening handshake is sent to ``path`` and the backend
must answer 101 with the right ``Sec-WebSocket-Accept`` (then it gets a masked Close frame and
the connection ends). A probe returns None when the backend is healthy, else a short reason for
the log ("connection refused", "answered 403 instead of 101", "no answer within 2s").

``run_health_checks`` is one trio task per process, whatever the number of routes, backends or
tunnels: it asks for the current upstreams on every turn (a reload changes them), starts the
probes that are due (each bounded by the route's ``timeout``) and hands every result to the
upstream (``Upstream.check_result``), whose state machine decides up and down. It is not the
hot path, so it uses plain trio streams.
"""

from __future__ import annotations

import base64
import functools
import logging
import os
import ssl
from collections.abc import Callable, Iterable
from typing import Any

import h11
import trio

from tunnel.config import format_duration, join_host_port
from tunnel.core import headers
from tunnel.core.proxy_protocol import build as build_proxy_header
from tunnel.core.response import check_switch_headers, websocket_accept
from tunnel.core.wsframes import close_frame
from tunnel.errors import BadBackendResponse
from tunnel.logs import LOGGER_NAME, fields

log = logging.getLogger(LOGGER_NAME)

MAX_RESPONSE_HEAD = 16 * 1024
"""Bound on the backend's answer to a probe's upgrade request."""
RECEIVE_BYTES = 4096
MAX_WAKE_SECONDS = 1.0
"""The runner looks at the upstreams at least this often, so a reload's routes start soon."""
MIN_INTERVAL_SECONDS = 0.05
"""Floor under a route's ``interval``, so a zero can never make the runner spin."""
USER_AGENT = "tunnel-health-check"
CLOSE_REASON = "health check"
_NO_ANSWER = "closed the connection without answering"


def _seconds(value: float) -> str:
    try:
        return format_duration(value)
    except (ValueError, OverflowError):  # a stand-in value format_duration cannot spell
        return f"{value:g}s"


def _os_reason(exc: OSError) -> str:
    """A plain reason from a connect error: trio's "all attempts failed" wraps the real ones."""
    cause: BaseException | None = exc
    for _ in range(4):  # trio nests at most an ExceptionGroup of OSErrors
        if isinstance(cause, BaseExceptionGroup) and cause.exceptions:
            cause = cause.exceptions[0]
        elif isinstance(cause, OSError) and cause.errno:
            return os.strerror(cause.errno).lower()
        elif isinstance(cause, OSError) and cause.__cause__ is not None:
            cause = cause.__cause__
        else:
            break
    return str(exc) or type(exc).__name__


@functools.cache
def _default_context() -> ssl.SSLContext:
    """The system's trust store, loaded once per process (it reads files), for a ``wss``
    backend probed without a route context."""
    return ssl.create_default_context()


def _ssl_reason(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed ({exc.verify_message})"
    return str(exc.reason or exc)


async def probe_tcp(host: str, port: int, time_limit: float) -> str | None:
    """Connect to ``host:port`` and close: None when the connection was accepted within
    ``time_limit`` seconds, else the reason ("connection refused", "timed out after 1s")."""
    with trio.move_on_after(time_limit):
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            return _os_reason(exc)
        await stream.aclose()
        return None
    return f"timed out after {_seconds(time_limit)}"


def _upgrade_request(backend: Any, path: str, key: str) -> h11.Request:
    return h11.Request(
        method="GET",
        target=path,
        headers=[
            ("Host", join_host_port(backend.host, backend.port)),
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", key),
            ("Sec-WebSocket-Version", "13"),
            ("User-Agent", USER_AGENT),
        ],
    )


async def _read_answer(
    stream: trio.abc.Stream, conn: h11.Connection
) -> h11.InformationalResponse | h11.Response | str:
    """The backend's final answer (skipping any 100 Continue), or the reason there is none."""
    received = 0
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            return f"answered with something other than HTTP ({exc})"
        if event is h11.NEED_DATA:
            if received > MAX_RESPONSE_HEAD:
                return f"answer head over {MAX_RESPONSE_HEAD} bytes"
            data = bytes(await stream.receive_some(RECEIVE_BYTES))
            if not data:
                return "closed the connection mid-answer" if received else _NO_ANSWER
            received += len(data)
            conn.receive_data(data)
        elif isinstance(event, h11.InformationalResponse) and event.status_code != 101:
            continue  # 1xx before the real answer; the head bound still applies
        elif isinstance(event, h11.InformationalResponse | h11.Response):
            return event
        elif isinstance(event, h11.ConnectionClosed):
            return _NO_ANSWER
        else:
            return f"answered with {type(event).__name__}"


async def _handshake(stream: trio.abc.Stream, backend: Any, path: str) -> str | None:
    """Send the upgrade request on ``stream`` and judge the answer; on a 101, say goodbye."""
    key = base64.b64encode(os.urandom(16)).decode("ascii")
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
    request = _upgrade_request(backend, path, key)
    # A backend that expects a PROXY header gets one naming no client (v1 UNKNOWN, v2 LOCAL),
    # as HAProxy's check-send-proxy does: the check is the proxy's own connection.
    version = getattr(backend, "send_proxy_protocol", "")
    local = build_proxy_header(version, ("local", 0), ("local", 0)) if version else b""
    await stream.send_all(local + (conn.send(request) or b""))
    answer = await _read_answer(stream, conn)
    if isinstance(answer, str):
        return answer
    if answer.status_code != 101:
        return f"answered {answer.status_code} instead of 101"
    try:
        check_switch_headers(answer.headers, "websocket", None)
    except BadBackendResponse as exc:
        return exc.message
    accepts = headers.values(answer.headers, b"sec-websocket-accept")
    if [value.strip().decode("latin-1") for value in accepts] != [websocket_accept(key)]:
        return "bad Sec-WebSocket-Accept"
    await stream.send_all(close_frame(CLOSE_REASON, os.urandom(4)))
    return None


async def probe_websocket(
    backend: Any,
    path: str,
    time_limit: float,
    tls: ssl.SSLContext | None,
    server_name: str,
) -> str | None:
    """Open a WebSocket to ``backend`` (a ``BackendConfig``: ``host``, ``port``, ``scheme``)
    at ``path`` (empty: the backend's own path, else "/") within ``time_limit`` seconds, then
    send it a Close frame and hang up. None when it answered 101 with the right
    ``Sec-WebSocket-Accept``; else the reason.

    A ``wss`` backend is reached over TLS with ``tls`` (a default verifying context when None)
    and ``server_name``, or the backend's host, as SNI and the name to verify. Not checked:
    subprotocols and extensions, and whether the backend answers the Close.
    """
    target = path or getattr(backend, "path", "") or "/"
    phase = "connect"
    with trio.move_on_after(time_limit):
        stream: trio.abc.Stream | None = None
        try:
            stream = await trio.open_tcp_stream(backend.host, backend.port)
            if backend.scheme == "wss":
                phase = "tls"
                context = tls if tls is not None else _default_context()
                secure = trio.SSLStream(
                    stream, context, server_hostname=server_name or backend.host
                )
                stream = secure
                await secure.do_handshake()
            phase = "answer"
            return await _handshake(stream, backend, target)
        except trio.BrokenResourceError as exc:
            cause = exc.__cause__
            if isinstance(cause, ssl.SSLError):
                return f"TLS failed: {_ssl_reason(cause)}"
            return f"connection broken ({cause or exc})"
        except ssl.SSLError as exc:
            return f"TLS failed: {_ssl_reason(exc)}"
        except OSError as exc:
            return _os_reason(exc)
        finally:
            if stream is not None:
                await trio.aclose_forcefully(stream)
    if phase == "connect":
        return f"connect timed out after {_seconds(time_limit)}"
    if phase == "tls":
        return f"TLS handshake timed out after {_seconds(time_limit)}"
    return f"no answer within {_seconds(time_limit)}"


async def probe(upstream: Any, backend: Any) -> str | None:
    """One check of ``backend`` as its route's ``[routes.health]`` says: None when healthy."""
    health = upstream.route.health
    if health.kind == "tcp":
        return await probe_tcp(backend.host, backend.port, health.timeout)
    return await probe_websocket(
        backend, health.path, health.timeout, upstream.tls, upstream.route.backend_tls.server_name
    )


_Key = tuple[str, str, str, str, str, float, float]
"""A check's identity across reloads: route, backend, URL and the health settings that shape
it. A reload that changes none of them keeps the check's schedule; any change starts anew."""


def _key(upstream: Any, backend: Any) -> _Key:
    health = upstream.route.health
    return (
        upstream.route.name,
        backend.name,
        str(backend.url),
        health.kind,
        health.path,
        float(health.interval),
        float(health.timeout),
    )


async def _check(upstream: Any, backend: Any) -> None:
    """Probe ``backend`` and report to ``upstream``. A probe that raises (a bug, not a sick
    backend) is logged and reported as nothing, so it can neither stop the runner nor mark a
    backend down."""
    try:
        reason = await probe(upstream, backend)
    except Exception as exc:
        log.error(
            "health probe failed",
            extra=fields(
                route=upstream.route.name,
                backend=backend.name,
                error=f"{type(exc).__name__}: {exc}",
            ),
            exc_info=exc,
        )
        return
    try:
        upstream.check_result(backend.name, reason is None, reason or "", trio.current_time())
    except Exception as exc:
        log.error(
            "recording a health check failed",
            extra=fields(route=upstream.route.name, backend=backend.name, error=repr(exc)),
            exc_info=exc,
        )


async def run_health_checks(
    upstreams: Callable[[], Iterable[Any]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Check every backend of every upstream whose route has health checks, until cancelled.

    ``upstreams()`` is asked again on every turn, at least every ``MAX_WAKE_SECONDS``, so a
    reload's routes are picked up. A backend is first checked at once, then every ``interval``
    seconds from the start of its last check; a check still running when the next is due
    delays it (never two at once for one backend). Probes run concurrently, each bounded by
    the route's ``timeout``, and each result goes to ``upstream.check_result(name, ok, detail,
    now)`` with ``now`` from trio's clock.
    """
    due: dict[_Key, float] = {}
    running: set[_Key] = set()
    wake = trio.Event()

    async def check(key: _Key, upstream: Any, backend: Any) -> None:
        try:
            await _check(upstream, backend)
        finally:
            running.discard(key)
            wake.set()

    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            now = trio.current_time()
            current: dict[_Key, tuple[Any, Any]] = {}
            for upstream in upstreams():
                if upstream.route.health.kind == "none":
                    continue
                for backend in upstream.route.backends:
                    current[_key(upstream, backend)] = (upstream, backend)
            for gone in due.keys() - current.keys():
                del due[gone]
            wake_at = now + MAX_WAKE_SECONDS
            for key, (upstream, backend) in current.items():
                if key in running:
                    continue
                at = due.setdefault(key, now)
                if at <= now:
                    at = due[key] = now + max(key[5], MIN_INTERVAL_SECONDS)
                    running.add(key)
                    nursery.start_soon(check, key, upstream, backend)
                wake_at = min(wake_at, at)
            wake = trio.Event()
            with trio.move_on_at(wake_at):
                await wake.wait()
