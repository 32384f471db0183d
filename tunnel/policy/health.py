"""Backend health as pure state machines: active checks (rise/fall) and passive connect failures.

The probes themselves (``net``) feed results in; these classes only count.
"""

from __future__ import annotations


class HealthState:
    """Up or down, flipped only by a run of equal check results (HAProxy's rise and fall).

    While up, ``fall`` consecutive failures mark it down; while down, ``rise`` consecutive
    successes mark it up. A result that agrees with the current state resets the run.
    """

    def __init__(self, rise: int, fall: int, up: bool = True) -> None:
        if rise < 1 or fall < 1:
            raise ValueError("rise and fall must be at least 1")
        self.rise = rise
        self.fall = fall
        self.up = up
        self.run = 0
        """Consecutive results against the current state so far."""

    def observe(self, ok: bool) -> bool:
        """Record one check result; True when it flipped the state."""
        if ok == self.up:
            self.run = 0
            return False
        self.run += 1
        if self.run < (self.fall if self.up else self.rise):
            return False
        self.up = ok
        self.run = 0
        return True


class PassiveFailures:
    """Consecutive connect failures of one backend, against a limit (0 = never counts)."""

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError("passive_failures must be >= 0")
        self.limit = limit
        self.count = 0

    def failed(self) -> bool:
        """One connect failure; True when it makes ``limit`` in a row (the count starts over)."""
        if not self.limit:
            return False
        self.count += 1
        if self.count < self.limit:
            return False
        self.count = 0
        return True

    def succeeded(self) -> None:
        """A connect that worked ends the run."""
        self.count = 0
