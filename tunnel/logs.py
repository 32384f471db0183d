"""Log lines for operators: one event name plus key=value fields, as text or JSON.

Code logs with ``log.info("tunnel closed", extra=fields(client=..., reason=...))``; the formatter
chosen by ``server.log_format`` renders the fields.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

LOGGER_NAME = "tunnel"


def fields(**values: Any) -> dict[str, Any]:
    """Wrap structured fields for the ``extra=`` argument of a logging call."""
    return {"fields": values}


def _quote(value: Any) -> str:
    text = str(value)
    if not text or " " in text or '"' in text or "=" in text:
        return json.dumps(text)
    return text


class TextFormatter(logging.Formatter):
    """``2026-11-23T13:40:00Z info tunnel closed client=1.2.3.4:5 reason="client EOF"``"""

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._stamp = ""

    def _time(self, created: float) -> str:
        """The UTC stamp, formatted once per second: a busy tunnel logs thousands a second."""
        second = int(created)
        if second != self._second:
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))
            self._second = second
        return self._stamp

    def format(self, record: logging.LogRecord) -> str:
        stamp = self._time(record.created)
        values: dict[str, Any] = getattr(record, "fields", {})
        parts = [stamp, record.levelname.lower(), record.getMessage()]
        parts += [f"{key}={_quote(value)}" for key, value in values.items()]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time``, ``level``, ``event`` and the fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": round(record.created, 6),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(log_format: str, level: int = logging.INFO) -> None:
    """Send tunnel's logs to stderr in ``log_format`` ("text" or "json")."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
    # Neither format prints them, and each costs a getpid() or more per line.
    logging.logProcesses = False
    logging.logThreads = False
    logging.logMultiprocessing = False
