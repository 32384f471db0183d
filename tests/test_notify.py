"""sd_notify over a real datagram socket, as systemd listens on ``$NOTIFY_SOCKET``."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tunnel.net.notify import notify


def test_the_state_reaches_the_notify_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(str(path))
        systemd.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert notify("MAINPID=4242")
        assert systemd.recv(100) == b"MAINPID=4242"


def test_an_abstract_socket_is_reached_too(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"tunnel-test-notify-{id(monkeypatch)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind("\0" + name)
        systemd.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify("READY=1")
        assert systemd.recv(100) == b"READY=1"


@pytest.mark.parametrize("value", ["", "relative/path", "/nonexistent/notify"])
def test_without_systemd_nothing_is_sent(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert not notify("MAINPID=1")
