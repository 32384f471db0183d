"""Checking the backend's reply, and the proxy's own error responses."""

from __future__ import annotations

import base64
import hashlib

import h11

from tunnel.core import headers
from tunnel.errors import BadBackendResponse, HandshakeError, HeadersTooLarge, TunnelError

WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def websocket_accept(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` a server must answer to ``key`` (RFC 6455 §4.2.2)."""
    digest = hashlib.sha1(key.encode("ascii") + WEBSOCKET_GUID).digest()
    return base64.b64encode(digest).decode("ascii")


def check_switch(response: h11.InformationalResponse, token: str, key: str | None) -> None:
    """Check that a backend's 101 switches to what the client asked for.

    Raises:
        BadBackendResponse: 502, when ``Upgrade`` is not ``token``, ``Connection`` lacks
            ``upgrade``, or (websocket) ``Sec-WebSocket-Accept`` does not match ``key``.

    Not checked: subprotocol and extensions, which the client verifies end to end.
    """
    check_switch_headers(response.headers, token, key)


def check_switch_headers(raw: headers.HeaderList, token: str, key: str | None) -> None:
    """``check_switch`` over a list of (lower-case name, value) pairs."""
    upgrade = headers.tokens(raw, b"upgrade")
    if upgrade != [token]:
        raise BadBackendResponse(
            f"backend switched to Upgrade {', '.join(upgrade) or 'none'}, not {token}"
        )
    if "upgrade" not in headers.tokens(raw, b"connection"):
        raise BadBackendResponse("backend's 101 lacks Connection: Upgrade")
    if key is not None:
        accepts = headers.values(raw, b"sec-websocket-accept")
        if [a.strip().decode("latin-1") for a in accepts] != [websocket_accept(key)]:
            raise BadBackendResponse("backend's Sec-WebSocket-Accept does not match the key")


def error_response(error: TunnelError) -> bytes:
    """The complete response bytes for a refusal: status, extra headers, a one-line text body."""
    body = f"{error.status} {error.reason}: {error.message}\n".encode()
    lines = [
        f"HTTP/1.1 {error.status} {error.reason}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in error.headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + body


def protocol_error(exc: h11.RemoteProtocolError, *, limit: int) -> HandshakeError:
    """Map a malformed client request, as h11 reports it through its status hint."""
    if exc.error_status_hint == 431:
        return HeadersTooLarge(limit)
    return HandshakeError(f"malformed request: {exc}")
