"""The relay: after the 101, bytes flow both ways untouched. It knows nothing about HTTP.

Two pumps run in one nursery. Each reads at most ``chunk_size`` bytes and writes them before
reading again, so a slow reader stalls the writer and memory stays bounded. EOF on one side is
passed on as a half-close (``send_eof``); a reset or error on either side ends both directions.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

CHUNK_SIZE = 64 * 1024

CLIENT_EOF = "client EOF"
BACKEND_EOF = "backend EOF"
CLIENT_RESET = "client reset"
BACKEND_RESET = "backend reset"
IDLE_TIMEOUT = "idle timeout"


@dataclass(slots=True)
class RelayStats:
    """Live counters of one tunnel; read them while bytes flow."""

    bytes_up: int = 0
    """Client → backend."""
    bytes_down: int = 0
    """Backend → client."""
    last_activity: float = 0.0
    close_reason: str = ""


async def relay(
    client: trio.abc.HalfCloseableStream,
    backend: trio.abc.HalfCloseableStream,
    *,
    idle_timeout: float,
    stats: RelayStats | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> RelayStats:
    """Pump bytes both ways until both sides sent EOF, one side failed, or the tunnel idled.

    ``idle_timeout`` of 0 disables the idle check. The streams are left open; the caller closes
    them. Returns the stats with ``close_reason`` set.
    """
    stats = stats if stats is not None else RelayStats()
    stats.last_activity = trio.current_time()
    finished: list[str] = []

    async def pump(
        source: trio.abc.ReceiveStream,
        sink: trio.abc.HalfCloseableStream,
        upstream: bool,
        cancel_scope: trio.CancelScope,
    ) -> None:
        eof_reason, source_reset, sink_reset = (
            (CLIENT_EOF, CLIENT_RESET, BACKEND_RESET)
            if upstream
            else (BACKEND_EOF, BACKEND_RESET, CLIENT_RESET)
        )
        while True:
            try:
                data = await source.receive_some(chunk_size)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                _end(stats, source_reset, cancel_scope)
                return
            if not data:
                break
            stats.last_activity = trio.current_time()
            try:
                await sink.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                _end(stats, sink_reset, cancel_scope)
                return
            if upstream:
                stats.bytes_up += len(data)
            else:
                stats.bytes_down += len(data)
            stats.last_activity = trio.current_time()
        if not stats.close_reason:
            stats.close_reason = eof_reason
        try:
            await sink.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            _end(stats, sink_reset, cancel_scope)
            return
        finished.append(eof_reason)
        if len(finished) == 2:
            cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        scope = nursery.cancel_scope
        nursery.start_soon(pump, client, backend, True, scope)
        nursery.start_soon(pump, backend, client, False, scope)
        if idle_timeout > 0:
            nursery.start_soon(_watch_idle, stats, idle_timeout, scope)
    return stats


def _end(stats: RelayStats, reason: str, scope: trio.CancelScope) -> None:
    """A failure ends the whole tunnel; the first reason recorded is the one reported,
    except that a reset overrides an earlier clean half-close."""
    if stats.close_reason in ("", CLIENT_EOF, BACKEND_EOF):
        stats.close_reason = reason
    scope.cancel()


async def _watch_idle(stats: RelayStats, idle_timeout: float, scope: trio.CancelScope) -> None:
    while True:
        deadline = stats.last_activity + idle_timeout
        if trio.current_time() >= deadline:
            stats.close_reason = IDLE_TIMEOUT
            scope.cancel()
            return
        await trio.sleep_until(deadline)
