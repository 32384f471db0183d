"""docs/limits.md names, for every limit, the test that proves it: each name must exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_test_named_in_limits_md_exists() -> None:
    text = (ROOT / "docs" / "limits.md").read_text(encoding="utf-8")
    named = re.findall(r"`(test_\w+\.py)(?:::(test_\w+))?`", text)
    continued = re.findall(r"`(test_\w+\.py)::\w+`, `::(test_\w+)`", text)
    assert len(named) > 20, "the table is read"
    missing = []
    for module, test in [*named, *continued]:
        path = ROOT / "tests" / module
        if not path.exists():
            missing.append(module)
        elif test and not re.search(rf"def {test}\(", path.read_text(encoding="utf-8")):
            missing.append(f"{module}::{test}")
    assert missing == []
