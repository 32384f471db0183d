"""Checking the backend's reply, and the proxy's own error responses."""

from __future__ import annotations

import base64
import hashlib

import h11

from tunnel.core import headers
from tunnel.errors import BadBackendResponse, HandshakeError, TunnelError

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
    upgrade = headers.tokens(raw, b"upgrade", lowered=True)
    if upgrade != [token]:
        raise BadBackendResponse(
            f"backend switched to Upgrade {', '.join(upgrade) or 'none'}, not {token}"
        )
    if "upgrade" not in headers.tokens(raw, b"connection", lowered=True):
        raise BadBackendResponse("backend's 101 lacks Connection: Upgrade")
    if key is not None:
        accepts = headers.lowered_values(raw, b"sec-websocket-accept")
        if [a.strip().decode("latin-1") for a in accepts] != [websocket_accept(key)]:
            raise BadBackendResponse("backend's Sec-WebSocket-Accept does not match the key")


def error_response(error: TunnelError) -> bytes:
    """The complete response bytes for a refusal: status, extra headers, a one-line text body."""
    body = f"{error.status} {error.reason}: {error.public}\n".encode()
    lines = [
        f"HTTP/1.1 {error.status} {error.reason}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in error.headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + body


_H11_WORDS = (
    ("illegal request line", 'the request line is not "METHOD /path HTTP/1.1"'),
    ("no request line received", "the request starts with an empty line"),
    ("illegal header line", 'a header line is not "Name: value"'),
    ("continuation line at start", "the first header line starts with a space or tab"),
    ("missing mandatory host", "the Host header is missing"),
    ("found multiple host", "the Host header is sent more than once"),
    ("illegal method characters", "the method has characters no method has"),
    ("illegal target characters", "the request target has a space or a control character"),
    ("illegal header name", "a header name has characters no header name has"),
    ("conflicting content-length", "Content-Length is sent more than once with other values"),
    ("bad content-length", "Content-Length is not a number"),
    ("multiple transfer-encoding", "an upgrade request must not have a body (Transfer-Encoding)"),
    ("only transfer-encoding", "an upgrade request must not have a body (Transfer-Encoding)"),
)
"""h11's reasons, said in words: its own messages quote the bytes as Python reprs."""


def protocol_error(exc: h11.RemoteProtocolError) -> HandshakeError:
    """Say in words what h11 found wrong with a client's request head (400)."""
    reason = str(exc).lower()
    for prefix, words in _H11_WORDS:
        if reason.startswith(prefix):
            return HandshakeError(f"malformed request: {words}")
    return HandshakeError("malformed request: the request head is not valid HTTP/1.1")


def with_header(head: bytes, name: bytes, value: bytes) -> bytes:
    """``head`` (a response head ending with its blank line, as relayed verbatim) with one
    header added last: the tunnel's own, such as a sticky cookie on the backend's 101. The
    value must be a valid field value (no CR or LF); the caller builds it."""
    if head.endswith(b"\r\n\r\n"):
        return head[:-2] + name + b": " + value + b"\r\n\r\n"
    if head.endswith(b"\n\n"):  # a backend that ends its lines with bare LF, as h11 allows
        return head[:-1] + name + b": " + value + b"\n\n"
    raise ValueError("not a complete response head")
