"""What the relay engine reads of trio's run loop, so that it can sleep in its own epoll.

Waiting through trio costs every message two wake-ups: trio's ``epoll_wait`` reports the
engine's epoll descriptor, trio reschedules the engine's task, and the engine then polls its own
set. The engine can instead block in its own ``epoll_wait`` whenever trio has nothing else to do,
with trio's epoll descriptor inside its set: trio's I/O (new connections, handshakes, signals,
calls from threads) makes that descriptor readable and wakes the engine, which then yields to
trio. For that it must know whether any other task can run and when trio's next deadline falls.

trio offers no public way to ask either, nor to get its epoll descriptor: they are read from
the runner's attributes (trio 0.2x and 0.3x), checked once when the engine starts.
``TrioLoop.current`` returns None, and the engine waits through trio as before, wherever the
answer could be wrong: another I/O backend, a clock other than trio's ``SystemClock`` (a
``MockClock`` jumps only when trio itself sees every task blocked), guest mode, or instruments that
watch I/O waits (they expect to see every one).
"""

from __future__ import annotations

import math
import select
from collections.abc import Callable
from typing import Any


class TrioLoop:
    """The running trio loop's state the engine needs: its epoll descriptor, whether a task
    other than the caller can run, and the seconds until its next deadline."""

    __slots__ = ("_deadlines", "_idle_waiters", "_runq", "_tasks", "fd", "now")

    def __init__(self, runner: Any, epoll: select.epoll) -> None:
        self._runq = runner.runq
        self._tasks = runner.tasks
        self._deadlines = runner.deadlines
        self.now: Callable[[], float] = runner.clock.current_time
        """trio's clock (``trio.current_time`` without its lookups)."""
        self._idle_waiters = runner.waiting_for_idle
        self.fd = epoll.fileno()
        """trio's own epoll descriptor: readable when trio has I/O to serve."""

    @classmethod
    def current(cls) -> TrioLoop | None:
        """The loop of the calling trio task, or None when the engine must wait through trio."""
        try:
            from trio._core import _run

            runner: Any = _run.GLOBAL_RUN_CONTEXT.runner
            epoll = runner.io_manager._epoll
            usable = (
                type(runner.clock) is _run.SystemClock
                and isinstance(epoll, select.epoll)
                and not runner.is_guest
                and "before_io_wait" not in runner.instruments
                and "after_io_wait" not in runner.instruments
                and callable(runner.deadlines.next_deadline)
                and runner.runq is not None
                and runner.waiting_for_idle is not None
                and hasattr(_run.current_task(), "_next_send_fn")
            )
        except (ImportError, AttributeError):
            return None
        return cls(runner, epoll) if usable else None

    def sleep_time(self) -> float:
        """How long the caller may block without delaying trio: 0 when another task can run,
        else the seconds until trio's next deadline (``inf``: none)."""
        if self._runq:
            return 0.0
        deadline: float = self._deadlines.next_deadline()
        if deadline == math.inf:
            return math.inf
        left = deadline - self.now()
        return left if left > 0 else 0.0

    def others_scheduled(self, me: object) -> bool:
        """Whether a task other than ``me`` is scheduled to run: in the run queue, or later in
        the batch trio is running now (which the run queue no longer shows; a task's
        ``_next_send_fn`` is set from its rescheduling until it runs). It walks every task,
        so the caller asks only once after each time it yields to trio."""
        if self._runq:
            return True
        return any(task._next_send_fn is not None and task is not me for task in self._tasks)

    @property
    def idle_waiters(self) -> bool:
        """A task waits in ``trio.testing.wait_all_tasks_blocked``: it wakes only when trio's
        own loop finds every task blocked, so the caller must block through trio meanwhile."""
        return bool(self._idle_waiters)
