"""Where WebSocket frames begin, and the Close frame the tunnel sends when it ends a tunnel.

To close a WebSocket politely the tunnel must put a Close frame between two frames, never inside
one, so each direction of a WebSocket tunnel carries a ``FrameTracker``: it reads frame headers
(2 to 14 bytes, RFC 6455 section 5.2) and skips payloads by their length, without looking at,
unmasking or copying them. It knows nothing of sockets: the relay feeds it the bytes it copied,
or, when it splices, the header it peeked and the number of bytes the kernel moved.

Not checked: opcodes, reserved bits, masking rules, UTF-8, fragmentation order. A peer that breaks
them is the backend's or the client's business; the tracker only needs the lengths to be honest,
and a liar only misplaces its own Close frame.
"""

from __future__ import annotations

from dataclasses import dataclass

GOING_AWAY = 1001
"""RFC 6455 close code: the endpoint is going away (server shutdown, drain, lifetime...)."""
CLOSE_OPCODE = 0x8
MAX_HEADER = 14
"""2 bytes, 8 of extended length, 4 of mask key."""
MAX_CLOSE_REASON = 123
"""A control frame's payload is at most 125 bytes, two of which are the code."""
FRAMES_ALWAYS_TRACKED = 32
SMALLEST_AVERAGE_FRAME = 32
"""Beyond ``FRAMES_ALWAYS_TRACKED`` frames in one read, the frames of that read must average at
least this many bytes, or the tracker gives up (``TooManyFrames``). Reading a header costs about
0.2 µs of Python where relaying costs about 1 ns a byte: 64 KiB of empty 2-byte frames would
take 7 ms to track, a cheap way for one client to burn a core. With this bound tracking costs at
most about 6 µs plus 6 ns a byte per read; a chatty client whose many tiny messages arrive
batched in one read only loses the Close frame at the end (its tunnel closes plainly)."""


class TooManyFrames(Exception):
    """A read held too many tiny frames (``SMALLEST_AVERAGE_FRAME``): the tracker stopped,
    and the stream's boundaries are no longer known."""


def header_size(first: int, second: int) -> int:
    """The whole header's size, known from its first two bytes."""
    size = 6 if second & 0x80 else 2
    length = second & 0x7F
    if length == 126:
        return size + 2
    if length == 127:
        return size + 8
    return size


def _parse(data: bytes | bytearray | memoryview, pos: int, end: int) -> tuple[int, int, int] | None:
    """``(header size, payload length, opcode)`` of the header at ``data[pos:]``, or None when
    ``data[pos:end]`` does not hold all of it."""
    if end - pos < 2:
        return None
    second = data[pos + 1]
    length = second & 0x7F
    size = 6 if second & 0x80 else 2
    if length == 126:
        size += 2
        if end - pos < size:
            return None
        length = int.from_bytes(data[pos + 2 : pos + 4])
    elif length == 127:
        size += 8
        if end - pos < size:
            return None
        length = int.from_bytes(data[pos + 2 : pos + 10])
    elif end - pos < size:
        return None
    return size, length, data[pos] & 0x0F


class FrameTracker:
    """Frame boundaries of one direction of a WebSocket byte stream.

    ``left`` is how many bytes of the frame in flight are still to come; 0 with no partial
    header held means the stream stands between two frames. The relay's hot path may update
    ``left`` itself when a read ends inside a payload (``left >= n``), which is the common case
    for large frames; ``feed`` does the rest.
    """

    __slots__ = ("_head", "close_seen", "left")

    def __init__(self) -> None:
        self.left = 0
        self._head = b""
        """The start of a header that a read cut short."""
        self.close_seen = False
        """A Close frame's header has passed."""

    @property
    def in_frame(self) -> bool:
        """Bytes of a frame already passed and more of it still to come."""
        return self.left > 0 or bool(self._head)

    def feed(self, data: bytes | bytearray | memoryview, end: int) -> None:
        """Account for ``data[:end]``, the next bytes of the stream.

        Raises:
            TooManyFrames: ``data[:end]`` held too many tiny frames (``SMALLEST_AVERAGE_FRAME``);
                the tracker is then of no further use.
        """
        pos = self.left
        if pos >= end:
            self.left = pos - end
            return
        if self._head:
            pos = self._complete_head(data, end)
            if pos < 0:
                return
        budget = FRAMES_ALWAYS_TRACKED + (end - pos) // SMALLEST_AVERAGE_FRAME
        while pos < end:
            budget -= 1
            if budget < 0:
                raise TooManyFrames
            # The common case written out (a payload under 126 bytes, the header whole in
            # this read): this loop runs once per frame of every WebSocket message.
            if end - pos >= 6:
                second = data[pos + 1]
                length = second & 0x7F
                if length < 126:
                    if data[pos] & 0x0F == CLOSE_OPCODE:
                        self.close_seen = True
                    pos += (6 if second & 0x80 else 2) + length
                    continue
            header = _parse(data, pos, end)
            if header is None:
                self._head = bytes(data[pos:end])
                self.left = 0
                return
            size, length, opcode = header
            if opcode == CLOSE_OPCODE:
                self.close_seen = True
            pos += size + length
        self.left = pos - end

    def finish_frame(self, data: bytes | bytearray | memoryview, end: int) -> int:
        """Account for the bytes of ``data[:end]`` that belong to the frame in flight, and
        return how many they are: ``end`` when the frame goes on past them, fewer when it ends
        inside them (the rest starts the next frame), 0 when no frame is in flight."""
        if self._head:
            pos = self._complete_head(data, end)
            if pos < 0:
                return end
        else:
            pos = 0
        if pos + self.left >= end:
            self.left -= end - pos
            return end
        pos += self.left
        self.left = 0
        return pos

    def _complete_head(self, data: bytes | bytearray | memoryview, end: int) -> int:
        """Join a cut header with the bytes that follow it. Returns where in ``data`` the
        frame after it begins (``left`` is then 0), or -1 when the header is still incomplete
        (everything was consumed) or the frame goes on past ``end`` (``left`` says how far)."""
        held = len(self._head)
        joined = self._head + bytes(data[: min(end, MAX_HEADER)])
        header = _parse(joined, 0, len(joined))
        if header is None:
            self._head = joined
            return -1
        size, length, opcode = header
        self._head = b""
        if opcode == CLOSE_OPCODE:
            self.close_seen = True
        rest = size - held + length
        if rest > end:
            self.left = rest - end
            return -1
        self.left = 0
        return rest

    def peek(self, head: bytes) -> int | None:
        """Between two frames, given the first bytes of the next one (read with ``MSG_PEEK``),
        the size of that whole frame, header included, which the caller then moves and counts
        with ``skip``; None when ``head`` does not hold the whole header."""
        header = _parse(head, 0, len(head))
        if header is None:
            return None
        size, length, opcode = header
        if opcode == CLOSE_OPCODE:
            self.close_seen = True
        self.left = size + length
        return self.left

    def skip(self, moved: int) -> None:
        """``moved`` bytes of the frame in flight passed without being read (spliced)."""
        self.left -= moved

    def position(self) -> FramePosition:
        """Where the stream stands, for a tracker in another process to carry on from
        (``resume``): a tunnel handed off keeps its frame boundaries."""
        return FramePosition(self.left, self._head, self.close_seen)

    @classmethod
    def resume(cls, position: FramePosition) -> FrameTracker:
        """A tracker standing where ``position`` says, as if it had read the same bytes.

        Raises:
            ValueError: the position cannot come from a tracker (``left`` negative, a held
                header that is complete or too long, or both ``left`` and a header).
        """
        left, head, close_seen = position.left, position.head, position.close_seen
        if left < 0 or len(head) >= MAX_HEADER or (head and left):
            raise ValueError(f"not a frame position: {position!r}")
        if head and _parse(head, 0, len(head)) is not None:
            raise ValueError(f"not a frame position (the held header is whole): {position!r}")
        tracker = cls()
        tracker.left = left
        tracker._head = head
        tracker.close_seen = close_seen
        return tracker


@dataclass(frozen=True, slots=True)
class FramePosition:
    """A ``FrameTracker``'s whole state: bytes of the frame in flight still to come, the
    start of a header a read cut short, and whether a Close header has passed."""

    left: int = 0
    head: bytes = b""
    close_seen: bool = False


def close_frame(reason: str, mask: bytes | None = None, code: int = GOING_AWAY) -> bytes:
    """A Close frame with ``code`` and ``reason`` (ASCII, cut to 123 bytes): unmasked toward a
    client, masked with the 4-byte ``mask`` toward a server (RFC 6455 section 5.3; the caller
    draws the key, since this module has no randomness)."""
    payload = code.to_bytes(2, "big") + reason.encode("ascii")[:MAX_CLOSE_REASON]
    if mask is None:
        return bytes((0x80 | CLOSE_OPCODE, len(payload))) + payload
    masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    return bytes((0x80 | CLOSE_OPCODE, 0x80 | len(payload))) + mask + masked
