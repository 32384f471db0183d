"""Validation of the client's upgrade request: pure functions over an ``h11.Request``."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11

from tunnel.core import headers
from tunnel.errors import HandshakeError, MethodNotAllowed, UpgradeRequired

WEBSOCKET_VERSION = "13"


@dataclass(frozen=True, slots=True)
class UpgradeRequest:
    """An upgrade request that passed the route-independent checks."""

    request: h11.Request
    host: str
    """The Host header as the client sent it (with port, original case)."""
    hostname: str
    """Lower-case host name without port, for routing."""
    target: str
    """Origin-form target (``/path?query``), even if the client sent absolute form."""
    offered: tuple[str, ...]
    """Upgrade tokens the client offered, lower-case, in its order of preference."""
    fields: list[tuple[bytes, bytes]]
    """The headers as (lower-case name, value), listed once: h11's header view is slow to
    iterate, and a handshake looks headers up a dozen times."""

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]


def validate_request(
    request: h11.Request, fields: list[tuple[bytes, bytes]] | None = None
) -> UpgradeRequest:
    """Check an upgrade request head before routing. ``fields``: the request's (lower-case
    name, value) pairs as ``RequestHead.fields`` gives them (its strict parser refused control
    characters already), else they are listed from the request.

    Tokens in ``Connection`` and ``Upgrade`` are compared case-insensitively.

    Raises:
        MethodNotAllowed: 405, the method is not GET.
        HandshakeError: 400, HTTP version other than 1.1, a request body (``Content-Length`` > 0
            or any ``Transfer-Encoding``), a control character in a header value, a ``Host``
            that is not a host name or IP literal with an optional port (``parse_host``), a
            target that is neither a path nor a valid absolute URL, an absolute-form target
            naming another host than ``Host``, or a path with a dot segment (``check_path``).
        UpgradeRequired: 426 with ``Upgrade: websocket``, when the request is not an upgrade
            (no ``Upgrade`` header, or ``Connection`` without the ``upgrade`` token).

    Not checked here: the Upgrade token against a route (``choose_upgrade``), WebSocket headers
    (``check_websocket``), and the Host header's count, which h11 already enforces.
    """
    method = request.method.decode("ascii", "replace")
    if method != "GET":
        raise MethodNotAllowed(method)
    if request.http_version != b"1.1":
        version = request.http_version.decode("ascii", "replace")
        raise HandshakeError(f"HTTP/{version} cannot upgrade; the tunnel needs HTTP/1.1")
    if fields is None:
        raw = list(request.headers)
        for name, value in raw:
            if _CONTROL.search(value):
                raise HandshakeError(
                    f"header {name.decode('latin-1')} has a control character in its value"
                )
    else:
        raw = fields
    if headers.lowered_values(raw, b"transfer-encoding"):
        raise HandshakeError("an upgrade request must not have a body (Transfer-Encoding sent)")
    for length in headers.lowered_values(raw, b"content-length"):
        if length.strip() != b"0":
            raise HandshakeError("an upgrade request must not have a body (Content-Length > 0)")
    offered = tuple(headers.tokens(raw, b"upgrade", lowered=True))
    if not offered or "upgrade" not in headers.tokens(raw, b"connection", lowered=True):
        raise UpgradeRequired(
            "this endpoint only accepts WebSocket upgrades (send Connection: Upgrade and "
            "Upgrade: websocket)",
            headers=[("Upgrade", "websocket")],
        )
    host = headers.lowered_values(raw, b"host")[0].decode("latin-1")
    hostname, _ = headers.parse_host(host)
    target = request.target.decode("latin-1")
    if not target.startswith("/"):
        target = _origin_form(target, host)
    check_path(target.partition("?")[0])
    return UpgradeRequest(request, host, hostname, target, offered, raw)


_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
"""Control characters other than tab (RFC 9110 §5.5): h11 lets them through in values."""

_SEGMENT_SEPARATOR = re.compile(r"/|\\|%2f|%5c", re.IGNORECASE)


def check_path(path: str) -> None:
    """Refuse a path with a dot segment, rather than resolve it.

    A path is routed by its prefix and forwarded as sent, so ``/ws/../admin`` would be routed
    as ``/ws/`` and reach the backend, which resolves it, as ``/admin``. Browsers and WebSocket
    clients resolve dot segments before sending, so only a prober sends one. Looked for in the
    forms backends are known to resolve too: percent-encoded (``%2e%2e``), separated by ``\\``
    or an encoded ``/`` or ``\\`` (``%2f``, ``%5c``), and with ``;parameters`` (``..;``, which
    Java servers read as ``..``).

    Raises:
        HandshakeError: 400, naming the segment.
    """
    if "." not in path and "%" not in path:
        return
    for segment in _SEGMENT_SEPARATOR.split(path):
        name = segment.partition(";")[0].lower().replace("%2e", ".")
        if name in (".", ".."):
            raise HandshakeError(
                f"the request path has a {name!r} segment; send the path with dot segments "
                "resolved (RFC 3986, section 5.2.4)"
            )


def _origin_form(target: str, host: str) -> str:
    """Turn an absolute-form target into origin form, refusing one that names another host."""
    try:
        parts = urlsplit(target)
    except ValueError as exc:  # such as an unclosed "[" in the authority
        raise HandshakeError(f"request target {target!r} is not a valid URL") from exc
    if parts.scheme.lower() not in ("http", "https", "ws", "wss") or not parts.netloc:
        raise HandshakeError(f"request target {target!r} is neither a path nor an absolute URL")
    default_port = "443" if parts.scheme.lower() in ("https", "wss") else "80"
    if _authority(parts.netloc, default_port) != _authority(host, default_port):
        raise HandshakeError(
            f"absolute request target names host {parts.netloc!r} but Host is {host!r}"
        )
    path = parts.path or "/"
    return f"{path}?{parts.query}" if parts.query else path


def _authority(netloc: str, default_port: str) -> tuple[str, str]:
    """(lower-case host, port) with the scheme's default port filled in, for comparison."""
    name, port = headers.parse_host(netloc)
    return name, port or default_port


def choose_upgrade(request: UpgradeRequest, allowed: Sequence[str]) -> str:
    """Pick the first offered Upgrade token that the route allows.

    Raises:
        UpgradeRequired: 426 naming the allowed tokens in ``Upgrade``, when none is offered.

    Not checked: the WebSocket headers of a websocket upgrade (``check_websocket``).
    """
    for token in request.offered:
        if token in allowed:
            return token
    raise UpgradeRequired(
        f"Upgrade {', '.join(request.offered)} is not allowed here; allowed: {', '.join(allowed)}",
        headers=[("Upgrade", ", ".join(allowed))],
    )


def check_websocket(request: h11.Request, fields: list[tuple[bytes, bytes]] | None = None) -> str:
    """Check the RFC 6455 headers of a websocket upgrade and return the Sec-WebSocket-Key.
    ``fields``: the request's (lower-case name, value) pairs (``UpgradeRequest.fields``), else
    they are listed from the request.

    Raises:
        HandshakeError: 400, ``Sec-WebSocket-Key`` missing, repeated, or not base64 of 16 bytes.
        UpgradeRequired: 426 with ``Sec-WebSocket-Version: 13``, version missing or not 13.

    Not checked: ``Origin`` (policy's job), subprotocols and extensions (the backend's).
    """
    raw = list(request.headers) if fields is None else fields
    versions = headers.tokens(raw, b"sec-websocket-version", lowered=True)
    if versions != [WEBSOCKET_VERSION]:
        sent = ", ".join(versions) or "none"
        raise UpgradeRequired(
            f"Sec-WebSocket-Version {sent} is not supported; use 13",
            headers=[("Sec-WebSocket-Version", WEBSOCKET_VERSION)],
        )
    keys = headers.lowered_values(raw, b"sec-websocket-key")
    if len(keys) != 1:
        problem = "missing" if not keys else "sent more than once"
        raise HandshakeError(f"Sec-WebSocket-Key is {problem}")
    key = keys[0].strip()
    try:
        decoded = base64.b64decode(key, validate=True)
    except binascii.Error:
        decoded = b""
    if len(decoded) != 16:
        raise HandshakeError("Sec-WebSocket-Key is not the base64 of 16 bytes")
    return key.decode("ascii")
