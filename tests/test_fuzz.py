"""Bounded fuzzing of the rule "any bytes either parse or raise a documented error".

Client bytes end in a request or a ``HandshakeError`` (or ``ClientClosed`` on an empty EOF);
a request that passes validation can always be rewritten and sent. Backend bytes end in a
progress report or a ``BadBackendResponse``, and what is forwarded is always the backend's own
bytes, untouched.

Near-valid request heads (a real WebSocket upgrade with look-alike, duplicated or re-cased
fields, bare LF or CR line ends, obs-folds, NUL and 0x7f-0xff bytes, thousands of tiny fields)
get the same verdict however the reads cut them, and ``RequestHead`` accepts only what h11
accepts, as h11 reads it, refusing besides a bare LF (unless ``allow_bare_lf``) and more than
``max_headers`` fields.

CI runs a few hundred examples per test; a longer run of every fuzz file is one command::

    TUNNEL_FUZZ_EXAMPLES=20000 python -m pytest -q -p no:cacheprovider tests/test_fuzz*.py
"""

from __future__ import annotations

import itertools

import h11
import pytest
from conftest import fuzz_settings
from hypothesis import given
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
FUZZ = fuzz_settings(300)

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
                assert_fast_fields_agree(head, request)
                upgrade = validate_request(request, head.fields)
                token = choose_upgrade(upgrade, ("websocket", "mqtt"))
                key = check_websocket(request, upgrade.fields) if token == "websocket" else None
                return upgrade, token, key, fed
    except (TunnelError, ClientClosed) as exc:
        return exc
    raise NeedMoreData


def assert_fast_fields_agree(head: RequestHead, request: h11.Request) -> None:
    """Where the strict parser lists the fields itself (``RequestHead.fields``), the list is
    the one h11's view gives, and validating with it gets the verdict validating without it
    does (control characters included)."""
    if head.fields is None:
        return
    assert head.fields == list(request.headers)

    def verdict(fields: list[tuple[bytes, bytes]] | None) -> object:
        try:
            return validate_request(request, fields)
        except TunnelError as exc:
            return (exc.status, exc.message)

    assert verdict(head.fields) == verdict(None)


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


# --- near-valid request heads -------------------------------------------------------------------

BIG = 64 * 1024


UPGRADE_HEAD = [
    (b"Host", b"a.example"),
    (b"Upgrade", b"websocket"),
    (b"Connection", b"Upgrade"),
    (b"Sec-WebSocket-Key", KEY.encode()),
    (b"Sec-WebSocket-Version", b"13"),
]
LOOK_ALIKES = {
    b"Host": [b"host", b"HOST", b"Ho_st", b"Host ", b" Host", b"Host\t", b"X-Host", b"Hos"],
    b"Upgrade": [b"upgrade", b"UPGRADE", b"Up_grade", b"Upgrade ", b"Upgrades", b"X-Upgrade"],
    b"Connection": [b"connection", b"CONNECTION", b"Conn_ection", b"Proxy-Connection"],
    b"Sec-WebSocket-Key": [
        b"sec-websocket-key",
        b"SEC-WEBSOCKET-KEY",
        b"Sec_WebSocket_Key",
        b"Sec-WebSocket_Key",
        b"Sec-WebSocket-Key2",
    ],
    b"Sec-WebSocket-Version": [b"sec-websocket-version", b"Sec_WebSocket_Version"],
}
OTHER_VALUES = {
    b"Host": [b"", b"b.example", b"a.example:99999", b"[::1]", b"a.example, b.example", b"a b"],
    b"Upgrade": [b"WebSocket", b"websocket, h2c", b"h2c", b"", b"web socket", b"websocket/13"],
    b"Connection": [b"upgrade, close", b"keep-alive", b"", b"Upgrade, Upgrade", b"close"],
    b"Sec-WebSocket-Key": [b"", b"short", KEY.encode() + b"=", KEY.encode().lower(), b"\xff=="],
    b"Sec-WebSocket-Version": [b"8", b"13, 8", b"", b"013", b"13 "],
}
ODD_LINE_ENDS = [b"\n", b"\r", b"\r\r\n", b"\n\r", b"\r\n ", b"\r\n\t", b""]
"""A line end mistyped; ``\\r\\n `` and ``\\r\\n\\t`` make the next line an obs-fold."""
ODD_BYTES = [b"\x00", b"\x7f", b"\x80", b"\xff", b"\r", b"\n", b"\t", b" ", b":", b"\r\n"]
REQUEST_LINE_VARIANTS = [
    b"get ",
    b"GET  ",
    b"GET\t",
    b"/",
    b"*",
    b"http://a.example/x",
    b"/\xff",
    b"/a b",
    b"",
    b" HTTP/1.0",
    b" HTTP/1.1 ",
    b" http/1.1",
    b"",
]


MUTATIONS = ["alike", "value", "twice", "drop", "fold", "colon", "end", "byte", "line", "many"]


@st.composite
def near_valid_head(draw: st.DrawFn, *, many: bool = True) -> bytes:
    """A WebSocket upgrade head broken in up to three places a real client or attacker would
    try; with ``many``, now and then with thousands of tiny fields."""
    fields = {name: [name, b": ", value] for name, value in UPGRADE_HEAD}
    first = [b"GET ", b"/chat?room=1", b" HTTP/1.1"]
    extra: list[bytes] = []
    later: list[str] = []
    kinds = MUTATIONS if many else MUTATIONS[:-1]
    for kind in draw(st.lists(st.sampled_from(kinds), max_size=3)):
        name = draw(st.sampled_from([name for name, _ in UPGRADE_HEAD]))
        field = fields[name]
        if kind == "alike":
            field[0] = draw(st.sampled_from(LOOK_ALIKES[name]))
        elif kind == "value":
            field[2] = draw(st.sampled_from(OTHER_VALUES[name]))
        elif kind == "twice":
            other = draw(st.sampled_from([field[2], *OTHER_VALUES[name]]))
            extra.append(draw(st.sampled_from([name, *LOOK_ALIKES[name]])) + b": " + other)
        elif kind == "drop":
            field[:] = [b"", b"", b""]
        elif kind == "fold":
            cut = draw(st.integers(0, len(field[2])))
            fold = b"\r\n" + draw(st.sampled_from([b" ", b"\t", b"  "]))
            field[2] = field[2][:cut] + fold + field[2][cut:]
        elif kind == "colon":
            field[1] = draw(st.sampled_from([b":", b":\t", b" : ", b":  ", b"\t:", b"::"]))
        elif kind == "line":
            first[draw(st.integers(0, 2))] = draw(st.sampled_from(REQUEST_LINE_VARIANTS))
        elif kind == "many":
            tiny = draw(st.sampled_from([b"a:b", b"A: ", b"x-y:z", b"a:b\t"]))
            extra.append(b"\r\n".join([tiny] * draw(st.integers(1, 3000))))
        else:
            later.append(kind)
    lines = [b"".join(first)] + [b"".join(f) for f in fields.values() if f[0]]
    for line in extra:
        lines.insert(draw(st.integers(1, len(lines))), line)
    ends = [b"\r\n"] * (len(lines) + 1)  # the last one ends the blank line
    for kind in later:
        if kind == "end":
            ends[draw(st.integers(0, len(lines)))] = draw(st.sampled_from(ODD_LINE_ENDS))
    head = b"".join(line + end for line, end in zip(lines, ends, strict=False)) + ends[-1]
    for kind in later:
        if kind == "byte":
            at = draw(st.integers(0, len(head)))
            head = head[:at] + draw(st.sampled_from(ODD_BYTES)) + head[at:]
    return head + draw(st.sampled_from([b"", b"", b"\x81\x85", b"\n", b"GET / HTTP/1.1\r\n\r\n"]))


HEAD_LIMITS = st.sampled_from([1024, 32 * 1024])
READER_OPTIONS = st.fixed_dictionaries(
    {},
    optional={"max_headers": st.sampled_from([1, 5, 100, 10_000]), "allow_bare_lf": st.booleans()},
)

Verdict = tuple[object, ...]


def head_verdict(head: RequestHead, pieces: list[bytes]) -> Verdict:
    """What the handler would conclude from ``pieces`` (``b""`` is EOF): the request and the
    head's length, a refusal's status, the client leaving, or waiting for more. Anything else
    raised is an undocumented error and fails the test."""
    fed = 0
    error: HandshakeError | ClientClosed | None = None
    try:
        for piece in pieces:
            fed += len(piece)
            request = head.feed(piece)
            if request is not None:
                assert_fast_fields_agree(head, request)
                fields = tuple(request.headers.raw_items())
                length = fed - len(head.leftover)
                return ("request", request.target, request.http_version, fields, length)
    except (HandshakeError, ClientClosed) as exc:
        error = exc
    if isinstance(error, HandshakeError):
        assert error.status in {400, 414, 431}, error
        assert error_response(error).startswith(f"HTTP/1.1 {error.status} ".encode())
        return ("refused", error.status)
    if isinstance(error, ClientClosed):
        assert pieces[-1] == b"", "ClientClosed only on EOF"
        assert error.received == fed
        return ("closed",)
    return ("more",)


def assert_same_verdict(chunked: Verdict, whole: Verdict) -> None:
    """The verdict on the head read in pieces is the one on it read at once. A refused head
    that is both malformed and over the limit may get 400 or 431: read at once, h11 judges the
    whole head first; read in pieces, the limit is crossed first."""
    if chunked[0] == whole[0] == "refused" and {chunked[1], whole[1]} <= {400, 414, 431}:
        return
    assert chunked == whole


def bare(data: bytes, byte: int, partner: int, *, before: bool) -> bool:
    """Whether ``data`` holds ``byte`` without ``partner`` next to it (a bare LF has no CR
    before it, a bare CR no LF after it)."""
    for i, b in enumerate(data):
        if b != byte:
            continue
        j = i - 1 if before else i + 1
        if not 0 <= j < len(data) or data[j] != partner:
            return True
    return False


def bare_lf(data: bytes) -> bool:
    return bare(data, 0x0A, 0x0D, before=True)


def bare_cr(data: bytes) -> bool:
    return bare(data, 0x0D, 0x0A, before=False)


@FUZZ
@given(
    data=near_valid_head(),
    cuts=st.one_of(st.lists(st.integers(min_value=0), max_size=8), st.just(list(range(400)))),
    eof=st.booleans(),
    limit=HEAD_LIMITS,
    options=READER_OPTIONS,
)
def test_near_valid_heads_get_one_verdict_however_the_reads_cut_them(
    data: bytes, cuts: list[int], eof: bool, limit: int, options: dict[str, object]
) -> None:
    end = [b""] if eof else []
    whole = head_verdict(RequestHead(limit, **options), [data, *end])
    assert_same_verdict(head_verdict(RequestHead(limit, **options), split(data, cuts) + end), whole)
    if whole[0] == "request":
        length = whole[-1]
        assert isinstance(length, int)
        assert length <= limit
        head = data[:length]
        assert b"\x00" not in head
        assert not bare_cr(head), "a bare CR is never a line end, nor allowed in a field"
        if not options.get("allow_bare_lf"):
            assert not bare_lf(head), "a bare LF is refused unless allow_bare_lf"
        fields = whole[3]
        assert isinstance(fields, tuple)
        assert len(fields) <= int(options.get("max_headers", 100))  # type: ignore[call-overload]


@fuzz_settings(40)
@given(data=near_valid_head(many=False), eof=st.booleans())
def test_every_two_piece_split_gets_the_one_read_verdict(data: bytes, eof: bool) -> None:
    end = [b""] if eof else []
    whole = head_verdict(RequestHead(LIMIT), [data, *end])
    for cut in range(1, len(data)):
        pieces = [data[:cut], data[cut:], *end]
        assert_same_verdict(head_verdict(RequestHead(LIMIT), pieces), whole)


def h11_verdict(data: bytes) -> Verdict:
    """h11's own reading of ``data`` as a server, no size limit in the way."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=10 * BIG)
    conn.receive_data(data)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return ("refused",)
    if event is h11.NEED_DATA:
        return ("more",)
    assert isinstance(event, h11.Request)
    fields = tuple(event.headers.raw_items())
    length = len(data) - len(conn.trailing_data[0])
    return ("request", event.target, event.http_version, fields, length)


@FUZZ
@given(data=st.one_of(near_valid_head(), CLIENT_BYTES).filter(bool), allow_bare_lf=st.booleans())
def test_the_head_reader_accepts_what_h11_accepts_and_nothing_else(
    data: bytes, allow_bare_lf: bool
) -> None:
    ours = head_verdict(RequestHead(BIG, max_headers=10**6, allow_bare_lf=allow_bare_lf), [data])
    judge = h11_verdict(data)
    if judge[0] == "request":
        length = judge[-1]
        assert isinstance(length, int)
        stricter = bare_lf(data[:length]) and not allow_bare_lf
        if ours[0] == "refused":
            assert stricter or data[:1] == b"\x16", f"h11 accepts {data[:length]!r}"
            return
    if judge[0] == "refused" or ours[0] == "refused":
        assert ours[0] == "refused"
        return
    assert ours == judge


REAL_HEAD = (
    b"GET /chat?room=1 HTTP/1.1\r\nHost: a.example\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: " + KEY.encode() + b"\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)
LINE_END_AT = [i for i in range(len(REAL_HEAD)) if REAL_HEAD[i : i + 2] == b"\r\n"]


def one_read(head: RequestHead, data: bytes) -> Verdict:
    return head_verdict(head, [data, b""])


@pytest.mark.parametrize("at", LINE_END_AT)
def test_a_bare_lf_is_a_line_end_when_allowed(at: int) -> None:
    data = REAL_HEAD[:at] + REAL_HEAD[at + 1 :]
    verdict = one_read(RequestHead(LIMIT, allow_bare_lf=True), data)
    assert verdict[0] == "request"
    assert verdict[3] == one_read(RequestHead(LIMIT), REAL_HEAD)[3]


@pytest.mark.parametrize("at", LINE_END_AT)
def test_a_bare_lf_anywhere_in_the_head_is_refused_unless_allowed(at: int) -> None:
    data = REAL_HEAD[:at] + REAL_HEAD[at + 1 :]
    assert one_read(RequestHead(LIMIT), data) == ("refused", 400)
    assert one_read(RequestHead(LIMIT, allow_bare_lf=False), data) == ("refused", 400)


@pytest.mark.parametrize("leftover", [b"\n", b"x\ny", b"\r", b"\x00\n\n"])
def test_a_bare_lf_or_cr_after_the_head_is_not_part_of_it(leftover: bytes) -> None:
    verdict = one_read(RequestHead(LIMIT, allow_bare_lf=False), REAL_HEAD + leftover)
    assert verdict == one_read(RequestHead(LIMIT), REAL_HEAD)


@pytest.mark.parametrize("at", range(len(REAL_HEAD) - 2))
@pytest.mark.parametrize("byte", [b"\r", b"\x00"])
def test_a_bare_cr_or_nul_anywhere_in_the_head_is_never_accepted(at: int, byte: bytes) -> None:
    data = REAL_HEAD[:at] + byte + REAL_HEAD[at:]
    verdict = one_read(RequestHead(LIMIT), data)
    assert verdict in {("refused", 400), ("closed",)}, verdict


def with_tiny_fields(count: int) -> bytes:
    """``REAL_HEAD`` (5 fields) with ``count`` more."""
    return REAL_HEAD[:-2] + b"a:b\r\n" * count + b"\r\n"


def test_a_head_of_100_fields_is_read() -> None:
    assert one_read(RequestHead(32 * 1024), with_tiny_fields(95))[0] == "request"


@pytest.mark.parametrize("extra", [96, 5000])
def test_more_fields_than_max_headers_is_431(extra: int) -> None:
    assert one_read(RequestHead(32 * 1024), with_tiny_fields(extra)) == ("refused", 431)
