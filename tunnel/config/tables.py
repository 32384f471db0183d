"""Tables of declared keys: read one from TOML data, give it back as TOML data and as text.

A table is a frozen dataclass whose fields carry their ``Key`` (see ``kinds.setting``). A class
may add keys that are not fields in ``EXTRA_KEYS`` (a shorthand such as a listener's ``cert``,
or a backend's ``url``, which several fields come from) and then builds itself from the parsed
values with a ``from_keys(values, key)`` class method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tunnel.config.kinds import DECLARATION, REQUIRED, TABLE_KEY, Context, Key, Kind, toml_value
from tunnel.errors import ConfigError


def keys_of(cls: type[Any]) -> tuple[Key, ...]:
    """Every key declared for the table ``cls``, ``EXTRA_KEYS`` first, then fields in order."""
    declared = tuple(
        dataclasses.replace(
            f.metadata[DECLARATION],
            name=f.name,
            **({} if f.default is dataclasses.MISSING else {"default": f.default}),
        )
        for f in dataclasses.fields(cls)
        if DECLARATION in f.metadata
    )
    extra: tuple[Key, ...] = getattr(cls, "EXTRA_KEYS", ())
    return (*extra, *declared)


def current_keys(cls: type[Any]) -> tuple[Key, ...]:
    """The keys a file may write today: those whose issue is "now"."""
    return tuple(key for key in keys_of(cls) if key.issue == "now")


def key_named(cls: type[Any], name: str) -> Key:
    """The declaration of ``cls``'s key ``name``."""
    return next(key for key in keys_of(cls) if key.name == name)


def dotted(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def parse_table(cls: type[Any], raw: object, key: str, ctx: Context) -> Any:
    """An instance of ``cls`` from the TOML table ``raw`` found at ``key``."""
    if not isinstance(raw, Mapping):
        raise ConfigError(key, f"expected a table, got {type(raw).__name__}")
    keys = current_keys(cls)
    names = [k.name for k in keys]
    for name in raw:
        if name not in names:
            raise ConfigError(
                dotted(key, name), f"unknown key; known keys here: {', '.join(names)}"
            )
    values: dict[str, Any] = {}
    for k in keys:
        where = dotted(key, k.name)
        if k.name in raw:
            values[k.name] = k.kind.parse(raw[k.name], where, ctx)
        elif k.default is REQUIRED:
            raise ConfigError(where, k.missing)
        else:
            values[k.name] = key if k.default is TABLE_KEY else k.default
    build = getattr(cls, "from_keys", None)
    return build(values, key) if build is not None else cls(**values)


def _written(obj: object) -> list[tuple[Key, object]]:
    """``(key, TOML data)`` for each key ``to_toml`` writes for ``obj``."""
    pairs = []
    for k in current_keys(type(obj)):
        if not k.written:
            continue
        value = getattr(obj, k.name)
        if k.omit_default and value == k.default:
            continue
        data = k.kind.dump(value)
        if data is not None:
            pairs.append((k, data))
    return pairs


def dump_table(obj: object) -> dict[str, object]:
    """``obj`` as the TOML data ``parse_table`` reads back as ``obj``."""
    return {k.name: data for k, data in _written(obj)}


def render_table(obj: object, path: str) -> list[str]:
    """The lines of ``obj``'s table whose header (already written) is ``path``: its values,
    then its sub-tables ``[path.name]``, then its arrays of tables ``[[path.name]]``."""
    lines, tables, arrays = [], [], []
    for k, data in _written(obj):
        kind, value = k.kind, getattr(obj, k.name)
        name = dotted(path, k.name)
        if isinstance(kind, Table) and not kind.inline:
            tables += ["", f"[{name}]", *render_table(value, name)]
        elif isinstance(kind, TableList) and not kind.inline:
            for item in value:
                arrays += ["", f"[[{name}]]", *render_table(item, name)]
        else:
            lines.append(f"{k.name} = {toml_value(data)}")
    return [*lines, *tables, *arrays]


@dataclass(frozen=True, slots=True)
class Table(Kind[Any]):
    """A table of ``cls``'s keys: ``[name]`` (or inline ``{ ... }`` when ``inline``); a None
    value (an optional table left out) is not written."""

    cls: type[Any]
    inline: bool = False

    def parse(self, raw: object, key: str, ctx: Context) -> Any:
        return parse_table(self.cls, raw, key, ctx)

    def dump(self, value: Any) -> object:
        return None if value is None else dump_table(value)


@dataclass(frozen=True, slots=True)
class TableList(Kind[tuple[Any, ...]]):
    """An array of ``cls`` tables: ``[[name]]`` sections, or ``[{ ... }, ...]`` when
    ``inline``; ``least`` is why an empty array is refused ("" when it is fine)."""

    cls: type[Any]
    inline: bool = False
    least: str = ""

    def parse(self, raw: object, key: str, ctx: Context) -> tuple[Any, ...]:
        if not isinstance(raw, list):
            spelling = "like [{ ... }]" if self.inline else f"([[{key}]])"
            raise ConfigError(key, f"expected an array of tables {spelling}, got {raw!r}")
        if not raw and self.least:
            raise ConfigError(key, self.least)
        return tuple(parse_table(self.cls, item, f"{key}[{i}]", ctx) for i, item in enumerate(raw))

    def dump(self, value: tuple[Any, ...]) -> object:
        return [dump_table(item) for item in value]
