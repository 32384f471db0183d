"""Fuzzing configuration files: ``Config.from_toml`` returns a ``Config`` or raises
``ConfigError``, never ``KeyError``, ``TypeError``, ``ValueError`` or ``AttributeError``.

Documents are built from the real declarations (``tables.current_keys`` of every table
``docs.sections`` finds, so a key added tomorrow is fuzzed too) with values a file might hold:
valid ones, near-valid ones (a sign, a unit too many, another case, unicode, empty strings,
huge numbers) and wrong ones (other types, floats, dates, tables where a value goes and values
where a table goes, keys of other tables), written as ``[table]`` sections or inline, and now
and then with a typo in the TOML itself. A configuration that loads round-trips:
``Config.from_toml(config.to_toml())`` equals it (the contract of tests/test_config.py).

Longer run: ``TUNNEL_FUZZ_EXAMPLES=20000 python -m pytest -q tests/test_fuzz*.py``.
"""

from __future__ import annotations

import copy
import json
import math
import re
import tomllib
from collections.abc import Callable
from typing import Any

from conftest import fuzz_settings
from hypothesis import event, given
from hypothesis import strategies as st

from tunnel.config import Config
from tunnel.config.docs import sections
from tunnel.config.kinds import (
    REQUIRED,
    Absent,
    Choice,
    CIDRList,
    Duration,
    FilePath,
    Flag,
    Integer,
    Key,
    ListenAddress,
    Size,
    Text,
    TextList,
)
from tunnel.config.routes import BackendURL
from tunnel.config.tables import Table, TableList, current_keys
from tunnel.errors import ConfigError

FUZZ = fuzz_settings(200)


class Raw(str):
    """TOML written as it is (a date, ``inf``), not as a string."""

    __slots__ = ()


GOOD: dict[type[Any], list[object]] = {
    Flag: [True, False],
    Duration: ["10s", "0s", "500ms", "1h", "1.5s", "2m", "1d", "0.001s", "90s"],
    Size: ["32KiB", "1024", 4096, "1MiB", "1.5KiB", "2048B", "64 KiB"],
    CIDRList: [[], ["10.0.0.0/8"], ["::1", "192.168.0.0/16"], ["2001:db8::/32"]],
    ListenAddress: ["127.0.0.1:0", "127.0.0.1:8080", "[::1]:9000", "localhost:0", ":8080"],
    FilePath: ["", "cert.pem", "/etc/tunnel/key.pem", "~/ca.pem", "certs/../x.pem"],
    BackendURL: ["ws://127.0.0.1:9000", "wss://b.example/chat/", "127.0.0.1:9001", "ws://[::1]"],
    TextList: [
        [],
        ["websocket"],
        ["a.example", "*.example.org"],
        ["mqtt", "websocket"],
        ["https://a.example", "*"],
        ["x-forwarded-user"],
    ],
    Text: ["chat", "a", "X-Client-Cert", "header:X-User", "cookie:sid", "query:t", "ip", "/ws/"],
}
WRONG = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(),
    st.sampled_from([Raw("inf"), Raw("-inf"), Raw("nan"), Raw("1e400"), Raw("-0.0"), Raw("1.5")]),
    st.sampled_from([Raw("1979-05-27"), Raw("07:32:00"), Raw("1979-05-27T07:32:00Z")]),
    st.text(max_size=12),
    st.lists(st.one_of(st.integers(), st.text(max_size=4)), max_size=3),
    st.dictionaries(st.sampled_from(["listen", "url", "name", "x"]), st.integers(), max_size=2),
)
"""Values of the wrong type for most keys."""


def good_values(key: Key) -> list[object]:
    """Values a real file might write for ``key``."""
    kind = key.kind
    values = list(GOOD.get(type(kind), []))
    if isinstance(kind, Text) and kind.pattern is not None:
        values = [v for v in values if isinstance(v, str) and kind.pattern.fullmatch(v)]
    if isinstance(kind, Choice):
        values += list(kind.values)
    if isinstance(kind, Integer):
        values += [kind.min, kind.min + 1, 100] + ([kind.max] if kind.max is not None else [])
    if isinstance(kind, ListenAddress) and kind.off:
        values.append("")
    if not isinstance(key.default, Absent):
        default = kind.dump(key.default)
        if default is not None:
            values.append(default)
    return values or [""]


FULLWIDTH_DIGITS = str.maketrans("0123456789", "".join(chr(0xFF10 + i) for i in range(10)))
"""Digits that ``str.isdigit`` takes and the units' ASCII patterns must not."""


def near(value: object) -> list[object]:
    """Misspellings of a valid value."""
    if isinstance(value, bool):
        return [str(value).lower(), int(value)]
    if isinstance(value, int):
        return [value - 1, value + 1, -value, value * 2**32, 2**63 - 1, str(value), float(value)]
    if isinstance(value, str):
        return [
            "-" + value,
            value.upper(),
            f" {value} ",
            value + "s",
            value + "\x00",
            value * 40,
            "é" + value,
            value.replace(".", ","),
            value.translate(FULLWIDTH_DIGITS),
            "",
        ]
    if isinstance(value, list):
        return [[*value, ""], [*value, 1], value * 3, [value]]
    return []


def value_for(key: Key, depth: int) -> st.SearchStrategy[object]:
    """A value that ``key`` may well take (``corrupt`` breaks some afterwards)."""
    kind = key.kind
    if isinstance(kind, Table):
        return table_for(kind.cls, depth + 1)
    if isinstance(kind, TableList):
        tables = table_for(kind.cls, depth + 1)
        return st.lists(tables, min_size=1, max_size=2) | st.just([])
    return st.sampled_from(good_values(key))


NINE_IN_TEN = st.sampled_from([True] * 9 + [False])
ALL_NAMES = sorted({k.name for _, cls in sections() for k in current_keys(cls)})


def table_for(cls: type[Any], depth: int = 0) -> st.SearchStrategy[dict[str, object]]:
    """A table of ``cls``'s keys: some of them, and the required ones nine times in ten."""
    keys = current_keys(cls)
    if depth > 4:
        return st.just({})
    optional = {k.name: value_for(k, depth) for k in keys}
    needed = [
        k.name
        for k in keys
        if k.default is REQUIRED or (depth == 0 and isinstance(k.kind, TableList))
    ]  # a file that runs has listeners and routes

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, object]:
        table = draw(st.fixed_dictionaries({}, optional=optional))
        for name in needed:
            if name not in table and draw(NINE_IN_TEN):
                table[name] = draw(optional[name])
        return table

    return build()


Spot = tuple[dict[str, object] | list[object], Any]


def spots(data: object) -> list[Spot]:
    """Every (container, key or index) in ``data``, depth first."""
    found: list[Spot] = []
    if isinstance(data, dict):
        for key, value in data.items():
            found += [(data, key), *spots(value)]
    elif isinstance(data, list):
        for i, value in enumerate(data):
            found += [(data, i), *spots(value)]
    return found


@st.composite
def corrupted(draw: st.DrawFn, data: dict[str, object]) -> dict[str, object]:
    """``data`` broken in up to three places: a value misspelt, of the wrong type, a table
    where a value goes, a key of another table added, a key dropped."""
    data = copy.deepcopy(data)  # drawn values share lists with GOOD
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2, 3]))):
        container, key = draw(st.sampled_from([*spots(data), (data, None)]))
        action = draw(st.sampled_from(["near", "near", "wrong", "table", "stranger", "drop"]))
        if key is None or action == "stranger":
            if key is None and not draw(NINE_IN_TEN):
                continue
            target = container if isinstance(container, dict) else data
            target[draw(st.sampled_from(ALL_NAMES))] = draw(st.one_of(WRONG, st.just({})))
        elif action == "near" and near(container[key]):
            container[key] = draw(st.sampled_from(near(container[key])))
        elif action == "wrong":
            container[key] = draw(WRONG)
        elif action == "table":
            container[key] = draw(st.sampled_from([{}, {"listen": "127.0.0.1:0"}, [{}]]))
        elif action == "drop" and isinstance(container, dict):
            del container[key]
    return data


# --- writing TOML ------------------------------------------------------------------------------

BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def toml_key(name: str) -> str:
    return name if BARE_KEY.fullmatch(name) else toml_string(name)


def toml_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def inline(value: object) -> str:
    """``value`` as an inline TOML value."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(inline(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {inline(v)}" for k, v in value.items()) + "}"
    raise AssertionError(f"no TOML for {value!r}")


def document(data: dict[str, object], sectioned: bool) -> str:
    """``data`` as a file: all inline, or top-level tables as ``[name]`` and ``[[name]]``
    sections with their own sub-tables as ``[name.sub]`` sections."""
    if not sectioned:
        return "".join(f"{toml_key(k)} = {inline(v)}\n" for k, v in data.items())
    plain = [f"{toml_key(k)} = {inline(v)}\n" for k, v in data.items() if not _is_table(v)]
    lines = ["".join(plain)]
    for name, value in data.items():
        if isinstance(value, dict):
            lines.append(_section(f"[{toml_key(name)}]", toml_key(name), value))
        elif _is_table(value):
            assert isinstance(value, list)
            for item in value:
                lines.append(_section(f"[[{toml_key(name)}]]", toml_key(name), item))
    return "\n".join(lines)


def _is_table(value: object) -> bool:
    return isinstance(value, dict) or (
        isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)
    )


def _section(header: str, path: str, table: dict[str, object]) -> str:
    lines = [header]
    lines += [f"{toml_key(k)} = {inline(v)}" for k, v in table.items() if not isinstance(v, dict)]
    for name, value in table.items():
        if isinstance(value, dict):
            lines.append(f"[{path}.{toml_key(name)}]")
            lines += [f"{toml_key(k)} = {inline(v)}" for k, v in value.items()]
    return "\n".join(lines) + "\n"


CONFIG_DATA = table_for(Config).flatmap(corrupted)
"""Built once: strategies over every declared key cost more to build than to draw from."""


@st.composite
def config_files(draw: st.DrawFn) -> str:
    text = document(draw(CONFIG_DATA), draw(st.booleans()))
    if not draw(NINE_IN_TEN):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(["=", "[", '"', "\n", "]", "x", "#"])) + text[at:]
    return text


def load(read: Callable[..., Config], source: object, partial: bool) -> Config | None:
    """The configuration ``read`` makes of ``source``, or None for a ``ConfigError`` that
    names its key and says what is wrong; any other exception fails the test."""
    error: ConfigError | None = None
    try:
        config = read(source, partial=partial)
    except ConfigError as exc:
        error = exc
    else:
        event("loaded")
        return config
    assert error.key
    assert error.problem
    event("ConfigError at " + re.sub(r"\[\d+\]", "[]", error.key))
    return None


@FUZZ
@given(text=config_files(), partial=st.booleans())
def test_a_config_file_loads_and_round_trips_or_is_a_config_error(text: str, partial: bool) -> None:
    config = load(Config.from_toml, text, partial)
    if config is None:
        return
    printed = config.to_toml()
    assert Config.from_toml(printed, partial=partial) == config
    assert Config.from_mapping(tomllib.loads(printed), partial=partial) == config
    assert Config.from_mapping(config.to_mapping(), partial=partial) == config
    if not partial:
        config.validate()


@FUZZ
@given(data=CONFIG_DATA, partial=st.booleans())
def test_a_config_mapping_loads_or_is_a_config_error(
    data: dict[str, object], partial: bool
) -> None:
    # The Python API (``tunnel.Config.from_mapping``) is handed data that never was TOML.
    config = load(Config.from_mapping, data, partial)
    if config is None:
        return
    assert Config.from_toml(config.to_toml(), partial=partial) == config
