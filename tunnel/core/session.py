"""The two sans-io conversations of a handshake: reading the client's request head and reading
the backend's reply. Bytes go in, events and bytes to forward come out; no I/O here."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import h11

from tunnel.core.response import check_switch, check_switch_headers, protocol_error
from tunnel.core.rewrite import ForwardRequest
from tunnel.errors import (
    BadBackendResponse,
    HandshakeError,
    HeadersTooLarge,
    TooManyHeaders,
    UriTooLong,
)


class ClientClosed(Exception):
    """The client went away before sending a complete request head: nobody is left to read an
    answer, so none is sent (a debug line, not a refusal)."""

    def __init__(self, received: int) -> None:
        super().__init__(f"client left after sending {received} bytes of a request head")
        self.received = received


TLS_ON_PLAIN_PORT = (
    "a TLS handshake was sent to a plain (non-TLS) port; use ws:// or http:// here, "
    "or the TLS listener's port with wss://"
)
_TLS_HANDSHAKE_RECORD = 0x16
"""The first byte of a TLS ClientHello; no HTTP method starts with it."""


class RequestHead:
    """Accumulates client bytes until the request head is complete.

    ``max_header_bytes`` bounds the whole head, whether it arrives in one read or many, and
    ``max_headers`` its field lines. Both are checked on the raw bytes as they arrive, before
    any parser builds anything per field, so a head of thousands of tiny fields costs a count
    of its line ends, not thousands of objects. Every byte is looked at once, however the
    reads cut the head. A folded (obs-fold) continuation counts as a line of its own.

    Line ends must be CRLF: a bare LF anywhere in the head is refused as soon as it arrives,
    unless ``allow_bare_lf``, which keeps h11's lenient reading (RFC 9112 section 2.2 allows
    either; nginx, HAProxy and Caddy read ``X-A: 1\\nX-B: 2`` as two fields, Node's llhttp
    refuses it).

    A complete head whose every line is plainly well formed (``GET target HTTP/1.1``,
    ``name: value`` fields, CRLF line ends) is read by a strict parser of its own and becomes
    an ``h11.Request``, which checks the fields again (Host, framing headers). Any other
    complete head, and bytes no request line starts with (h11 refuses those at once), go to
    an h11 server connection from their first byte, so every malformed head gets h11's
    verdict: the fast path only ever accepts what h11 accepts (the tests hold it to that).
    """

    def __init__(
        self, max_header_bytes: int, max_headers: int = 100, allow_bare_lf: bool = False
    ) -> None:
        self._limit = max_header_bytes
        self._max_headers = max_headers
        self._strict = not allow_bare_lf
        self._buffer = bytearray()
        self._received = 0
        self._leftover = b""
        self._scanned = 0
        """Bytes at the start of ``_buffer`` already checked (all of them inside the head)."""
        self._line_ends = 0
        """LF bytes among them: the request line's, then one per field line."""
        self._line_length: int | None = None
        """Length of the request line once its end has been seen: 414 or 431 when too big."""
        self._fields: list[tuple[bytes, bytes]] | None = None

    def feed(self, data: bytes) -> h11.Request | None:
        """Feed bytes (``b""`` for EOF); return the request once its head is complete.

        Raises:
            UriTooLong: 414, the request line alone is longer than ``max_header_bytes``.
            HeadersTooLarge: 431, the head is larger than ``max_header_bytes``.
            TooManyHeaders: 431, the head has more than ``max_headers`` field lines.
            HandshakeError: 400, the bytes are not an HTTP/1.1 request head, or a line ends in
                a bare LF (unless ``allow_bare_lf``); the message says what is wrong in words
                (a TLS handshake on a plain port is named as such).
            ClientClosed: EOF before the head is complete (nothing to answer: a client that
                sent half a head and closed is not waiting for a 400).
        """
        if self._line_length is None:
            end = data.find(b"\n")
            self._line_length = None if end < 0 else self._received + end
        self._received += len(data)
        buffer = self._buffer
        buffer += data
        if buffer and buffer[0] < _FIRST_REQUEST_BYTE:
            if buffer[0] == _TLS_HANDSHAKE_RECORD:
                raise HandshakeError(TLS_ON_PLAIN_PORT)
            return self._judge()
        end = self._scan()
        if end < 0:
            if not data:
                raise ClientClosed(self._received)
            if len(buffer) > self._limit:
                raise self._too_large()
            return None
        if end > self._limit:
            raise self._too_large()
        if buffer[end - 4 : end] == b"\r\n\r\n":
            clean = _clean_request(bytes(buffer[: end - 4]))
            if clean is not None:
                self._leftover = bytes(buffer[end:])
                request, self._fields = clean
                return request
        return self._judge()

    def _scan(self) -> int:
        """Check the bytes fed since the last call up to the head's end: bare LFs, and the
        count of field lines. Returns where the head ends (after its blank line), or -1."""
        buffer, start = self._buffer, self._scanned
        blank = _BLANK_LINE.search(buffer, max(start - 2, 0))
        stop = len(buffer) if blank is None else blank.end()
        line_ends = buffer.count(b"\n", start, stop)
        if line_ends:
            if self._strict and buffer.count(b"\r\n", max(start - 1, 0), stop) != line_ends:
                raise _bare_lf(buffer, stop)
            self._line_ends += line_ends
            # A complete head's line ends: the request line's, one per field, the blank line's.
            fields = self._line_ends - (1 if blank is None else 2)
            if fields > self._max_headers:
                raise TooManyHeaders(self._max_headers)
        self._scanned = stop
        return stop if blank is not None else -1

    def _judge(self) -> h11.Request:
        """h11's verdict on what was fed: a complete head, or bytes it refuses at once."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self._limit)
        conn.receive_data(bytes(self._buffer))
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise protocol_error(exc) from exc
        if not isinstance(event, h11.Request):  # pragma: no cover - a whole head is a Request
            raise HandshakeError("malformed request")
        self._leftover = bytes(conn.trailing_data[0])
        return event

    def _too_large(self) -> HeadersTooLarge | UriTooLong:
        """414 when the request line alone is over the limit (nginx's answer), else 431."""
        if self._line_length is None or self._line_length > self._limit:
            return UriTooLong(self._limit)
        return HeadersTooLarge(self._limit)

    @property
    def received(self) -> int:
        """Bytes of the client's fed so far."""
        return self._received

    @property
    def leftover(self) -> bytes:
        """Bytes received after the head (a client may send frames before the 101)."""
        return self._leftover

    @property
    def fields(self) -> list[tuple[bytes, bytes]] | None:
        """The request's fields as (lower-case name, value), in order, when the strict parser
        read the head (no control character in any value, nothing for h11 to merge); None
        when h11 did: ``validate_request`` then lists them from the request."""
        return self._fields


_FIRST_REQUEST_BYTE = 0x21
"""No request line starts with a byte below this (a control byte, a space, a blank line):
h11 refuses such bytes before the head is complete, and so do we."""
_BLANK_LINE = re.compile(rb"\n\r?\n")
"""Where a head ends, as h11 finds it: the first empty line, whatever its line ends."""


def _bare_lf(buffer: bytearray, stop: int) -> HandshakeError:
    """The refusal of the first bare LF before ``stop``, which holds one (the error path: it
    may look at the bytes twice)."""
    at = buffer.find(b"\n")
    while buffer[at - 1] == 0x0D:  # the first byte is no LF: refused before the scan
        at = buffer.find(b"\n", at + 1, stop)
    line = buffer.count(b"\n", 0, at) + 1
    return HandshakeError(
        f"line {line} of the request head ends in a bare LF; HTTP/1.1 line ends are CRLF"
    )


def _bare_lf_end(buffer: bytearray) -> bool:
    """Whether a reply head may already have ended with bare LF line ends, which h11 accepts
    and the strict parser leaves to it (``\\r\\n\\r\\n`` was looked for first)."""
    return b"\n\n" in buffer or b"\n\r\n" in buffer


_REQUEST_LINE = re.compile(rb"GET ([!-~]+) HTTP/1\.1")


def _clean_request(head: bytes) -> tuple[h11.Request, list[tuple[bytes, bytes]] | None] | None:
    """The request of a plainly well-formed GET head (without its final blank line) and its
    (lower-case name, value) fields (None when h11 merges or rewrites some: Content-Length,
    Transfer-Encoding), or None for anything else, which h11 then judges from the first byte.

    ``_parsed=True`` tells h11 its own parser checked the names and values (it then skips two
    regular expressions a field, most of a handshake's parsing time); ``_FIELD`` and
    ``_REQUEST_LINE`` accept a subset of what h11's parser does, and h11 still lower-cases
    the names and checks Host and the framing headers."""
    lines = head.split(b"\r\n")
    line = _REQUEST_LINE.fullmatch(lines[0])
    if line is None:
        return None
    fields = _clean_fields(lines[1:])
    if fields is None:
        return None
    try:
        request = h11.Request(
            method=b"GET", target=line[1], headers=fields, http_version=b"1.1", _parsed=True
        )
    except h11.LocalProtocolError:
        return None
    lowered = [(name.lower(), value) for name, value in fields]
    for name, _ in lowered:
        if name in _NORMALISED_BY_H11:
            return request, None
    return request, lowered


_NORMALISED_BY_H11 = frozenset({b"content-length", b"transfer-encoding"})
"""Fields h11 may merge (repeated equal Content-Lengths) or rewrite (lower-cased
Transfer-Encoding): a request with one is listed from h11's view, to stay aligned with it."""


@dataclass(frozen=True, slots=True)
class ReplyProgress:
    """What to do after feeding backend bytes."""

    forward: bytes = b""
    """Raw backend bytes to pass to the client now, verbatim."""
    status: int | None = None
    """The final status once the reply head is complete."""
    switched: bool = False
    """A valid 101 arrived: open the tunnel; ``leftover`` goes to the client after ``forward``."""
    complete: bool = False
    """A refusal has been relayed in full: close the connection."""
    leftover: bytes = b""


class BackendReply:
    """Sends the rewritten request and follows the backend's reply.

    A 101 is checked against the requested token and key, then forwarded verbatim; any other
    final response is forwarded verbatim, body included, and ends the connection. Interim 1xx
    responses other than 101 are consumed.

    The common case, a well-formed 101 head, is recognised by a strict parser of its own:
    building h11's client state machine costs more than the rest of the handshake together.
    Anything else (a refusal, an interim response, bare LF line ends, a malformed line) is
    handed, from its first byte, to an h11 client connection, which frames bodies and reports
    protocol errors.
    """

    def __init__(
        self,
        request: ForwardRequest | h11.Request,
        token: str,
        websocket_key: str | None,
        max_head_bytes: int,
    ) -> None:
        if isinstance(request, h11.Request):
            request = ForwardRequest.from_h11(request)
        self._request = request
        self._token = token
        self._key = websocket_key
        self._max_head = max_head_bytes
        self._head = bytearray()
        self._conn: h11.Connection | None = None
        self._pending = bytearray()
        self._status: int | None = None
        self.request_bytes = request.to_bytes()

    def feed(self, data: bytes) -> ReplyProgress:
        """Feed backend bytes (``b""`` for EOF).

        Raises:
            BadBackendResponse: 502, the reply is not HTTP, the backend closed before a complete
                head, or the 101 does not match the request.
        """
        if self._conn is not None:
            return self._feed_h11(data)
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end >= 0:
            fields = _clean_switch(bytes(self._head[:end])) if end < self._max_head else None
            if fields is not None:
                check_switch_headers(fields, self._token, self._key)
                self._status = 101
                head = bytes(self._head[: end + 4])
                return ReplyProgress(
                    head, 101, switched=True, leftover=bytes(self._head[end + 4 :])
                )
        elif data and len(self._head) <= self._max_head and not _bare_lf_end(self._head):
            return ReplyProgress()
        return self._hand_to_h11(eof=not data)

    def _hand_to_h11(self, *, eof: bool) -> ReplyProgress:
        self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=self._max_head)
        self._conn.send(self._request.to_h11())
        self._conn.send(h11.EndOfMessage())
        received, self._head = bytes(self._head), bytearray()
        progress = self._feed_h11(received)
        if not eof or progress.complete or progress.switched:
            return progress
        rest = self._feed_h11(b"")
        return dataclasses.replace(rest, forward=progress.forward + rest.forward)

    def _feed_h11(self, data: bytes) -> ReplyProgress:
        assert self._conn is not None
        self._pending += data
        self._conn.receive_data(data)
        forward = bytearray()
        while True:
            try:
                event = self._conn.next_event()
            except h11.RemoteProtocolError as exc:
                if not data and self._status is None:
                    # h11 reports an early EOF as a state error; say what happened instead.
                    raise BadBackendResponse(
                        "backend closed the connection before replying"
                    ) from exc
                raise BadBackendResponse(f"backend sent a malformed reply: {exc}") from exc
            consumed = len(self._pending) - len(self._conn.trailing_data[0])
            chunk = bytes(self._pending[:consumed])
            del self._pending[:consumed]
            if event is h11.NEED_DATA or event is h11.PAUSED:
                if event is h11.PAUSED and self._status == 101:
                    return ReplyProgress(
                        bytes(forward), 101, switched=True, leftover=bytes(self._pending)
                    )
                if self._status is not None:
                    forward += chunk
                return ReplyProgress(bytes(forward), self._status)
            if isinstance(event, h11.InformationalResponse):
                if event.status_code == 101:
                    check_switch(event, self._token, self._key)
                    self._status = 101
                    forward += chunk
                continue
            if isinstance(event, h11.ConnectionClosed):
                if self._status is None:
                    raise BadBackendResponse("backend closed the connection before replying")
                return ReplyProgress(bytes(forward), self._status, complete=True)
            if isinstance(event, h11.Response):
                self._status = event.status_code
            forward += chunk
            if isinstance(event, h11.EndOfMessage):
                return ReplyProgress(bytes(forward), self._status, complete=True)


_STATUS_101 = re.compile(rb"HTTP/1\.1 101(?: [\t -~\x80-\xff]*)?")
_FIELD = re.compile(
    rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*((?:[!-~\x80-\xff]+(?:[ \t]+[!-~\x80-\xff]+)*)?)[ \t]*"
)
"""``name: value``: a token, then a value of visible bytes (and obs-text) with spaces or tabs
only between them, optional whitespace around it. No control byte but tab passes. Runs of
visible bytes are matched at once (a group per byte took half a head's parsing time)."""


def _clean_switch(head: bytes) -> list[tuple[bytes, bytes]] | None:
    """The (lower-case name, value) fields of a well-formed ``HTTP/1.1 101`` head (without its
    final blank line), or None for anything else, which h11 then judges."""
    lines = head.split(b"\r\n")
    fields = _clean_fields(lines[1:])
    if _STATUS_101.fullmatch(lines[0]) is None or fields is None:
        return None
    return [(name.lower(), value) for name, value in fields]


def _clean_fields(lines: list[bytes]) -> list[tuple[bytes, bytes]] | None:
    """(name as sent, value) of each ``name: value`` line, or None if any line is not one."""
    fields = []
    for line in lines:
        match = _FIELD.fullmatch(line)
        if match is None:
            return None
        fields.append((match[1], match[2]))
    return fields
