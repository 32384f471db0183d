"""Balancing: smooth weighted round-robin, slow start, least-conn, rendezvous hashing."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from tunnel.policy.balance import BackendState, Balancer, rendezvous_score, why_none

ABCD = ("a", "b", "c", "d")


def states(*names: str, **overrides: dict[str, object]) -> list[BackendState]:
    return [BackendState(name, **overrides.get(name, {})) for name in names]  # type: ignore[arg-type]


def picks(balancer: Balancer, backends: list[BackendState], count: int, now: float = 0.0) -> str:
    return "".join(balancer.order(backends, now=now)[0] for _ in range(count))


# --- round-robin -----------------------------------------------------------------------------


def test_equal_weights_rotate() -> None:
    balancer = Balancer("round-robin", ("a", "b", "c"))
    assert picks(balancer, states("a", "b", "c"), 7) == "abcabca"


def test_three_to_one_is_exact_and_interleaved() -> None:
    balancer = Balancer("round-robin", ("a", "b"))
    backends = [BackendState("a", weight=3), BackendState("b", weight=1)]
    sequence = picks(balancer, backends, 400)
    assert Counter(sequence) == {"a": 300, "b": 100}
    assert sequence[:4] == "aaba"
    assert "aaaa" not in sequence  # never a run longer than the weight ratio allows
    assert all(Counter(sequence[i : i + 4]) == {"a": 3, "b": 1} for i in range(0, 400, 4))


def test_nginx_five_one_one() -> None:
    # The sequence in nginx's commit message for smooth weighted round-robin.
    balancer = Balancer("round-robin", ("a", "b", "c"))
    backends = [BackendState("a", weight=5), BackendState("b"), BackendState("c")]
    assert picks(balancer, backends, 7) == "aabacaa"


@pytest.mark.parametrize("method", ["round-robin", "cookie", "hash"])
def test_failover_order_lists_every_available_backend_once(method: str) -> None:
    balancer = Balancer(method, ABCD)
    backends = [BackendState(name, weight=i + 1) for i, name in enumerate(ABCD)]
    for _ in range(20):
        order = balancer.order(backends, now=0.0)
        assert sorted(order) == list(ABCD)


def test_failover_order_is_by_current_weight_then_ring() -> None:
    balancer = Balancer("round-robin", ("a", "b", "c"))
    backends = states("a", "b", "c")
    # After the first pick a has -2, b and c have 1 each: the tie goes to ring order.
    assert balancer.order(backends, now=0.0) == ["a", "b", "c"]
    assert balancer.order(backends, now=0.0) == ["b", "c", "a"]
    assert balancer.order(backends, now=0.0) == ["c", "a", "b"]


def test_same_calls_same_answers() -> None:
    backends = [BackendState("a", weight=2), BackendState("b", weight=3), BackendState("c")]
    first, second = Balancer("round-robin", ("a", "b", "c")), Balancer("round-robin", "abc")
    assert [first.order(backends, now=0) for _ in range(30)] == [
        second.order(backends, now=0) for _ in range(30)
    ]


# --- slow start ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("elapsed", "expected_share"),
    [(0.0, 0.01 / 1.01), (25.0, 0.25 / 1.25), (50.0, 0.5 / 1.5), (100.0, 0.5), (500.0, 0.5)],
)
def test_slow_start_ramps_linearly(elapsed: float, expected_share: float) -> None:
    balancer = Balancer("round-robin", ("old", "new"))
    backends = [
        BackendState("old"),
        BackendState("new", up_since=1000.0, slow_start=100.0),
    ]
    count = 10_100
    sequence = [balancer.order(backends, now=1000.0 + elapsed)[0] for _ in range(count)]
    share = sequence.count("new") / count
    assert share == pytest.approx(expected_share, abs=0.001)


@pytest.mark.parametrize(
    ("now", "weight"),
    [(-5.0, 0.04), (0.0, 0.04), (1.0, 0.4), (5.0, 2.0), (10.0, 4.0), (11.0, 4.0), (1e9, 4.0)],
)
def test_effective_weight(now: float, weight: float) -> None:
    state = BackendState("a", weight=4, up_since=0.0, slow_start=10.0)
    assert state.effective_weight(now) == pytest.approx(weight)


def test_no_slow_start_means_full_weight_at_once() -> None:
    assert BackendState("a", weight=7, up_since=5.0).effective_weight(5.0) == 7.0
    assert BackendState("a", weight=7, slow_start=10.0).effective_weight(0.0) == 7.0  # -inf


# --- least-conn ------------------------------------------------------------------------------


def test_least_conn_picks_the_emptiest() -> None:
    balancer = Balancer("least-conn", ("a", "b", "c"))
    backends = [
        BackendState("a", open_tunnels=5),
        BackendState("b", open_tunnels=2),
        BackendState("c", open_tunnels=9),
    ]
    assert balancer.order(backends, now=0.0) == ["b", "a", "c"]


def test_least_conn_counts_weight() -> None:
    balancer = Balancer("least-conn", ("a", "b"))
    backends = [BackendState("a", weight=4, open_tunnels=7), BackendState("b", open_tunnels=2)]
    # (7 + 1) / 4 = 2 < (2 + 1) / 1 = 3
    assert balancer.order(backends, now=0.0) == ["a", "b"]


def test_least_conn_rotates_ties() -> None:
    balancer = Balancer("least-conn", ("a", "b", "c"))
    backends = states("a", "b", "c")
    assert [balancer.order(backends, now=0.0)[0] for _ in range(6)] == list("abcabc")
    assert balancer.order(backends, now=0.0) == ["a", "b", "c"]
    assert balancer.order(backends, now=0.0) == ["b", "c", "a"]


def test_least_conn_rotation_skips_the_busy() -> None:
    balancer = Balancer("least-conn", ("a", "b", "c"))
    backends = [BackendState("a"), BackendState("b", open_tunnels=3), BackendState("c")]
    assert [balancer.order(backends, now=0.0)[0] for _ in range(4)] == list("acac")


def test_least_conn_follows_counts_as_they_fill() -> None:
    balancer = Balancer("least-conn", ABCD)
    counts = dict.fromkeys(ABCD, 0)
    for _ in range(40):
        chosen = balancer.order([BackendState(n, open_tunnels=c) for n, c in counts.items()], now=0)
        counts[chosen[0]] += 1
    assert counts == dict.fromkeys(ABCD, 10)


def test_least_conn_slow_start_gets_less() -> None:
    balancer = Balancer("least-conn", ("old", "new"))
    backends = [
        BackendState("old", open_tunnels=10),
        BackendState("new", open_tunnels=1, up_since=0.0, slow_start=100.0),
    ]
    assert balancer.order(backends, now=10.0)[0] == "old"  # (1 + 1) / 0.1 = 20 > 11
    assert balancer.order(backends, now=100.0)[0] == "new"


# --- hash ------------------------------------------------------------------------------------

KEYS = [f"client-{i}".encode() for i in range(10_000)]


def shares(balancer: Balancer, backends: list[BackendState]) -> dict[bytes, str]:
    return {key: balancer.order(backends, now=0.0, key=key)[0] for key in KEYS}


def test_hash_is_stable_across_restarts() -> None:
    backends = states(*ABCD)
    first = [Balancer("hash", ABCD).order(backends, now=0.0, key=key) for key in KEYS[:500]]
    again = [Balancer("hash", ABCD).order(backends, now=9.0, key=key) for key in KEYS[:500]]
    assert first == again
    # Known answers: the hash is blake2b, the same in every process on every platform.
    assert rendezvous_score(b"k", "a", 1.0) == rendezvous_score(b"k", "a", 1.0)
    assert [Balancer("hash", ABCD).order(backends, now=0, key=k)[0] for k in (b"x", b"y")] == [
        max(ABCD, key=lambda n: rendezvous_score(k, n, 1.0)) for k in (b"x", b"y")
    ]


def test_hash_spreads_evenly() -> None:
    counts = Counter(shares(Balancer("hash", ABCD), states(*ABCD)).values())
    assert all(2300 < counts[name] < 2700 for name in ABCD), counts


@pytest.mark.parametrize("removed", ABCD)
@pytest.mark.parametrize("how", ["ineligible", "full", "missing"])
def test_removing_one_backend_moves_only_its_keys(removed: str, how: str) -> None:
    balancer = Balancer("hash", ABCD)
    before = shares(balancer, states(*ABCD))
    if how == "missing":
        after_states = states(*(n for n in ABCD if n != removed))
    else:
        change = (
            {"eligible": False} if how == "ineligible" else {"max_tunnels": 1, "open_tunnels": 1}
        )
        after_states = states(*ABCD, **{removed: change})
    after = shares(balancer, after_states)
    moved = {key for key in KEYS if before[key] != after[key]}
    assert moved == {key for key in KEYS if before[key] == removed}
    assert 0.22 < len(moved) / len(KEYS) < 0.28
    # The keys that moved spread over the others, and come back when the backend returns.
    assert removed not in {after[key] for key in moved}
    assert shares(balancer, states(*ABCD)) == before


def test_adding_a_backend_takes_keys_only_for_itself() -> None:
    balancer = Balancer("hash", (*ABCD, "e"))
    before = shares(balancer, states(*ABCD))
    after = shares(balancer, states(*ABCD, "e"))
    moved = {key for key in KEYS if before[key] != after[key]}
    assert {after[key] for key in moved} == {"e"}
    assert 0.17 < len(moved) / len(KEYS) < 0.23


def test_hash_weights_skew_shares() -> None:
    backends = [BackendState(name, weight=i + 1) for i, name in enumerate(ABCD)]
    counts = Counter(shares(Balancer("hash", ABCD), backends).values())
    for i, name in enumerate(ABCD):
        assert counts[name] / len(KEYS) == pytest.approx((i + 1) / 10, abs=0.02), counts


def test_hash_failover_order_is_by_score() -> None:
    balancer = Balancer("hash", ABCD)
    order = balancer.order(states(*ABCD), now=0.0, key=b"user-42")
    scores = [rendezvous_score(b"user-42", name, 1.0) for name in order]
    assert scores == sorted(scores, reverse=True)
    assert sorted(order) == list(ABCD)


def test_hash_without_a_key_is_round_robin() -> None:
    balancer = Balancer("hash", ("a", "b"))
    assert picks(balancer, states("a", "b"), 4) == "abab"


def test_rendezvous_score_is_positive_and_finite() -> None:
    for key in KEYS[:2000]:
        score = rendezvous_score(key, "a", 1.0)
        assert 0 < score < math.inf


# --- what every method leaves out ------------------------------------------------------------

METHODS = ["round-robin", "least-conn", "hash", "cookie"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("key", [None, b"k1", b"k2", b"k3"])
def test_ineligible_and_full_are_skipped(method: str, key: bytes | None) -> None:
    balancer = Balancer(method, ABCD)
    backends = [
        BackendState("a", eligible=False),
        BackendState("b", max_tunnels=3, open_tunnels=3),
        BackendState("c", max_tunnels=3, open_tunnels=2),
        BackendState("d", weight=5, max_tunnels=0, open_tunnels=1000),
    ]
    for _ in range(10):
        assert sorted(balancer.order(backends, now=0.0, key=key)) == ["c", "d"]


@pytest.mark.parametrize("method", METHODS)
def test_unknown_and_missing_names(method: str) -> None:
    balancer = Balancer(method, ("a", "b"))
    order = balancer.order(states("b", "zzz"), now=0.0, key=b"k")
    assert order == ["b"]
    assert balancer.order(states("zzz"), now=0.0, key=b"k") == []
    assert balancer.why_none(states("zzz")) == "down"


@pytest.mark.parametrize("method", METHODS)
def test_nothing_available(method: str) -> None:
    balancer = Balancer(method, ("a", "b"))
    down = [BackendState("a", eligible=False), BackendState("b", eligible=False)]
    full = [
        BackendState("a", eligible=False),
        BackendState("b", max_tunnels=1, open_tunnels=2),
    ]
    assert balancer.order(down, now=0.0, key=b"k") == []
    assert balancer.order(full, now=0.0, key=b"k") == []
    assert balancer.order([], now=0.0) == []
    assert balancer.why_none(down) == "down"
    assert balancer.why_none(full) == "full"


@pytest.mark.parametrize(
    ("backends", "reason"),
    [
        ([], "down"),
        ([BackendState("a", eligible=False)], "down"),
        ([BackendState("a", eligible=False, max_tunnels=1, open_tunnels=1)], "down"),
        ([BackendState("a", max_tunnels=1, open_tunnels=1)], "full"),
        (
            [BackendState("a", eligible=False), BackendState("b", max_tunnels=2, open_tunnels=2)],
            "full",
        ),
        ([BackendState("a", max_tunnels=1, open_tunnels=1), BackendState("b")], ""),
        ([BackendState("a", max_tunnels=2, open_tunnels=1)], ""),
    ],
)
def test_why_none(backends: list[BackendState], reason: str) -> None:
    assert why_none(backends) == reason


def test_ineligible_backend_rejoins_round_robin() -> None:
    balancer = Balancer("round-robin", ("a", "b"))
    assert picks(balancer, [BackendState("a"), BackendState("b", eligible=False)], 3) == "aaa"
    assert Counter(picks(balancer, states("a", "b"), 10)) == {"a": 5, "b": 5}


@pytest.mark.parametrize(
    ("method", "names"),
    [("random", ("a",)), ("round-robin", ()), ("least-conn", ("a", "a"))],
)
def test_bad_balancer(method: str, names: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match=r"method|backend"):
        Balancer(method, names)


@pytest.mark.parametrize(
    "fields",
    [{"weight": 0}, {"weight": 257}, {"open_tunnels": -1}, {"max_tunnels": -1}, {"slow_start": -1}],
)
def test_bad_state(fields: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="backend 'a'"):
        BackendState("a", **fields)  # type: ignore[arg-type]
