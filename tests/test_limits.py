"""Per-client limits and admission pacing (``tunnel.policy.limits``): rates, the token bucket,
client keys, the memory store and ``Admission``.

Pure: every clock reading is a number the test passes, so every case is exact; the store's
methods never yield, so they run under trio without a clock at all.
"""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunnel.policy.limits import (
    DEFAULT_MAX_BUCKETS,
    EPSILON,
    MAX_RETRY_AFTER,
    OFF,
    Admission,
    LimitStore,
    MemoryStore,
    MemoryStoreStats,
    Rate,
    StoreUnavailable,
    TokenBucket,
    client_key,
    parse_rate,
    retry_after,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TEN_PER_SECOND = Rate(10.0, 1.0)
ALMOST_ONE = 1 - 2**-53
"""The largest draw below 1 (``random.random()`` never returns 1)."""

# --- rates -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "rate", "per_second"),
    [
        ("10/s", Rate(10.0, 1.0), 10.0),
        ("600/m", Rate(600.0, 60.0), 10.0),
        ("1/m", Rate(1.0, 60.0), 1 / 60),
        ("0.5/s", Rate(0.5, 1.0), 0.5),
        ("0/s", Rate(0.0, 1.0), 0.0),
        (" 5/s ", Rate(5.0, 1.0), 5.0),
    ],
)
def test_parse_rate(text: str, rate: Rate, per_second: float) -> None:
    assert parse_rate(text) == rate
    assert parse_rate(text).per_second == pytest.approx(per_second)


@pytest.mark.parametrize(
    "text", ["", "10", "10/h", "10 /s", "10/S", "-1/s", "1e3/s", "10r/s", "ten/s", "/s", "10/sec"]
)
def test_parse_rate_refuses(text: str) -> None:
    with pytest.raises(ValueError, match=r'is not a rate; .* like "10/s" or "600/m"'):
        parse_rate(text)


def test_parse_rate_refuses_an_infinite_count() -> None:
    with pytest.raises(ValueError, match="too large"):
        parse_rate("9" * 400 + "/s")


@pytest.mark.parametrize(
    ("rate", "text"),
    [(Rate(10.0, 1.0), "10/s"), (Rate(600.0, 60.0), "600/m"), (Rate(0.25, 1.0), "0.25/s")],
)
def test_a_rate_is_written_back_as_it_reads(rate: Rate, text: str) -> None:
    assert str(rate) == text
    assert parse_rate(text) == rate


@given(st.decimals(min_value=0, max_value=10**6, places=3), st.sampled_from(["s", "m"]))
@FUZZ
def test_any_rate_round_trips(count: object, unit: str) -> None:
    rate = parse_rate(f"{count}/{unit}")
    assert parse_rate(str(rate)) == rate


def test_off() -> None:
    assert OFF.off
    assert parse_rate("0/m").off
    assert not TEN_PER_SECOND.off


@pytest.mark.parametrize(
    ("wait", "seconds"), [(0.0, 1), (EPSILON, 1), (0.3, 1), (1.0, 1), (1.01, 2), (59.5, 60)]
)
def test_retry_after_is_whole_seconds_at_least_one(wait: float, seconds: int) -> None:
    assert retry_after(wait) == seconds


# --- the token bucket --------------------------------------------------------------------------


def test_a_bucket_starts_full_and_admits_its_burst_at_once() -> None:
    bucket = TokenBucket(TEN_PER_SECOND, 3, now=100.0)
    assert [bucket.take(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(100.0) == pytest.approx(0.1)
    assert bucket.take(100.0) == pytest.approx(0.1)  # a refusal takes nothing


def test_the_wait_it_names_is_enough() -> None:
    bucket = TokenBucket(Rate(3.0, 1.0), 1, now=0.0)
    now = 0.0
    for _ in range(100):
        assert bucket.take(now) == 0.0
        wait = bucket.take(now)
        assert wait == pytest.approx(1 / 3)
        now += wait  # exactly what it said, rounding included


def test_a_bucket_refills_at_the_rate_up_to_its_burst() -> None:
    bucket = TokenBucket(Rate(60.0, 60.0), 2, now=0.0)  # 1 a second
    assert bucket.take(0.0) == bucket.take(0.0) == 0.0
    assert bucket.take(0.5) == pytest.approx(0.5)
    assert bucket.take(1.0) == 0.0
    assert not bucket.full(2.0)
    assert bucket.full(3.0)
    assert bucket.full(1000.0)
    # an hour idle fills it to 2 tokens, not 3600
    assert [bucket.take(1000.0) for _ in range(3)] == [0.0, 0.0, pytest.approx(1.0)]


def test_a_clock_that_steps_back_admits_nothing_extra() -> None:
    bucket = TokenBucket(TEN_PER_SECOND, 1, now=10.0)
    assert bucket.take(10.0) == 0.0
    assert bucket.take(9.0) == pytest.approx(1.1)
    assert bucket.take(10.1) == 0.0


@pytest.mark.parametrize(
    ("rate", "burst", "problem"),
    [(OFF, 1, "rate above 0"), (Rate(1.0, 0.0), 1, "rate above 0"), (TEN_PER_SECOND, 0, "burst")],
)
def test_a_bucket_needs_a_rate_and_a_token(rate: Rate, burst: int, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        TokenBucket(rate, burst, now=0.0)


@given(
    count=st.integers(1, 1000),
    per=st.sampled_from([1.0, 60.0]),
    burst=st.integers(1, 50),
    steps=st.lists(st.floats(0, 2, allow_nan=False), min_size=1, max_size=300),
)
@FUZZ
def test_a_bucket_never_admits_more_than_burst_plus_rate(
    count: int, per: float, burst: int, steps: list[float]
) -> None:
    """Over any window [a, b] of attempts, admitted <= burst + rate * (b - a)."""
    rate = Rate(float(count), per)
    bucket = TokenBucket(rate, burst, now=0.0)
    now, admitted_at = 0.0, []
    for step in steps:
        now += step
        if bucket.take(now) == 0.0:
            admitted_at.append(now)
    for i, start in enumerate(admitted_at):
        for j in range(i, len(admitted_at)):
            allowed = burst + rate.per_second * (admitted_at[j] - start + EPSILON)
            assert j - i + 1 <= math.floor(allowed + 1e-9)


@given(
    burst=st.integers(1, 20),
    steps=st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=200),
)
@FUZZ
def test_a_refusal_always_names_a_wait_after_which_a_token_is_there(
    burst: int, steps: list[float]
) -> None:
    bucket = TokenBucket(Rate(7.0, 1.0), burst, now=0.0)
    now = 0.0
    for step in steps:
        now += step
        wait = bucket.take(now)
        assert 0.0 <= wait <= 1 / 7 + EPSILON
        if wait:
            assert bucket.take(now + wait) == 0.0
            now += wait


# --- client keys -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "prefix", "key"),
    [
        ("203.0.113.7", 64, "203.0.113.7"),
        ("203.0.113.7", 128, "203.0.113.7"),
        ("2001:db8:1:2:3:4:5:6", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2:3:4:5:6", 48, "2001:db8:1::/48"),
        ("2001:db8:1:2:3:4:5:6", 128, "2001:db8:1:2:3:4:5:6/128"),
        ("2001:db8::1", 1, "::/1"),
        ("::ffff:192.0.2.1", 64, "192.0.2.1"),
        ("::FFFF:c000:0201", 64, "192.0.2.1"),
        ("fe80::1%eth0", 64, "fe80::/64"),
        ("::1", 64, "::/64"),
    ],
)
def test_client_key(ip: str, prefix: int, key: str) -> None:
    assert client_key(ip, prefix) == key


def test_one_slash_64_is_one_client_and_the_next_is_another() -> None:
    assert client_key("2001:db8:0:1::a", 64) == client_key("2001:db8:0:1:ffff:ffff:ffff:ffff", 64)
    assert client_key("2001:db8:0:1::a", 64) != client_key("2001:db8:0:2::a", 64)


@pytest.mark.parametrize("prefix", [0, 129, -1])
def test_client_key_refuses_a_prefix_outside_1_to_128(prefix: int) -> None:
    with pytest.raises(ValueError, match="ipv6_prefix must be 1 to 128"):
        client_key("2001:db8::1", prefix)


def test_client_key_refuses_what_is_not_an_address() -> None:
    with pytest.raises(ValueError, match="1::x"):
        client_key("1::x", 64)


# --- the memory store --------------------------------------------------------------------------


def test_the_memory_store_is_a_limit_store() -> None:
    store: LimitStore = MemoryStore()
    assert store is not None
    assert issubclass(StoreUnavailable, Exception)


async def test_take_keeps_one_bucket_per_key() -> None:
    store = MemoryStore()
    assert await store.take("r|rate|a", TEN_PER_SECOND, 2, 0.0) == 0.0
    assert await store.take("r|rate|a", TEN_PER_SECOND, 2, 0.0) == 0.0
    assert await store.take("r|rate|a", TEN_PER_SECOND, 2, 0.0) == pytest.approx(0.1)
    assert await store.take("r|rate|b", TEN_PER_SECOND, 2, 0.0) == 0.0
    assert store.statistics() == MemoryStoreStats(buckets=2, counters=0, holders=0)
    assert await store.take("r|rate|a", TEN_PER_SECOND, 2, 0.1) == 0.0
    assert store.statistics().buckets == 1  # b was full again at 0.1, so it went


async def test_take_uses_the_rate_it_is_given() -> None:
    """A reload that changes the rate or burst applies to the next attempt of a known client;
    the time it already owes (until 1.0 here) stands."""
    store = MemoryStore()
    assert await store.take("k", Rate(1.0, 1.0), 1, 0.0) == 0.0
    assert await store.take("k", Rate(1.0, 1.0), 1, 0.5) == pytest.approx(0.5)
    assert await store.take("k", Rate(4.0, 1.0), 1, 0.5) == pytest.approx(0.5)
    assert await store.take("k", Rate(4.0, 1.0), 3, 0.5) == 0.0
    assert await store.take("k", Rate(4.0, 1.0), 3, 0.5) == pytest.approx(0.25)


async def test_take_refuses_a_bucket_without_a_rate() -> None:
    with pytest.raises(ValueError, match="0 is off"):
        await MemoryStore().take("k", OFF, 1, 0.0)


async def test_full_buckets_are_dropped_as_the_store_is_used() -> None:
    store = MemoryStore()
    for i in range(5):
        await store.take(f"old{i}", TEN_PER_SECOND, 1, 0.0)
    assert store.statistics().buckets == 5
    await store.take("new", TEN_PER_SECOND, 1, 1.0)  # the old ones are full by 0.1
    assert store.statistics().buckets == 4
    await store.take("new", TEN_PER_SECOND, 1, 1.0)
    await store.take("new", TEN_PER_SECOND, 1, 1.0)
    assert store.statistics().buckets == 1


async def test_a_bucket_in_use_is_kept_and_blocks_the_sweep() -> None:
    """Least recently used first: a bucket not yet full at the old end stops the sweep, and
    everything behind it was used more recently."""
    store = MemoryStore()
    await store.take("busy", TEN_PER_SECOND, 1, 0.0)
    await store.take("busy", TEN_PER_SECOND, 1, 0.0)  # refused; tat stays at 0.1
    await store.take("other", TEN_PER_SECOND, 1, 0.05)
    assert store.statistics().buckets == 2
    assert await store.take("busy", TEN_PER_SECOND, 1, 0.05) == pytest.approx(0.05)
    assert store.statistics().buckets == 2


async def test_max_buckets_drops_the_least_recently_used() -> None:
    store = MemoryStore(max_buckets=3)
    for name in "abcd":
        await store.take(name, TEN_PER_SECOND, 1, 0.0)
    assert store.statistics().buckets == 3
    # "a" was forgotten: it starts full again (lenient), "d" was not
    assert await store.take("a", TEN_PER_SECOND, 1, 0.0) == 0.0
    assert await store.take("d", TEN_PER_SECOND, 1, 0.0) == pytest.approx(0.1)
    assert MemoryStore().max_buckets == DEFAULT_MAX_BUCKETS


def test_max_buckets_is_at_least_one() -> None:
    with pytest.raises(ValueError, match="max_buckets"):
        MemoryStore(max_buckets=0)


async def test_the_store_stays_bounded_under_100k_addresses() -> None:
    """A flood of 100,000 distinct addresses at 10,000 a second, 10/s burst 10 each: a bucket
    used once is full again 0.1 s later, so about a thousand are ever held."""
    store = MemoryStore()
    largest = 0
    for i in range(100_000):
        await store.take(
            f"r|rate|10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", TEN_PER_SECOND, 10, i / 10_000
        )
        largest = max(largest, store.statistics().buckets)
    assert largest <= 1_100
    await store.take("late", TEN_PER_SECOND, 10, 1_000.0)
    for _ in range(600):  # each call drops two full ones
        await store.take("late", TEN_PER_SECOND, 10, 1_000.0)
    assert store.statistics().buckets == 1


async def test_the_hard_cap_holds_under_100k_addresses_at_one_instant() -> None:
    store = MemoryStore(max_buckets=5_000)
    for i in range(100_000):
        assert await store.take(f"k{i}", TEN_PER_SECOND, 10, 0.0) == 0.0
        assert store.statistics().buckets <= 5_000


async def test_acquire_and_release() -> None:
    store = MemoryStore()
    counters = [("r|ip|a", 2), ("r|id|alice", 5)]
    assert await store.acquire("t1", counters) is None
    assert await store.acquire("t2", counters) is None
    assert (store.count("r|ip|a"), store.count("r|id|alice")) == (2, 2)
    assert await store.acquire("t3", counters) == "r|ip|a"
    assert (store.count("r|ip|a"), store.count("r|id|alice")) == (2, 2)  # all or nothing
    await store.release("t1", ["r|ip|a", "r|id|alice"])
    assert (store.count("r|ip|a"), store.count("r|id|alice")) == (1, 1)
    assert await store.acquire("t3", counters) is None
    assert store.statistics() == MemoryStoreStats(buckets=0, counters=2, holders=2)


async def test_acquire_names_the_first_counter_at_its_cap() -> None:
    store = MemoryStore()
    assert await store.acquire("t1", [("r|id|alice", 1)]) is None
    assert await store.acquire("t2", [("r|ip|b", 3), ("r|id|alice", 1)]) == "r|id|alice"
    assert store.count("r|ip|b") == 0
    assert store.statistics() == MemoryStoreStats(buckets=0, counters=1, holders=1)


async def test_a_cap_of_zero_admits_nobody() -> None:
    store = MemoryStore()
    assert await store.acquire("t1", [("k", 0)]) == "k"


async def test_acquire_nothing_holds_nothing() -> None:
    store = MemoryStore()
    assert await store.acquire("t1", []) is None
    assert store.statistics() == MemoryStoreStats(0, 0, 0)


async def test_release_twice_unknown_or_unheld_is_harmless() -> None:
    store = MemoryStore()
    assert await store.acquire("t1", [("k", 3)]) is None
    assert await store.acquire("t2", [("k", 3)]) is None
    await store.release("t1", ["k"])
    await store.release("t1", ["k"])
    await store.release("nobody", ["k"])
    await store.release("t2", ["other"])
    assert store.count("k") == 1
    await store.release("t2", ["k", "other"])
    assert store.count("k") == 0
    assert store.statistics() == MemoryStoreStats(0, 0, 0)


async def test_one_holder_acquiring_twice_releases_both() -> None:
    store = MemoryStore()
    assert await store.acquire("t1", [("k", 3)]) is None
    assert await store.acquire("t1", [("k", 3)]) is None
    assert store.count("k") == 2
    await store.release("t1", ["k"])
    assert store.count("k") == 0


async def test_a_partial_release_keeps_the_rest() -> None:
    store = MemoryStore()
    assert await store.acquire("t1", [("a", 1), ("b", 1)]) is None
    await store.release("t1", ["a"])
    assert (store.count("a"), store.count("b")) == (0, 1)
    assert store.statistics().holders == 1
    await store.release("t1", ["a", "b"])
    assert store.statistics() == MemoryStoreStats(0, 0, 0)


OPS = st.lists(
    st.tuples(
        st.booleans(),
        st.integers(0, 5),  # holder
        st.lists(st.sampled_from(["a", "b", "c"]), unique=True, max_size=3),
    ),
    max_size=200,
)


@given(OPS)
@FUZZ
async def test_counters_never_go_negative_nor_past_their_caps(
    ops: list[tuple[bool, int, list[str]]],
) -> None:
    caps = {"a": 1, "b": 2, "c": 3}
    store = MemoryStore()
    held: dict[str, list[str]] = {}  # what the model says each holder holds, with repeats
    for is_acquire, number, keys in ops:
        holder = f"t{number}"
        if is_acquire:
            refused = await store.acquire(holder, [(key, caps[key]) for key in keys])
            if refused is None:
                held.setdefault(holder, []).extend(keys)
            else:
                assert refused in keys
        else:
            await store.release(holder, keys)
            held[holder] = [key for key in held.get(holder, []) if key not in keys]
        for key, cap in caps.items():
            expected = sum(keys.count(key) for keys in held.values())
            assert 0 <= store.count(key) == expected <= cap
    for holder in list(held):
        await store.release(holder, list(caps))
    assert store.statistics() == MemoryStoreStats(0, 0, 0)


# --- admission ---------------------------------------------------------------------------------


def test_admission_off_admits_everything() -> None:
    admission = Admission(OFF, now=0.0)
    assert all(admission.admit(0.0, 0.5) is None for _ in range(10_000))


def test_admission_holds_one_second_of_the_rate() -> None:
    admission = Admission(Rate(600.0, 60.0), now=0.0)  # 10/s
    assert [admission.admit(0.0, 0.0) for _ in range(10)] == [None] * 10
    assert admission.admit(0.0, 0.0) == 1
    assert admission.admit(0.1, 0.0) is None


def test_a_slow_rate_still_holds_one_token() -> None:
    admission = Admission(Rate(1.0, 60.0), now=0.0)
    assert admission.admit(0.0, 0.0) is None
    assert admission.admit(0.0, 0.0) == 60
    assert admission.admit(60.0, 0.0) is None


def test_refusals_in_one_instant_spread_over_many_seconds() -> None:
    admission = Admission(TEN_PER_SECOND, now=0.0)
    draw = random.Random(13)
    answers = [admission.admit(5.0, draw.random()) for _ in range(1_000)]
    refused = [seconds for seconds in answers if seconds is not None]
    assert len(refused) == 990
    assert min(refused) == 1
    assert max(refused) >= 90  # 990 clients at 10/s need 99 s
    assert max(refused) <= MAX_RETRY_AFTER
    assert len(set(refused)) >= 80
    # and no second gets a herd: about the rate's worth each
    assert max(refused.count(s) for s in set(refused)) <= 12


def test_refused_clients_queue_in_slots_of_one_over_the_rate() -> None:
    admission = Admission(Rate(2.0, 1.0), now=0.0)
    assert admission.admit(0.0, 0.0) is admission.admit(0.0, 0.0) is None
    # wait 0.5 s, then slots of 0.5 s: 0.5 + [0, 0.5), 0.5 + [0.5, 1), 0.5 + [1, 1.5), ...
    assert [admission.admit(0.0, 0.0) for _ in range(4)] == [1, 1, 2, 2]
    assert [admission.admit(0.0, ALMOST_ONE) for _ in range(2)] == [3, 4]


def test_the_spread_grows_with_the_backlog_and_drains_at_the_rate() -> None:
    admission = Admission(TEN_PER_SECOND, now=0.0)
    for _ in range(10):
        admission.admit(0.0, 0.0)
    assert admission.admit(0.0, ALMOST_ONE) == 1  # backlog 1: 0.1 s of spread
    for _ in range(99):
        admission.admit(0.0, 0.0)
    assert admission.backlog() == 100
    assert admission.admit(0.0, ALMOST_ONE) == 11  # wait 0.1 + 101 / 10
    assert admission.admit(5.0, 0.0) is None  # 5 s later: 50 drained, the bucket refilled
    assert admission.backlog() == pytest.approx(51)
    assert admission.admit(100.0, 0.0) is None
    assert admission.backlog() == 0


def test_the_spread_is_capped() -> None:
    admission = Admission(Rate(1.0, 1.0), now=0.0, max_retry_after=30)
    answers = [admission.admit(0.0, ALMOST_ONE) for _ in range(1_000)]
    assert answers[0] is None
    assert max(s for s in answers if s is not None) == 30
    assert admission.backlog() == 30


def test_beyond_the_window_refusals_spread_over_all_of_it() -> None:
    admission = Admission(Rate(1.0, 1.0), now=0.0, max_retry_after=30)
    for _ in range(31):
        admission.admit(0.0, 0.0)
    draw = random.Random(7)
    late = [admission.admit(0.0, draw.random()) for _ in range(3_000)]
    assert set(late) == set(range(2, 31))  # wait 1 s, then anywhere in the window
    assert max(late.count(s) for s in set(late)) < 150  # about 100 each, no pile at the cap


def test_max_retry_after_is_at_least_one_second() -> None:
    with pytest.raises(ValueError, match="max_retry_after"):
        Admission(TEN_PER_SECOND, now=0.0, max_retry_after=0)


def test_a_clock_that_steps_back_drains_nothing() -> None:
    admission = Admission(TEN_PER_SECOND, now=10.0)
    for _ in range(20):
        admission.admit(10.0, 0.0)
    assert admission.backlog() == 10
    assert admission.admit(9.0, 0.0) is not None
    assert admission.backlog() == 11
