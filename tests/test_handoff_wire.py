"""The hand-off wire (``tunnel.net.handoff``): tunnels' and listeners' descriptors with their
records over a Unix socket, between two trio tasks or two processes, and what a broken peer gets.

"Tunnels" here are socketpairs: the test keeps the far end of each and checks, by writing through
it, that every descriptor received is the one its record names. Every error must be a
``HandoffError`` and leave no descriptor open; a stalled peer is timed on trio's MockClock.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
from test_engine import open_fds

from tunnel.core.wsframes import FramePosition
from tunnel.net.handoff import (
    HEADER,
    MAGIC,
    MAX_BODY,
    MAX_FDS,
    VERSION,
    FlowState,
    HandoffError,
    TunnelState,
    receive_listeners,
    receive_tunnels,
    send_listeners,
    send_tunnels,
)

GUARD_SECONDS = 60.0
LOOPBACK = "127.0.0.1"
CHILD_SECONDS = 60.0
ROOT = Path(__file__).resolve().parent.parent


def state_for(i: int) -> TunnelState:
    """A state that differs from tunnel to tunnel, so that a mix-up shows."""
    return TunnelState(
        up=FlowState(bytes([i % 256]) * (i % 7), frames=FramePosition(left=i)),
        down=FlowState(b"x" * (i % 3), eof=i % 2 == 1, frames=FramePosition()),
        bytes_up=i,
        bytes_down=2 * i,
        age=float(i),
        idle=0.5,
        lifetime=None if i % 2 else 10.0 + i,
        meta={"id": str(i)},
    )


@contextmanager
def tunnels(
    count: int,
) -> Iterator[
    tuple[
        list[tuple[socket.socket, socket.socket, TunnelState]],
        list[tuple[socket.socket, socket.socket]],
    ]
]:
    """``count`` tunnels to send (inner ends and states) and the far ends the test keeps."""
    items = []
    far = []
    try:
        for i in range(count):
            client_far, client = socket.socketpair()
            backend, backend_far = socket.socketpair()
            far.append((client_far, backend_far))
            items.append((client, backend, state_for(i)))
        yield items, far
    finally:
        for client, backend, _ in items:
            client.close()
            backend.close()
        for client_far, backend_far in far:
            client_far.close()
            backend_far.close()


def check_matched(
    received: list[tuple[socket.socket, socket.socket, TunnelState]],
    far: list[tuple[socket.socket, socket.socket]],
) -> None:
    """Each received pair is the one its record names: bytes written at the far ends of
    tunnel ``i`` come out of the sockets received with the record of ``i``."""
    assert len(received) == len(far)
    for i, (client_far, backend_far) in enumerate(far):
        client_far.send(b"c%d" % i)
        backend_far.send(b"b%d" % i)
    for client, backend, state in received:
        i = int(state.meta["id"])
        assert state == state_for(i)
        assert client.recv(64) == b"c%d" % i
        assert backend.recv(64) == b"b%d" % i


async def test_a_thousand_tunnels_move_between_two_tasks_with_their_records() -> None:
    baseline = open_fds()
    with trio.fail_after(GUARD_SECONDS), tunnels(1000) as (items, far):
        old, new = socket.socketpair()
        with old, new:
            received: list[tuple[socket.socket, socket.socket, TunnelState]] = []

            async def receive() -> None:
                received.extend(await receive_tunnels(new))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive)
                assert await send_tunnels(old, items) == 1000
            try:
                assert all(not sock.getblocking() for c, b, _ in received for sock in (c, b))
                assert all(not sock.get_inheritable() for c, b, _ in received for sock in (c, b))
                check_matched(received, far)
            finally:
                for client, backend, _ in received:
                    client.close()
                    backend.close()
    assert open_fds() == baseline


async def test_large_pending_bytes_split_the_batches_and_still_match() -> None:
    # Records of about 400 KiB each: batches are cut by size, not only by descriptors.
    with trio.fail_after(GUARD_SECONDS), tunnels(12) as (items, _):
        big = [
            (c, b, TunnelState(up=FlowState(os.urandom(300_000)), down=FlowState(), meta=s.meta))
            for c, b, s in items
        ]
        old, new = socket.socketpair()
        with old, new:
            received: list[tuple[socket.socket, socket.socket, TunnelState]] = []

            async def receive() -> None:
                received.extend(await receive_tunnels(new))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive)
                await send_tunnels(old, big)
            try:
                assert [s.up.pending for _, _, s in received] == [s.up.pending for _, _, s in big]
            finally:
                for client, backend, _ in received:
                    client.close()
                    backend.close()


async def test_listeners_move_and_accept_in_the_receiver() -> None:
    baseline = open_fds()
    with trio.fail_after(GUARD_SECONDS):
        listeners = []
        for _ in range(3):
            listener = socket.socket()
            listener.bind((LOOPBACK, 0))
            listener.listen(8)
            listeners.append(listener)
        old, new = socket.socketpair()
        received: list[tuple[socket.socket, dict[str, str]]] = []
        try:

            async def receive() -> None:
                received.extend(await receive_listeners(new))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive)
                sent = [(s, {"listen": "{}:{}".format(*s.getsockname())}) for s in listeners]
                assert await send_listeners(old, sent) == 3
            for listener in listeners:
                listener.close()
            for listener, meta in received:
                host, port = meta["listen"].rsplit(":", 1)
                with socket.create_connection((host, int(port))) as client:
                    client.sendall(b"hi")
                    listener.setblocking(True)
                    accepted, _ = listener.accept()
                    with accepted:
                        assert accepted.recv(2) == b"hi"
        finally:
            old.close()
            new.close()
            for listener in listeners:
                listener.close()
            for listener, _ in received:
                listener.close()
    assert open_fds() == baseline


async def test_listeners_then_tunnels_share_one_socket() -> None:
    # The order of a hand-off: listeners first, then tunnels, on one connection.
    with trio.fail_after(GUARD_SECONDS), tunnels(300) as (items, far):
        listener = socket.socket()
        listener.bind((LOOPBACK, 0))
        listener.listen(1)
        old, new = socket.socketpair()
        got: list[tuple[socket.socket, dict[str, str]]] = []
        received: list[tuple[socket.socket, socket.socket, TunnelState]] = []
        try:

            async def receive() -> None:
                got.extend(await receive_listeners(new))
                received.extend(await receive_tunnels(new))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive)
                assert await send_listeners(old, [(listener, {"name": "main"})]) == 1
                assert await send_tunnels(old, items) == 300
            assert [meta for _, meta in got] == [{"name": "main"}]
            assert got[0][0].getsockname() == listener.getsockname()
            check_matched(received, far)
        finally:
            for sock in (old, new, listener, *(s for s, _ in got)):
                sock.close()
            for client, backend, _ in received:
                client.close()
                backend.close()


CHILD = textwrap.dedent(
    """
    import json, os, socket, sys
    import trio
    from tunnel.net.handoff import receive_tunnels

    def fds():
        return len(os.listdir("/proc/self/fd"))

    async def main():
        sock = socket.socket(fileno=int(sys.argv[1]))
        before = fds()
        items = await receive_tunnels(sock)
        held = fds() - before
        for client, backend, state in items:
            client.sendall(state.meta["id"].encode() + b" client")
            backend.sendall(state.meta["id"].encode() + b" backend")
            client.close()
            backend.close()
        sock.close()
        print(json.dumps({"received": len(items), "held": held, "left": fds() - before + 1}))

    trio.run(main)
    """
)


async def test_tunnels_reach_another_process_matched_and_counted() -> None:
    count = 1000
    with trio.fail_after(CHILD_SECONDS), tunnels(count) as (items, far):
        old, new = socket.socketpair()
        with old:
            with new:
                child = await trio.lowlevel.open_process(
                    [sys.executable, "-c", CHILD, str(new.fileno())],
                    pass_fds=(new.fileno(),),
                    stdout=subprocess.PIPE,
                    cwd=ROOT,
                )
            try:
                assert await send_tunnels(old, items) == count
                # The child holds them now: the sender's copies close, the far ends still
                # reach the child.
                for client, backend, _ in items:
                    client.close()
                    backend.close()
                assert child.stdout is not None
                output = b""
                async for chunk in child.stdout:
                    output += chunk
                assert await child.wait() == 0
            finally:
                if child.returncode is None:
                    child.kill()
                    await child.wait()
        report = json.loads(output)
        assert report == {"received": count, "held": 2 * count, "left": 0}
        for i, (client_far, backend_far) in enumerate(far):
            client_far.setblocking(True)
            backend_far.setblocking(True)
            assert client_far.recv(64) == b"%d client" % i
            assert backend_far.recv(64) == b"%d backend" % i


# --- a broken peer -----------------------------------------------------------------------------


def header(
    kind: int = 1, fds: int = 0, length: int = 0, magic: bytes = MAGIC, version: int = VERSION
) -> bytes:
    return HEADER.pack(magic, version, kind, fds, length)


def tunnel_records(count: int) -> bytes:
    return json.dumps([json.loads(state_for(i).to_json()) for i in range(count)]).encode()


def end(count: int) -> bytes:
    body = json.dumps({"count": count}).encode()
    return header(3, 0, len(body)) + body


GARBAGE = {
    "not-a-hand-off": (b"GET / HTTP/1.1\r\n\r\n", 0, "not a hand-off message"),
    "wrong-version": (header(version=9), 0, "version 9"),
    "unknown-kind": (header(kind=77), 0, "kind 77"),
    "an-ack-first": (header(kind=4), 0, "unexpected ack"),
    "too-many-descriptors": (header(fds=MAX_FDS + 2), 0, "too large"),
    "huge-body": (header(length=MAX_BODY + 1), 0, "too large"),
    "cut-short": (header(length=100) + b"[", 0, "closed the hand-off socket mid-message"),
    "descriptors-missing": (
        header(fds=2, length=len(tunnel_records(1))) + tunnel_records(1),
        0,
        "named 2 descriptors, 0 came",
    ),
    "descriptors-unnamed": (
        header(fds=0, length=len(tunnel_records(1))) + tunnel_records(1),
        2,
        "named 0 descriptors, 2 came",
    ),
    "records-and-descriptors-disagree": (
        header(fds=2, length=len(tunnel_records(2))) + tunnel_records(2),
        2,
        "2 descriptors for 2 records",
    ),
    "not-json": (header(fds=2, length=3) + b"{{{", 2, "not JSON"),
    "a-bad-record": (header(fds=2, length=12) + b'[{"up": {}}]' + end(1), 2, "pending missing"),
    "end-miscounted": (end(5), 0, "sent 0 records but counted 5"),
}


@pytest.mark.parametrize(("data", "attach", "error"), list(GARBAGE.values()), ids=list(GARBAGE))
async def test_a_broken_peer_gets_an_error_and_no_descriptor_is_left(
    data: bytes, attach: int, error: str
) -> None:
    baseline = open_fds()
    with trio.fail_after(GUARD_SECONDS):
        old, new = socket.socketpair()
        spare = [socket.socketpair() for _ in range(attach // 2)]
        with old, new:
            fds = [s.fileno() for pair in spare for s in pair]
            if fds:
                socket.send_fds(old, [data], fds)
            else:
                old.sendall(data)
            for pair in spare:
                for s in pair:
                    s.close()
            old.shutdown(socket.SHUT_WR)
            with pytest.raises(HandoffError, match=error):
                await receive_tunnels(new)
    assert open_fds() == baseline


async def test_descriptors_past_the_limit_are_a_truncation_error() -> None:
    # SCM_MAX_FD is 253; the receiver takes 252 per message, so the 253rd is cut off.
    baseline = open_fds()
    with trio.fail_after(GUARD_SECONDS):
        old, new = socket.socketpair()
        with old, new:
            pipe = os.pipe()
            try:
                socket.send_fds(old, [header(fds=253)], [pipe[0]] * 253)
            finally:
                os.close(pipe[0])
                os.close(pipe[1])
            with pytest.raises(HandoffError, match="MSG_CTRUNC"):
                await receive_tunnels(new)
    assert open_fds() == baseline


async def test_a_descriptor_that_is_not_a_socket_is_refused() -> None:
    baseline = open_fds()
    with trio.fail_after(GUARD_SECONDS):
        old, new = socket.socketpair()
        with old, new:
            read_end, write_end = os.pipe()
            body = tunnel_records(1)
            pair = socket.socketpair()
            try:
                socket.send_fds(
                    old,
                    [header(fds=2, length=len(body)) + body + end(1)],
                    [pair[0].fileno(), read_end],
                )
            finally:
                os.close(read_end)
                os.close(write_end)
                pair[0].close()
                pair[1].close()

            async def ack() -> None:
                with pytest.raises(HandoffError, match="not a socket"):
                    await receive_tunnels(new)

            await ack()
    assert open_fds() == baseline


async def test_a_stalled_receiver_or_sender_is_an_error_not_a_hang(
    autojump_clock: trio.testing.MockClock,
) -> None:
    baseline = open_fds()
    with trio.fail_after(GUARD_SECONDS), tunnels(3) as (items, _):
        old, new = socket.socketpair()
        with old, new:
            # Half a header, then silence.
            old.sendall(header()[:5])
            with pytest.raises(HandoffError, match="no whole hand-off message within 10 s"):
                await receive_tunnels(new)
        # A receiver that never acknowledges.
        old, new = socket.socketpair()
        with old, new, pytest.raises(HandoffError, match="no whole hand-off message within 2 s"):
            await send_tunnels(old, items, stall=2.0)
    # The silent receiver's socket held the descriptors in flight; both ends are closed now.
    assert open_fds() == baseline


async def test_a_record_the_receiver_refuses_is_never_acknowledged() -> None:
    # The sender must not believe a hand-off the receiver threw away: it keeps its tunnels.
    baseline = open_fds()
    with trio.fail_after(GUARD_SECONDS), tunnels(300) as (items, far):
        bad = TunnelState(FlowState(), FlowState(), drain_reason="bored", meta={"id": "299"})
        items[299] = (items[299][0], items[299][1], bad)
        old, new = socket.socketpair()
        with old:
            errors: list[str] = []

            async def receive() -> None:
                with new:
                    try:
                        await receive_tunnels(new)
                    except HandoffError as exc:
                        errors.append(str(exc))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive)
                with pytest.raises(HandoffError, match="hand-off socket"):
                    await send_tunnels(old, items)
        assert errors == ["tunnel state: drain_reason 'bored' is not a close reason"]
        client_far, _ = far[0]
        client_far.send(b"still mine")
        assert items[0][0].recv(64) == b"still mine"
    assert open_fds() == baseline


async def test_a_wrong_acknowledgement_is_an_error() -> None:
    with trio.fail_after(GUARD_SECONDS), tunnels(2) as (items, _):
        old, new = socket.socketpair()
        with old, new:
            body = json.dumps({"count": 1}).encode()
            new.sendall(header(kind=4, length=len(body)) + body)
            with pytest.raises(HandoffError, match="acknowledged 1 records of 2"):
                await send_tunnels(old, items)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "[]",
        '{"up": 1}',
        state_for(1).to_json().replace('"bytes_up":1', '"bytes_up":-1'),
        state_for(1).to_json().replace('"bytes_up":1', '"bytes_up":true'),
        state_for(1).to_json().replace('"age":1.0', '"age":NaN'),
        state_for(1).to_json().replace('"id":"1"', '"id":1'),
        TunnelState(FlowState(), FlowState()).to_json().replace('"pending":""', '"pending":"!"'),
        state_for(3).to_json().replace('"left":3', '"left":-3'),
        state_for(1)
        .to_json()
        .replace('"frames":{"left":0,"head":"","close_seen":false}', '"frames":null'),
        state_for(1).to_json().replace('"head":""', '"head":"gg=="', 1),
        state_for(1).to_json().replace('"drain_reason":"drain"', '"drain_reason":"bored"'),
        state_for(1).to_json().replace('"close_reason":null', '"close_reason":"bored"'),
    ],
    ids=[
        "empty",
        "a-list",
        "wrong-shape",
        "negative-count",
        "bool-count",
        "nan",
        "meta-not-string",
        "bad-base64",
        "negative-left",
        "frames-one-way",
        "whole-header-held",
        "unknown-drain-reason",
        "unknown-close-reason",
    ],
)
def test_a_state_that_is_not_one_is_refused(text: str) -> None:
    with pytest.raises(HandoffError):
        TunnelState.from_json(text)
