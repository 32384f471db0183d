"""Log lines: the text and JSON formatters render the same record, times and durations included,
and docs/operations.md describes every field the code logs."""

from __future__ import annotations

import ast
import calendar
import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest

from tunnel.logs import LOGGER_NAME, JsonFormatter, Seconds, TextFormatter, Throttle, fields

ROOT = Path(__file__).resolve().parent.parent
AT = calendar.timegm((2026, 12, 3, 23, 40, 0)) + 0.125
"""2026-12-03T23:40:00.125Z; an eighth of a second is exact in binary, so no rounding doubt."""


def record(event: str, created: float = AT, **values: Any) -> logging.LogRecord:
    entry = logging.LogRecord(LOGGER_NAME, logging.INFO, __file__, 1, event, (), None)
    entry.created = created
    entry.__dict__.update(fields(**values))
    return entry


def test_json_time_is_iso_8601_utc_with_milliseconds() -> None:
    entry = json.loads(JsonFormatter().format(record("listening")))
    assert entry["time"] == "2026-12-03T23:40:00.125Z"
    assert entry["level"] == "info"
    assert entry["event"] == "listening"


def test_text_time_is_the_same_instant_to_the_second() -> None:
    line = TextFormatter().format(record("listening", address="127.0.0.1:8080"))
    assert line == "2026-12-03T23:40:00Z info listening address=127.0.0.1:8080"


def test_both_formatters_follow_the_clock_from_one_second_to_the_next() -> None:
    """The per-second stamp is cached; the cache must not outlive its second."""
    text, json_formatter = TextFormatter(), JsonFormatter()
    times = [AT, AT + 0.5, AT + 1.0, AT + 3600.0]
    text_stamps = [text.format(record("e", created)).split()[0] for created in times]
    json_stamps = [json.loads(json_formatter.format(record("e", c)))["time"] for c in times]
    assert text_stamps == [
        "2026-12-03T23:40:00Z",
        "2026-12-03T23:40:00Z",
        "2026-12-03T23:40:01Z",
        "2026-12-04T00:40:00Z",
    ]
    assert json_stamps == [
        "2026-12-03T23:40:00.125Z",
        "2026-12-03T23:40:00.625Z",
        "2026-12-03T23:40:01.125Z",
        "2026-12-04T00:40:00.125Z",
    ]


@pytest.mark.parametrize(
    ("seconds", "text", "number"),
    [
        (0.0041234, "0.004s", 0.004),
        (0.0, "0s", 0.0),
        (2.5, "2.5s", 2.5),
        (0.1, "0.1s", 0.1),
        (3600.0004, "3600s", 3600.0),
        (86400 * 30 + 0.25, "2592000.25s", 2592000.25),
    ],
)
def test_a_duration_is_seconds_in_text_and_a_number_in_json(
    seconds: float, text: str, number: float
) -> None:
    closed = record("tunnel closed", duration=Seconds(seconds), reason="client_eof")
    assert TextFormatter().format(closed).endswith(f" duration={text} reason=client_eof")
    entry = json.loads(JsonFormatter().format(closed))
    assert entry["duration"] == number
    assert isinstance(entry["duration"], float)


def test_json_keeps_numbers_numbers_and_text_quotes_what_has_spaces() -> None:
    refused = record("request refused", status=400, reason="no Upgrade header")
    entry = json.loads(JsonFormatter().format(refused))
    assert (entry["status"], entry["reason"]) == (400, "no Upgrade header")
    assert TextFormatter().format(refused).endswith(' status=400 reason="no Upgrade header"')


# --- the documentation of the fields ---------------------------------------------------------

LINE_FIELDS = {"time", "level", "event", "exception"}
"""Keys every line (or a line with a traceback) has besides the fields of its event."""


def logged_fields() -> set[str]:
    """Every keyword passed to ``fields(...)`` anywhere in the package, plus ``worker`` (added to
    every line of a worker by ``tunnel.worker.WorkerTag``)."""
    names = {"worker"}
    for path in (ROOT / "tunnel").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "fields"
            ):
                names |= {keyword.arg for keyword in node.keywords if keyword.arg is not None}
    return names


def documented_fields() -> set[str]:
    """The first column of the field table under "### Fields" in docs/operations.md."""
    text = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    section = text.split("### Fields", 1)[1].split("\n#", 1)[0]
    return set(re.findall(r"^\| `([a-z0-9_]+)` \|", section, flags=re.MULTILINE))


def test_every_logged_field_is_documented_in_operations() -> None:
    assert logged_fields() >= {"client", "duration", "reason", "bytes_up"}, "the scan works"
    assert sorted((logged_fields() | LINE_FIELDS) - documented_fields()) == [], "undocumented"
    assert sorted(documented_fields() - logged_fields() - LINE_FIELDS) == [], "documented, unused"


def test_a_throttled_line_comes_once_per_period_with_the_count_since_the_last() -> None:
    throttle = Throttle(10.0)
    assert throttle.count(100.0) == 1
    assert [throttle.count(t) for t in (101.0, 105.0, 109.9)] == [None, None, None]
    assert throttle.count(110.0) == 4
    assert throttle.count(110.5) is None
    assert throttle.count(500.0) == 2
