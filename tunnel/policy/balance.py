"""Load balancing: the order in which a route's backends are tried for one connection.

A ``Balancer`` belongs to one route's upstream and keeps the little state a method needs (the
smooth weighted round-robin's current weights, the least-conn tie rotation). Everything it
looks at arrives per call as ``BackendState`` snapshots plus ``now``; it never reads a clock.

Methods:

``round-robin``
    nginx's smooth weighted round-robin: each call adds every candidate's effective weight to
    its current weight, picks the largest and takes the total off the winner, so weights 3:1
    give ``a a b a`` rather than ``a a a b``. ``cookie`` (the sticky cookie is checked by the
    caller first) and ``hash`` without a key use it too.
``least-conn``
    fewest ``(open_tunnels + 1) / effective weight`` (HAProxy's measure: the load once this
    connection is added, so weights count even when every backend is empty); ties rotate.
``hash``
    weighted rendezvous hashing over blake2b: the same key picks the same backend in every
    process and after every restart, and taking a backend out moves only the keys it held.

Slow start: a backend that came up ``t`` seconds ago with ``slow_start = s`` counts with weight
``weight * min(1, t / s)``, never below 1% of its weight, so it still sees some traffic.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

METHODS = ("round-robin", "least-conn", "hash", "cookie")
MAX_WEIGHT = 256
SLOW_START_FLOOR = 0.01
"""The smallest share of its weight a backend in slow start counts with."""


@dataclass(frozen=True, slots=True)
class BackendState:
    """What a balancer sees of one backend at one instant."""

    name: str
    weight: int = 1
    """1..256."""
    open_tunnels: int = 0
    max_tunnels: int = 0
    """0 = no cap."""
    eligible: bool = True
    """Up and not draining."""
    up_since: float = -math.inf
    """Clock time the backend last came up (for slow start)."""
    slow_start: float = 0.0
    """Seconds over which its weight ramps up after ``up_since``; 0 = off."""

    def __post_init__(self) -> None:
        if not 1 <= self.weight <= MAX_WEIGHT:
            raise ValueError(f"backend {self.name!r}: weight must be 1..{MAX_WEIGHT}")
        if self.open_tunnels < 0 or self.max_tunnels < 0 or self.slow_start < 0:
            raise ValueError(f"backend {self.name!r}: counts and slow_start must be >= 0")

    @property
    def full(self) -> bool:
        return 0 < self.max_tunnels <= self.open_tunnels

    @property
    def available(self) -> bool:
        return self.eligible and not self.full

    def effective_weight(self, now: float) -> float:
        """The weight after slow start: linear from 1% to 100% over ``slow_start`` seconds."""
        if self.slow_start <= 0:
            return float(self.weight)
        ramp = (now - self.up_since) / self.slow_start
        return self.weight * max(SLOW_START_FLOOR, min(1.0, ramp))


def why_none(states: Sequence[BackendState]) -> Literal["down", "full", ""]:
    """Why no backend can take a connection.

    ``"down"`` when none is eligible (answer 503 naming the route), ``"full"`` when every
    eligible one is at its ``max_tunnels`` (answer 503 with Retry-After), ``""`` when some
    backend is available after all.
    """
    eligible = [state for state in states if state.eligible]
    if not eligible:
        return "down"
    if all(state.full for state in eligible):
        return "full"
    return ""


def rendezvous_score(key: bytes, name: str, weight: float) -> float:
    """Weighted rendezvous score of ``name`` for ``key``: ``-weight / ln(u)``, u in (0, 1).

    ``u`` comes from blake2b of ``key + b"\\0" + name``, so it is the same in every process.
    """
    digest = hashlib.blake2b(key + b"\0" + name.encode("utf-8"), digest_size=8).digest()
    u = ((int.from_bytes(digest, "big") >> 11) + 0.5) / float(1 << 53)
    return -weight / math.log(u)


class Balancer:
    """The order in which to try one route's backends, best first.

    ``names`` fixes the ring order (ties and failover are decided by it); states for names not
    in it are ignored, and names without a state are left out of that call's answer.
    """

    def __init__(self, method: str, names: Sequence[str]) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown balance method {method!r} (one of {', '.join(METHODS)})")
        if not names:
            raise ValueError("a balancer needs at least one backend")
        if len(set(names)) != len(names):
            raise ValueError("backend names of one balancer must differ")
        self.method = method
        self.names = tuple(names)
        self._ring = {name: index for index, name in enumerate(self.names)}
        self._current = dict.fromkeys(self.names, 0.0)
        self._next = 0  # least-conn: where the tie rotation starts

    def order(
        self, states: Sequence[BackendState], *, now: float, key: bytes | None = None
    ) -> list[str]:
        """The names to try, best first; not eligible and full backends are left out.

        The first that accepts the connection wins; the rest are the failover order. An empty
        list means none can take it: ``why_none(states)`` says whether they are down or full.
        """
        candidates = self._candidates(states)
        if not candidates:
            return []
        if self.method == "least-conn":
            return self._least_conn(candidates, now)
        if self.method == "hash" and key is not None:
            return self._hash(candidates, now, key)
        return self._round_robin(candidates, now)

    def why_none(self, states: Sequence[BackendState]) -> Literal["down", "full", ""]:
        """``why_none`` over this balancer's backends only."""
        return why_none([state for state in states if state.name in self._ring])

    def _candidates(self, states: Sequence[BackendState]) -> list[BackendState]:
        by_name = {state.name: state for state in states if state.name in self._ring}
        found = [by_name[name] for name in self.names if name in by_name]
        return [state for state in found if state.available]

    def _round_robin(self, candidates: list[BackendState], now: float) -> list[str]:
        total = 0.0
        for state in candidates:
            weight = state.effective_weight(now)
            self._current[state.name] += weight
            total += weight
        # max() keeps the first of equals, so ties go to the earliest in ring order.
        best = max(candidates, key=lambda state: self._current[state.name])
        self._current[best.name] -= total
        rest = sorted(
            (state for state in candidates if state is not best),
            key=lambda state: (-self._current[state.name], self._ring[state.name]),
        )
        return [best.name, *(state.name for state in rest)]

    def _least_conn(self, candidates: list[BackendState], now: float) -> list[str]:
        size = len(self.names)
        start = self._next

        def rank(state: BackendState) -> tuple[float, int]:
            load = (state.open_tunnels + 1) / state.effective_weight(now)
            return load, (self._ring[state.name] - start) % size

        ordered = sorted(candidates, key=rank)
        self._next = (self._ring[ordered[0].name] + 1) % size
        return [state.name for state in ordered]

    @staticmethod
    def _hash(candidates: list[BackendState], now: float, key: bytes) -> list[str]:
        scored = sorted(
            candidates,
            key=lambda state: -rendezvous_score(key, state.name, state.effective_weight(now)),
        )
        return [state.name for state in scored]
