"""When tunnels end on the tunnel's own initiative: lifetimes and drains, spread so that
clients do not all reconnect in the same instant.

Pure functions: the clock reading and the random draw come in as parameters.
"""

from __future__ import annotations

SPREAD_FROM = 2 / 3
"""A drain lets tunnels run undisturbed for this fraction of its window; the polite closes of
those still open are spread over the rest."""


def tunnel_lifetime(max_lifetime: float, jitter: float, draw: float) -> float:
    """One tunnel's lifetime: uniform over ``max_lifetime`` ± ``jitter`` (``draw`` uniform in
    [0, 1)), never below a tenth of ``max_lifetime``; 0 (no limit) when ``max_lifetime`` is 0.

    Clients that all connected in the same second (after a deploy, say) then reach their
    limits spread over ``2 * jitter`` seconds instead of reconnecting as a herd."""
    if max_lifetime <= 0:
        return 0.0
    return max(max_lifetime / 10, max_lifetime - jitter + 2 * jitter * draw)


def drain_window(now: float, timeout: float, close_grace: float) -> tuple[float, float, float]:
    """``(first, last, end)`` of a drain that starts at ``now`` and lasts ``timeout``.

    Tunnels still open at ``first`` get their polite closes between ``first`` and ``last``;
    whatever is open at ``end`` is closed at once. ``last`` leaves the last polite close two
    graces (a frame in flight to finish, then the Close replies) before ``end``, when the
    window is long enough; a short window starts closing at once."""
    end = now + timeout
    last = max(now, end - 2 * close_grace)
    first = min(last, now + timeout * SPREAD_FROM)
    return first, last, end


def spread(count: int, first: float, last: float) -> list[float]:
    """``count`` instants evenly spaced after ``first`` and up to ``last``: one close per step,
    never two at once unless the window is empty."""
    if count <= 0:
        return []
    step = (last - first) / count
    return [first + step * (i + 1) for i in range(count)]
