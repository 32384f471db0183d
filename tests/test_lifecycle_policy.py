"""When tunnels end on the tunnel's own initiative (``tunnel.policy.lifecycle``): each tunnel's
lifetime with its jitter, a drain's window, and the instants its polite closes are spread over.

Pure functions: the clock reading and the random draw are parameters, so every case is exact.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunnel.policy.lifecycle import SPREAD_FROM, drain_window, spread, tunnel_lifetime

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ALMOST_ONE = 1 - 2**-53
"""The largest draw below 1 (``random.random()`` never returns 1)."""

# --- tunnel_lifetime ---------------------------------------------------------------------------


@pytest.mark.parametrize("jitter", [0.0, 5.0, 3600.0])
@pytest.mark.parametrize("draw", [0.0, 0.5, ALMOST_ONE])
@pytest.mark.parametrize("max_lifetime", [0.0, -1.0])
def test_a_zero_lifetime_means_no_limit(max_lifetime: float, jitter: float, draw: float) -> None:
    assert tunnel_lifetime(max_lifetime, jitter, draw) == 0.0


@pytest.mark.parametrize("draw", [0.0, 0.25, 0.5, ALMOST_ONE])
def test_no_jitter_gives_the_lifetime_itself(draw: float) -> None:
    assert tunnel_lifetime(3600.0, 0.0, draw) == 3600.0


@pytest.mark.parametrize(
    ("max_lifetime", "jitter", "draw", "expected"),
    [
        (3600.0, 600.0, 0.0, 3000.0),
        (3600.0, 600.0, 0.5, 3600.0),
        (3600.0, 600.0, 0.25, 3300.0),
        (3600.0, 600.0, 0.75, 3900.0),
        (100.0, 10.0, 0.0, 90.0),
        (100.0, 10.0, 0.5, 100.0),
    ],
)
def test_the_draw_spreads_the_lifetime_uniformly(
    max_lifetime: float, jitter: float, draw: float, expected: float
) -> None:
    assert tunnel_lifetime(max_lifetime, jitter, draw) == pytest.approx(expected)


def test_the_jitter_bounds_with_extreme_draws() -> None:
    low = tunnel_lifetime(3600.0, 600.0, 0.0)
    high = tunnel_lifetime(3600.0, 600.0, ALMOST_ONE)
    assert low == 3000.0
    # Uniform over [3000, 4200): a draw just below 1 lands at the top (rounded to it).
    assert 4199.99 < high <= 4200.0


@pytest.mark.parametrize(
    ("max_lifetime", "jitter", "draw"),
    [
        (100.0, 100.0, 0.0),  # would be 0
        (100.0, 95.0, 0.0),  # would be 5
        (100.0, 1000.0, 0.0),  # would be negative
        (100.0, 1000.0, 0.3),  # would be -300
        (60.0, 60.0, 0.01),
    ],
)
def test_the_lifetime_is_never_below_a_tenth(
    max_lifetime: float, jitter: float, draw: float
) -> None:
    assert tunnel_lifetime(max_lifetime, jitter, draw) == max_lifetime / 10


def test_a_tenth_is_only_a_floor() -> None:
    # With the jitter larger than the lifetime, draws that land above the floor keep their value.
    assert tunnel_lifetime(100.0, 1000.0, 0.5) == 100.0
    assert tunnel_lifetime(100.0, 1000.0, ALMOST_ONE) == pytest.approx(1100.0)


@FUZZ
@given(
    max_lifetime=st.floats(0.001, 1e7),
    jitter=st.floats(0.0, 1e7),
    draw=st.floats(0.0, 1.0, exclude_max=True),
)
def test_lifetime_bounds_hold_for_every_draw(
    max_lifetime: float, jitter: float, draw: float
) -> None:
    lifetime = tunnel_lifetime(max_lifetime, jitter, draw)
    assert lifetime >= max_lifetime / 10
    assert lifetime >= max_lifetime - jitter - 1e-9 * max(max_lifetime, jitter)
    assert lifetime <= max(max_lifetime / 10, max_lifetime + jitter) * (1 + 1e-12)


@FUZZ
@given(
    max_lifetime=st.floats(1.0, 1e6),
    jitter=st.floats(0.0, 1e6),
    draws=st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.floats(0.0, 1.0, exclude_max=True)),
)
def test_a_larger_draw_never_gives_a_shorter_lifetime(
    max_lifetime: float, jitter: float, draws: tuple[float, float]
) -> None:
    small, large = sorted(draws)
    assert tunnel_lifetime(max_lifetime, jitter, small) <= tunnel_lifetime(
        max_lifetime, jitter, large
    )


# --- drain_window ------------------------------------------------------------------------------


def test_a_long_window_spreads_from_two_thirds_to_two_graces_before_the_end() -> None:
    first, last, end = drain_window(now=1000.0, timeout=30.0, close_grace=1.0)
    assert end == 1030.0
    assert first == pytest.approx(1020.0)
    assert last == 1028.0


@pytest.mark.parametrize(
    ("timeout", "close_grace", "expected"),
    [
        (30.0, 1.0, (20.0, 28.0, 30.0)),
        (300.0, 5.0, (200.0, 290.0, 300.0)),
        (30.0, 0.0, (20.0, 30.0, 30.0)),  # no grace: the spread runs to the end
        (30.0, 5.0, (20.0, 20.0, 30.0)),  # last == first: exactly two graces left at 2/3
        (30.0, 6.0, (18.0, 18.0, 30.0)),  # short window: starts when two graces remain
        (3.0, 1.0, (1.0, 1.0, 3.0)),
        (2.0, 1.0, (0.0, 0.0, 2.0)),  # two graces: starts closing at once
        (1.0, 1.0, (0.0, 0.0, 1.0)),  # shorter than two graces: never before now
        (0.0, 1.0, (0.0, 0.0, 0.0)),
    ],
)
def test_drain_window_table(
    timeout: float, close_grace: float, expected: tuple[float, float, float]
) -> None:
    now = 500.0
    first, last, end = drain_window(now, timeout, close_grace)
    assert (first - now, last - now, end - now) == pytest.approx(expected)


@FUZZ
@given(
    now=st.floats(0.0, 1e9),
    timeout=st.floats(0.0, 1e5),
    close_grace=st.floats(0.0, 1e3),
)
def test_drain_window_is_ordered_and_inside_the_timeout(
    now: float, timeout: float, close_grace: float
) -> None:
    first, last, end = drain_window(now, timeout, close_grace)
    assert now <= first <= last <= end
    assert end == now + timeout
    assert first <= now + timeout * SPREAD_FROM + 1e-6 * max(1.0, now)
    if timeout >= 2 * close_grace:
        assert last == pytest.approx(end - 2 * close_grace)
    else:
        assert last == now


# --- spread ------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [0, -1, -10])
def test_spread_of_nothing_is_empty(count: int) -> None:
    assert spread(count, 20.0, 28.0) == []


def test_spread_of_one_is_the_last_instant() -> None:
    assert spread(1, 20.0, 28.0) == [28.0]


def test_spread_of_four_is_evenly_spaced_after_first() -> None:
    assert spread(4, 20.0, 28.0) == [22.0, 24.0, 26.0, 28.0]


@pytest.mark.parametrize("count", [2, 3, 10, 1000, 100_000])
@pytest.mark.parametrize(("first", "last"), [(0.0, 1.0), (1020.0, 1028.0), (1e6, 1e6 + 3600)])
def test_spread_of_many_is_strictly_increasing_and_inside_the_window(
    count: int, first: float, last: float
) -> None:
    instants = spread(count, first, last)
    assert len(instants) == count
    assert all(a < b for a, b in itertools.pairwise(instants)), "two closes at once"
    assert first < instants[0]
    assert instants[-1] == pytest.approx(last)
    assert all(first <= t <= last + 1e-9 * abs(last) for t in instants)
    steps = [b - a for a, b in itertools.pairwise(instants)]
    assert max(steps) - min(steps) < 1e-6 * (last - first), "evenly spaced"


def test_an_empty_window_puts_every_close_at_its_one_instant() -> None:
    assert spread(3, 5.0, 5.0) == [5.0, 5.0, 5.0]


@FUZZ
@given(
    count=st.integers(0, 2000),
    first=st.floats(0.0, 1e9),
    width=st.floats(0.0, 1e5),
)
def test_spread_property(count: int, first: float, width: float) -> None:
    last = first + width
    instants = spread(count, first, last)
    assert len(instants) == max(0, count)
    slack = 1e-9 * max(1.0, abs(last))  # rounding of step * count
    assert all(first <= t <= last + slack for t in instants)
    assert instants == sorted(instants)
    if count and (last - first) / count > 1e-6 * max(1.0, abs(last)):
        assert all(a < b for a, b in itertools.pairwise(instants))
