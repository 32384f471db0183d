"""Pipes for ``splice(2)``: a pool, so that a tunnel holds descriptors only while bytes sit in
a pipe."""

from __future__ import annotations

import fcntl
import os

PIPE_SIZE = 256 * 1024
"""Asked of ``F_SETPIPE_SZ``; the kernel may grant less (``/proc/sys/fs/pipe-max-size``, 1 MiB
by default, bounds it; past ``pipe-user-pages-soft`` an unprivileged user's new pipes get one
page). Fewer, larger splices per wake-up: on loopback, 64 KiB chunks echoed (medians of three,
proxy CPU per GiB), 64 KiB pipes cost 0.68 s on one connection and 0.54 on four, 256 KiB pipes
0.52 and 0.37, 1 MiB pipes 0.65 and 0.52 (docs/benchmarks.md). A pipe holds pages only while
bytes are in it, and spliced pages are the socket buffers' own."""


def splice_available() -> bool:
    """True where the kernel and Python offer ``splice(2)`` (Linux, Python 3.10+)."""
    return hasattr(os, "splice") and hasattr(fcntl, "F_SETPIPE_SZ")


Pipe = tuple[int, int, int]
"""``(read_fd, write_fd, size)`` of a pooled pipe."""


class PipePool:
    """Pipes for splicing, held by a direction only while bytes sit in them.

    A tunnel that kept its own two pipes would hold six descriptors; a pool bounded by
    ``limit`` keeps the count proportional to the bytes in flight instead. Idle pipes are kept
    for reuse while tunnels exist and closed when the last tunnel ends.
    """

    def __init__(self, limit: int, size: int = PIPE_SIZE) -> None:
        self.limit = limit
        self.size = size
        """What each new pipe asks for; the last grant is what ``statistics()`` shows."""
        self.in_use = 0
        self.fallbacks = 0
        self.granted = 0
        self._idle: list[Pipe] = []

    def acquire(self) -> Pipe | None:
        """A pipe, or None when the limit or the descriptors ran out.

        Each pipe carries the size the kernel granted it: past ``pipe-user-pages-soft`` an
        unprivileged process gets small pipes, and one small grant must not shrink the others.
        """
        if self._idle:
            self.in_use += 1
            return self._idle.pop()
        if self.in_use >= self.limit:
            self.fallbacks += 1
            return None
        try:
            read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            self.fallbacks += 1
            return None
        try:
            granted = fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, self.size)
        except OSError:
            granted = fcntl.fcntl(write_fd, fcntl.F_GETPIPE_SZ)
        self.in_use += 1
        self.granted = granted
        return read_fd, write_fd, granted

    @property
    def idle(self) -> int:
        """Empty pipes kept for reuse."""
        return len(self._idle)

    def release(self, pipe: Pipe) -> None:
        """Give back an empty pipe."""
        self.in_use -= 1
        self._idle.append(pipe)

    def discard(self, pipe: Pipe) -> None:
        """Close a pipe that may still hold bytes (its tunnel died)."""
        self.in_use -= 1
        os.close(pipe[0])
        os.close(pipe[1])

    def trim(self) -> None:
        """Close the idle pipes, so an idle server holds no descriptor for splicing."""
        while self._idle:
            read_fd, write_fd, _ = self._idle.pop()
            os.close(read_fd)
            os.close(write_fd)
