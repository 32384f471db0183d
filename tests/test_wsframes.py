"""The WebSocket frame-boundary tracker and the Close frame builder (``tunnel.core.wsframes``).

The tracker is checked against a reference parser written here from RFC 6455 section 5.2: for
every way of cutting a stream of frames into reads, its idea of where frames end (``left``,
``in_frame``) and whether a Close header has passed (``close_seen``) must equal the reference
at the end of each read. ``close_frame`` is checked byte for byte, by unmasking, and with the
``websockets`` library's own parser as the judge.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ProtocolError
from websockets.frames import Close, Frame, Opcode
from websockets.streams import StreamReader

from tunnel.core.wsframes import (
    CLOSE_OPCODE,
    GOING_AWAY,
    MAX_CLOSE_REASON,
    MAX_HEADER,
    FrameTracker,
    close_frame,
    header_size,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MASK = b"\x37\xfa\x21\x3d"

TEXT, BINARY, CONTINUATION, PING, PONG = 0x1, 0x2, 0x0, 0x9, 0xA


# --- a reference encoder and parser ------------------------------------------------------------


def encode_header(
    opcode: int, length: int, *, mask: bytes | None = None, fin: bool = True, width: int = 0
) -> bytes:
    """A frame header as RFC 6455 writes it. ``width`` forces the length field's size (0 =
    the shortest, 2 or 8 = the 16-bit or 64-bit extended length), to build honest but
    non-minimal encodings."""
    first = (0x80 if fin else 0) | opcode
    flag = 0x80 if mask is not None else 0
    if width == 0:
        width = 0 if length <= 125 else 2 if length <= 0xFFFF else 8
    if width == 0:
        head = bytes((first, flag | length))
    elif width == 2:
        head = bytes((first, flag | 126)) + length.to_bytes(2, "big")
    else:
        head = bytes((first, flag | 127)) + length.to_bytes(8, "big")
    return head + (mask or b"")


def encode_frame(
    opcode: int, payload: bytes, *, mask: bytes | None = None, width: int = 0
) -> bytes:
    """A whole frame; ``payload`` is masked with ``mask`` when given."""
    if mask is not None:
        payload = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    return encode_header(opcode, len(payload), mask=mask, width=width) + payload


@dataclass(frozen=True)
class RefFrame:
    """Where one frame lies in a stream: ``[start, body)`` is its header, ``[body, end)`` its
    payload."""

    start: int
    body: int
    end: int
    opcode: int


def reference_frames(stream: bytes) -> list[RefFrame]:
    """Every frame of ``stream`` (the last one may be cut short), read the plain RFC way."""
    frames = []
    pos = 0
    while pos < len(stream):
        rest = stream[pos:]
        if len(rest) < 2:
            frames.append(RefFrame(pos, pos + 2, pos + 2, rest[0] & 0x0F))
            break
        masked = rest[1] & 0x80
        code = rest[1] & 0x7F
        extra = 2 if code == 126 else 8 if code == 127 else 0
        body = pos + 2 + extra + (4 if masked else 0)
        if extra and len(rest) >= 2 + extra:
            length = int.from_bytes(rest[2 : 2 + extra], "big")
        elif extra:
            length = 0  # unknown yet: the header itself is cut
        else:
            length = code
        frames.append(RefFrame(pos, body, body + length, rest[0] & 0x0F))
        pos = body + length
    return frames


@dataclass(frozen=True)
class RefState:
    """What the tracker should say after ``pos`` bytes of a stream."""

    in_frame: bool
    left: int
    close_seen: bool


def reference_state(frames: list[RefFrame], pos: int) -> RefState:
    close_seen = any(f.opcode == CLOSE_OPCODE and f.body <= pos for f in frames)
    for frame in frames:
        if frame.start < pos < frame.body:
            return RefState(True, 0, close_seen)  # inside the header: held, nothing known
        if frame.body <= pos < frame.end:
            return RefState(True, frame.end - pos, close_seen)
    return RefState(False, 0, close_seen)


def state_of(tracker: FrameTracker) -> RefState:
    return RefState(tracker.in_frame, tracker.left, tracker.close_seen)


def pieces(data: bytes, cuts: Iterator[int] | list[int]) -> list[bytes]:
    """``data`` cut at ``cuts`` (positions, any order, out-of-range ones folded in)."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


def check_feeding(stream: bytes, chunks: list[bytes]) -> None:
    """Feed ``chunks`` (which join to ``stream``) and compare with the reference after each."""
    assert b"".join(chunks) == stream
    frames = reference_frames(stream)
    tracker = FrameTracker()
    pos = 0
    for chunk in chunks:
        # The relay feeds a shared buffer that holds more than the read: only [:end] counts.
        buffer = bytearray(chunk + b"\xff" * 7)
        tracker.feed(memoryview(buffer), len(chunk))
        pos += len(chunk)
        assert state_of(tracker) == reference_state(frames, pos), f"after {pos} bytes"


# --- header_size -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "masked", "size"),
    [
        (0, False, 2),
        (0, True, 6),
        (125, False, 2),
        (125, True, 6),
        (126, False, 4),
        (126, True, 8),
        (65535, False, 4),
        (65535, True, 8),
        (65536, False, 10),
        (65536, True, 14),
        (2**32, False, 10),
        (2**32, True, 14),
        (2**63 - 1, True, 14),
    ],
)
def test_header_size_from_the_first_two_bytes(length: int, masked: bool, size: int) -> None:
    head = encode_header(BINARY, length, mask=MASK if masked else None)
    assert len(head) == size
    assert header_size(head[0], head[1]) == size
    assert size <= MAX_HEADER


# --- feed: table -------------------------------------------------------------------------------

LENGTHS = [0, 1, 125, 126, 65535, 65536, 2**32]
"""Payload lengths at every edge of the three length encodings."""
ZEROS = bytes(64 * 1024)


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("length", LENGTHS)
def test_one_header_then_the_payload_by_length(length: int, masked: bool) -> None:
    head = encode_header(BINARY, length, mask=MASK if masked else None)
    tracker = FrameTracker()
    tracker.feed(head, len(head))
    assert tracker.left == length
    assert tracker.in_frame == (length > 0)
    # Payloads are skipped by length, never read: a huge one costs nothing. Small reads go
    # through ``feed``, big ones the way the relay's hot path does (``left -= n``).
    passed = 0
    for _ in range(8):
        if passed == length:
            break
        n = min(max(1, length // 3), length - passed)
        if n <= len(ZEROS):
            tracker.feed(ZEROS, n)
        else:
            tracker.left -= n
        passed += n
        assert tracker.left == length - passed
    assert passed == length
    assert not tracker.in_frame
    assert not tracker.close_seen


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("length", [0, 5, 125, 126, 300, 65535, 65536, 70_000])
def test_a_header_cut_at_every_byte_across_two_feeds(length: int, masked: bool) -> None:
    payload = bytes(i % 251 for i in range(length))
    frame = encode_frame(BINARY, payload, mask=MASK if masked else None)
    follower = encode_frame(TEXT, b"next")
    stream = frame + follower
    size = header_size(frame[0], frame[1])
    for cut in range(1, size + 1):
        check_feeding(stream, [stream[:cut], stream[cut:]])


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("length", [0, 125, 126, 65535, 65536, 2**32])
def test_a_header_fed_one_byte_at_a_time(length: int, masked: bool) -> None:
    head = encode_header(BINARY, length, mask=MASK if masked else None)
    tracker = FrameTracker()
    for i, byte in enumerate(head):
        assert tracker.left == 0
        tracker.feed(bytes((byte,)), 1)
        if i < len(head) - 1:
            assert tracker.in_frame, f"header byte {i} of {len(head)}"
            assert tracker.left == 0
    assert tracker.left == length
    assert tracker.in_frame == (length > 0)


def test_several_frames_in_one_feed() -> None:
    frames = [
        encode_frame(TEXT, b"hello"),
        encode_frame(BINARY, b"", mask=MASK),
        encode_frame(PING, b"p"),
        encode_frame(BINARY, bytes(126)),
        encode_frame(BINARY, bytes(70_000), mask=MASK),
        encode_frame(CONTINUATION, b"x" * 3),
        encode_frame(BINARY, bytes(10), width=8),  # honest, if not minimal
    ]
    stream = b"".join(frames)
    tracker = FrameTracker()
    tracker.feed(stream, len(stream))
    assert (tracker.left, tracker.in_frame, tracker.close_seen) == (0, False, False)
    # The same, with the last frame's payload cut by 4 bytes and then a cut header after it.
    tracker = FrameTracker()
    tracker.feed(stream[:-4], len(stream) - 4)
    assert (tracker.left, tracker.in_frame) == (4, True)
    tail = stream[-4:] + encode_header(BINARY, 300)[:3]
    tracker.feed(tail, len(tail))
    assert (tracker.left, tracker.in_frame) == (0, True), "three bytes of a 4-byte header held"
    tracker.feed(b"\x2c", 1)  # 300 = 0x012c
    assert (tracker.left, tracker.in_frame) == (300, True)


def test_feed_counts_only_the_first_end_bytes() -> None:
    frame = encode_frame(TEXT, b"abc")
    garbage = encode_header(BINARY, 1000)
    buffer = frame + garbage
    tracker = FrameTracker()
    tracker.feed(buffer, len(frame))
    assert (tracker.left, tracker.in_frame) == (0, False)


@pytest.mark.parametrize(
    ("first_byte", "close"),
    [
        (0x88, True),
        (0x08, True),  # FIN clear: not a legal Close, but the opcode is all that counts
        (0xC8, True),  # a reserved bit set: not checked either
        (0x98, True),
        (0x81, False),
        (0x82, False),
        (0x80, False),
        (0x89, False),
        (0x8A, False),
        (0x8B, False),  # a reserved control opcode is not a Close
        (0x0F, False),
        (0x10, False),  # RSV3 alone, opcode 0 (a continuation)
    ],
    ids=hex,
)
def test_close_seen_only_for_opcode_8(first_byte: int, close: bool) -> None:
    head = bytes((first_byte, 2)) + b"\x03\xe9"
    tracker = FrameTracker()
    tracker.feed(head, len(head))
    assert tracker.close_seen == close
    tracker = FrameTracker()
    tracker.peek(head)
    assert tracker.close_seen == close


def test_close_seen_once_its_header_has_passed_not_before() -> None:
    stream = encode_frame(TEXT, b"x" * 10) + encode_frame(CLOSE_OPCODE, b"\x03\xe8bye", mask=MASK)
    close_body = len(encode_frame(TEXT, b"x" * 10)) + 6
    for cut in range(len(stream) + 1):
        tracker = FrameTracker()
        tracker.feed(stream[:cut], cut)
        assert tracker.close_seen == (cut >= close_body), cut
        rest = stream[cut:]
        tracker.feed(rest, len(rest))
        assert tracker.close_seen
        assert not tracker.in_frame


def test_close_seen_when_the_close_header_completes_a_held_header() -> None:
    tracker = FrameTracker()
    tracker.feed(b"\x88", 1)
    assert not tracker.close_seen
    tracker.feed(b"\x02\x03\xe9" + b"\x00" * 10, 2)  # two bytes count: 0x02 and 0x03
    assert tracker.close_seen
    assert tracker.left == 1


# --- finish_frame ------------------------------------------------------------------------------


def test_finish_frame_between_two_frames_takes_nothing() -> None:
    tracker = FrameTracker()
    data = encode_frame(TEXT, b"next frame")
    assert tracker.finish_frame(data, len(data)) == 0
    assert (tracker.left, tracker.in_frame) == (0, False)


def test_finish_frame_inside_a_payload_takes_everything() -> None:
    tracker = FrameTracker()
    head = encode_header(BINARY, 1000)
    tracker.feed(head, len(head))
    assert tracker.finish_frame(bytes(400), 400) == 400
    assert tracker.left == 600
    assert tracker.in_frame


def test_finish_frame_ending_exactly_at_the_read_end() -> None:
    tracker = FrameTracker()
    head = encode_header(BINARY, 1000)
    tracker.feed(head, len(head))
    assert tracker.finish_frame(bytes(1000), 1000) == 1000
    assert (tracker.left, tracker.in_frame) == (0, False)


def test_finish_frame_ending_inside_the_read_stops_there() -> None:
    tracker = FrameTracker()
    head = encode_header(BINARY, 1000)
    tracker.feed(head, len(head))
    data = bytes(1000) + encode_frame(TEXT, b"after")
    assert tracker.finish_frame(data, len(data)) == 1000
    assert (tracker.left, tracker.in_frame) == (0, False)
    # The rest is the caller's: fed separately, it starts a new frame.
    rest = data[1000:]
    tracker.feed(rest, len(rest))
    assert (tracker.left, tracker.in_frame) == (0, False)


def test_finish_frame_only_counts_the_first_end_bytes() -> None:
    tracker = FrameTracker()
    head = encode_header(BINARY, 10)
    tracker.feed(head, len(head))
    buffer = bytes(64)
    assert tracker.finish_frame(buffer, 4) == 4
    assert tracker.left == 6


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("length", [0, 7, 126, 65536])
def test_finish_frame_completes_a_held_header(length: int, masked: bool) -> None:
    head = encode_header(BINARY, length, mask=MASK if masked else None)
    frame = head + bytes(length)
    after = encode_frame(TEXT, b"after")
    for held in range(1, len(head)):
        tracker = FrameTracker()
        tracker.feed(frame[:held], held)
        assert tracker.in_frame
        data = frame[held:] + after
        # The rest of the frame and the next one in one read: it stops at the frame's end.
        assert tracker.finish_frame(data, len(data)) == len(frame) - held, held
        assert (tracker.left, tracker.in_frame) == (0, False)


@pytest.mark.parametrize("held", [1, 3])
def test_finish_frame_with_a_header_still_incomplete_takes_everything(held: int) -> None:
    head = encode_header(BINARY, 70_000, mask=MASK)  # 14 bytes
    tracker = FrameTracker()
    tracker.feed(head[:held], held)
    more = head[held : held + 4]
    assert tracker.finish_frame(more, len(more)) == len(more)
    assert tracker.in_frame
    assert tracker.left == 0
    rest = head[held + 4 :] + bytes(5)
    assert tracker.finish_frame(rest, len(rest)) == len(rest)
    assert tracker.left == 70_000 - 5


def test_finish_frame_completing_a_held_header_whose_payload_goes_on() -> None:
    head = encode_header(BINARY, 500)
    tracker = FrameTracker()
    tracker.feed(head[:1], 1)
    data = head[1:] + bytes(100)
    assert tracker.finish_frame(data, len(data)) == len(data)
    assert tracker.left == 400


def test_finish_frame_sees_a_close_header_it_completes() -> None:
    tracker = FrameTracker()
    tracker.feed(b"\x88", 1)
    data = b"\x02\x03\xe9" + encode_frame(TEXT, b"after")
    assert tracker.finish_frame(data, len(data)) == 3
    assert tracker.close_seen


# --- peek and skip -----------------------------------------------------------------------------


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("length", LENGTHS)
def test_peek_gives_the_whole_frame_size_then_skip_counts_it_down(
    length: int, masked: bool
) -> None:
    head = encode_header(BINARY, length, mask=MASK if masked else None)
    tracker = FrameTracker()
    peeked = (head + b"\x00" * MAX_HEADER)[:MAX_HEADER]  # MSG_PEEK returns what is queued
    assert tracker.peek(peeked) == len(head) + length
    assert tracker.left == len(head) + length
    assert tracker.in_frame
    total = len(head) + length
    for moved in (1, total // 2 - 1, total - total // 2):
        if moved > 0:
            tracker.skip(moved)
    assert tracker.left == 0
    assert not tracker.in_frame


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("length", [0, 126, 65536])
def test_peek_with_too_few_bytes_is_none_and_changes_nothing(length: int, masked: bool) -> None:
    head = encode_header(BINARY, length, mask=MASK if masked else None)
    for cut in range(len(head)):
        tracker = FrameTracker()
        assert tracker.peek(head[:cut]) is None, cut
        assert (tracker.left, tracker.in_frame, tracker.close_seen) == (0, False, False)


def test_peek_sees_a_close() -> None:
    tracker = FrameTracker()
    frame = close_frame("drain", MASK)
    assert tracker.peek(frame[:MAX_HEADER]) == len(frame)
    assert tracker.close_seen
    tracker = FrameTracker()
    assert tracker.peek(encode_frame(PONG, b"")) == 2
    assert not tracker.close_seen


def test_peek_and_skip_walk_a_stream_frame_by_frame() -> None:
    frames = [
        encode_frame(TEXT, b"a"),
        encode_frame(BINARY, bytes(300), mask=MASK),
        encode_frame(BINARY, bytes(70_000)),
        encode_frame(CLOSE_OPCODE, b"\x03\xe8"),
    ]
    stream = b"".join(frames)
    tracker = FrameTracker()
    pos = 0
    for frame in frames:
        size = tracker.peek(stream[pos : pos + MAX_HEADER])
        assert size == len(frame)
        # The splice moves the frame in pieces of whatever the pipe takes.
        while tracker.left:
            tracker.skip(min(tracker.left, 4096))
        pos += len(frame)
    assert pos == len(stream)
    assert tracker.close_seen


# --- properties --------------------------------------------------------------------------------

EDGE_LENGTHS = st.sampled_from([0, 1, 2, 124, 125, 126, 127, 65535, 65536])


@st.composite
def frame_streams(draw: st.DrawFn) -> bytes:
    """A few frames of mixed opcodes, masks and length encodings, joined."""
    frames = []
    for _ in range(draw(st.integers(1, 8))):
        opcode = draw(st.sampled_from([TEXT, BINARY, CONTINUATION, PING, PONG, CLOSE_OPCODE]))
        length = draw(st.one_of(st.integers(0, 300), EDGE_LENGTHS))
        masked = draw(st.booleans())
        minimal = 0 if length <= 125 else 2 if length <= 0xFFFF else 8
        width = draw(st.sampled_from(sorted({minimal, max(minimal, 2), 8})))
        head = encode_header(
            opcode, length, mask=MASK if masked else None, fin=draw(st.booleans()), width=width
        )
        frames.append(head + bytes(length))
    return b"".join(frames)


CUTS = st.lists(st.integers(min_value=0), max_size=30)


@FUZZ
@given(stream=frame_streams(), cuts=CUTS)
def test_feed_agrees_with_the_reference_whatever_the_reads(stream: bytes, cuts: list[int]) -> None:
    check_feeding(stream, pieces(stream, cuts))


@FUZZ
@given(stream=frame_streams(), cuts=CUTS)
def test_the_relay_hot_path_agrees_with_the_reference(stream: bytes, cuts: list[int]) -> None:
    # The engine skips ``feed`` when a read ends inside the payload in flight (left >= n).
    frames = reference_frames(stream)
    tracker = FrameTracker()
    pos = 0
    for chunk in pieces(stream, cuts):
        n = len(chunk)
        if tracker.left >= n:
            tracker.left -= n
        else:
            tracker.feed(chunk, n)
        pos += n
        assert state_of(tracker) == reference_state(frames, pos), f"after {pos} bytes"


@FUZZ
@given(stream=frame_streams(), cuts=CUTS, at=st.integers(min_value=0))
def test_finish_frame_stops_at_the_reference_boundary(
    stream: bytes, cuts: list[int], at: int
) -> None:
    # Feed some reads, then (as a polite close does) finish the frame in flight from the next
    # read: what it takes ends exactly where the reference says the frame ends.
    chunks = pieces(stream, cuts)
    at %= len(chunks)
    frames = reference_frames(stream)
    tracker = FrameTracker()
    pos = 0
    for chunk in chunks[:at]:
        tracker.feed(chunk, len(chunk))
        pos += len(chunk)
    chunk = chunks[at]
    take = tracker.finish_frame(chunk, len(chunk))
    expected = reference_state(frames, pos)
    if not expected.in_frame:
        assert take == 0
        return
    current = next(f for f in frames if f.start < pos < f.end or f.start < pos < f.body)
    assert take == min(len(chunk), current.end - pos)
    pos += take
    assert state_of(tracker) == reference_state(frames, pos)
    rest = chunk[take:]
    tracker.feed(rest, len(rest))
    pos += len(rest)
    assert state_of(tracker) == reference_state(frames, pos)


@FUZZ
@given(stream=frame_streams(), sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=20))
def test_peek_and_skip_agree_with_the_reference(stream: bytes, sizes: list[int]) -> None:
    # The splice path: peek at each header, move the frame in pipe-sized pieces.
    frames = reference_frames(stream)
    tracker = FrameTracker()
    turns = itertools.cycle(sizes)
    for frame in frames:
        assert (
            tracker.peek(stream[frame.start : frame.start + MAX_HEADER]) == frame.end - frame.start
        )
        while tracker.left:
            tracker.skip(min(tracker.left, next(turns)))
        assert state_of(tracker) == reference_state(frames, frame.end)


# --- close_frame -------------------------------------------------------------------------------


def unmask(payload: bytes, mask: bytes) -> bytes:
    return bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))


def websockets_parse(data: bytes, *, mask: bool) -> Frame:
    """Parse one frame with the ``websockets`` library; ``mask`` True reads as a server
    (client frames must be masked), False as a client (server frames must not be)."""
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    parser = Frame.parse(reader.read_exact, mask=mask)
    try:
        next(parser)
    except StopIteration as done:
        frame: Frame = done.value
    else:
        raise AssertionError("the parser wanted more bytes")
    assert not reader.buffer, "bytes left after the frame"
    return frame


def test_close_frame_for_drain_unmasked_is_exact() -> None:
    assert close_frame("drain") == b"\x88\x07\x03\xe9drain"


def test_close_frame_for_drain_masked_is_exact() -> None:
    frame = close_frame("drain", MASK)
    assert frame[:2] == b"\x88\x87"
    assert frame[2:6] == MASK
    assert frame[6:] == unmask(b"\x03\xe9drain", MASK)
    assert unmask(frame[6:], MASK) == b"\x03\xe9drain"
    assert len(frame) == 2 + 4 + 7


def test_close_frame_other_code() -> None:
    assert close_frame("", code=1000) == b"\x88\x02\x03\xe8"
    assert GOING_AWAY == 1001


@pytest.mark.parametrize(
    "reason",
    [
        "drain",
        "admin",
        "idle_timeout",
        "max_lifetime",
        "shutdown",
        "credential_expired",
        "backend_down",
        "",
        "x" * 123,
    ],
)
@pytest.mark.parametrize("mask", [None, MASK, b"\x00\x00\x00\x00", b"\xff\xff\xff\xff"])
def test_close_frame_parses_with_websockets(reason: str, mask: bytes | None) -> None:
    data = close_frame(reason, mask)
    frame = websockets_parse(data, mask=mask is not None)
    assert frame.opcode is Opcode.CLOSE
    assert frame.fin
    close = Close.parse(frame.data)
    assert (close.code, close.reason) == (GOING_AWAY, reason)
    # And our reference tracker agrees on its length and that it is a Close.
    tracker = FrameTracker()
    tracker.feed(data, len(data))
    assert (tracker.in_frame, tracker.close_seen) == (False, True)


def test_websockets_refuses_a_close_frame_masked_the_wrong_way() -> None:
    # Shows that the judge above checks the direction: a server frame must not be masked.
    with pytest.raises(ProtocolError):
        websockets_parse(close_frame("drain", MASK), mask=False)
    with pytest.raises(ProtocolError):
        websockets_parse(close_frame("drain"), mask=True)


@pytest.mark.parametrize("mask", [None, MASK], ids=["unmasked", "masked"])
@pytest.mark.parametrize("length", [124, 125, 200, 1000])
def test_a_long_reason_is_cut_to_123_bytes(length: int, mask: bytes | None) -> None:
    reason = "".join(chr(ord("a") + i % 26) for i in range(length))
    data = close_frame(reason, mask)
    assert data[1] & 0x7F == 2 + MAX_CLOSE_REASON == 125
    assert len(data) == 2 + (4 if mask else 0) + 125
    frame = websockets_parse(data, mask=mask is not None)
    assert Close.parse(frame.data).reason == reason[:MAX_CLOSE_REASON]


@pytest.mark.parametrize("mask", [b"\x01\x02\x03\x04", b"\xa5\x5a\xa5\x5a", MASK])
def test_masking_uses_the_key_cyclically(mask: bytes) -> None:
    reason = "credential_expired"
    data = close_frame(reason, mask)
    payload = data[6:]
    expected = GOING_AWAY.to_bytes(2, "big") + reason.encode()
    assert [payload[i] ^ mask[i % 4] for i in range(len(payload))] == list(expected)


@FUZZ
@given(
    reason=st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=200),
    mask=st.one_of(st.none(), st.binary(min_size=4, max_size=4)),
    code=st.sampled_from([1000, 1001, 1008, 1011, 3000, 4999]),
)
def test_close_frame_always_parses(reason: str, mask: bytes | None, code: int) -> None:
    data = close_frame(reason, mask, code)
    frame = websockets_parse(data, mask=mask is not None)
    close = Close.parse(frame.data)
    assert (close.code, close.reason) == (code, reason[:MAX_CLOSE_REASON])
