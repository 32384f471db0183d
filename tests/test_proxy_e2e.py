"""PROXY protocol over real loopback sockets: a trusted load balancer's header names the client
for logs, access rules and ``X-Forwarded-For``; anyone else's is closed unanswered; backends
with ``send_proxy_protocol`` get one naming the client."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

import pytest
import trio
from rawhttp import KEY, LOOPBACK, read_head, read_to_eof, serve_loopback, status_of, switching

from tunnel import Config, serve
from tunnel.certs import write_dev_certificates
from tunnel.core.proxy_protocol import build, parse
from tunnel.logs import TextFormatter


def logged(caplog: pytest.LogCaptureFixture) -> str:
    formatter = TextFormatter()
    return "\n".join(formatter.format(record) for record in caplog.records)


REQUEST = (
    "GET /chat HTTP/1.1\r\nHost: chat.example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
).encode("ascii")


class Recorder:
    """A raw backend: records what arrives before the request head (a PROXY header) and the
    head, answers 101 and closes."""

    def __init__(self) -> None:
        self.received: list[bytes] = []

    async def __call__(self, stream: trio.SocketStream) -> None:
        try:
            head, _ = await read_head(stream)
        except (EOFError, trio.BrokenResourceError):
            return
        self.received.append(head)
        await stream.send_all(switching(KEY))


def config(backend: int, *, trusted: str, listener: str = "", backend_keys: str = "") -> Config:
    return Config.from_toml(
        f"""
[server]
trusted_proxies = [{trusted}]
[[listeners]]
listen = "{LOOPBACK}:0"
proxy_protocol = true
{listener}
[[routes]]
name = "chat"
backends = [{{ url = "ws://{LOOPBACK}:{backend}"{backend_keys} }}]
[routes.access]
deny = ["198.51.100.0/24"]
"""
    )


async def start(nursery: trio.Nursery, cfg: Config) -> int:
    listeners: list[trio.SocketListener] = await nursery.start(serve, cfg)
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def send(port: int, data: bytes) -> bytes:
    """What the tunnel answers to ``data``; b"" when it closed without a word (a reset
    included: closing with the client's bytes unread resets the connection)."""
    stream = await trio.open_tcp_stream(LOOPBACK, port)
    async with stream:
        try:
            await stream.send_all(data)
            with trio.fail_after(10):
                return await read_to_eof(stream)
        except trio.BrokenResourceError:
            return b""


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_a_trusted_header_names_the_client(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, version: str
) -> None:
    caplog.set_level(logging.INFO, logger="tunnel")
    recorder = Recorder()
    backend = await serve_loopback(nursery, recorder)
    port = await start(nursery, config(backend, trusted='"127.0.0.1"'))
    header = build(version, ("203.0.113.9", 40123), ("192.0.2.1", 443))
    answer = await send(port, header + REQUEST)
    assert status_of(answer) == 101
    (head,) = recorder.received
    assert b"X-Forwarded-For: 203.0.113.9\r\n" in head
    assert b"X-Real-IP: 203.0.113.9\r\n" in head
    assert b"PROXY" not in head
    assert "client=203.0.113.9:40123" in logged(caplog)


async def test_the_header_address_feeds_the_access_rules(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder()
    backend = await serve_loopback(nursery, recorder)
    port = await start(nursery, config(backend, trusted='"127.0.0.1"'))
    header = build("v2", ("198.51.100.7", 5555), ("192.0.2.1", 443))
    answer = await send(port, header + REQUEST)
    assert status_of(answer) == 403
    assert recorder.received == []


@pytest.mark.parametrize(
    "data",
    [
        build("v1", ("203.0.113.9", 1), ("192.0.2.1", 2)) + REQUEST,
        build("v2", ("203.0.113.9", 1), ("192.0.2.1", 2)) + REQUEST,
    ],
)
async def test_an_untrusted_peer_is_closed_unanswered(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, data: bytes
) -> None:
    recorder = Recorder()
    backend = await serve_loopback(nursery, recorder)
    port = await start(nursery, config(backend, trusted='"10.0.0.0/8"'))
    assert await send(port, data) == b""
    assert recorder.received == []
    text = logged(caplog)
    assert "PROXY header refused" in text
    assert "trusted_proxies" in text


async def test_a_missing_or_broken_header_is_closed_unanswered(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder()
    backend = await serve_loopback(nursery, recorder)
    port = await start(nursery, config(backend, trusted='"127.0.0.1"'))
    assert await send(port, REQUEST) == b""
    assert await send(port, b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n" + REQUEST) == b""
    assert recorder.received == []
    assert logged(caplog).count("PROXY header refused") == 2
    # The listener still serves well-formed connections afterwards.
    answer = await send(port, build("v1", ("203.0.113.9", 1), ("192.0.2.1", 2)) + REQUEST)
    assert status_of(answer) == 101


async def test_the_header_comes_before_tls(nursery: trio.Nursery, tmp_path: Path) -> None:
    paths = write_dev_certificates(tmp_path / "certs", ["localhost"])
    cert, key = paths.cert, paths.key
    recorder = Recorder()
    backend = await serve_loopback(nursery, recorder)
    port = await start(
        nursery,
        config(
            backend, trusted='"127.0.0.1"', listener=f'tls = {{ cert = "{cert}", key = "{key}" }}'
        ),
    )
    context = ssl.create_default_context(cafile=str(paths.ca_cert))
    tcp = await trio.open_tcp_stream(LOOPBACK, port)
    await tcp.send_all(build("v2", ("203.0.113.9", 777), ("192.0.2.1", 443)))
    stream = trio.SSLStream(tcp, context, server_hostname="localhost")
    async with stream:
        await stream.send_all(REQUEST)
        with trio.fail_after(10):
            head, _ = await read_head(stream)
    assert status_of(head) == 101
    assert b"X-Forwarded-For: 203.0.113.9\r\n" in recorder.received[0]
    assert b"X-Forwarded-Proto: https\r\n" in recorder.received[0]


class ProxyReader:
    """A backend that expects a PROXY header before the request head."""

    def __init__(self) -> None:
        self.headers: list[tuple[tuple[str, int] | None, tuple[str, int] | None]] = []

    async def __call__(self, stream: trio.SocketStream) -> None:
        data = b""
        while (header := parse(data)) is None:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            data += chunk
        self.headers.append((header.source, header.destination))
        rest = data[header.length :]
        while b"\r\n\r\n" not in rest:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            rest += chunk
        await stream.send_all(switching(KEY))


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_send_proxy_protocol_names_the_client_to_the_backend(
    nursery: trio.Nursery, version: str
) -> None:
    reader = ProxyReader()
    backend = await serve_loopback(nursery, reader)
    cfg = Config.from_toml(
        f"""
[[listeners]]
listen = "{LOOPBACK}:0"
[[routes]]
backends = [{{ url = "ws://{LOOPBACK}:{backend}", send_proxy_protocol = "{version}" }}]
"""
    )
    port = await start(nursery, cfg)
    stream = await trio.open_tcp_stream(LOOPBACK, port)
    client_port = stream.socket.getsockname()[1]
    async with stream:
        await stream.send_all(REQUEST)
        with trio.fail_after(10):
            head, _ = await read_head(stream)
    assert status_of(head) == 101
    assert reader.headers == [((LOOPBACK, client_port), (LOOPBACK, port))]


async def test_send_proxy_protocol_passes_on_what_a_trusted_header_said(
    nursery: trio.Nursery,
) -> None:
    reader = ProxyReader()
    backend = await serve_loopback(nursery, reader)
    port = await start(
        nursery, config(backend, trusted='"127.0.0.1"', backend_keys=', send_proxy_protocol = "v2"')
    )
    answer = await send(port, build("v1", ("203.0.113.9", 40123), ("192.0.2.1", 443)) + REQUEST)
    assert status_of(answer) == 101
    assert reader.headers == [(("203.0.113.9", 40123), ("192.0.2.1", 443))]
