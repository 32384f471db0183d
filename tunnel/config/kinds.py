"""Declaring a key: a dataclass field made with ``setting`` (or ``field(metadata=declare())``)
names the kind of value it holds, its default, its doc line and the issue that brings it.

A kind reads a TOML value (raising ``ConfigError`` that names the dotted key) and gives back the
TOML data that reads as the same value, so ``to_toml`` round-trips and the docs show defaults as
a file writes them. ``tables`` walks the declarations; nothing here knows a particular key.

Example: ``idle_timeout: float = setting(1 * HOURS, Duration(allow_zero=True), "A tunnel with
no bytes either way for this long is closed.")``.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import json
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Generic, TypeVar

from tunnel.config.hosts import Address
from tunnel.config.units import format_duration, format_size, parse_duration, parse_size
from tunnel.errors import ConfigError

T = TypeVar("T")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
DECLARATION = "tunnel.config"
"""The ``dataclasses.field`` metadata entry that holds a field's ``Key``."""


@dataclass(frozen=True, slots=True)
class Context:
    """What reading a value needs besides the value: the directory relative file names are read
    from (the configuration file's own, as nginx users expect of an include)."""

    base: Path | None = None


class Absent(enum.Enum):
    """Defaults that are not a value."""

    REQUIRED = "required"
    """The key must be written; ``Key.missing`` says what to write."""
    TABLE_KEY = "table key"
    """The table's own dotted key (``routes[2]``), as a name for logs."""


REQUIRED = Absent.REQUIRED
TABLE_KEY = Absent.TABLE_KEY


class Kind(ABC, Generic[T]):
    """The type of a key's value: how it is read from TOML and written back."""

    __slots__ = ()

    @abstractmethod
    def parse(self, raw: object, key: str, ctx: Context) -> T:
        """The value of ``raw``, or ``ConfigError(key, ...)``."""

    @abstractmethod
    def dump(self, value: T) -> object:
        """TOML data (str, int, bool, list, dict) that ``parse`` reads as ``value``; None
        leaves the key out."""


@dataclass(frozen=True, slots=True)
class Key:
    """One key of a table: everything parsing, ``to_toml`` and the docs know about it."""

    name: str
    kind: Kind[Any]
    doc: str
    default: Any
    issue: str = "now"
    """The issue that brings the key's behaviour; until it is "now" the key is unknown."""
    shown: str = ""
    """The docs' default cell, when the default value alone does not say it."""
    missing: str = "missing"
    """The problem reported when a ``REQUIRED`` key is not written."""
    omit_default: bool = False
    """``to_toml`` leaves the key out while it holds its default."""
    written: bool = True
    """False for a shorthand that parsing folds into another key (``to_toml`` writes that)."""


def declare(
    kind: Kind[Any],
    doc: str,
    *,
    default: object = REQUIRED,
    issue: str = "now",
    shown: str = "",
    missing: str = "missing",
    omit_default: bool = False,
) -> dict[str, Key]:
    """The metadata that makes a dataclass field a key: ``field(metadata=declare(...))``, where
    the constructor requires the field (``default`` is then only the file's default) or the
    field's default is a table; ``setting`` otherwise (``field`` is what mypy and ruff know to
    be a field). A field's own default is the key's."""
    return {DECLARATION: Key("", kind, doc, default, issue, shown, missing, omit_default)}


def setting(
    default: object,
    kind: Kind[Any],
    doc: str,
    *,
    issue: str = "now",
    shown: str = "",
    omit_default: bool = False,
) -> Any:
    """A dataclass field with a default, declared as a key (see ``declare``)."""
    metadata = declare(kind, doc, issue=issue, shown=shown, omit_default=omit_default)
    return dataclasses.field(default=default, metadata=metadata)


def _wrong_type(key: str, expected: str, raw: object) -> ConfigError:
    return ConfigError(key, f"expected {expected}, got {type(raw).__name__} {raw!r}")


@dataclass(frozen=True, slots=True)
class Flag(Kind[bool]):
    """``true`` or ``false``."""

    def parse(self, raw: object, key: str, ctx: Context) -> bool:
        if not isinstance(raw, bool):
            raise _wrong_type(key, "bool", raw)
        return raw

    def dump(self, value: bool) -> object:
        return value


@dataclass(frozen=True, slots=True)
class Integer(Kind[int]):
    """A whole number from ``min`` to ``max`` (None: no upper bound); ``zero`` says what 0
    means when it is the least value allowed."""

    min: int
    max: int | None = None
    zero: str = ""

    def parse(self, raw: object, key: str, ctx: Context) -> int:
        if isinstance(raw, bool):
            raise ConfigError(key, f"expected an integer, got {raw!r}")
        if not isinstance(raw, int):
            raise _wrong_type(key, "int", raw)
        if self.max is not None and not self.min <= raw <= self.max:
            raise ConfigError(key, f"must be between {self.min} and {self.max}")
        if raw < self.min:
            meaning = f" ({self.zero})" if self.zero else ""
            raise ConfigError(key, f"must be {self.min}{meaning} or more")
        return raw

    def dump(self, value: int) -> object:
        return value


@dataclass(frozen=True, slots=True)
class Text(Kind[str]):
    """A string; with ``pattern``, one it matches whole (``""`` passes when ``empty``), else
    ``"'value' {mismatch}"``."""

    pattern: re.Pattern[str] | None = None
    mismatch: str = ""
    empty: bool = True

    def parse(self, raw: object, key: str, ctx: Context) -> str:
        if not isinstance(raw, str):
            raise _wrong_type(key, "str", raw)
        if self.pattern is None or (not raw and self.empty) or self.pattern.fullmatch(raw):
            return raw
        raise ConfigError(key, f"{raw!r} {self.mismatch}")

    def dump(self, value: str) -> object:
        return value


@dataclass(frozen=True, slots=True)
class Choice(Kind[str]):
    """One of a few words."""

    values: tuple[str, ...]

    def parse(self, raw: object, key: str, ctx: Context) -> str:
        if not isinstance(raw, str):
            raise _wrong_type(key, "str", raw)
        if raw not in self.values:
            raise ConfigError(key, f"{raw!r}: must be one of {', '.join(self.values)}")
        return raw

    def dump(self, value: str) -> object:
        return value


@dataclass(frozen=True, slots=True)
class TextList(Kind[tuple[str, ...]]):
    """A list of strings, lower-cased when ``lower``; ``check`` says why one is refused ("" when
    it is fine), ``least`` why an empty list is ("" when it is fine)."""

    lower: bool = False
    check: Callable[[str], str] | None = None
    least: str = ""

    def parse(self, raw: object, key: str, ctx: Context) -> tuple[str, ...]:
        if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
            raise ConfigError(key, f"expected a list of strings, got {raw!r}")
        items = tuple(item.lower() if self.lower else item for item in raw)
        if not items and self.least:
            raise ConfigError(key, self.least)
        for item in items:
            problem = self.check(item) if self.check is not None else ""
            if problem:
                raise ConfigError(key, problem)
        return items

    def dump(self, value: tuple[str, ...]) -> object:
        return list(value)


@dataclass(frozen=True, slots=True)
class Duration(Kind[float]):
    """A duration string (``"10s"``), in seconds; ``"0s"`` only when ``allow_zero`` (off)."""

    allow_zero: bool = False

    def parse(self, raw: object, key: str, ctx: Context) -> float:
        value = parse_duration(raw, key)  # never negative: the syntax has no sign
        if value == 0 and not self.allow_zero:
            raise ConfigError(key, "must be more than 0s")
        return value

    def dump(self, value: float) -> object:
        return format_duration(value)


@dataclass(frozen=True, slots=True)
class Size(Kind[int]):
    """A size (``"32KiB"``), in bytes, from ``min`` to ``max``."""

    min: int
    max: int

    def parse(self, raw: object, key: str, ctx: Context) -> int:
        value = parse_size(raw, key)
        if not self.min <= value <= self.max:
            span = f"between {format_size(self.min)} and {format_size(self.max)}"
            raise ConfigError(key, f"must be {span}")
        return value

    def dump(self, value: int) -> object:
        return format_size(value)


@dataclass(frozen=True, slots=True)
class CIDRList(Kind[tuple[IPNetwork, ...]]):
    """IP networks (``"10.0.0.0/8"``; an address alone is one host); host bits are dropped."""

    def parse(self, raw: object, key: str, ctx: Context) -> tuple[IPNetwork, ...]:
        networks = []
        for cidr in TextList().parse(raw, key, ctx):
            try:
                networks.append(ipaddress.ip_network(cidr, strict=False))
            except ValueError as exc:
                raise ConfigError(key, f"{cidr!r} is not a CIDR: {exc}") from exc
        return tuple(networks)

    def dump(self, value: tuple[IPNetwork, ...]) -> object:
        return [str(network) for network in value]


@dataclass(frozen=True, slots=True)
class ListenAddress(Kind[Address | None]):
    """``host:port`` to listen on (see ``Address.parse``); with ``off``, ``""`` is None."""

    off: bool = False

    def parse(self, raw: object, key: str, ctx: Context) -> Address | None:
        if self.off and raw == "":
            return None
        return Address.parse(raw, key)

    def dump(self, value: Address | None) -> object:
        return "" if value is None else str(value)


@dataclass(frozen=True, slots=True)
class FilePath(Kind[str]):
    """A file name, relative to the configuration file's directory, ``~`` expanded; ``""`` is
    no file, refused unless ``empty``."""

    empty: bool = True

    def parse(self, raw: object, key: str, ctx: Context) -> str:
        value = Text().parse(raw, key, ctx)
        if not value:
            if not self.empty:
                raise ConfigError(key, PEM_MISSING)
            return ""
        path = Path(value).expanduser()
        if ctx.base is not None and not path.is_absolute():
            path = ctx.base / path
        return str(path)

    def dump(self, value: str) -> object:
        return value


PEM_MISSING = "missing; write the path of a PEM file"


_RATE_UNITS = {"s": 1.0, "m": 60.0}
_RATE = re.compile(r"([0-9]+(?:\.[0-9]+)?)/([sm])", re.ASCII)


@dataclass(frozen=True, slots=True)
class Rate:
    """``count`` events per ``per`` seconds (``"10/s"``: 10 per 1, ``"600/m"``: 600 per 60);
    a count of 0 is off."""

    count: float
    per: float

    @property
    def per_second(self) -> float:
        return self.count / self.per

    @property
    def off(self) -> bool:
        return self.count == 0

    def __str__(self) -> str:
        """The spelling ``parse_rate`` reads back as this rate."""
        count = self.count
        text = str(int(count)) if count.is_integer() else f"{Decimal(repr(count)):f}"
        return f"{text}/{'m' if self.per == _RATE_UNITS['m'] else 's'}"


RATE_OFF = Rate(0.0, 1.0)


def parse_rate(text: str) -> Rate:
    """``"10/s"`` → ``Rate(10, 1)``, ``"600/m"`` → ``Rate(600, 60)``; decimals allowed
    (``"0.5/s"``), ``"0/s"`` is off. Anything else raises ``ValueError`` saying how to write it."""
    match = _RATE.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"{text!r} is not a rate; write a number of events per second or per minute, "
            'like "10/s" or "600/m"'
        )
    count = float(match.group(1))
    if not math.isfinite(count):
        raise ValueError(f"{text!r} is too large")
    return Rate(count, _RATE_UNITS[match.group(2)])


@dataclass(frozen=True, slots=True)
class RateKind(Kind[Rate]):
    """A rate (``"10/s"``, ``"600/m"``, see ``parse_rate``); ``"0/s"`` only when
    ``allow_zero`` (off). Named apart from the ``Rate`` it reads, like ``ListenAddress``."""

    allow_zero: bool = False

    def parse(self, raw: object, key: str, ctx: Context) -> Rate:
        if not isinstance(raw, str):
            raise ConfigError(key, f'expected a rate such as "10/s" or "600/m", got {raw!r}')
        try:
            value = parse_rate(raw)
        except ValueError as exc:
            raise ConfigError(key, str(exc)) from exc
        if value.off and not self.allow_zero:
            raise ConfigError(key, 'must be more than 0/s; write it like "10/s" or "600/m"')
        return value

    def dump(self, value: Rate) -> object:
        return str(value)


def toml_value(data: object) -> str:
    """``data`` (as ``Kind.dump`` gives it) in TOML; arrays of tables one per line."""
    if isinstance(data, bool):
        return "true" if data else "false"
    if isinstance(data, int):
        return str(data)
    if isinstance(data, str):
        return toml_str(data)
    if isinstance(data, dict):
        inner = ", ".join(f"{name} = {toml_value(value)}" for name, value in data.items())
        return f"{{ {inner} }}" if inner else "{}"
    if isinstance(data, list | tuple):
        items: Sequence[object] = data
        if any(isinstance(item, dict) for item in items):
            return "[\n" + "".join(f"  {toml_value(item)},\n" for item in items) + "]"
        return "[" + ", ".join(toml_value(item) for item in items) + "]"
    raise TypeError(f"no TOML for {data!r}")


def toml_str(text: str) -> str:
    """A TOML basic string. Values come from users (names, paths), so quotes, backslashes and
    control characters are escaped; JSON's escapes are valid TOML, and DEL must be escaped too."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")
