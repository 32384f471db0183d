"""The Python API as the README shows it: its "From Python" snippet, run as written in a real
subprocess, logs like ``tunnel run`` and stops cleanly on Ctrl-C (SIGINT) or SIGTERM."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import tunnel
from tunnel.logs import LOGGER_NAME, JsonFormatter, TextFormatter

README = Path(__file__).resolve().parent.parent / "README.md"
WAIT_SECONDS = 30.0
"""Bound on the snippet starting or stopping; a healthy run takes well under a second."""
POLL_SECONDS = 0.02


def readme_snippet() -> str:
    """The first Python block after "From Python" in README.md, exactly as a reader copies it."""
    text = README.read_text(encoding="utf-8")
    after = text.split("From Python", 1)[1]
    match = re.search(r"```python\n(.*?)```", after, flags=re.DOTALL)
    assert match, "README.md has no Python block after 'From Python'"
    return match.group(1)


def terminal_sigint() -> None:
    """In the child, before exec: SIGINT back to its default. A shell runs background jobs with
    SIGINT ignored, and Python would then never turn Ctrl-C into KeyboardInterrupt at all."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def snippet_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """The README snippet running in a subprocess, its stderr in a file; killed if still alive."""
    script = tmp_path / "snippet.py"
    script.write_text(readme_snippet(), encoding="utf-8")
    stderr_path = tmp_path / "stderr.txt"
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, str(script)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            cwd=tmp_path,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=terminal_sigint,
        )
    try:
        yield process, stderr_path
    finally:
        if process.poll() is None:
            process.kill()  # the snippet this fixture started, by its Popen
            process.wait(WAIT_SECONDS)


def wait_for_line(process: subprocess.Popen[bytes], path: Path, pattern: str) -> str:
    """Poll ``path`` (bounded by count and time) until ``pattern`` matches; return the text."""
    deadline = time.monotonic() + WAIT_SECONDS
    for _ in range(int(WAIT_SECONDS / POLL_SECONDS) + 1):
        text = path.read_text(errors="replace")
        if re.search(pattern, text):
            return text
        if process.poll() is not None or time.monotonic() > deadline:
            break
        time.sleep(POLL_SECONDS)
    raise AssertionError(f"no line matching {pattern!r}; stderr:\n{path.read_text()}")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_the_readme_snippet_logs_and_stops_cleanly(
    snippet_process: tuple[subprocess.Popen[bytes], Path], signum: int
) -> None:
    process, stderr_path = snippet_process
    wait_for_line(process, stderr_path, r"Z info listening address=127\.0\.0\.1:\d+ routes=echo")

    process.send_signal(signum)

    returncode = process.wait(WAIT_SECONDS)
    stderr = stderr_path.read_text(errors="replace")
    assert returncode == 0, stderr
    assert "ExceptionGroup" not in stderr
    assert "Traceback" not in stderr
    assert f"info stopping signal={signal.Signals(signum).name}\n" in stderr


@pytest.fixture
def restore_tunnel_logger() -> Iterator[logging.Logger]:
    logger = logging.getLogger(LOGGER_NAME)
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield logger
    logger.handlers[:], logger.level, logger.propagate = saved


@pytest.mark.parametrize(
    ("log_format", "formatter"), [("text", TextFormatter), ("json", JsonFormatter)]
)
def test_setup_logging_is_exported_and_picks_the_format(
    restore_tunnel_logger: logging.Logger, log_format: str, formatter: type[logging.Formatter]
) -> None:
    tunnel.setup_logging(log_format=log_format)
    [handler] = restore_tunnel_logger.handlers
    assert isinstance(handler.formatter, formatter)
    assert restore_tunnel_logger.level == logging.INFO


def test_setup_logging_defaults_to_text_and_refuses_an_unknown_format(
    restore_tunnel_logger: logging.Logger,
) -> None:
    tunnel.setup_logging()
    assert isinstance(restore_tunnel_logger.handlers[0].formatter, TextFormatter)
    with pytest.raises(ValueError, match="'yaml'"):
        tunnel.setup_logging(log_format="yaml")
