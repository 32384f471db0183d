"""The import rules of DESIGN.md, checked by parsing every module with ``ast``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tunnel"

IO_MODULES = {"trio", "socket", "ssl", "select", "asyncio", "click", "selectors"}
CLOCK_AND_CHANCE = {"time", "random"}

# Module (relative path prefix) -> modules it must never import.
FORBIDDEN: dict[str, set[str]] = {
    "errors.py": {"tunnel", *IO_MODULES, "h11"},
    "_version.py": {"tunnel", *IO_MODULES},
    "reasons.py": {"tunnel", *IO_MODULES, "h11"},
    "core/": IO_MODULES | CLOCK_AND_CHANCE | {"tunnel.net", "tunnel.app", "tunnel.cli"},
    "policy/": IO_MODULES | CLOCK_AND_CHANCE | {"tunnel.net", "tunnel.app", "tunnel.cli"},
    "config": IO_MODULES | {"tunnel.core", "tunnel.net", "tunnel.app", "tunnel.cli"},
    "logs.py": IO_MODULES | {"tunnel.core", "tunnel.net", "tunnel.app", "tunnel.cli"},
    # L1 edges: snapshots and their exposition are plain data, readable without any I/O.
    "stats.py": IO_MODULES | {"tunnel.core", "tunnel.net", "tunnel.server", "tunnel.app"},
    "metrics.py": IO_MODULES | {"tunnel.core", "tunnel.net", "tunnel.server", "tunnel.app"},
    "federation.py": IO_MODULES | {"tunnel.core", "tunnel.net", "tunnel.server", "tunnel.app"},
    "net/": {"tunnel.app", "tunnel.server", "tunnel.cli", "click"},
    # L2 beside net/: making certificates is synchronous cryptography work, so no trio either.
    "certs.py": {"tunnel.app", "tunnel.cli", "click", "trio"},
    "app.py": {"tunnel.cli", "click"},
    "server.py": {"tunnel.cli", "click", "tunnel.app"},
    # L3 beside app.py: the supervisor of workers = N is plain os/signal/subprocess, no trio.
    "supervisor.py": {"tunnel.cli", "click", "trio", "tunnel.app"},
    "worker.py": {"tunnel.cli", "click"},
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _violations(relative: str, imported: set[str]) -> list[str]:
    found = []
    for prefix, forbidden in FORBIDDEN.items():
        if not relative.startswith(prefix):
            continue
        for name in imported:
            for banned in forbidden:
                if name == banned or name.startswith(banned + "."):
                    found.append(f"{relative} imports {name} (layer rule: no {banned})")
    return found


MODULES = sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("relative", MODULES)
def test_module_respects_layers(relative: str) -> None:
    assert _violations(relative, _imports(PACKAGE / relative)) == []


def test_only_cli_runs_trio_or_exits() -> None:
    offenders = []
    for relative in MODULES:
        source = (PACKAGE / relative).read_text(encoding="utf-8")
        if relative != "cli.py" and ("trio.run(" in source or "sys.exit(" in source):
            offenders.append(relative)
    assert offenders == []


def test_rules_catch_a_forbidden_import() -> None:
    assert _violations("core/handshake.py", {"trio"}) == [
        "core/handshake.py imports trio (layer rule: no trio)"
    ]
    assert _violations("core/handshake.py", {"h11", "tunnel.errors"}) == []
    assert _violations("certs.py", {"cryptography.x509", "tunnel.errors"}) == []
    assert _violations("certs.py", {"trio"}) == ["certs.py imports trio (layer rule: no trio)"]
