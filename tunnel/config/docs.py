"""The key tables of docs/configuration.md, written from the declarations.

Each table follows a marker line ``<!-- keys: routes.backend_tls -->`` naming its table; the
prose around the tables is the doc's own. ``python -m tunnel.config.docs [FILE]`` rewrites the
tables in place (FILE defaults to docs/configuration.md), and tests/test_config_docs.py fails
while the file differs from what this would write.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tunnel.config.kinds import REQUIRED, Key, toml_value
from tunnel.config.model import Config
from tunnel.config.tables import Table, TableList, current_keys, dotted

DOC = Path("docs/configuration.md")
REGENERATE = "python -m tunnel.config.docs"
MARKER = re.compile(r"<!-- keys: ([\w.]+) -->")
_HEADER = ["| key | default | meaning |", "|---|---|---|"]


def sections(cls: type[Any] = Config, path: str = "") -> list[tuple[str, type[Any]]]:
    """``(dotted name, class)`` of every table below ``cls``, depth first."""
    found = []
    for key in current_keys(cls):
        if isinstance(key.kind, Table | TableList):
            name = dotted(path, key.name)
            found += [(name, key.kind.cls), *sections(key.kind.cls, name)]
    return found


def table(cls: type[Any]) -> list[str]:
    """The markdown table of ``cls``'s keys, one row each."""
    return [*_HEADER, *(_row(key) for key in current_keys(cls))]


def _row(key: Key) -> str:
    if key.shown:
        default = key.shown
    elif key.default is REQUIRED:
        default = "(required)"
    else:
        default = f"`{toml_value(key.kind.dump(key.default))}`"
    cells = (f"`{key.name}`", default, key.doc)
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def rewrite(text: str) -> str:
    """``text`` with the table after each marker written afresh."""
    tables = dict(sections())
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        out.append(lines[i])
        match = MARKER.fullmatch(lines[i].strip())
        i += 1
        if match is None:
            continue
        if match.group(1) not in tables:
            raise ValueError(f"{match.group(0)}: no such table; tables: {', '.join(tables)}")
        out += table(tables[match.group(1)])
        while i < len(lines) and lines[i].startswith("|"):
            i += 1
    return "\n".join(out) + "\n"


def markers(text: str) -> list[str]:
    """The tables ``text`` has a marker for, in order."""
    return [m.group(1) for m in map(MARKER.fullmatch, map(str.strip, text.splitlines())) if m]


def main(argv: Sequence[str] = ()) -> int:
    """Rewrite the tables of the doc named in ``argv`` (default ``DOC``); 0 when it was
    already up to date, 1 when it changed."""
    path = Path(argv[0]) if argv else DOC
    text = path.read_text(encoding="utf-8")
    fresh = rewrite(text)
    if fresh == text:
        print(f"{path}: key tables up to date")
        return 0
    path.write_text(fresh, encoding="utf-8")
    print(f"{path}: key tables rewritten")
    return 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
