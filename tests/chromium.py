"""Headless Chromium as the browser tests start it: where it is, and the flags every run needs.

A plain module (not a fixture file), imported by the browser tests like ``rawhttp``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium")
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
