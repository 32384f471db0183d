"""A WebSocket echo server on trio, driving the ``websockets`` sans-io protocol.

It is the embedded backend of ``tunnel demo``: every text or binary message comes back as sent,
pings are answered and the closing handshake is completed by the protocol object.
"""

from __future__ import annotations

import trio
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import Protocol
from websockets.server import ServerProtocol

READ_SIZE = 64 * 1024
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


async def flush(stream: trio.abc.HalfCloseableStream, protocol: Protocol) -> None:
    """Write what the protocol wants sent; ``b""`` from it means "half-close now"."""
    for data in protocol.data_to_send():
        if data:
            await stream.send_all(data)
        else:
            await stream.send_eof()


async def serve_echo_connection(stream: trio.SocketStream) -> None:
    """Handshake with one client, then echo frames until the connection closes."""
    protocol = ServerProtocol(max_size=MAX_MESSAGE_BYTES)
    try:
        while True:
            data = await stream.receive_some(READ_SIZE)
            if data:
                protocol.receive_data(data)
            else:
                protocol.receive_eof()
            for event in protocol.events_received():
                if isinstance(event, Request):
                    protocol.send_response(protocol.accept(event))
                elif isinstance(event, Frame):
                    _echo(protocol, event)
            await flush(stream, protocol)
            if not data or protocol.close_expected():
                return
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return
    finally:
        await stream.aclose()


def _echo(protocol: ServerProtocol, frame: Frame) -> None:
    if frame.opcode is Opcode.TEXT:
        protocol.send_text(frame.data, fin=frame.fin)
    elif frame.opcode is Opcode.BINARY:
        protocol.send_binary(frame.data, fin=frame.fin)
    elif frame.opcode is Opcode.CONT:
        protocol.send_continuation(frame.data, fin=frame.fin)


async def serve_echo(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the echo backend until cancelled; reports its listeners through ``task_status``."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    await trio.serve_listeners(serve_echo_connection, listeners, task_status=task_status)
