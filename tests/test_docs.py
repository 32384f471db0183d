"""The documentation stands on its own: it states facts in place instead of pointing at issues,
notes or design files a reader of the repository cannot see."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted(
    path.relative_to(ROOT).as_posix()
    for path in [ROOT / "README.md", ROOT / "bench" / "README.md", *(ROOT / "docs").glob("*.md")]
)
UNSEEN_SOURCES = re.compile(
    r"\bDESIGN\b"  # the design file kept outside the repository
    r"|\b(?:the|this|that|an?) [\w-]+ issue\b"  # "the fast-path issue"
    r"|\bissue's\b|\bissues? #?\d+"
    r"|\bnotes'|\bthe (?:project's )?notes\b"  # "the notes' prototypes"
)


@pytest.mark.parametrize("page", PAGES)
def test_a_page_cites_nothing_the_reader_cannot_see(page: str) -> None:
    lines = (ROOT / page).read_text(encoding="utf-8").splitlines()
    found = [
        f"{page}:{number}: {line.strip()}"
        for number, line in enumerate(lines, start=1)
        if UNSEEN_SOURCES.search(line)
    ]
    assert found == []


@pytest.mark.parametrize(
    "text",
    [
        "described in the project's DESIGN notes",
        "Against the targets of the fast-path issue",
        "the issue's prototypes put that at 40 µs",
        "cheaper than in the notes' prototypes",
        "as issue 9 says",
    ],
)
def test_the_pattern_catches_such_references(text: str) -> None:
    assert UNSEEN_SOURCES.search(text)


@pytest.mark.parametrize(
    "text",
    ["unable to get local issuer certificate", "issue from a new CA", "## Method notes"],
)
def test_the_pattern_leaves_ordinary_words_alone(text: str) -> None:
    assert not UNSEEN_SOURCES.search(text)
