"""One declaration per key: parsing, ``to_toml``, ``validate`` and ``missing`` all come from it."""

from __future__ import annotations

import ast
import dataclasses
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tunnel.config import (
    Address,
    BackendConfig,
    CertPair,
    Config,
    ListenerConfig,
    ListenerTLS,
    RouteConfig,
    ServerConfig,
)
from tunnel.config.docs import sections, table
from tunnel.config.kinds import Context, Duration, Flag, Integer, declare, setting
from tunnel.config.tables import current_keys, keys_of, parse_table, render_table
from tunnel.errors import ConfigError

PACKAGE = Path(__file__).resolve().parent.parent / "tunnel" / "config"
SERVER_ONLY = '[server]\nidle_timeout = "5m"\n'
ROUTE = '\n[[routes]]\nname = "r"\nbackends = [{ url = "127.0.0.1:9000" }]\n'
LISTENER = '\n[[listeners]]\nlisten = "127.0.0.1:8080"\n'


@pytest.mark.parametrize(("name", "cls"), [("(top)", Config), *sections()])
def test_every_field_is_a_declared_key_or_comes_from_one(name: str, cls: type[Any]) -> None:
    declared = {key.name for key in keys_of(cls)}
    fields = {f.name for f in dataclasses.fields(cls)}
    if not hasattr(cls, "from_keys"):
        assert fields <= declared, f"[{name}]: fields without a declaration"
    assert all(key.doc for key in keys_of(cls)), f"[{name}]: a key without a doc line"


def test_config_python_objects_round_trip_through_toml() -> None:
    """Configs built in Python, as the demo and the tests build them, print and read back."""
    config = Config(
        listeners=(
            ListenerConfig(Address("", 0)),
            ListenerConfig(Address("::1", 8443), tls=ListenerTLS((CertPair("/c", "/k"),))),
        ),
        routes=(
            RouteConfig("demo", (BackendConfig("echo", "127.0.0.1", 9000),)),
            RouteConfig(
                "two",
                (BackendConfig("b", "b.example", 443, "/x", "wss"),),
                hosts=("a.example",),
                upgrades=("websocket", "mqtt"),
            ),
        ),
        server=ServerConfig(idle_timeout=0.25, max_header_bytes=1536, workers=3),
    )
    config.validate()
    assert Config.from_toml(config.to_toml()) == config
    assert tomllib.loads(config.to_toml()) == config.to_mapping()
    assert Config.from_mapping(config.to_mapping()) == config


@pytest.mark.parametrize(
    ("config", "key", "message"),
    [
        (
            Config(server=ServerConfig(log_format="xml")),
            "server.log_format",
            "'xml': must be one of text, json",
        ),
        (Config(server=ServerConfig(max_header_bytes=100)), "server.max_header_bytes", "1KiB"),
        (Config(server=ServerConfig(connect_timeout=0)), "server.connect_timeout", "more than 0s"),
        (
            Config(listeners=(ListenerConfig(Address("h", 1), tls=ListenerTLS(())),)),
            "listeners[0].tls",
            "no certificate",
        ),
        (
            Config(
                listeners=(
                    ListenerConfig(
                        Address("h", 1),
                        tls=ListenerTLS((CertPair("c", "k"),), client_subject_header="X-S"),
                    ),
                )
            ),
            "listeners[0].tls.client_subject_header",
            "needs client_ca",
        ),
        (
            Config(
                listeners=(ListenerConfig(Address("h", 1)),),
                routes=(RouteConfig("r", (BackendConfig("b", "0.0.0.0", 1),)),),
            ),
            "routes[0].backends[0].url",
            "a backend needs the address to connect to",
        ),
        (Config(), "listeners", "no listener; add [[listeners]] or pass --listen"),
    ],
)
def test_validate_checks_a_config_built_in_python_as_a_file(
    config: Config, key: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        config.validate()
    assert caught.value.key == key
    assert message in caught.value.problem


# --- a file that leaves listeners or routes to the flags ---------------------------------------


@pytest.mark.parametrize(
    ("text", "notes"),
    [
        (
            SERVER_ONLY,
            ("no listener: tunnel run needs --listen", "no route: tunnel run needs --backend"),
        ),
        (SERVER_ONLY + ROUTE, ("no listener: tunnel run needs --listen",)),
        (SERVER_ONLY + LISTENER, ("no route: tunnel run needs --backend",)),
        (SERVER_ONLY + LISTENER + ROUTE, ()),
        ("", ("no listener: tunnel run needs --listen", "no route: tunnel run needs --backend")),
    ],
)
def test_a_partial_file_is_valid_and_says_what_it_lacks(text: str, notes: tuple[str, ...]) -> None:
    config = Config.from_toml(text, partial=True)
    assert config.missing() == notes
    assert Config.from_toml(config.to_toml(), partial=True) == config
    if notes:
        with pytest.raises(ConfigError) as caught:
            Config.from_toml(text)
        assert caught.value.problem.startswith(notes[0].split(":")[0] + ";")
        with pytest.raises(ConfigError):
            config.validate()
    else:
        assert Config.from_toml(text) == config


def test_flags_complete_a_partial_file(tmp_path: Path) -> None:
    path = tmp_path / "server-only.toml"
    path.write_text(SERVER_ONLY, encoding="utf-8")
    loaded = Config.from_file(path, partial=True)
    config = loaded.with_overrides(listen=["127.0.0.1:0"], backends=["127.0.0.1:9000"])
    assert config.missing() == ()
    assert config.server.idle_timeout == 300.0
    assert str(config.listeners[0].listen) == "127.0.0.1:0"
    with pytest.raises(ConfigError) as caught:
        loaded.with_overrides(listen=["127.0.0.1:0"])
    assert str(caught.value) == "routes: no route; add [[routes]] or pass --backend"
    with pytest.raises(ConfigError) as caught:
        Config.from_file(path)
    assert caught.value.key == "listeners"


def test_a_partial_file_still_gets_every_other_check() -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_toml('[server]\nrelay = "sendfile"\n', partial=True)
    assert caught.value.key == "server.relay"
    with pytest.raises(ConfigError) as caught:
        Config.from_toml(LISTENER + LISTENER, partial=True)
    assert caught.value.key == "listeners[1].listen"


@pytest.mark.parametrize(
    ("backends", "names"),
    [
        (["b:1", "c:1"], ["b:1", "c:1"]),
        (["ws://b:1/x", "ws://b:1/y"], ["b:1", "ws://b:1/y"]),
    ],
)
def test_backend_flags_get_unique_names(backends: list[str], names: list[str]) -> None:
    config = Config.from_toml(LISTENER + ROUTE).with_overrides(backends=backends)
    assert [b.name for b in config.routes[0].backends] == names


def test_the_same_backend_flag_twice_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_toml(LISTENER + ROUTE).with_overrides(backends=["b:1", "ws://b:1"])
    assert caught.value.key == "--backend ws://b:1"
    assert "'ws://b:1' is also --backend b:1" in caught.value.problem


def test_workers_flag_is_checked_by_the_key_declaration() -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_toml(LISTENER + ROUTE).with_overrides(workers=0)
    assert str(caught.value) == "--workers: must be between 1 and 256"


# --- the declaration machinery, on a table of its own ------------------------------------------


@dataclass(frozen=True, slots=True)
class Toy:
    count: int = field(metadata=declare(Integer(1), "How many.", missing="missing; write count"))
    wait: float = setting(2.0, Duration(allow_zero=True), "How long.")
    quiet: bool = setting(False, Flag(), "Whether to hush.", omit_default=True)
    later: bool = setting(False, Flag(), "Arrives with its issue.", issue="routing")


def test_a_key_not_yet_built_is_unknown_unwritten_and_undocumented() -> None:
    assert [key.name for key in keys_of(Toy)] == ["count", "wait", "quiet", "later"]
    assert [key.name for key in current_keys(Toy)] == ["count", "wait", "quiet"]
    with pytest.raises(ConfigError) as caught:
        parse_table(Toy, {"count": 1, "later": True}, "toy", Context())
    assert str(caught.value) == "toy.later: unknown key; known keys here: count, wait, quiet"
    assert render_table(Toy(1, later=True), "toy") == ["count = 1", 'wait = "2s"']
    assert [row.split(" | ")[0] for row in table(Toy)[2:]] == ["| `count`", "| `wait`", "| `quiet`"]


def test_a_required_key_says_what_to_write_and_defaults_fill_the_rest() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_table(Toy, {}, "toy", Context())
    assert str(caught.value) == "toy.count: missing; write count"
    assert parse_table(Toy, {"count": 2, "quiet": True}, "toy", Context()) == Toy(2, quiet=True)
    assert render_table(Toy(2, 0.5, quiet=True), "t") == [
        "count = 2",
        'wait = "500ms"',
        "quiet = true",
    ]


# --- layering: the config package is an L1 edge ------------------------------------------------


@pytest.mark.parametrize("module", sorted(PACKAGE.glob("*.py")), ids=lambda p: p.name)
def test_the_config_package_imports_only_the_stdlib_and_errors(module: Path) -> None:
    """DESIGN.md's layering table: config imports errors and the standard library only."""
    imported = set()
    for node in ast.walk(ast.parse(module.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module)
    bad = {
        name
        for name in imported
        if name.split(".")[0] not in sys.stdlib_module_names
        and name != "tunnel.errors"
        and not name.startswith("tunnel.config")
    }
    assert bad == set()
    assert not imported & {"trio", "socket", "ssl", "click", "select", "asyncio"}
