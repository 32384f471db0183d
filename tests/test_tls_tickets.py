"""TLS 1.3 session tickets over loopback: a returning client resumes (``session_reused``) on the
listener that issued its ticket, on another server holding the same secret (in this process and
in another process given the secret through a pipe), across one key rotation but not two; a
ticket under another secret costs a full handshake, never an error; ``ticket_key_rotation =
"0s"`` issues no ticket. Clients are Python's blocking ``ssl`` (the only one that can offer a
saved session) in worker threads, each upgrading to WebSocket through the tunnel to a real echo
backend; the rotation period is stepped with ``tickets.clock``, not with sleeps.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import WsBackend
from rawhttp import LOOPBACK, status_of, upgrade_request
from test_e2e import CLIENT_TIMEOUT, in_thread
from test_tls_e2e import Pair, Pki, client_context, make_pki, start, tls_config

from tunnel.logs import LOGGER_NAME
from tunnel.net import openssl_tickets, tickets

HOUR = 3600.0
T0 = 1_000_000 * HOUR + 1.0
"""The start of a rotation period (for "1h"), one second in."""
TEST_TIMEOUT = 30.0


@pytest.fixture(autouse=True)
def fresh_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts on its own secret and a fixed clock; both are restored after."""
    monkeypatch.setattr(tickets, "_secret", tickets.new_secret())
    monkeypatch.setattr(tickets, "clock", lambda: T0)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path)


@pytest.fixture
def site(pki: Pki) -> Pair:
    return pki.pair("site", ["localhost", "127.0.0.1"])


@dataclass(frozen=True)
class Visit:
    """What a client saw on one connection."""

    status: int
    reused: bool
    session: ssl.SSLSession


def visit(port: int, context: ssl.SSLContext, session: ssl.SSLSession | None = None) -> Visit:
    """Connect (offering ``session``), upgrade to WebSocket, read the answer's head, close.
    Reading the head also reads the tickets, which come before it."""
    raw = socket.create_connection((LOOPBACK, port), timeout=CLIENT_TIMEOUT)
    with raw, context.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
        tls.sendall(upgrade_request("localhost"))
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = tls.recv(4096)
            assert chunk, f"closed before the answer's head: {head!r}"
            head += chunk
        assert tls.version() == "TLSv1.3"
        assert tls.session is not None
        return Visit(status_of(head), bool(tls.session_reused), tls.session)


def config(site: Pair, backend: WsBackend, rotation: str | None = None) -> Any:
    tls: dict[str, str] = site.toml()
    if rotation is not None:
        tls["ticket_key_rotation"] = rotation
    return tls_config([backend.url], tls=tls)


async def test_a_returning_client_resumes_and_its_ticket_lives_one_rotation(
    pki: Pki, site: Pair, echo_backend: WsBackend
) -> None:
    client = client_context(pki.ca_file)
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            port = await start(nursery, config(site, echo_backend, "10m"))
            first = await in_thread(visit, port, client)
            assert (first.status, first.reused) == (101, False)
            assert first.session.has_ticket
            assert first.session.ticket_lifetime_hint == 600, "one rotation"
            again = await in_thread(visit, port, client, first.session)
            assert (again.status, again.reused) == (101, True)
            assert again.session.id != first.session.id, "a fresh ticket for the next visit"
            nursery.cancel_scope.cancel()
    assert echo_backend.connections == 2


async def test_two_servers_with_the_same_secret_accept_each_others_tickets(
    pki: Pki, site: Pair, echo_backend: WsBackend
) -> None:
    """Two listeners with their own OpenSSL contexts, as two workers have: the keys come from
    the secret alone."""
    client = client_context(pki.ca_file)
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            port_a = await start(nursery, config(site, echo_backend))
            port_b = await start(nursery, config(site, echo_backend))
            from_a = await in_thread(visit, port_a, client)
            on_b = await in_thread(visit, port_b, client, from_a.session)
            on_a = await in_thread(visit, port_a, client, on_b.session)
            assert [v.reused for v in (from_a, on_b, on_a)] == [False, True, True]
            assert {v.status for v in (from_a, on_b, on_a)} == {101}
            nursery.cancel_scope.cancel()


CHILD = textwrap.dedent(
    """
    import sys, trio
    from tunnel import Config, serve
    from tunnel.net import tickets

    tickets.use_secret(tickets.read_secret(int(sys.argv[1])))
    config = Config.from_mapping({
        "listeners": [{"listen": "127.0.0.1:0", "tls": {"cert": sys.argv[2], "key": sys.argv[3]}}],
        "routes": [{"name": "default", "backends": [{"name": "b0", "url": sys.argv[4]}]}],
    })

    async def main():
        with trio.move_on_after(60):
            async with trio.open_nursery() as nursery:
                listeners = await nursery.start(serve, config)
                print(listeners[0].socket.getsockname()[1], flush=True)
                # until the test closes stdin
                await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
                nursery.cancel_scope.cancel()

    trio.run(main)
    """
)


async def test_another_process_given_the_secret_through_a_pipe_accepts_the_tickets(
    pki: Pki, site: Pair, echo_backend: WsBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tickets, "clock", time.time)  # the child's clock
    client = client_context(pki.ca_file)
    fd = tickets.write_secret_to_pipe()
    try:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(fd), str(site.cert), str(site.key), echo_backend.url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            pass_fds=(fd,),
        )
    finally:
        os.close(fd)
    try:
        assert child.stdout is not None
        line = await in_thread(child.stdout.readline)
        child_port = int(line)
        with trio.fail_after(TEST_TIMEOUT):
            async with trio.open_nursery() as nursery:
                port = await start(nursery, config(site, echo_backend))
                here = await in_thread(visit, port, client)
                there = await in_thread(visit, child_port, client, here.session)
                back = await in_thread(visit, port, client, there.session)
                assert [v.reused for v in (here, there, back)] == [False, True, True]
                assert {v.status for v in (here, there, back)} == {101}
                nursery.cancel_scope.cancel()
    finally:
        assert child.stdin is not None
        child.stdin.close()
        try:
            child.wait(timeout=TEST_TIMEOUT)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


async def test_a_ticket_is_accepted_one_period_later_and_refused_two_periods_later(
    pki: Pki, site: Pair, echo_backend: WsBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = client_context(pki.ca_file)
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            port = await start(nursery, config(site, echo_backend, "1h"))
            issued = await in_thread(visit, port, client)
            monkeypatch.setattr(tickets, "clock", lambda: T0 + HOUR)
            next_period = await in_thread(visit, port, client, issued.session)
            assert (next_period.status, next_period.reused) == (101, True)
            monkeypatch.setattr(tickets, "clock", lambda: T0 + 2 * HOUR)
            too_old = await in_thread(visit, port, client, issued.session)
            assert (too_old.status, too_old.reused) == (101, False), "a full handshake"
            renewed = await in_thread(visit, port, client, next_period.session)
            assert renewed.reused, "the ticket renewed one period later is under a current key"
            nursery.cancel_scope.cancel()


async def test_a_ticket_under_another_secret_gets_a_full_handshake(
    pki: Pki, site: Pair, echo_backend: WsBackend, caplog: pytest.LogCaptureFixture
) -> None:
    """As after a restart, which makes a new secret: the client is served all the same."""
    client = client_context(pki.ca_file)
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            port = await start(nursery, config(site, echo_backend))
            issued = await in_thread(visit, port, client)
            tickets.use_secret(tickets.new_secret())
            later = await in_thread(visit, port, client, issued.session)
            assert (later.status, later.reused) == (101, False)
            assert later.session.has_ticket, "a new ticket, under the new secret"
            nursery.cancel_scope.cancel()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_rotation_0s_issues_no_ticket(pki: Pki, site: Pair, echo_backend: WsBackend) -> None:
    client = client_context(pki.ca_file)
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            port = await start(nursery, config(site, echo_backend, "0s"))
            first = await in_thread(visit, port, client)
            assert first.status == 101
            assert not first.session.has_ticket
            again = await in_thread(visit, port, client, first.session)
            assert (again.status, again.reused) == (101, False)
            nursery.cancel_scope.cancel()


async def test_without_shared_keys_one_warning_and_tickets_stay_per_listener(
    pki: Pki,
    site: Pair,
    echo_backend: WsBackend,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When the ctypes layer cannot vouch for OpenSSL (here: as if the library were another
    version), tunnel serves on with OpenSSL's own keys and says so once."""
    caplog.set_level(logging.WARNING, logger=LOGGER_NAME)
    monkeypatch.setattr(openssl_tickets, "_ossl", None)
    monkeypatch.setattr(openssl_tickets, "_failure", "libcrypto.so.3 is version 0x1, not 0x2")
    monkeypatch.setattr(tickets, "_warned", False)
    client = client_context(pki.ca_file)
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            port_a = await start(nursery, config(site, echo_backend))
            port_b = await start(nursery, config(site, echo_backend))
            first = await in_thread(visit, port_a, client)
            same = await in_thread(visit, port_a, client, first.session)
            other = await in_thread(visit, port_b, client, first.session)
            assert [v.reused for v in (first, same, other)] == [False, True, False]
            assert {v.status for v in (first, same, other)} == {101}
            nursery.cancel_scope.cancel()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "per process" in warnings[0].getMessage()
    assert "0x1" in str(warnings[0].__dict__)


def test_the_secret_crosses_a_pipe_whole() -> None:
    fd = tickets.write_secret_to_pipe()
    assert os.get_inheritable(fd)
    assert tickets.read_secret(fd) == tickets.current_secret()
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)  # read_secret closed it


def test_a_short_secret_is_refused() -> None:
    read_end, write_end = os.pipe()
    os.write(write_end, b"x" * 31)
    os.close(write_end)
    with pytest.raises(ValueError, match="32-byte"):
        tickets.read_secret(read_end)
    with pytest.raises(ValueError, match="32 bytes"):
        tickets.use_secret(b"x" * 31)


def test_keys_depend_on_the_secret_the_period_and_the_rotation() -> None:
    secret = tickets.new_secret()
    key = tickets.derive(secret, HOUR, 7)
    assert key == tickets.derive(secret, HOUR, 7)
    others = [
        tickets.derive(secret, HOUR, 8),
        tickets.derive(secret, 2 * HOUR, 7),
        tickets.derive(tickets.new_secret(), HOUR, 7),
    ]
    assert all(o.name != key.name and o.aes != key.aes and o.hmac != key.hmac for o in others)
