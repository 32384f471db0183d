"""``tunnel demo``: an echo backend behind the tunnel on localhost, and a self-check through it."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import trio
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from tunnel.app import Control, serve_until_signal
from tunnel.config import Address, BackendConfig, Config, ListenerConfig, RouteConfig
from tunnel.echo import READ_SIZE, flush, serve_echo
from tunnel.net.listener import bound_address

SELF_CHECK_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class SelfCheck:
    ok: bool
    detail: str


def demo_config(backend_port: int, listen: Address) -> Config:
    backend = BackendConfig("echo", "127.0.0.1", backend_port)
    return Config(listeners=(ListenerConfig(listen),), routes=(RouteConfig("demo", (backend,)),))


async def self_check(url: str) -> SelfCheck:
    """Open a WebSocket through the tunnel, echo a text and a binary message, close cleanly."""
    with trio.move_on_after(SELF_CHECK_SECONDS):
        try:
            return await _exchange(url)
        except OSError as exc:
            return SelfCheck(False, f"could not connect to {url}: {exc}")
    return SelfCheck(False, f"no echo within {SELF_CHECK_SECONDS:g}s")


async def _exchange(url: str) -> SelfCheck:
    uri = parse_uri(url)
    protocol = ClientProtocol(uri)
    stream = await trio.open_tcp_stream(uri.host, uri.port)
    async with stream:
        protocol.send_request(protocol.connect())
        await flush(stream, protocol)
        text, blob = "hello through the tunnel", os.urandom(4096)
        expected = [(Opcode.TEXT, text.encode()), (Opcode.BINARY, blob)]
        received: list[tuple[Opcode, bytes]] = []
        while len(received) < len(expected):
            data = await stream.receive_some(READ_SIZE)
            if not data:
                return SelfCheck(False, "the tunnel closed the connection before the echo")
            protocol.receive_data(data)
            for event in protocol.events_received():
                if isinstance(event, Response):
                    if protocol.handshake_exc is not None:
                        return SelfCheck(False, f"handshake failed: {protocol.handshake_exc}")
                    protocol.send_text(text.encode())
                    protocol.send_binary(blob)
                elif isinstance(event, Frame) and event.opcode in (Opcode.TEXT, Opcode.BINARY):
                    received.append((event.opcode, bytes(event.data)))
            await flush(stream, protocol)
        if received != expected:
            return SelfCheck(False, "the echoed messages differ from those sent")
        protocol.send_close()
        await flush(stream, protocol)
        while await stream.receive_some(READ_SIZE):
            pass
    return SelfCheck(True, "text and binary messages echoed through the tunnel")


async def run_demo(listen: Address, *, once: bool, report: Callable[[str], None]) -> bool:
    """Start the echo backend and the tunnel, run the self-check; serve on unless ``once``,
    until SIGINT or SIGTERM, which stop the demo as they stop ``tunnel run``."""
    passed = True  # a stop signal before the self-check ends is a normal stop, not a failure
    async with trio.open_nursery() as nursery:
        echo_listeners = await nursery.start(serve_echo)
        backend_port = echo_listeners[0].socket.getsockname()[1]
        config = demo_config(backend_port, listen)
        control = Control()
        listeners = await nursery.start(_serve_then_stop, config, nursery.cancel_scope, control)
        address = bound_address(listeners[0])
        url = f"ws://{address}/"
        report(f"echo backend on 127.0.0.1:{backend_port}; tunnel listening on {address}")
        report(f"WebSocket URL: {url}")
        result = await self_check(url)
        passed = result.ok
        report(f"self-check: {'passed' if result.ok else 'FAILED'} ({result.detail})")
        if not result.ok:
            nursery.cancel_scope.cancel()
        elif once:
            # A clean stop: the self-check's tunnel ends as it closed (its own close reason in
            # the log), not cut short by the exit.
            control.stop()
        else:
            report("serving; press Ctrl-C to stop")
    return passed


async def _serve_then_stop(
    config: Config,
    demo: trio.CancelScope,
    control: Control,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The tunnel until a stop signal or ``control.stop()``; then the rest of the demo
    (backend, self-check) stops."""
    await serve_until_signal(config, control=control, task_status=task_status)
    demo.cancel()
