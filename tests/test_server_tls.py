"""``ServerTLS`` on its own: what a reload does with good, unchanged and broken files, and how
often the file watcher's path logs a broken pair."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tunnel.certs import issue, make_ca
from tunnel.config import CertPair, ListenerTLS
from tunnel.errors import ConfigError
from tunnel.logs import LOGGER_NAME
from tunnel.net.tls import ServerTLS

NOT_RELOADED = "TLS certificates not reloaded"


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    issued = issue(make_ca(), ["localhost"])
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(issued.cert_pem)
    key.write_bytes(issued.key_pem)
    return cert, key


def server_tls(cert: Path, key: Path) -> ServerTLS:
    return ServerTLS(ListenerTLS((CertPair(str(cert), str(key)),)), "listeners[0].tls")


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_unchanged_files_are_not_reloaded_unless_forced(files: tuple[Path, Path]) -> None:
    tls = server_tls(*files)
    first = tls.context
    assert tls.reload(force=False) is False
    assert tls.context is first
    assert tls.reload(force=True) is True
    assert tls.context is not first


def test_new_contents_are_picked_up_by_a_check(files: tuple[Path, Path]) -> None:
    cert, key = files
    tls = server_tls(cert, key)
    first = tls.context
    issued = issue(make_ca(), ["localhost"])
    cert.write_bytes(issued.cert_pem)
    key.write_bytes(issued.key_pem)
    assert tls.reload(force=False) is True
    assert tls.context is not first


def test_a_broken_pair_is_logged_once_by_the_checks_and_at_every_forced_reload(
    files: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    cert, key = files
    tls = server_tls(cert, key)
    first = tls.context
    key.write_bytes(b"not a key\n")
    assert [tls.reload(force=False) for _ in range(5)] == [False] * 5
    assert len([m for m in errors(caplog) if NOT_RELOADED in m]) == 1
    assert tls.reload(force=True) is False
    assert len([m for m in errors(caplog) if NOT_RELOADED in m]) == 2
    assert tls.context is first, "the previous pair stays in use"


def test_a_missing_file_is_logged_once_by_the_checks(
    files: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    cert, key = files
    tls = server_tls(cert, key)
    key.unlink()
    assert [tls.reload(force=False) for _ in range(3)] == [False] * 3
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(logged) == 1
    assert str(key) in str(logged[0].__dict__), "the line names the file"


def test_a_listener_without_loadable_files_does_not_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        server_tls(tmp_path / "missing.pem", tmp_path / "missing-key.pem")
    assert caught.value.key == "listeners[0].tls"
    assert "missing.pem" in caught.value.problem
