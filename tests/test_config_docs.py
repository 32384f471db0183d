"""docs/configuration.md's key tables are the declarations in tunnel/config/, written out."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunnel.config.docs import REGENERATE, main, markers, rewrite, sections, table
from tunnel.config.routes import BackendTLS

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def test_the_doc_tables_are_the_declarations() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert rewrite(text) == text, (
        f"docs/configuration.md differs from the keys declared in tunnel/config/; run "
        f"`{REGENERATE}` and commit the result"
    )


def test_every_table_has_one_place_in_the_doc() -> None:
    found = markers(DOC.read_text(encoding="utf-8"))
    assert sorted(found) == sorted(name for name, _ in sections()), (
        f"each table needs one '<!-- keys: NAME -->' line in docs/configuration.md; "
        f"then run `{REGENERATE}`"
    )


def test_a_table_is_one_row_per_key() -> None:
    assert table(BackendTLS)[2:] == [
        '| `ca` | `""` | PEM bundle to verify backend certificates against; `""` = the system\'s '
        "trust store. |",
        '| `server_name` | `""` | Name the backend certificate must carry, also sent as SNI; '
        '`""` = the host of each backend URL. |',
        '| `cert` | `""` | Client certificate for backends that require one; needs `key` too. |',
        '| `key` | `""` | Its private key; needs `cert` too. |',
        "| `verify` | `true` | `false` accepts any certificate (logged as a warning at start). A "
        "backend that fails verification is skipped like a refused connect; when none is left "
        "the client gets 502 and the log names the reason. |",
    ]


def test_main_rewrites_a_stale_table_and_keeps_the_prose(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = tmp_path / "configuration.md"
    stale = "# Title\n\nProse.\n\n<!-- keys: routes.backend_tls -->\n| key |\n| old |\n\nMore.\n"
    doc.write_text(stale, encoding="utf-8")
    assert main([str(doc)]) == 1
    fresh = doc.read_text(encoding="utf-8")
    assert fresh == (
        "# Title\n\nProse.\n\n<!-- keys: routes.backend_tls -->\n"
        + "\n".join(table(BackendTLS))
        + "\n\nMore.\n"
    )
    assert main([str(doc)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{doc}: key tables rewritten",
        f"{doc}: key tables up to date",
    ]


def test_a_marker_for_no_table_is_refused() -> None:
    with pytest.raises(ValueError, match="no such table"):
        rewrite("<!-- keys: routes.authz -->\n")
