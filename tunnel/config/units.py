"""Durations and sizes: the units a file writes them in, read exactly and written back exactly."""

from __future__ import annotations

import math
import re
from decimal import Decimal
from fractions import Fraction

from tunnel.errors import ConfigError

MILLISECONDS = 0.001
SECONDS = 1.0
MINUTES = 60 * SECONDS
HOURS = 60 * MINUTES
DAYS = 24 * HOURS

BYTES = 1
KiB = 1024 * BYTES
MiB = 1024 * KiB
GiB = 1024 * MiB
MAX_SIZE = 1024 * GiB
"""The largest size ``parse_size`` reads: no key comes near it, so beyond it is a typo."""

_DURATION_UNITS = {"ms": MILLISECONDS, "s": SECONDS, "m": MINUTES, "h": HOURS, "d": DAYS}
_SIZE_UNITS = {"": BYTES, "b": BYTES, "kib": KiB, "mib": MiB, "gib": GiB}
_AMBIGUOUS_SIZE_UNITS = {"k": "KiB", "kb": "KiB", "m": "MiB", "mb": "MiB", "g": "GiB", "gb": "GiB"}
"""Units that mean 1000 to some programs and 1024 to others (nginx reads "32k" as 32 KiB)."""
_QUANTITY = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$", re.ASCII)


def parse_duration(text: object, key: str) -> float:
    """``"10s"`` → 10.0 seconds. Units: ms, s, m, h, d. ``"0s"`` means "off" where allowed."""
    if not isinstance(text, str):
        raise ConfigError(key, f'expected a duration string such as "10s", got {text!r}')
    match = _QUANTITY.match(text)
    if not match or match.group(2).lower() not in _DURATION_UNITS:
        raise ConfigError(key, f'{text!r} is not a duration; write it like "500ms", "10s", "1h"')
    value = float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]
    if not math.isfinite(value):
        raise ConfigError(key, f"{text!r} is too large")
    return value


def parse_size(text: object, key: str) -> int:
    """``"32KiB"`` → 32768 bytes. Units: B, KiB, MiB, GiB, any letter case; a bare number is bytes.

    KB, MB, GB, k, m and g are refused as ambiguous rather than guessed. Fractions are exact
    (``"1.5KiB"`` is 1536) and must come to whole bytes. From 0 to ``MAX_SIZE``; each key then
    checks its own range.
    """
    if isinstance(text, bool) or not isinstance(text, int | str):
        raise ConfigError(key, f'expected a size such as "32KiB", got {text!r}')
    if isinstance(text, int):
        size = Fraction(text)
    else:
        match = _QUANTITY.match(text)
        if match is None and text.lstrip().startswith("-"):
            raise ConfigError(key, f"{text!r}: a size cannot be negative")
        unit = match.group(2).lower() if match else ""
        if match and unit in _AMBIGUOUS_SIZE_UNITS:
            raise ConfigError(key, _ambiguous_size(text, match.group(1), unit))
        if match is None or unit not in _SIZE_UNITS:
            raise ConfigError(key, f'{text!r} is not a size; write it like "512B", "32KiB", "1MiB"')
        size = Fraction(Decimal(match.group(1))) * _SIZE_UNITS[unit]  # exact, unlike float
    if size < 0:
        raise ConfigError(key, f"{text!r}: a size cannot be negative")
    if size > MAX_SIZE:
        raise ConfigError(key, f"{text!r} is too large; sizes go up to {format_size(MAX_SIZE)}")
    if size.denominator != 1:
        raise ConfigError(
            key,
            f"{text!r} is not a whole number of bytes; write a number of bytes, or a fraction "
            'of a unit that comes out whole ("1.5KiB" is 1536 bytes)',
        )
    return int(size)


def _ambiguous_size(text: str, number: str, unit: str) -> str:
    """Say which binary unit to write, and what it comes to when that is a size."""
    binary = _AMBIGUOUS_SIZE_UNITS[unit]
    size = Fraction(Decimal(number)) * _SIZE_UNITS[binary.lower()]
    whole = size <= MAX_SIZE and size.denominator == 1
    meant = f'"{number}{binary}" ({size} bytes) or ' if whole else ""
    return (
        f"{text!r} is ambiguous; write {meant}a number of bytes "
        f"({unit.upper()} is 1000-based to some programs and 1024-based to others)"
    )


def format_duration(seconds: float) -> str:
    """The spelling that ``parse_duration`` reads back as exactly ``seconds``, so ``to_toml``
    round-trips: whole units when they are exact, else decimal seconds (``"1.001s"``)."""
    if seconds == 0:
        return "0s"
    for unit, scale in (("h", HOURS), ("m", MINUTES), ("s", SECONDS), ("ms", MILLISECONDS)):
        count = seconds / scale
        if count.is_integer() and int(count) * scale == seconds:
            return f"{int(count)}{unit}"
    return f"{Decimal(repr(seconds)):f}s"


def format_size(size: int) -> str:
    """The largest unit that holds ``size`` whole: ``"32KiB"``, ``"1536B"``."""
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return f"{size}B"
