"""The request head reader's hardening: bare LF line ends refused (unless ``allow_bare_lf``),
at most ``max_headers`` field lines, and a cost linear in the head's size however the reads
cut it.

Table-driven and pure: build a valid head, break one thing, check the status and the message.
"""

from __future__ import annotations

import time

import pytest

from tunnel.core.session import ClientClosed, RequestHead
from tunnel.errors import HandshakeError, HeadersTooLarge, TooManyHeaders

LIMIT = 32 * 1024
KEY = "dGhlIHNhbXBsZSBub25jZQ=="
HEAD = (
    "GET /chat HTTP/1.1\r\nHost: chat.example.com\r\nUpgrade: websocket\r\n"
    f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
).encode()
LINE_ENDS = [i for i in range(len(HEAD)) if HEAD[i : i + 2] == b"\r\n"]
"""Where each CRLF of ``HEAD`` starts: the request line's first, the blank line's last."""
FIELDS = HEAD.count(b"\r\n") - 2
REFUSALS = 20
REFUSALS_SECONDS = 0.05
"""CPU seconds (this process's: a busy machine does not count) for ``REFUSALS`` refusals of the
5,000-field head: about 2 ms measured, and 180 ms when every field was parsed."""
BYTEWISE_SECONDS = 0.4
"""CPU seconds for that head read a byte at a time: 0.07 s measured, and 0.83 s when every
read searched the whole buffer again."""


def with_bare_lf(at: int) -> bytes:
    """``HEAD`` with the CR of the line end at ``at`` removed."""
    return HEAD[:at] + HEAD[at + 1 :]


def feed_bytewise(reader: RequestHead, data: bytes) -> object:
    for i in range(len(data)):
        request = reader.feed(data[i : i + 1])
        if request is not None:
            return request
    return None


def with_fields(count: int, field: bytes = b"a:b") -> bytes:
    """A valid upgrade head with ``count`` field lines in all (``HEAD``'s and tiny ones)."""
    assert count >= FIELDS
    return HEAD[:-2] + (field + b"\r\n") * (count - FIELDS) + b"\r\n"


# --- bare LF -----------------------------------------------------------------------------------


def line_of(at: int) -> int:
    return HEAD.count(b"\n", 0, at) + 1


@pytest.mark.parametrize("at", LINE_ENDS, ids=lambda at: f"line-{line_of(at)}")
def test_a_bare_lf_ending_any_line_is_400_naming_the_line(at: int) -> None:
    line = line_of(at)
    data = with_bare_lf(at)
    for reader, feed in (
        (RequestHead(LIMIT), lambda r: r.feed(data)),
        (RequestHead(LIMIT, allow_bare_lf=False), lambda r: r.feed(data)),
        (RequestHead(LIMIT), lambda r: feed_bytewise(r, data)),
    ):
        with pytest.raises(HandshakeError) as raised:
            feed(reader)
        assert type(raised.value) is HandshakeError
        assert raised.value.status == 400
        assert raised.value.message == (
            f"line {line} of the request head ends in a bare LF; HTTP/1.1 line ends are CRLF"
        )


@pytest.mark.parametrize("at", LINE_ENDS)
def test_allow_bare_lf_reads_the_head_as_h11_does(at: int) -> None:
    expected = RequestHead(LIMIT).feed(HEAD)
    assert expected is not None
    for data in (with_bare_lf(at), HEAD.replace(b"\r\n", b"\n")):
        reader = RequestHead(LIMIT, allow_bare_lf=True)
        request = reader.feed(data + b"\x81\x00")
        assert request is not None
        assert request.headers.raw_items() == expected.headers.raw_items()
        assert reader.leftover == b"\x81\x00"


def test_the_two_fields_of_a_bare_lf_are_refused_not_forwarded() -> None:
    # nginx, HAProxy and Caddy forward X-A and X-B as two fields; h11 does too.
    data = HEAD[:-2] + b"X-A: 1\nX-B: 2\r\n\r\n"
    with pytest.raises(HandshakeError, match=r"line 7 .* bare LF"):
        RequestHead(LIMIT).feed(data)
    request = RequestHead(LIMIT, allow_bare_lf=True).feed(data)
    assert request is not None
    assert request.headers.raw_items()[-2:] == [(b"X-A", b"1"), (b"X-B", b"2")]


def test_a_bare_lf_is_refused_as_soon_as_it_arrives() -> None:
    reader = RequestHead(LIMIT)
    assert reader.feed(b"GET /chat HTTP/1.1\r\nHost: a\r\n") is None
    with pytest.raises(HandshakeError, match=r"line 3 .* bare LF"):
        reader.feed(b"X-A: 1\n")


def test_a_crlf_cut_between_reads_is_no_bare_lf() -> None:
    reader = RequestHead(LIMIT)
    cut = LINE_ENDS[2] + 1
    assert reader.feed(HEAD[:cut]) is None
    assert reader.feed(HEAD[cut:]) is not None


@pytest.mark.parametrize("after", [b"\n", b"x\ny\n\n", b"\x81\x82\n\r\n"])
def test_a_bare_lf_after_the_head_is_not_the_heads(after: bytes) -> None:
    reader = RequestHead(LIMIT)
    assert reader.feed(HEAD + after) is not None
    assert reader.leftover == after


def test_a_bare_lf_of_a_request_that_is_not_get_is_refused_too() -> None:
    with pytest.raises(HandshakeError, match=r"line 1 .* bare LF"):
        RequestHead(LIMIT).feed(b"POST /x HTTP/1.1\nHost: a\r\n\r\n")


# --- max_headers -------------------------------------------------------------------------------


@pytest.mark.parametrize("allow_bare_lf", [False, True])
def test_exactly_max_headers_fields_is_read_and_one_more_is_431(allow_bare_lf: bool) -> None:
    request = RequestHead(LIMIT, allow_bare_lf=allow_bare_lf).feed(with_fields(100))
    assert request is not None
    assert len(request.headers) == 100
    for reader, feed in (
        (RequestHead(LIMIT, allow_bare_lf=allow_bare_lf), RequestHead.feed),
        (RequestHead(LIMIT, allow_bare_lf=allow_bare_lf), feed_bytewise),
    ):
        with pytest.raises(TooManyHeaders) as raised:
            feed(reader, with_fields(101))
        assert raised.value.status == 431
        assert isinstance(raised.value, HeadersTooLarge)
        assert raised.value.message == (
            "request head has more than max_headers (100) header fields"
        )


@pytest.mark.parametrize("limit", [1, 6, 250])
def test_max_headers_is_the_readers_own(limit: int) -> None:
    fields = max(limit, FIELDS)
    assert RequestHead(LIMIT, max_headers=fields).feed(with_fields(fields)) is not None
    with pytest.raises(TooManyHeaders, match=rf"max_headers \({fields}\)"):
        RequestHead(LIMIT, max_headers=fields).feed(with_fields(fields + 1))


def test_a_head_over_max_headers_is_refused_before_it_ends() -> None:
    reader = RequestHead(LIMIT)
    assert reader.feed(with_fields(100)[:-2]) is None
    with pytest.raises(TooManyHeaders):
        reader.feed(b"a:b\r\n")


def test_too_many_fields_of_a_request_that_is_not_get_is_431_too() -> None:
    with pytest.raises(TooManyHeaders):
        RequestHead(LIMIT).feed(b"POST" + with_fields(101)[3:])


def test_a_half_head_at_eof_is_the_client_leaving_not_a_count() -> None:
    reader = RequestHead(LIMIT)
    assert reader.feed(with_fields(100)[:-2]) is None
    with pytest.raises(ClientClosed):
        reader.feed(b"")


# --- cost --------------------------------------------------------------------------------------

TINY_FIELDS = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X:1\r\n" * 5000 + b"\r\n"


def test_five_thousand_tiny_fields_are_431_at_once() -> None:
    assert 25_000 < len(TINY_FIELDS) < LIMIT
    started = time.process_time()
    for _ in range(REFUSALS):
        with pytest.raises(TooManyHeaders):
            RequestHead(LIMIT).feed(TINY_FIELDS)
    assert time.process_time() - started < REFUSALS_SECONDS


def test_a_head_read_a_byte_at_a_time_costs_its_size_not_its_square() -> None:
    reader = RequestHead(LIMIT, max_headers=10_000)
    started = time.process_time()
    request = feed_bytewise(reader, TINY_FIELDS)
    assert time.process_time() - started < BYTEWISE_SECONDS
    assert request is not None
    assert len(request.headers) == 5001


@pytest.mark.parametrize("start", [b"\n", b"\r\n", b" GET", b"\x00"])
def test_bytes_no_request_line_starts_with_are_refused_at_once_by_h11(start: bytes) -> None:
    # Before any bare LF or field count: h11 refuses them without waiting for the head's end.
    with pytest.raises(HandshakeError) as raised:
        RequestHead(LIMIT).feed(start)
    assert type(raised.value) is HandshakeError
    assert "bare LF" not in raised.value.message
