"""Headless Chromium as the browser tests start it: where it is, and the flags every run needs.

A plain module (not a fixture file), imported by the browser tests like ``rawhttp``.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

CHROMIUM = shutil.which("chromium")
EXIT_SECONDS = 5
"""How long a browser gets to exit after SIGTERM before it is killed."""
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)"
)


def headless(profile: Path, *extra: str) -> list[str]:
    """The command line of a headless Chromium with a fresh profile in ``profile``, then
    ``extra``. Without the background-networking flags Chromium keeps dialling Google's hosts,
    which this machine's closed network refuses."""
    assert CHROMIUM is not None
    return [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--no-proxy-server",  # a proxy in the environment must not see the loopback test
        f"--user-data-dir={profile}",
        *extra,
    ]


@contextmanager
def browser_environment() -> Iterator[dict[str, str]]:
    """The environment to start Chromium in: ``TMPDIR`` is a directory of its own, removed
    afterwards, since Chromium leaves its ``org.chromium.Chromium.*`` singleton directories in
    the temporary directory. It is short, because a Unix socket's path goes in it."""
    directory = tempfile.mkdtemp(prefix="chromium-")
    try:
        yield {**os.environ, "TMPDIR": directory}
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def stop(process: trio.Process) -> None:
    """SIGTERM, up to ``EXIT_SECONDS`` to exit, then SIGKILL; only ever ``process.pid``, the
    browser this test started."""
    if process.returncode is not None:
        return
    process.send_signal(signal.SIGTERM)
    with trio.move_on_after(EXIT_SECONDS):
        await process.wait()
    if process.returncode is None:
        process.kill()
        with trio.move_on_after(EXIT_SECONDS):
            await process.wait()
