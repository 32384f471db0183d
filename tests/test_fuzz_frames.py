"""Fuzzing the frame tracker (``tunnel.core.wsframes``) with frames the ``websockets`` library
builds and parses.

Streams are real WebSocket traffic in one direction (masked from a client, unmasked from a
server): every opcode, payload lengths at the edges of the three length encodings, fragmented
messages with control frames between the fragments, bursts of tiny frames. Cut into reads
anywhere, the tracker's frame boundaries must be the ones ``websockets`` parses, whether the
relay feeds every read or skips the reads that end inside a payload; the only error it may
raise is ``TooManyFrames``, and exactly when a read holds more frames than its budget. Arbitrary
bytes get the same treatment against a plain RFC 6455 header walk. A Close frame built by
``close_frame`` and put where the tracker says a frame ends is read by ``websockets`` as that
Close, in the middle of the real stream.

Longer run: ``TUNNEL_FUZZ_EXAMPLES=20000 python -m pytest -q tests/test_fuzz*.py``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

from conftest import fuzz_settings
from hypothesis import given
from hypothesis import strategies as st
from websockets.frames import Close, Frame, Opcode
from websockets.streams import StreamReader

from tunnel.core.wsframes import (
    CLOSE_OPCODE,
    FRAMES_ALWAYS_TRACKED,
    MAX_CLOSE_REASON,
    MAX_HEADER,
    SMALLEST_AVERAGE_FRAME,
    FrameTracker,
    TooManyFrames,
    close_frame,
)

FUZZ = fuzz_settings(200)
EDGE_LENGTHS = [0, 1, 124, 125, 126, 127, 65535, 65536, 65537]
LENGTHS = st.one_of(st.integers(0, 200), st.sampled_from(EDGE_LENGTHS))
CLOSE_CODES = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014]
"""The codes ``websockets`` accepts on the wire, besides 3000-4999."""
CUTS = st.lists(st.integers(min_value=0), max_size=30)


# --- streams built by websockets ---------------------------------------------------------------


def payload(draw: st.DrawFn, length: int) -> bytes:
    """Drawn bytes for small payloads; zeros for big ones (the tracker never looks)."""
    return draw(st.binary(min_size=length, max_size=length)) if length <= 200 else bytes(length)


def control_frame(draw: st.DrawFn) -> Frame:
    opcode = draw(st.sampled_from([Opcode.PING, Opcode.PONG, Opcode.CLOSE]))
    if opcode is Opcode.CLOSE and draw(st.booleans()):
        code = draw(st.one_of(st.sampled_from(CLOSE_CODES), st.integers(3000, 4999)))
        reason = draw(st.text(max_size=20))[:30]
        data = Close(code, reason).serialize()
        if len(data) > 125:
            data = Close(code, "").serialize()
        return Frame(opcode, data)
    return Frame(opcode, payload(draw, draw(st.sampled_from([0, 1, 2, 124, 125]))))


@st.composite
def websocket_frames(draw: st.DrawFn) -> list[Frame]:
    """Messages of one to four fragments (a TEXT or BINARY frame, then CONT frames, FIN on
    the last), control frames between fragments, now and then a burst of tiny frames."""
    frames: list[Frame] = []
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.integers(0, 5)) == 0:
            tiny = [Frame(Opcode.PING, b""), Frame(Opcode.TEXT, b"x"), Frame(Opcode.PONG, b"ab")]
            frames += draw(st.lists(st.sampled_from(tiny), min_size=30, max_size=150))
            continue
        first = draw(st.sampled_from([Opcode.TEXT, Opcode.BINARY]))
        count = draw(st.integers(1, 4))
        for i in range(count):
            opcode = first if i == 0 else Opcode.CONT
            frames.append(Frame(opcode, payload(draw, draw(LENGTHS)), fin=i == count - 1))
            frames += [control_frame(draw) for _ in range(draw(st.integers(0, 2)))]
    return frames


@dataclass(frozen=True)
class Span:
    """One frame of a stream: ``[start, body)`` its header, ``[body, end)`` its payload."""

    start: int
    body: int
    end: int
    opcode: int


def websockets_spans(stream: bytes, *, masked: bool) -> list[Span]:
    """The frames of ``stream`` where the ``websockets`` parser finds them (the whole stream
    must parse, as a server reads a client's frames when ``masked``)."""
    reader = StreamReader()
    reader.feed_data(stream)
    reader.feed_eof()
    spans = []
    start = 0
    while reader.buffer:
        parser = Frame.parse(reader.read_exact, mask=masked)
        try:
            next(parser)
        except StopIteration as done:
            frame: Frame = done.value
        else:
            raise AssertionError("websockets wanted more bytes")
        end = len(stream) - len(reader.buffer)
        spans.append(Span(start, end - len(frame.data), end, frame.opcode.value))
        start = end
    return spans


def rfc_spans(stream: bytes) -> list[Span]:
    """The frames of any bytes read as RFC 6455 section 5.2 headers; the last may be cut."""
    spans = []
    pos = 0
    while pos < len(stream):
        second = stream[pos + 1] if pos + 1 < len(stream) else 0
        extra = {126: 2, 127: 8}.get(second & 0x7F, 0)
        body = pos + 2 + extra + (4 if second & 0x80 else 0)
        length = second & 0x7F
        if extra:
            field = stream[pos + 2 : pos + 2 + extra]
            length = int.from_bytes(field) if len(field) == extra else 0
        spans.append(Span(pos, body, body + length, stream[pos] & 0x0F))
        pos = body + length
    return spans


def expected(spans: list[Span], pos: int) -> tuple[bool, int, bool]:
    """``(in_frame, left, close_seen)`` after ``pos`` bytes."""
    close_seen = any(s.opcode == CLOSE_OPCODE and s.body <= pos for s in spans)
    for span in spans:
        if span.start < pos < span.body:
            return True, 0, close_seen
        if span.body <= pos < span.end:
            return True, span.end - pos, close_seen
    return False, 0, close_seen


def state(tracker: FrameTracker) -> tuple[bool, int, bool]:
    return tracker.in_frame, tracker.left, tracker.close_seen


def reads(stream: bytes, cuts: list[int]) -> list[tuple[int, bytes]]:
    """``(offset, bytes)`` of each read when ``stream`` is cut at ``cuts``."""
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    return [(a, stream[a:b]) for a, b in itertools.pairwise(points) if b > a]


def over_budget(spans: list[Span], start: int, end: int) -> bool:
    """Whether the read ``[start, end)`` starts more frames than the tracker's budget."""
    starts = [s.start for s in spans if start <= s.start < end]
    if not starts:
        return False
    budget = FRAMES_ALWAYS_TRACKED + (end - starts[0]) // SMALLEST_AVERAGE_FRAME
    return len(starts) > budget


def track(stream: bytes, spans: list[Span], cuts: list[int], *, hot_path: bool) -> Iterator[int]:
    """Feed ``stream`` in reads as the relay does (a shared buffer longer than the read; with
    ``hot_path``, reads that end inside the payload in flight only lower ``left``), check the
    state after each, and yield each read's end. Stops after ``TooManyFrames``, which must come
    exactly when a read is over budget."""
    tracker = FrameTracker()
    for offset, chunk in reads(stream, cuts):
        end = offset + len(chunk)
        if hot_path and tracker.left >= len(chunk):
            tracker.left -= len(chunk)
        else:
            buffer = bytearray(chunk + b"\x82\x7f" * 4)
            try:
                tracker.feed(memoryview(buffer), len(chunk))
            except TooManyFrames:
                assert over_budget(spans, offset, end), f"gave up on the read [{offset}, {end})"
                return
            assert not over_budget(spans, offset, end), f"tracked [{offset}, {end}) anyway"
        assert state(tracker) == expected(spans, end), f"after {end} bytes"
        yield end


@FUZZ
@given(frames=websocket_frames(), masked=st.booleans(), cuts=CUTS, hot_path=st.booleans())
def test_the_tracker_finds_the_frames_websockets_parses(
    frames: list[Frame], masked: bool, cuts: list[int], hot_path: bool
) -> None:
    stream = b"".join(frame.serialize(mask=masked, extensions=[]) for frame in frames)
    spans = websockets_spans(stream, masked=masked)
    assert [s.opcode for s in spans] == [f.opcode.value for f in frames]
    assert rfc_spans(stream) == spans
    for _ in track(stream, spans, cuts, hot_path=hot_path):
        pass


@FUZZ
@given(
    frames=websocket_frames(),
    masked=st.booleans(),
    cuts=CUTS,
    at=st.integers(min_value=0),
    reason=st.text(st.characters(max_codepoint=127), max_size=MAX_CLOSE_REASON + 10),
)
def test_a_close_put_where_the_tracker_says_a_frame_ends_is_read_by_websockets(
    frames: list[Frame], masked: bool, cuts: list[int], at: int, reason: str
) -> None:
    # The polite close: after some reads, finish the frame in flight from the next read, then
    # write the Close; the peer reads the frames before it, the Close, and the rest.
    stream = b"".join(frame.serialize(mask=masked, extensions=[]) for frame in frames)
    chunks = reads(stream, cuts)
    at %= len(chunks)
    tracker = FrameTracker()
    try:
        for _, chunk in chunks[:at]:
            tracker.feed(chunk, len(chunk))
    except TooManyFrames:
        return  # no boundary known: the engine closes without a Close frame
    boundary = -1
    for offset, chunk in chunks[at:]:
        take = tracker.finish_frame(chunk, len(chunk))
        if not tracker.in_frame:
            boundary = offset + take
            break
        assert take == len(chunk)
    ends = {0} | {s.end for s in websockets_spans(stream, masked=masked)}
    assert boundary in ends
    close = close_frame(reason, b"\x00\x01\x02\x03" if masked else None, 1001)
    spliced = stream[:boundary] + close + stream[boundary:]
    spans = websockets_spans(spliced, masked=masked)
    inserted = next(s for s in spans if s.start == boundary)
    assert inserted.end == boundary + len(close)
    frame = next(iter(websockets_parsed(close, masked=masked)))
    parsed = Close.parse(frame.data)
    assert (parsed.code, parsed.reason) == (1001, reason[:MAX_CLOSE_REASON])


def websockets_parsed(data: bytes, *, masked: bool) -> Iterator[Frame]:
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    while reader.buffer:
        parser = Frame.parse(reader.read_exact, mask=masked)
        try:
            next(parser)
        except StopIteration as done:
            yield done.value
        else:
            raise AssertionError("websockets wanted more bytes")


# --- arbitrary bytes ---------------------------------------------------------------------------

GARBAGE = st.one_of(
    st.binary(max_size=300),
    st.lists(
        st.one_of(st.binary(max_size=6), st.sampled_from([b"\x88", b"\x7e", b"\xff" * 9])),
        max_size=60,
    ).map(b"".join),
)


@FUZZ
@given(stream=GARBAGE, cuts=CUTS, hot_path=st.booleans())
def test_arbitrary_bytes_are_walked_as_rfc_headers_or_too_many_frames(
    stream: bytes, cuts: list[int], hot_path: bool
) -> None:
    for _ in track(stream, rfc_spans(stream), cuts, hot_path=hot_path):
        pass


@FUZZ
@given(stream=GARBAGE.filter(bool), sizes=st.lists(st.integers(1, 70_000), min_size=1))
def test_peek_on_arbitrary_bytes_is_none_or_the_whole_frame(
    stream: bytes, sizes: list[int]
) -> None:
    spans = rfc_spans(stream)
    tracker = FrameTracker()
    size = tracker.peek(stream[:MAX_HEADER])
    first = spans[0]
    if first.body > len(stream[:MAX_HEADER]):
        assert size is None
        assert state(tracker) == (False, 0, False)
        return
    assert size == first.end - first.start
    assert tracker.close_seen == (first.opcode == CLOSE_OPCODE)
    for moved in itertools.islice(itertools.cycle(sizes), 100):
        if not tracker.left:
            break
        tracker.skip(min(tracker.left, moved))
        assert tracker.left >= 0


# --- close_frame -------------------------------------------------------------------------------


@FUZZ
@given(
    reason=st.text(st.characters(max_codepoint=127), max_size=200),
    mask=st.one_of(st.none(), st.binary(min_size=4, max_size=4)),
    code=st.one_of(st.sampled_from(CLOSE_CODES), st.integers(3000, 4999)),
)
def test_close_frame_is_one_close_websockets_reads_back(
    reason: str, mask: bytes | None, code: int
) -> None:
    data = close_frame(reason, mask, code)
    frames = list(websockets_parsed(data, masked=mask is not None))
    assert len(frames) == 1
    assert frames[0].opcode is Opcode.CLOSE
    assert frames[0].fin
    close = Close.parse(frames[0].data)
    assert (close.code, close.reason) == (code, reason[:MAX_CLOSE_REASON])
    tracker = FrameTracker()
    tracker.feed(data, len(data))
    assert state(tracker) == (False, 0, True)
