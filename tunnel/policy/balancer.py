"""Load balancing: the order in which a route's backends are tried for one connection."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, TypeVar

B = TypeVar("B")


class RoundRobin(Generic[B]):
    """Each call to ``candidates`` starts one backend further along the ring.

    The whole ring is returned so that the caller can fail over to the next backend when one
    refuses the connection, before the client has been answered.
    """

    def __init__(self, backends: Sequence[B]) -> None:
        if not backends:
            raise ValueError("a balancer needs at least one backend")
        self._backends = tuple(backends)
        self._next = 0

    def candidates(self) -> list[B]:
        start = self._next
        self._next = (start + 1) % len(self._backends)
        return [*self._backends[start:], *self._backends[:start]]
