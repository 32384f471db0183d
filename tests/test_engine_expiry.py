"""Credential expiry in the relay engine: ``adopt(..., expires_at=...)`` closes the tunnel at
that instant (trio's clock) with reason ``credential_expired``.

A WebSocket tunnel closes politely: each side gets a Close frame with code 1008 (policy
violation) and the reason as text, read here by the ``websockets`` library's own protocol
playing the client (unmasked frames) and the server (masked ones), whose Close replies then end
the tunnel. Any other tunnel closes at once. Over real loopback TCP on a MockClock, with the
harness of ``tests/test_engine_half_close.py``.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from rawhttp import read_exactly, read_to_eof
from test_engine import MODES
from test_engine_close import exchange_frames, expect_eof_both
from test_engine_half_close import EXACT, patient_clock, running
from websockets.frames import Close, Frame, Opcode
from websockets.protocol import Protocol, Side

from tunnel.net.engine import POLICY_VIOLATION
from tunnel.reasons import CloseReason

__all__ = ["patient_clock"]

POLICY = 1008
GRACE = 2.0


async def receive_close(stream: trio.SocketStream, side: Side) -> Protocol:
    """Read what the tunnel sends ``stream`` until a whole Close frame has arrived, as the
    ``websockets`` protocol of that side parses it; returns the protocol, which has queued
    its Close reply."""
    protocol = Protocol(side)
    for _ in range(64):
        protocol.receive_data(await read_exactly(stream, 1))
        if protocol.close_rcvd is not None:
            assert protocol.parser_exc is None
            return protocol
    raise AssertionError("no Close frame in the first 64 bytes")


def close_of(protocol: Protocol) -> Close:
    events = protocol.events_received()
    assert len(events) == 1
    frame = events[0]
    assert isinstance(frame, Frame)
    assert frame.opcode is Opcode.CLOSE
    assert protocol.close_rcvd is not None
    return protocol.close_rcvd


def test_the_code_is_policy_violation() -> None:
    assert POLICY_VIOLATION == POLICY


@pytest.mark.parametrize("splice", MODES)
async def test_an_expired_credential_closes_a_websocket_tunnel_with_1008_both_ways(
    splice: str, patient_clock: trio.testing.MockClock
) -> None:
    async with running(relay=splice, close_grace=GRACE) as relay:
        opened = trio.current_time()
        conn = relay.open(expires_at=opened + 30.0)
        for turn in range(5):
            await trio.sleep(5.0)
            await exchange_frames(conn, b"%d" % turn)
        client = await receive_close(conn.client, Side.CLIENT)
        assert trio.current_time() - opened == pytest.approx(30.0, abs=EXACT)
        assert close_of(client) == Close(POLICY, "credential_expired")
        backend = await receive_close(conn.backend, Side.SERVER)
        assert close_of(backend) == Close(POLICY, "credential_expired")
        assert not conn.closed.is_set(), "closed before the peers answered"

        # Both answer as real peers do; the tunnel ends at once, before the grace.
        await conn.client.send_all(client.data_to_send()[0])
        await conn.backend.send_all(backend.data_to_send()[0])
        await conn.closed.wait()
        assert conn.closed_at is not None
        assert conn.closed_at - opened < 30.0 + GRACE / 2
        assert conn.stats.close_reason == CloseReason.CREDENTIAL_EXPIRED
        await expect_eof_both(conn)


@pytest.mark.parametrize("splice", MODES)
async def test_peers_that_do_not_answer_get_the_grace_then_the_close(
    splice: str, patient_clock: trio.testing.MockClock
) -> None:
    async with running(relay=splice, close_grace=GRACE) as relay:
        opened = trio.current_time()
        conn = relay.open(expires_at=opened + 10.0)
        client = await receive_close(conn.client, Side.CLIENT)
        assert close_of(client) == Close(POLICY, "credential_expired")
        await conn.closed.wait()
        assert conn.closed_at is not None
        assert conn.closed_at - opened == pytest.approx(10.0 + GRACE, abs=EXACT)
        assert conn.stats.close_reason == CloseReason.CREDENTIAL_EXPIRED


@pytest.mark.parametrize("splice", MODES)
async def test_a_plain_tunnel_closes_at_once_at_expiry(
    splice: str, patient_clock: trio.testing.MockClock
) -> None:
    async with running(relay=splice) as relay:
        opened = trio.current_time()
        conn = relay.open(websocket=False, expires_at=opened + 10.0)
        await conn.client.send_all(b"ping")
        assert await read_exactly(conn.backend, 4) == b"ping"
        await conn.closed.wait()
        assert conn.closed_at is not None
        assert conn.closed_at - opened == pytest.approx(10.0, abs=EXACT)
        assert conn.stats.close_reason == CloseReason.CREDENTIAL_EXPIRED
        assert await read_to_eof(conn.client) == b""
        assert await read_to_eof(conn.backend) == b""


async def test_an_expiry_already_past_closes_at_once(
    patient_clock: trio.testing.MockClock,
) -> None:
    async with running(relay="copy") as relay:
        now = trio.current_time()
        conn = relay.open(websocket=False, expires_at=now - 1.0)
        await conn.closed.wait()
        assert conn.closed_at == pytest.approx(now, abs=EXACT)
        assert conn.stats.close_reason == CloseReason.CREDENTIAL_EXPIRED


async def test_the_first_deadline_wins_and_names_the_close(
    patient_clock: trio.testing.MockClock,
) -> None:
    async with running(relay="copy") as relay:
        now = trio.current_time()
        expiring = relay.open(websocket=False, lifetime=20.0, expires_at=now + 10.0)
        ageing = relay.open(websocket=False, lifetime=10.0, expires_at=now + 20.0)
        unlimited = relay.open(websocket=False)
        for conn, reason in (
            (expiring, CloseReason.CREDENTIAL_EXPIRED),
            (ageing, CloseReason.MAX_LIFETIME),
        ):
            await conn.closed.wait()
            assert conn.closed_at == pytest.approx(now + 10.0, abs=EXACT)
            assert conn.stats.close_reason == reason
        assert not unlimited.closed.is_set()
