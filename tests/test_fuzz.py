"""Bounded fuzzing of the rule "any bytes either parse or raise a documented error".

Client bytes end in a request or a ``HandshakeError`` (or ``ClientClosed`` on an empty EOF);
a request that passes validation can always be rewritten and sent. Backend bytes end in a
progress report or a ``BadBackendResponse``, and what is forwarded is always the backend's own
bytes, untouched.
"""

from __future__ import annotations

import itertools

import h11
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunnel.core.handshake import (
    UpgradeRequest,
    check_websocket,
    choose_upgrade,
    validate_request,
)
from tunnel.core.response import error_response, websocket_accept
from tunnel.core.rewrite import Forwarding, rewrite_request
from tunnel.core.session import BackendReply, ClientClosed, RequestHead
from tunnel.errors import BadBackendResponse, HandshakeError, TunnelError

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
LIMIT = 1024
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

REQUEST_PARTS = [
    b"GET ",
    b"POST ",
    b"get ",
    b"/chat?room=1",
    b"http://a/x",
    b"ws://b:80/",
    b"http://[::1/",
    b"*",
    b" HTTP/1.1",
    b" HTTP/1.0",
    b" HTTP/2.0",
    b"\r\n",
    b"\n",
    b"\r\n\r\n",
    b"Host: a",
    b"Host: [::1]:80",
    b"Connection: Upgrade",
    b"Connection: keep-alive, upgrade, X-Drop",
    b"Upgrade: websocket",
    b"Upgrade: mqtt, h2c",
    b"Sec-WebSocket-Key: " + KEY.encode(),
    b"Sec-WebSocket-Key: \xff\xfe==",
    b"Sec-WebSocket-Version: 13",
    b"Sec-WebSocket-Version: 8, 13",
    b"Content-Length: 5",
    b"Content-Length: 0",
    b"Transfer-Encoding: chunked",
    b"X-Forwarded-For: 1.2.3.4, \xe9",
    b"X-Forwarded-Host: \xff",
    b"X-Drop: 1",
    b":",
    b",",
    b" ",
    b"\t",
    b"\x00",
    b"\xff",
]

VALID_LINES = [
    b"Host: a.example",
    b"Connection: keep-alive, Upgrade",
    b"Upgrade: websocket",
    b"Sec-WebSocket-Key: " + KEY.encode(),
    b"Sec-WebSocket-Version: 13",
    b"Sec-WebSocket-Protocol: chat",
    b"X-Forwarded-For: 10.0.0.1",
]


TARGETS = [
    b"/chat?room=1",
    b"http://a.example/x",
    b"ws://A.EXAMPLE",
    b"http://other.example/",
    b"http://[::1/",
    b"ws://[",
    b"http://a.example:99999/",
    b"*",
    b"a.example:443",
    b"//x",
    b"http:///x",
]


@st.composite
def mutated_request(draw: st.DrawFn) -> bytes:
    """A valid upgrade request with lines dropped, repeated or replaced, and noise added."""
    line = st.one_of(
        st.sampled_from(VALID_LINES),
        st.binary(max_size=24),
        st.lists(st.sampled_from(REQUEST_PARTS), max_size=4).map(b"".join),
    )
    method = draw(st.sampled_from([b"GET"] * 4 + [b"POST", b"get"]))
    noise = st.binary(min_size=1, max_size=12).filter(lambda b: not any(c in b" \r\n" for c in b))
    target = draw(st.one_of(st.sampled_from(TARGETS), st.sampled_from(TARGETS), noise))
    version = draw(st.sampled_from([b"HTTP/1.1"] * 4 + [b"HTTP/1.0", b"HTTP/9.9"]))
    first = b" ".join([method, target, version])
    lines = []
    for valid in VALID_LINES:
        action = draw(st.sampled_from(["keep"] * 7 + ["drop", "twice", "replace"]))
        if action != "drop":
            lines.append(draw(line) if action == "replace" else valid)
        if action == "twice":
            lines.append(valid)
    for extra in draw(st.lists(line, max_size=3)):
        lines.insert(draw(st.integers(0, len(lines))), extra)
    return b"\r\n".join([first, *lines]) + b"\r\n\r\n" + draw(st.binary(max_size=8))


CLIENT_BYTES = st.one_of(
    mutated_request(),
    mutated_request(),
    st.binary(max_size=200),
    st.lists(st.one_of(st.sampled_from(REQUEST_PARTS), st.binary(max_size=8)), max_size=40).map(
        b"".join
    ),
)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """Cut ``data`` at the given positions into non-empty pieces (empty means EOF)."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


Accepted = tuple[UpgradeRequest, str, str | None, bytes]


def run_client(head: RequestHead, pieces: list[bytes]) -> Accepted | TunnelError | ClientClosed:
    """The handler's pure pipeline; returns the accepted request (and the bytes fed until it
    arrived) or the error it raised."""
    fed = b""
    try:
        for piece in pieces:
            fed += piece
            request = head.feed(piece)
            if request is not None:
                upgrade = validate_request(request)
                token = choose_upgrade(upgrade, ("websocket", "mqtt"))
                key = check_websocket(request) if token == "websocket" else None
                return upgrade, token, key, fed
    except (TunnelError, ClientClosed) as exc:
        return exc
    raise NeedMoreData


class NeedMoreData(Exception):
    """The bytes so far are a valid beginning of a request head."""


@FUZZ
@given(data=CLIENT_BYTES, cuts=st.lists(st.integers(min_value=0), max_size=6), eof=st.booleans())
def test_client_bytes_parse_or_raise_a_documented_error(
    data: bytes, cuts: list[int], eof: bool
) -> None:
    head = RequestHead(LIMIT)
    try:
        outcome = run_client(head, split(data, cuts) + ([b""] if eof else []))
    except NeedMoreData:
        assert not eof, "EOF always ends the head: a request or an error"
        return
    if isinstance(outcome, ClientClosed):
        assert eof, "ClientClosed is only for EOF before the head is complete"
        assert outcome.received == len(data)
    elif isinstance(outcome, TunnelError):
        assert isinstance(outcome, HandshakeError)
        assert outcome.status in {400, 405, 414, 426, 431}
        assert error_response(outcome).startswith(f"HTTP/1.1 {outcome.status} ".encode())
    else:
        upgrade, token, key, fed = outcome
        assert fed.endswith(head.leftover), "leftover is what followed the head, untouched"
        assert len(fed) - len(head.leftover) <= LIMIT
        # Whatever passes validation can be rewritten and sent to a backend.
        hop = Forwarding(peer_ip="192.0.2.1", path_prefix="/", backend_path="/b/")
        rewritten = rewrite_request(upgrade, token, hop)
        assert h11.Connection(h11.CLIENT).send(rewritten.to_h11()) == rewritten.to_bytes()
        assert BackendReply(rewritten, token, key, LIMIT).request_bytes.startswith(b"GET /b/")


SWITCH = (
    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    f"Sec-WebSocket-Accept: {websocket_accept(KEY)}\r\n\r\n"
).encode()

REPLY_PARTS = [
    SWITCH,
    b"HTTP/1.1 101 Switching Protocols\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 403 Forbidden\r\n",
    b"HTTP/1.0 200 OK\r\n",
    b"HTTP/1.1 200 OK\r\n",
    b"Upgrade: websocket\r\n",
    b"Upgrade: h2c\r\n",
    b"Connection: Upgrade\r\n",
    b"Sec-WebSocket-Accept: " + websocket_accept(KEY).encode() + b"\r\n",
    b"Content-Length: 3\r\n",
    b"Content-Length: x\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"\r\n",
    b"3\r\nabc\r\n",
    b"0\r\n\r\n",
    b"zz\r\n",
    b"\x81\x02hi",
    b"\x00",
]

BACKEND_BYTES = st.one_of(
    st.binary(max_size=200),
    st.lists(st.one_of(st.sampled_from(REPLY_PARTS), st.binary(max_size=8)), max_size=12).map(
        b"".join
    ),
)


@FUZZ
@given(data=BACKEND_BYTES, cuts=st.lists(st.integers(min_value=0), max_size=6), eof=st.booleans())
def test_backend_bytes_progress_or_raise_bad_backend_response(
    data: bytes, cuts: list[int], eof: bool
) -> None:
    request = h11.Request(
        method="GET",
        target="/chat",
        headers=[("Host", "a"), ("Connection", "Upgrade"), ("Upgrade", "websocket")],
    )
    reply = BackendReply(request, "websocket", KEY, LIMIT)
    pieces = split(data, cuts) + ([b""] if eof else [])
    forwarded = b""
    error: BadBackendResponse | None = None
    try:
        for piece in pieces:
            progress = reply.feed(piece)
            forwarded += progress.forward
            if progress.switched:
                forwarded += progress.leftover
            if progress.switched or progress.complete:
                break
    except BadBackendResponse as exc:
        error = exc
    if error is not None:
        assert error.status == 502
    assert forwarded in data, "only the backend's own bytes, in order, reach the client"
