"""The sans-io conversations: how bytes arrive at ``RequestHead`` and ``BackendReply``.

Sizes, split reads, leftovers and EOF; what the head *says* is ``test_handshake``'s job.
"""

from __future__ import annotations

from functools import partial

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel.core.response import check_switch, websocket_accept
from tunnel.core.session import TLS_ON_PLAIN_PORT, BackendReply, ClientClosed, RequestHead
from tunnel.errors import BadBackendResponse, HandshakeError, HeadersTooLarge, UriTooLong

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
LIMIT = 1024


def head_of_size(size: int) -> bytes:
    """A valid upgrade request head of exactly ``size`` bytes (padded with one header)."""
    start = (
        "GET /chat HTTP/1.1\r\nHost: chat.example.com\r\nConnection: Upgrade\r\n"
        f"Upgrade: websocket\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n"
        "X-Pad: "
    ).encode()
    end = b"\r\n\r\n"
    pad = size - len(start) - len(end)
    assert pad >= 1
    return start + b"a" * pad + end


def feed_bytewise(head: RequestHead, data: bytes) -> h11.Request | None:
    request = None
    for i in range(len(data)):
        request = head.feed(data[i : i + 1])
        if request is not None:
            assert i == len(data) - 1, "the head completed before its last byte"
    return request


def test_head_at_the_limit_passes_in_one_feed() -> None:
    request = RequestHead(LIMIT).feed(head_of_size(LIMIT))
    assert request is not None
    assert request.target == b"/chat"


def test_head_at_the_limit_passes_byte_by_byte() -> None:
    assert feed_bytewise(RequestHead(LIMIT), head_of_size(LIMIT)) is not None


@pytest.mark.parametrize("size", [LIMIT + 1, 2 * LIMIT, 40 * LIMIT])
def test_head_over_the_limit_in_one_feed_is_431(size: int) -> None:
    with pytest.raises(HeadersTooLarge) as caught:
        RequestHead(LIMIT).feed(head_of_size(size))
    assert caught.value.status == 431
    assert f"larger than max_header_bytes ({LIMIT} bytes)" in caught.value.message


@pytest.mark.parametrize("size", [LIMIT + 1, 2 * LIMIT])
def test_head_over_the_limit_byte_by_byte_is_431(size: int) -> None:
    with pytest.raises(HeadersTooLarge) as caught:
        feed_bytewise(RequestHead(LIMIT), head_of_size(size))
    assert caught.value.status == 431
    assert f"({LIMIT} bytes)" in caught.value.message


def test_head_that_never_ends_is_431_without_buffering_forever() -> None:
    head = RequestHead(LIMIT)
    head.feed(b"GET /chat HTTP/1.1\r\nHost: a\r\nX-Pad: ")
    pieces = [b"a" * 64] * (4 * LIMIT // 64)
    with pytest.raises(HeadersTooLarge):
        feed_each(head, pieces)


def feed_each(head: RequestHead, pieces: list[bytes]) -> None:
    for piece in pieces:
        assert head.feed(piece) is None


def test_leftover_bytes_after_the_head_are_kept() -> None:
    frame = b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"  # RFC 6455 masked "Hello"
    head = RequestHead(LIMIT)
    request = head.feed(head_of_size(300) + frame)
    assert request is not None
    assert head.leftover == frame


def test_leftover_does_not_count_against_the_limit() -> None:
    head = RequestHead(LIMIT)
    assert head.feed(head_of_size(LIMIT) + b"x" * (4 * LIMIT)) is not None
    assert head.leftover == b"x" * (4 * LIMIT)


def test_no_leftover_when_the_head_ends_the_read() -> None:
    head = RequestHead(LIMIT)
    assert head.feed(head_of_size(300)) is not None
    assert head.leftover == b""


def test_head_split_across_reads() -> None:
    data = head_of_size(300)
    head = RequestHead(LIMIT)
    assert head.feed(data[:10]) is None
    assert head.feed(data[10:299]) is None
    assert head.feed(data[299:] + b"tail") is not None
    assert head.leftover == b"tail"


def test_eof_before_any_byte_is_client_closed() -> None:
    with pytest.raises(ClientClosed):
        RequestHead(LIMIT).feed(b"")


@pytest.mark.parametrize(
    "partial",
    [b"GET /chat HTTP/1.1\r\nHost: a\r\n", b"GET /ch", b"G", b"POST / HTTP/1.1\r\nHost:"],
)
def test_eof_in_the_middle_of_a_head_is_the_client_leaving(partial: bytes) -> None:
    """Nobody is left to read a 400: the handler logs a debug line instead of a refusal."""
    head = RequestHead(LIMIT)
    assert head.feed(partial) is None
    with pytest.raises(ClientClosed) as caught:
        head.feed(b"")
    assert caught.value.received == len(partial)


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"hello there\r\n\r\n", id="no-http-version"),
        pytest.param(b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", id="bad-header-line"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", id="nul-in-value"),
        pytest.param(b"GET / HTTP/1.1\r\n Host: a\r\n\r\n", id="leading-whitespace"),
        pytest.param(b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", id="double-space"),
    ],
)
def test_garbage_is_400(garbage: bytes) -> None:
    with pytest.raises(HandshakeError) as caught:
        RequestHead(LIMIT).feed(garbage)
    assert type(caught.value) is HandshakeError
    assert caught.value.status == 400
    assert "malformed request" in caught.value.message


@pytest.mark.parametrize(
    ("garbage", "words"),
    [
        (b"hello there\r\n\r\n", 'the request line is not "METHOD /path HTTP/1.1"'),
        (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", 'a header line is not "Name: value"'),
        (b"GET / HTTP/1.1\r\n Host: a\r\n\r\n", "first header line starts with a space"),
        (b"GET / HTTP/1.1\r\nX: a\r\n\r\n", "the Host header is missing"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "Host header is sent more than once"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", 'a header line is not "Name'),
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n", "Content-Length is not"),
    ],
)
def test_malformed_heads_are_described_in_words(garbage: bytes, words: str) -> None:
    """h11's own messages quote the bytes as Python reprs (``bytearray(b'...')``)."""
    with pytest.raises(HandshakeError) as caught:
        RequestHead(LIMIT).feed(garbage)
    assert caught.value.message == f"malformed request: {words}" or words in caught.value.message
    assert "bytearray" not in caught.value.message
    assert "b'" not in caught.value.message


@pytest.mark.parametrize("hello", [b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"\x16"])
def test_a_tls_client_hello_on_a_plain_port_is_named(hello: bytes) -> None:
    with pytest.raises(HandshakeError) as caught:
        RequestHead(LIMIT).feed(hello)
    assert caught.value.status == 400
    assert caught.value.message == TLS_ON_PLAIN_PORT
    assert "TLS handshake was sent to a plain (non-TLS) port" in TLS_ON_PLAIN_PORT


def request_line_of(length: int) -> bytes:
    """A request line (without its CRLF) of exactly ``length`` bytes."""
    prefix, suffix = b"GET /", b" HTTP/1.1"
    return prefix + b"a" * (length - len(prefix) - len(suffix)) + suffix


@pytest.mark.parametrize("line_length", [LIMIT + 1, 2 * LIMIT, 10 * LIMIT])
@pytest.mark.parametrize("bytewise", [False, True], ids=["one-feed", "bytewise"])
def test_a_request_line_over_the_limit_is_414(line_length: int, bytewise: bool) -> None:
    data = request_line_of(line_length) + b"\r\nHost: a\r\n\r\n"
    head = RequestHead(LIMIT)
    feed = partial(feed_bytewise, head) if bytewise else head.feed
    with pytest.raises(UriTooLong) as caught:
        feed(data)
    assert caught.value.status == 414
    assert f"request target is longer than max_header_bytes ({LIMIT} bytes)" in str(caught.value)


def test_a_request_line_that_never_ends_is_414() -> None:
    head = RequestHead(LIMIT)
    with pytest.raises(UriTooLong):
        feed_each(head, [b"GET /" + b"a" * 64] + [b"a" * 64] * (2 * LIMIT // 64))


def test_a_short_request_line_with_big_headers_stays_431() -> None:
    data = request_line_of(LIMIT // 2) + b"\r\nHost: a\r\nX-Pad: " + b"p" * LIMIT + b"\r\n\r\n"
    with pytest.raises(HeadersTooLarge) as caught:
        RequestHead(LIMIT).feed(data)
    assert caught.value.status == 431


# --- BackendReply: the request it sends and the way it reads ---------------------------------


def upgrade_request(target: bytes = b"/chat") -> h11.Request:
    return h11.Request(
        method="GET",
        target=target,
        headers=[
            ("Host", "chat.example.com"),
            ("Sec-WebSocket-Key", KEY),
            ("Sec-WebSocket-Version", "13"),
            ("Connection", "Upgrade"),
            ("Upgrade", "websocket"),
        ],
    )


SWITCH = (
    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    f"Sec-WebSocket-Accept: {websocket_accept(KEY)}\r\n\r\n"
).encode()


def test_request_bytes_are_the_head_without_a_body() -> None:
    reply = BackendReply(upgrade_request(), "websocket", KEY, 64 * 1024)
    assert reply.request_bytes.startswith(b"GET /chat HTTP/1.1\r\nHost: chat.example.com\r\n")
    assert reply.request_bytes.endswith(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in reply.request_bytes
    assert b"Content-Length" not in reply.request_bytes


def test_101_in_one_read_with_frames_behind_it() -> None:
    frame = b"\x81\x05Hello"
    reply = BackendReply(upgrade_request(), "websocket", KEY, 64 * 1024)
    progress = reply.feed(SWITCH + frame)
    assert progress.switched
    assert progress.status == 101
    assert progress.forward == SWITCH
    assert progress.leftover == frame


def test_101_byte_by_byte() -> None:
    reply = BackendReply(upgrade_request(), "websocket", KEY, 64 * 1024)
    forwarded = b""
    for i in range(len(SWITCH)):
        progress = reply.feed(SWITCH[i : i + 1])
        forwarded += progress.forward
        if i < len(SWITCH) - 1:
            assert progress.status is None
            assert not progress.switched
    assert progress.switched
    assert progress.leftover == b""
    assert forwarded == SWITCH


def test_nothing_is_forwarded_before_the_status_is_known() -> None:
    reply = BackendReply(upgrade_request(), "websocket", KEY, 64 * 1024)
    progress = reply.feed(SWITCH[:-1])
    assert progress.forward == b""
    assert progress.status is None


def test_backend_eof_before_any_reply_is_502() -> None:
    reply = BackendReply(upgrade_request(), "websocket", KEY, 64 * 1024)
    with pytest.raises(BadBackendResponse) as caught:
        reply.feed(b"")
    assert caught.value.status == 502
    assert "backend closed the connection before replying" in caught.value.message


def test_backend_eof_in_the_middle_of_the_head_is_502() -> None:
    reply = BackendReply(upgrade_request(), "websocket", KEY, 64 * 1024)
    reply.feed(SWITCH[:20])
    with pytest.raises(BadBackendResponse) as caught:
        reply.feed(b"")
    assert caught.value.status == 502
    assert "backend closed the connection before replying" in caught.value.message


def test_backend_eof_after_a_100_continue_is_502() -> None:
    reply = BackendReply(upgrade_request(), "websocket", KEY, 64 * 1024)
    assert reply.feed(b"HTTP/1.1 100 Continue\r\n\r\n").status is None
    with pytest.raises(BadBackendResponse, match="before replying"):
        reply.feed(b"")


def test_backend_head_over_the_limit_is_502() -> None:
    reply = BackendReply(upgrade_request(), "websocket", KEY, 1024)
    with pytest.raises(BadBackendResponse) as caught:
        reply.feed(b"HTTP/1.1 101 Switching Protocols\r\nX-Pad: " + b"a" * 2048)
    assert caught.value.status == 502


def test_truncated_body_of_a_refusal_is_502() -> None:
    reply = BackendReply(upgrade_request(), "websocket", KEY, 64 * 1024)
    progress = reply.feed(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 10\r\n\r\nabc")
    assert progress.status == 403
    assert not progress.complete
    with pytest.raises(BadBackendResponse, match="malformed reply"):
        reply.feed(b"")


# The fast 101 path against h11 as the oracle --------------------------------------------------

FIELD_NAMES = st.sampled_from(
    [
        "Upgrade",
        "upgrade",
        "UPGRADE",
        "Connection",
        "connection",
        "Sec-WebSocket-Accept",
        "sec-websocket-accept",
        "Server",
        "X-Y",
        "Bad Name",
        "Bad:Name",
        "",
    ]
)
FIELD_VALUES = st.sampled_from(
    [
        "websocket",
        "WebSocket",
        "h2c",
        "Upgrade",
        "upgrade, keep-alive",
        "keep-alive",
        websocket_accept(KEY),
        "wrong",
        "",
        " padded ",
        "a\tb",
        "caf\xe9",
        "x\x00y",
        "x\ry",
    ]
)
FIELD_SEPARATORS = st.sampled_from([": ", ":", ":  ", ": \t", " : "])
STATUS_LINES = st.sampled_from(
    [
        "HTTP/1.1 101 Switching Protocols",
        "HTTP/1.1 101 Switching Protocols",
        "HTTP/1.1 101 Switching Protocols",
        "HTTP/1.1 101",
        "HTTP/1.1 101 ",
        "HTTP/1.0 101 x",
        "HTTP/1.1 1010 x",
        "http/1.1 101 x",
        "HTTP/1.1 200 OK",
        "HTTP/1.1 101 Sw\x01",
    ]
)
LINE_ENDS = st.sampled_from(["\r\n", "\r\n", "\r\n", "\n"])


@st.composite
def reply_heads(draw: st.DrawFn) -> bytes:
    """A backend reply head, usually a plausible 101, sometimes slightly broken."""
    end = draw(LINE_ENDS)
    fields = [
        draw(FIELD_NAMES) + draw(FIELD_SEPARATORS) + draw(FIELD_VALUES)
        for _ in range(draw(st.integers(min_value=0, max_value=4)))
    ]
    if draw(st.booleans()):
        fields += [
            draw(st.sampled_from(["Upgrade", "upgrade"])) + draw(FIELD_SEPARATORS) + "websocket",
            draw(st.sampled_from(["Connection", "CONNECTION"]))
            + draw(FIELD_SEPARATORS)
            + draw(st.sampled_from(["Upgrade", "keep-alive, upgrade"])),
            "Sec-WebSocket-Accept" + draw(FIELD_SEPARATORS) + websocket_accept(KEY),
        ]
    lines = [draw(STATUS_LINES), *draw(st.permutations(fields))]
    return (end.join(lines) + end + end).encode("latin-1")


def h11_verdict(head: bytes) -> bool | None:
    """True when h11 reads ``head`` as a 101 that passes ``check_switch``, False when it reads
    a 101 that fails the check, None when it does not read a valid 101 at all."""
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * 1024)
    conn.send(upgrade_request())
    conn.send(h11.EndOfMessage())
    conn.receive_data(head)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return None
    if not isinstance(event, h11.InformationalResponse) or event.status_code != 101:
        return None
    try:
        check_switch(event, "websocket", KEY)
    except BadBackendResponse:
        return False
    return True


@settings(max_examples=400, deadline=None)
@given(head=reply_heads(), tail=st.binary(max_size=8))
def test_a_101_is_judged_as_h11_judges_it(head: bytes, tail: bytes) -> None:
    verdict = h11_verdict(head)
    reply = BackendReply(upgrade_request(), "websocket", KEY, 64 * 1024)
    try:
        progress = reply.feed(head + tail)
    except BadBackendResponse:
        assert verdict is not True, "a 101 that h11 accepts was refused"
        return
    if progress.switched:
        assert verdict is True, "a reply that h11 does not accept as a 101 opened a tunnel"
        assert progress.forward == head
        assert progress.leftover == tail
    else:
        assert verdict is None


# The fast request path against h11 as the oracle ----------------------------------------------

REQUEST_LINES = st.sampled_from(
    [
        "GET /chat HTTP/1.1",
        "GET /chat HTTP/1.1",
        "GET /a?b=c&d HTTP/1.1",
        "GET http://chat.example.com/x HTTP/1.1",
        "GET  /chat HTTP/1.1",
        "GET /chat HTTP/1.0",
        "GET /ch at HTTP/1.1",
        "get /chat HTTP/1.1",
        "POST /chat HTTP/1.1",
        "GET /chat\x00 HTTP/1.1",
        "GET /caf\xe9 HTTP/1.1",
    ]
)
REQUEST_FIELDS = st.sampled_from(
    [
        "Host: chat.example.com",
        "host:chat.example.com",
        "Host: other.example.com",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {KEY}",
        "Sec-WebSocket-Version: 13",
        "Content-Length: 0",
        "Content-Length: 5",
        "Content-Length: x",
        "Transfer-Encoding: chunked",
        "Transfer-Encoding: gzip",
        "X-Empty:",
        "X-Spaces:   a b   ",
        "X-Tab:\tv",
        " obs-fold",
        "No-Colon",
        "Bad Name: v",
        "X-Ctl: a\x01b",
        "X-Latin: caf\xe9",
    ]
)


@st.composite
def request_heads(draw: st.DrawFn) -> bytes:
    end = draw(LINE_ENDS)
    fields = draw(st.lists(REQUEST_FIELDS, max_size=7))
    if draw(st.booleans()):
        fields = ["Host: chat.example.com", *fields]
    lines = [draw(REQUEST_LINES), *fields]
    return (end.join(lines) + end + end).encode("latin-1")


def h11_request(data: bytes) -> h11.Request | type[h11.RemoteProtocolError] | None:
    """What h11 alone makes of ``data``: the request, the error class, or None (needs more)."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
    conn.receive_data(data)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return h11.RemoteProtocolError
    return event if isinstance(event, h11.Request) else None


@settings(max_examples=500, deadline=None)
@given(head=request_heads(), tail=st.binary(max_size=8))
def test_a_request_head_is_read_as_h11_reads_it(head: bytes, tail: bytes) -> None:
    # With allow_bare_lf the reader is exactly as lenient as h11; without it, it refuses
    # what has a bare LF line end and reads the rest as h11 does.
    expected = h11_request(head + tail)
    if b"\n" in head.replace(b"\r\n", b""):
        with pytest.raises(HandshakeError, match="bare LF"):
            RequestHead(64 * 1024).feed(head + tail)
    reader = RequestHead(64 * 1024, allow_bare_lf=True)
    try:
        request = reader.feed(head + tail)
    except HandshakeError:
        assert expected is h11.RemoteProtocolError, "a head that h11 accepts was refused"
        return
    assert isinstance(expected, h11.Request), "a head that h11 refuses was accepted"
    assert request is not None
    assert (request.method, request.target, request.http_version) == (
        expected.method,
        expected.target,
        expected.http_version,
    )
    assert request.headers.raw_items() == expected.headers.raw_items()
    assert reader.leftover == tail


def test_a_head_ending_in_lf_then_crlf_is_read_at_once() -> None:
    # h11 accepts mixed line ends; waiting for a CRLF CRLF that never comes would stall to 408.
    request = RequestHead(LIMIT, allow_bare_lf=True).feed(b"GET /chat HTTP/1.1\r\nHost: a\n\r\n")
    assert request is not None
    assert request.target == b"/chat"
    with pytest.raises(HandshakeError, match=r"line 2 .* bare LF"):
        RequestHead(LIMIT).feed(b"GET /chat HTTP/1.1\r\nHost: a\n\r\n")
