"""When to restart a worker process that exited, and when to stop trying.

Pure bookkeeping for one worker slot of ``workers = N``; the supervisor passes in how long the
process was up (time is a parameter here, never read from a clock).

A worker that crashes at once must not be restarted in a tight loop, so each unexpected exit
doubles the wait before the next start (0.1 s, 0.2 s ... up to 5 s), and a worker that stayed up
for 10 s earns a fresh start at 0.1 s. A worker that exits within its first second has failed to
start; when every slot has failed to start three times in a row, nothing the supervisor can do
will help (a broken install, no memory), and it gives up instead of spinning.
"""

from __future__ import annotations

from dataclasses import dataclass

SECONDS = 1.0

FIRST_BACKOFF = 0.1 * SECONDS
MAX_BACKOFF = 5 * SECONDS
STABLE_UPTIME = 10 * SECONDS
"""A worker up this long was healthy: its next crash is restarted after ``FIRST_BACKOFF``."""
STARTUP_WINDOW = 1 * SECONDS
"""A worker that exits sooner than this after its start counts as having failed to start."""
FAILED_STARTS_TO_GIVE_UP = 3
"""Failed starts in a row after which a slot counts as unable to start."""


@dataclass(slots=True)
class RestartPolicy:
    """The backoff and the failed-start count of one worker slot."""

    backoff: float = FIRST_BACKOFF
    """The wait before the next restart."""
    failed_starts: int = 0
    """Exits within ``STARTUP_WINDOW`` of the start, in a row."""

    def exited(self, uptime: float) -> float:
        """Record an unexpected exit after ``uptime`` seconds; return the wait before restarting.

        ``uptime`` 0 also stands for "could not even be started" (fork or exec failed).
        """
        if uptime >= STABLE_UPTIME:
            self.backoff = FIRST_BACKOFF
        self.failed_starts = self.failed_starts + 1 if uptime < STARTUP_WINDOW else 0
        wait = self.backoff
        self.backoff = min(self.backoff * 2, MAX_BACKOFF)
        return wait

    @property
    def cannot_start(self) -> bool:
        """True after ``FAILED_STARTS_TO_GIVE_UP`` failed starts in a row."""
        return self.failed_starts >= FAILED_STARTS_TO_GIVE_UP
