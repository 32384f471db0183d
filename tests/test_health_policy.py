"""Health state machines: rise/fall over active checks, consecutive passive connect failures."""

from __future__ import annotations

import pytest

from tunnel.policy.health import HealthState, PassiveFailures


def run(state: HealthState, results: str) -> str:
    """Feed '+'/'-' results; answer with the state after each ('U'/'D'), lower-case on a flip."""
    out = []
    for result in results:
        flipped = state.observe(result == "+")
        letter = "U" if state.up else "D"
        out.append(letter.lower() if flipped else letter)
    return "".join(out)


@pytest.mark.parametrize(
    ("rise", "fall", "up", "results", "expected"),
    [
        (2, 3, True, "+++", "UUU"),
        (2, 3, True, "---", "UUd"),
        (2, 3, True, "--+--", "UUUUU"),
        (2, 3, True, "---+-+", "UUdDDD"),
        (2, 3, True, "---++", "UUdDu"),
        (2, 3, True, "---++---", "UUdDuUUd"),
        (2, 3, True, "-----", "UUdDD"),
        (2, 3, False, "+", "D"),
        (2, 3, False, "++", "Du"),
        (2, 3, False, "+-++", "DDDu"),
        (1, 1, True, "-+-+", "dudu"),
        (1, 1, True, "++--", "UUdD"),
        (3, 2, False, "+++--", "DDuUd"),
    ],
)
def test_rise_and_fall(rise: int, fall: int, up: bool, results: str, expected: str) -> None:
    state = HealthState(rise, fall, up)
    assert run(state, results) == expected


def test_default_is_up() -> None:
    assert HealthState(2, 3).up


@pytest.mark.parametrize(("rise", "fall"), [(0, 1), (1, 0), (-1, 3)])
def test_bad_thresholds(rise: int, fall: int) -> None:
    with pytest.raises(ValueError, match="rise and fall"):
        HealthState(rise, fall)


def test_passive_failures_reach_the_limit() -> None:
    failures = PassiveFailures(3)
    assert [failures.failed() for _ in range(7)] == [False, False, True, False, False, True, False]


def test_a_success_resets_the_run() -> None:
    failures = PassiveFailures(3)
    assert [failures.failed(), failures.failed()] == [False, False]
    failures.succeeded()
    assert failures.count == 0
    assert [failures.failed(), failures.failed(), failures.failed()] == [False, False, True]


def test_limit_one() -> None:
    failures = PassiveFailures(1)
    assert [failures.failed() for _ in range(3)] == [True, True, True]


def test_zero_is_off() -> None:
    failures = PassiveFailures(0)
    assert not any(failures.failed() for _ in range(100))
    failures.succeeded()
    assert failures.count == 0


def test_negative_limit() -> None:
    with pytest.raises(ValueError, match="passive_failures"):
        PassiveFailures(-1)
