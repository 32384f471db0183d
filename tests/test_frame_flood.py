"""A flood of tiny WebSocket frames must not make frame tracking a cheap way to burn a core.

Reading a frame header costs about 0.2 µs of Python; relaying costs about 1 ns a byte. Empty
2-byte frames would make tracking cost a hundred times the relay's own work per byte, so the
tracker gives up on a read whose frames are too small on average
(``wsframes.SMALLEST_AVERAGE_FRAME``): the bytes still flow untouched, and that tunnel later
closes plainly instead of with a Close frame.
"""

from __future__ import annotations

import pytest
import trio
from rawhttp import read_exactly, read_to_eof
from test_engine import MODES
from test_engine_close import BINARY, TEXT, client_frame, running_engine, server_frame

from tunnel.core.wsframes import (
    FRAMES_ALWAYS_TRACKED,
    SMALLEST_AVERAGE_FRAME,
    FrameTracker,
    TooManyFrames,
    close_frame,
)
from tunnel.reasons import CloseReason

EMPTY = b"\x82\x00"
"""An empty binary frame from a backend: the cheapest frame there is."""


def test_a_read_of_empty_frames_is_given_up() -> None:
    flood = EMPTY * 32768  # 64 KiB, 32,768 frames
    with pytest.raises(TooManyFrames):
        FrameTracker().feed(flood, len(flood))


def test_small_messages_batched_in_one_read_are_still_tracked() -> None:
    """A chatty client: many messages of the smallest average size allowed, in one read."""
    message = server_frame(TEXT, b"x" * (SMALLEST_AVERAGE_FRAME - 2))
    batch = message * (65536 // len(message))
    tracker = FrameTracker()
    tracker.feed(batch, len(batch))
    assert not tracker.in_frame


def test_a_few_tiny_frames_in_one_read_are_always_tracked() -> None:
    few = EMPTY * FRAMES_ALWAYS_TRACKED
    tracker = FrameTracker()
    tracker.feed(few, len(few))
    assert not tracker.in_frame


@pytest.mark.parametrize("relay", MODES)
async def test_a_flood_of_empty_frames_flows_intact_and_its_tunnel_closes_plainly(
    relay: str,
) -> None:
    flood = client_frame(BINARY, b"") * 16384  # 6-byte masked empty frames, 96 KiB
    async with running_engine(relay=relay) as engine:
        conn = engine.open()
        await conn.client.send_all(flood)
        assert await read_exactly(conn.backend, len(flood)) == flood
        # The other direction still carries messages.
        message = server_frame(TEXT, b"still flowing")
        await conn.backend.send_all(message)
        assert await read_exactly(conn.client, len(message)) == message
        engine.close(conn, CloseReason.ADMIN)
        with trio.fail_after(5):
            to_client = await read_to_eof(conn.client, b"")
            to_backend = await read_to_eof(conn.backend, b"")
    assert to_client == b"", "no Close frame: the boundaries were given up"
    assert to_backend == b""
    assert conn.stats.close_reason == CloseReason.ADMIN


@pytest.mark.parametrize("relay", MODES)
async def test_a_tunnel_without_a_flood_still_closes_politely(relay: str) -> None:
    """The control case of the test above: the same exchange with real messages."""
    async with running_engine(relay=relay, close_grace=0.5) as engine:
        conn = engine.open()
        messages = client_frame(BINARY, b"m" * 100) * 600
        await conn.client.send_all(messages)
        assert await read_exactly(conn.backend, len(messages)) == messages
        engine.close(conn, CloseReason.ADMIN)
        with trio.fail_after(5):
            assert await read_exactly(conn.client, len(close_frame("admin"))) == close_frame(
                "admin"
            )
