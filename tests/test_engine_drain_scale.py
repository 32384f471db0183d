"""A drain's cost grows with the tunnels it closes, not with their square: the timer heap is
rebuilt O(1) times per close, amortised, even though a drain gives every tunnel a second,
earlier deadline (each close used to rebuild the whole heap)."""

from __future__ import annotations

import heapq
import socket
from collections.abc import Iterator

import pytest
import trio

from tunnel.net import engine as engine_module
from tunnel.net.engine import Engine
from tunnel.net.relay import RelayStats
from tunnel.reasons import CloseReason

TUNNELS = 1500


class CountingHeapq:
    """``heapq`` with its rebuilds counted."""

    def __init__(self) -> None:
        self.heapify_calls = 0
        self.heappush = heapq.heappush
        self.heappop = heapq.heappop

    def heapify(self, items: list[object]) -> None:
        self.heapify_calls += 1
        heapq.heapify(items)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> CountingHeapq:
    counting = CountingHeapq()
    monkeypatch.setattr(engine_module, "heapq", counting)
    return counting


@pytest.fixture
def pairs() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    """(client, backend) ends for the engine; their peers stay open, silent, until the end."""
    ends, peers = [], []
    for _ in range(TUNNELS):
        client, client_peer = socket.socketpair()
        backend, backend_peer = socket.socketpair()
        client.setblocking(False)
        backend.setblocking(False)
        ends.append((client, backend))
        peers += [client_peer, backend_peer]
    yield ends
    for sock in peers:
        sock.close()


async def test_draining_many_tunnels_rebuilds_the_timer_heap_a_few_times_only(
    counted: CountingHeapq,
    pairs: list[tuple[socket.socket, socket.socket]],
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = Engine(relay="copy", splice_pipes=0, idle_timeout=3600.0, close_grace=1.0)
    closed: list[CloseReason | None] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        for client, backend in pairs:
            engine.adopt(
                client,
                backend,
                RelayStats(),
                lambda tunnel: closed.append(tunnel.stats.close_reason),
                websocket=True,
            )
        await trio.sleep(0.1)
        engine.drain((), CloseReason.SHUTDOWN, 30.0, every=True)
        with trio.fail_after(60):
            await engine.wait_empty()
        nursery.cancel_scope.cancel()
    assert len(closed) == TUNNELS
    # Amortised O(1): a rebuild halves the heap, so about log2(TUNNELS) of them, not one per
    # close (1,500 before the fix).
    assert counted.heapify_calls < 40
