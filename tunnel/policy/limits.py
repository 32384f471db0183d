"""Per-client limits and global admission pacing (``[routes.limits]``, ``[server]
admission_rate``): rates, token buckets, client keys and where the counts live.

Pure: the clock reading and the random draw come in as parameters. ``Rate`` and ``parse_rate``
are the configuration's (``config.kinds``), re-exported here. A ``LimitStore`` holds the
buckets and the concurrent-tunnel counters; ``MemoryStore`` keeps them in this process, a Redis
store (``[limits] store``) shares them between processes and instances.

Buckets are kept as GCRA's theoretical arrival time (the instant the bucket would be full
again, as redis-cell keeps them): one float per client instead of
(tokens, timestamp), admitting exactly what a bucket of ``burst`` tokens refilled at ``rate``
admits, and "full" is just ``tat <= now``, whatever the rate.
"""

from __future__ import annotations

import functools
import ipaddress
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from tunnel.config.kinds import RATE_OFF
from tunnel.config.kinds import Rate as Rate
from tunnel.config.kinds import parse_rate as parse_rate

MAX_RETRY_AFTER = 120
"""Seconds: the longest ``Retry-After`` that ``Admission`` spreads refused clients over."""
OFF = RATE_OFF
"""``"0/s"``: no limit."""
EPSILON = 1e-9
"""Seconds: a bucket admits this early at most (float rounding, see ``_gcra``)."""
SWEEP_PER_CALL = 2
"""Buckets a ``MemoryStore.take`` checks for dropping: more than the one it may add."""
DEFAULT_MAX_BUCKETS = 200_000
"""``MemoryStore``'s hard cap on buckets: about 190 bytes each with a key like
``"chat|rate|203.0.113.7"``, so about 40 MB."""


def retry_after(wait: float) -> int:
    """A ``Retry-After`` value (whole seconds, at least 1) for a wait of ``wait`` seconds."""
    return max(1, math.ceil(wait))


def _gcra(tat: float, now: float, interval: float, burst: int) -> tuple[float, float]:
    """``(new tat, wait)``: one event at ``now`` against a bucket whose theoretical arrival time
    is ``tat``. ``wait`` is 0.0 when admitted, else the seconds until a token is there (and
    ``tat`` is unchanged). A wait under ``EPSILON`` is none: float rounding must not refuse a
    client that waited exactly the time it was told."""
    tat = max(tat, now)
    wait = tat - (burst - 1) * interval - now
    if wait > EPSILON:
        return tat, wait
    return tat + interval, 0.0


def _interval(rate: Rate, burst: int) -> float:
    if rate.count <= 0 or rate.per <= 0:
        raise ValueError(f"a bucket needs a rate above 0, got {rate}; 0 is off: skip the bucket")
    if burst < 1:
        raise ValueError(f"a bucket holds at least 1 token, got burst {burst}")
    return rate.per / rate.count


class TokenBucket:
    """``burst`` tokens (the capacity, at least 1), refilled at ``rate``; full at ``now``."""

    __slots__ = ("_interval", "_tat", "burst")

    def __init__(self, rate: Rate, burst: int, now: float) -> None:
        self._interval = _interval(rate, burst)
        self.burst = burst
        self._tat = now

    def take(self, now: float) -> float:
        """0.0 when a token was taken, else the seconds until one will be there (none taken)."""
        self._tat, wait = _gcra(self._tat, now, self._interval, self.burst)
        return wait

    def full(self, now: float) -> bool:
        """Every token is back: forgetting the bucket changes nothing."""
        return self._tat <= now


def client_key(ip: str, ipv6_prefix: int) -> str:
    """Who a per-IP limit counts: an IPv4 address as it is (IPv4-mapped IPv6 too), an IPv6
    address as its ``/ipv6_prefix`` network (``"2001:db8:1:2::/64"``), since one subscriber
    usually holds a whole /64 and could otherwise take a fresh address per connection.

    ``ip`` is an address the listener or a trusted PROXY header already parsed; IPv4 takes the
    fast path (no parsing), IPv6 a small cache. Raises ``ValueError`` for a prefix outside
    1..128 or an IPv6 text that is not an address."""
    if ":" not in ip:
        return ip
    return _ipv6_key(ip, ipv6_prefix)


@functools.lru_cache(maxsize=4096)
def _ipv6_key(ip: str, prefix: int) -> str:
    if not 1 <= prefix <= 128:
        raise ValueError(f"ipv6_prefix must be 1 to 128, got {prefix}")
    address = ipaddress.IPv6Address(ip.split("%", 1)[0])  # a zone is not part of who it is
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    mask = ((1 << prefix) - 1) << (128 - prefix)
    return str(ipaddress.IPv6Network((int(address) & mask, prefix)))


class StoreUnavailable(Exception):
    """A store that cannot answer (Redis down, timed out); ``on_store_error`` decides."""


class LimitStore(Protocol):
    """Where buckets and concurrent-tunnel counters live. Keys are spelled by the caller:
    buckets ``f"{route}|rate|{client}"``, counters ``f"{route}|ip|{client}"`` and
    ``f"{route}|id|{subject}"``. Any method may raise ``StoreUnavailable``."""

    async def take(self, bucket: str, rate: Rate, burst: int, now: float) -> float:
        """0.0 = admitted (a token taken); else the seconds until the next token."""
        ...

    async def acquire(self, holder: str, counters: Sequence[tuple[str, int]]) -> str | None:
        """``counters`` are distinct ``(key, cap)`` pairs. All or nothing: when a counter is at
        its cap, nothing is acquired and that counter's key is returned; else each goes up by
        one for ``holder`` (the unique id of a tunnel attempt) and None is returned."""
        ...

    async def release(self, holder: str, keys: Sequence[str]) -> None:
        """Undo ``acquire`` for ``holder``; releasing twice, or for an unknown holder, does
        nothing."""
        ...


@dataclass(frozen=True, slots=True)
class MemoryStoreStats:
    """What a ``MemoryStore`` holds at one instant (its memory, for the admin page)."""

    buckets: int
    counters: int
    """Counters above 0."""
    holders: int
    """Tunnel attempts holding at least one counter."""


class MemoryStore:
    """A ``LimitStore`` for one process: ``workers = N`` or several instances each count their
    own clients. The methods never yield (``async`` only for the interface) and never fail.

    Memory stays bounded under a flood from many addresses:

    - a counter exists only while above 0, and only for held slots, so counters and holders
      are at most the tunnels open or opening (themselves capped by ``max_tunnels``);
    - buckets are kept least recently used first; each ``take`` adds at most one and drops up
      to ``SWEEP_PER_CALL`` full ones from the old end, so the store holds the buckets used
      within the last ``burst / rate`` seconds (the longest refill of any route) plus a backlog
      that each call shrinks: a flood of N new addresses a second keeps about N times that
      refill time;
    - and never more than ``max_buckets``: beyond it the least recently used bucket is dropped
      even when not full, which forgets that client's recent attempts (lenient, never unbounded).
    """

    def __init__(self, max_buckets: int = DEFAULT_MAX_BUCKETS) -> None:
        if max_buckets < 1:
            raise ValueError(f"max_buckets must be at least 1, got {max_buckets}")
        self.max_buckets = max_buckets
        self._tats: OrderedDict[str, float] = OrderedDict()
        self._counts: dict[str, int] = {}
        self._held: dict[str, dict[str, int]] = {}

    async def take(self, bucket: str, rate: Rate, burst: int, now: float) -> float:
        interval = _interval(rate, burst)
        tats = self._tats
        tat = tats.get(bucket)
        if tat is None:
            tat = now
        else:
            tats.move_to_end(bucket)
        tats[bucket], wait = _gcra(tat, now, interval, burst)
        self._sweep(now)
        return wait

    def _sweep(self, now: float) -> None:
        tats = self._tats
        while len(tats) > self.max_buckets:
            tats.popitem(last=False)
        for _ in range(SWEEP_PER_CALL):
            oldest = next(iter(tats))  # never empty: the bucket just taken from is not full
            if tats[oldest] > now:
                return
            del tats[oldest]

    async def acquire(self, holder: str, counters: Sequence[tuple[str, int]]) -> str | None:
        counts = self._counts
        for key, cap in counters:
            if counts.get(key, 0) >= cap:
                return key
        held = self._held.setdefault(holder, {})
        for key, _ in counters:
            counts[key] = counts.get(key, 0) + 1
            held[key] = held.get(key, 0) + 1
        if not held:
            del self._held[holder]
        return None

    async def release(self, holder: str, keys: Sequence[str]) -> None:
        held = self._held.get(holder)
        if held is None:
            return
        counts = self._counts
        for key in keys:
            mine = held.pop(key, 0)
            if not mine:
                continue
            left = counts[key] - mine
            if left > 0:
                counts[key] = left
            else:
                del counts[key]
        if not held:
            del self._held[holder]

    def count(self, key: str) -> int:
        """The counter ``key`` now (0 when nobody holds it)."""
        return self._counts.get(key, 0)

    def statistics(self) -> MemoryStoreStats:
        return MemoryStoreStats(len(self._tats), len(self._counts), len(self._held))


class Admission:
    """Global pacing of new upgrades (``[server] admission_rate``), so a fleet reconnecting at
    once reaches the backends at a pace they can take. ``rate`` off admits everything.

    The bucket holds one second's worth of the rate (at least 1): a steady rate passes without
    a drip-by-drip schedule, and no more than a second's worth ever arrives at once.

    Refused clients are told to come back spread out, in the order they were refused. The
    backlog counts refusals and drains at the rate (clients already told when to return); the
    k-th refused since it was empty gets the k-th slot of ``1 / rate`` seconds after the bucket's
    own ``wait``, at a ``jitter`` point within it::

        Retry-After = clamp(ceil(wait + (backlog - 1 + jitter) / rate), 1, max_retry_after)

    so each second gets about one second's worth of returning clients: a thousand refused in
    one instant at 10/s come back over a hundred different seconds, not all in the next one.
    Once the backlog fills ``max_retry_after`` seconds, a refusal gets any point of that window
    (``wait + jitter * (max_retry_after - wait)``) and the backlog stops growing.
    """

    __slots__ = ("_backlog", "_bucket", "_per_second", "_stamp", "max_retry_after")

    def __init__(self, rate: Rate, now: float, max_retry_after: int = MAX_RETRY_AFTER) -> None:
        if max_retry_after < 1:
            raise ValueError(f"max_retry_after must be at least 1, got {max_retry_after}")
        self._per_second = rate.per_second
        self._bucket = (
            None if rate.off else TokenBucket(rate, max(1, math.ceil(rate.per_second)), now)
        )
        self._backlog = 0.0
        self._stamp = now
        self.max_retry_after = max_retry_after

    def admit(self, now: float, jitter: float) -> int | None:
        """None when the upgrade may go ahead, else the ``Retry-After`` seconds for its 503;
        ``jitter`` is uniform in [0, 1), drawn by the caller."""
        if self._bucket is None:
            return None
        wait = self._bucket.take(now)
        drained = max(0.0, now - self._stamp) * self._per_second
        self._stamp = max(self._stamp, now)
        self._backlog = max(0.0, self._backlog - drained)
        if wait == 0.0:
            return None
        if self._backlog + 1 <= self.max_retry_after * self._per_second:
            self._backlog += 1
            slot = (self._backlog - 1 + jitter) / self._per_second
        else:
            slot = jitter * max(0.0, self.max_retry_after - wait)
        return min(self.max_retry_after, retry_after(wait + slot))

    def backlog(self) -> float:
        """Refused clients not yet drained at the rate (for statistics)."""
        return self._backlog
