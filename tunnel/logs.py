"""Log lines for operators: one event name plus key=value fields, as text or JSON.

Code logs with ``log.info("tunnel closed", extra=fields(client=..., reason=...))``; the formatter
chosen by ``server.log_format`` renders the fields. A span of time goes in as ``Seconds(x)``, so
that text shows ``0.004s`` and JSON a number a log pipeline can sum. docs/operations.md lists
every field.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from tunnel.config import LOG_FORMATS

LOGGER_NAME = "tunnel"


def fields(**values: Any) -> dict[str, Any]:
    """Wrap structured fields for the ``extra=`` argument of a logging call; a field whose
    value is None is left out (it does not apply to this line)."""
    return {"fields": {name: value for name, value in values.items() if value is not None}}


class Throttle:
    """For a line that could come once per event under attack or outage: counts the events
    and says when one may be logged (at most once per ``seconds``), with how many happened
    since the last line. The clock is the caller's."""

    __slots__ = ("_at", "_count", "seconds")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._at = float("-inf")
        self._count = 0

    def count(self, now: float) -> int | None:
        """Count one event; the number to log now, or None when it is not yet time."""
        self._count += 1
        if now - self._at < self.seconds:
            return None
        self._at = now
        counted, self._count = self._count, 0
        return counted


class Seconds(float):
    """A duration in a log field: ``0.004s`` in text, the number ``0.004`` in JSON; both to the
    millisecond, finer than any figure an operator acts on."""

    __slots__ = ()

    def __str__(self) -> str:
        return f"{self:.3f}".rstrip("0").rstrip(".") + "s"

    def __repr__(self) -> str:
        return f"Seconds({float(self)!r})"


class _UtcSeconds:
    """``2026-12-03T23:40:00``: the UTC date and time of a second, formatted once per second,
    since a busy tunnel logs thousands of lines a second."""

    __slots__ = ("_second", "_stamp")

    def __init__(self) -> None:
        self._second = -1
        self._stamp = ""

    def __call__(self, second: int) -> str:
        if second != self._second:
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return self._stamp


def _quote(value: Any) -> str:
    text = str(value)
    if not text or " " in text or '"' in text or "=" in text:
        return json.dumps(text)
    return text


class TextFormatter(logging.Formatter):
    """``2026-11-23T13:40:00Z info tunnel closed client=1.2.3.4:5 reason="client EOF"``"""

    def __init__(self) -> None:
        super().__init__()
        self._utc = _UtcSeconds()

    def format(self, record: logging.LogRecord) -> str:
        stamp = self._utc(int(record.created)) + "Z"
        values: dict[str, Any] = getattr(record, "fields", {})
        parts = [stamp, record.levelname.lower(), record.getMessage()]
        parts += [f"{key}={_quote(value)}" for key, value in values.items()]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (``2026-12-03T23:40:00.123Z``, the text lines' clock
    to the millisecond), ``level``, ``event`` and the fields."""

    def __init__(self) -> None:
        super().__init__()
        self._utc = _UtcSeconds()

    def format(self, record: logging.LogRecord) -> str:
        milliseconds = int(record.created * 1000)
        second, millisecond = divmod(milliseconds, 1000)
        values: dict[str, Any] = getattr(record, "fields", {})
        entry: dict[str, Any] = {
            "time": f"{self._utc(second)}.{millisecond:03d}Z",
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            **{
                key: round(value, 3) if isinstance(value, Seconds) else value
                for key, value in values.items()
            },
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(log_format: str = "text", level: int = logging.INFO) -> None:
    """Send tunnel's logs to stderr in ``log_format`` ("text" or "json"), as ``tunnel run``
    does; an embedding program calls it once (``tunnel.setup_logging()``) to get those lines."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log_format must be 'text' or 'json', not {log_format!r}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
    # Neither format prints them, and each costs a getpid() or more per line; nor the file and
    # line of the call, which logging finds by walking the stack (the logging HOWTO's own
    # advice for a program that does not print them).
    logging.logProcesses = False
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging._srcfile = None
