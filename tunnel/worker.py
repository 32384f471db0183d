"""What a worker process of ``workers = N`` needs besides ``serve``.

The supervisor (``tunnel.supervisor``) starts each worker as ``python -P -m tunnel worker``, with
the effective configuration as TOML on stdin and the read end of a "lifeline" pipe whose write end
only the supervisor holds. Nobody ever writes to that pipe: it reads end-of-file exactly when the
supervisor is gone (even after SIGKILL, when it could not stop its workers), and the worker then
stops instead of serving on as an orphan nobody supervises.
"""

from __future__ import annotations

import logging

import trio

from tunnel.logs import LOGGER_NAME

WORKER_COMMAND = "worker"
"""The hidden ``tunnel`` subcommand that runs one worker."""

_READ_SIZE = 512


class WorkerTag(logging.Filter):
    """Adds ``worker=N`` to every record: N processes share one stderr, and an operator needs to
    tell their lines apart. The number, unlike the pid, survives a restart of the worker."""

    def __init__(self, number: int) -> None:
        super().__init__()
        self.number = number

    def filter(self, record: logging.LogRecord) -> bool:
        record.fields = {**getattr(record, "fields", {}), "worker": self.number}
        return True


def tag_logs(number: int) -> None:
    """Tag every line of this process's tunnel logger (after ``setup_logging``) as worker N."""
    for handler in logging.getLogger(LOGGER_NAME).handlers:
        handler.addFilter(WorkerTag(number))


async def wait_for_supervisor_exit(lifeline: int) -> None:
    """Return when the supervisor is gone: the lifeline pipe ``lifeline`` reads end-of-file.

    Takes ownership of the descriptor. Bytes, which the supervisor never sends, are ignored.
    """
    async with trio.lowlevel.FdStream(lifeline) as stream:
        while await stream.receive_some(_READ_SIZE):
            pass
