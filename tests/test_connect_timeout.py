"""``connect_timeout`` over real loopback sockets: a backend whose accept queue is full drops
the SYN, so the connect hangs as it would to a host that is down; the client gets 504 once
the timeout passes, and the log names the backend."""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator

import pytest
import trio
from rawhttp import LOOPBACK, read_to_eof, status_of, upgrade_request

from tunnel import Config, serve
from tunnel.logs import TextFormatter


@pytest.fixture
def unresponsive_port() -> Iterator[int]:
    """A port that listens and never accepts, with its accept queue already full."""
    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers: list[socket.socket] = []
        try:
            for _ in range(8):
                filler = socket.socket()
                filler.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    filler.connect((LOOPBACK, port))
                fillers.append(filler)
            probe = socket.socket()
            probe.settimeout(0.5)
            try:
                probe.connect((LOOPBACK, port))
            except TimeoutError:
                pass
            else:
                pytest.skip("this kernel completes connects beyond a full accept queue")
            finally:
                probe.close()
            yield port
        finally:
            for filler in fillers:
                filler.close()


async def test_a_connect_that_hangs_gets_504_after_connect_timeout(
    nursery: trio.Nursery, unresponsive_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tunnel")
    config = Config.from_toml(
        f"""
[server]
connect_timeout = "1s"
[[listeners]]
listen = "{LOOPBACK}:0"
[[routes]]
backends = [{{ name = "stuck", url = "ws://{LOOPBACK}:{unresponsive_port}" }}]
"""
    )
    listeners: list[trio.SocketListener] = await nursery.start(serve, config)
    port = listeners[0].socket.getsockname()[1]
    stream = await trio.open_tcp_stream(LOOPBACK, port)
    started = trio.current_time()
    async with stream:
        await stream.send_all(upgrade_request(f"{LOOPBACK}:{port}"))
        with trio.fail_after(15):
            answer = await read_to_eof(stream)
    waited = trio.current_time() - started
    assert status_of(answer) == 504
    assert 0.9 <= waited < 10
    formatter = TextFormatter()
    text = "\n".join(formatter.format(record) for record in caplog.records)
    assert "stuck" in text
    assert "connect_timeout" in text or "timed out" in text
