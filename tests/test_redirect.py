"""``redirect_https``: the pure answer (``https_redirect``) table-driven, then a plain listener
that sends clients to a TLS listener of the same tunnel, over real loopback sockets."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from pathlib import Path

import h11
import pytest
import trio
import websockets.sync.client
from conftest import WsBackend
from rawhttp import LOOPBACK, header, read_to_eof, status_of, upgrade_request

from tunnel import Config, serve
from tunnel.certs import DevCertificates, write_dev_certificates
from tunnel.core.redirect import HTTPS_PORT, https_redirect
from tunnel.errors import HandshakeError, PermanentRedirect, TunnelError, UpgradeRequired
from tunnel.logs import LOGGER_NAME

WAIT_SECONDS = 10.0
"""Bound on any one exchange with the tunnel; a healthy one takes milliseconds."""

UPGRADE = [("Connection", "Upgrade"), ("Upgrade", "websocket")]

# --- the pure answer -------------------------------------------------------------------------


def request(
    target: str,
    headers: Sequence[tuple[str, str]] = (("Host", "example.com"),),
    *,
    method: str = "GET",
    version: str = "1.1",
) -> h11.Request:
    """An ``h11.Request`` as the handler would have parsed it."""
    return h11.Request(method=method, target=target, headers=list(headers), http_version=version)


REDIRECTS = [
    # (id, request, https port, Location)
    ("plain-get", request("/path?query"), 443, "https://example.com/path?query"),
    ("root", request("/"), 443, "https://example.com/"),
    ("other-port-kept", request("/a"), 8443, "https://example.com:8443/a"),
    (
        "host-port-replaced",
        request("/a?b=1", [("Host", "example.com:8080")]),
        8443,
        "https://example.com:8443/a?b=1",
    ),
    (
        "host-port-dropped-for-443",
        request("/a", [("Host", "example.com:8080")]),
        443,
        "https://example.com/a",
    ),
    ("host-lower-cased", request("/A", [("Host", "Example.COM")]), 443, "https://example.com/A"),
    ("ipv6-host", request("/x", [("Host", "[::1]:8080")]), 443, "https://[::1]/x"),
    ("ipv6-host-port", request("/x", [("Host", "[::1]")]), 8443, "https://[::1]:8443/x"),
    ("ipv4-host", request("/x", [("Host", "127.0.0.1:80")]), 4443, "https://127.0.0.1:4443/x"),
    (
        "absolute-form",
        request("http://a.example:8080/p?q=1", [("Host", "a.example:8080")]),
        8443,
        "https://a.example:8443/p?q=1",
    ),
    (
        "absolute-form-no-path",
        request("http://a.example", [("Host", "a.example")]),
        443,
        "https://a.example/",
    ),
    (
        "absolute-form-http10-without-host",
        request("http://a.example/p", [], version="1.0"),
        443,
        "https://a.example/p",
    ),
    (
        # RFC 9112 section 3.2.2: with an absolute-form target the Host field MUST be ignored.
        "absolute-form-wins-over-host",
        request("http://a.example/p", [("Host", "b.example")]),
        443,
        "https://a.example/p",
    ),
    ("post", request("/form", method="POST"), 443, "https://example.com/form"),
    ("head", request("/h", method="HEAD"), 443, "https://example.com/h"),
    (
        "upgrade-without-connection-upgrade",
        request("/chat", [("Host", "example.com"), ("Upgrade", "websocket")]),
        443,
        "https://example.com/chat",
    ),
    ("http10-with-host", request("/old", version="1.0"), 443, "https://example.com/old"),
]


@pytest.mark.parametrize(
    ("req", "port", "location"), [pytest.param(*case[1:], id=case[0]) for case in REDIRECTS]
)
def test_a_plain_request_is_redirected_with_308(req: h11.Request, port: int, location: str) -> None:
    answer = https_redirect(req, port)
    assert type(answer) is PermanentRedirect
    assert answer.status == 308
    assert answer.location == location
    assert answer.headers == (("Location", location),)
    assert location in answer.message


UPGRADES = [
    # (id, request, https port, wss URL)
    (
        "websocket",
        request("/chat?room=1", [("Host", "example.com"), *UPGRADE]),
        443,
        "wss://example.com/chat?room=1",
    ),
    (
        "websocket-other-port",
        request("/chat", [("Host", "example.com:8080"), *UPGRADE]),
        8443,
        "wss://example.com:8443/chat",
    ),
    (
        "tokens-case-and-lists",
        request(
            "/c",
            [
                ("Host", "example.com"),
                ("Connection", "keep-alive, UPGRADE"),
                ("Upgrade", "WebSocket"),
            ],
        ),
        443,
        "wss://example.com/c",
    ),
    ("ipv6", request("/c", [("Host", "[::1]:80"), *UPGRADE]), 9443, "wss://[::1]:9443/c"),
    (
        "absolute-form",
        request("http://a.example/c", [("Host", "a.example"), *UPGRADE]),
        443,
        "wss://a.example/c",
    ),
]


@pytest.mark.parametrize(
    ("req", "port", "url"), [pytest.param(*case[1:], id=case[0]) for case in UPGRADES]
)
def test_an_upgrade_request_gets_426_naming_the_wss_url(
    req: h11.Request, port: int, url: str
) -> None:
    answer = https_redirect(req, port)
    assert type(answer) is UpgradeRequired
    assert answer.status == 426
    assert url in answer.message
    assert answer.headers == (("Location", url),)


@pytest.mark.parametrize(
    "req",
    [
        pytest.param(request("/", [], version="1.0"), id="http10-without-host"),
        pytest.param(request("/", [("Host", "")]), id="empty-host"),
        pytest.param(request("/", UPGRADE, version="1.0"), id="http10-upgrade-without-host"),
    ],
)
def test_a_request_that_names_no_host_gets_400(req: h11.Request) -> None:
    answer = https_redirect(req)
    assert type(answer) is HandshakeError
    assert answer.status == 400
    assert "names no Host" in answer.message
    assert answer.headers == ()


@pytest.mark.parametrize(
    ("target", "host"),
    [
        ("/x", "evil.example/x?"),
        ("/x", "a@evil.example"),
        ("/x", "a b"),
        ("/x", "host:99999"),
        ("http://user@evil.example/x", "example.com"),
    ],
)
def test_a_host_that_is_not_one_gets_400_not_a_location(target: str, host: str) -> None:
    """Whatever names the host ends up in ``Location``: only a real host name may."""
    answer = https_redirect(request(target, [("Host", host)]))
    assert type(answer) is HandshakeError
    assert answer.status == 400
    assert not any(name == "Location" for name, _ in answer.headers)


def test_the_default_https_port_is_443() -> None:
    assert HTTPS_PORT == 443
    answer = https_redirect(request("/x", [("Host", "example.com:80")]))
    assert isinstance(answer, PermanentRedirect)
    assert answer.location == "https://example.com/x"


# --- end to end over loopback ----------------------------------------------------------------


@pytest.fixture(scope="module")
def dev_certs(tmp_path_factory: pytest.TempPathFactory) -> DevCertificates:
    """A development CA and a certificate for 127.0.0.1 and localhost, written to disk."""
    return write_dev_certificates(tmp_path_factory.mktemp("certs"), ["127.0.0.1", "localhost"])


def redirect_config(backend: WsBackend, certs: DevCertificates | None) -> Config:
    """A plain listener with ``redirect_https``, then (with ``certs``) a TLS listener."""
    listeners: list[dict[str, object]] = [{"listen": f"{LOOPBACK}:0", "redirect_https": True}]
    if certs is not None:
        tls = {"cert": str(certs.cert), "key": str(certs.key)}
        listeners.append({"listen": f"{LOOPBACK}:0", "tls": tls})
    return Config.from_mapping(
        {
            "listeners": listeners,
            "routes": [{"name": "default", "backends": [{"url": backend.url}]}],
        }
    )


def port_of(listener: trio.SocketListener) -> int:
    port: int = listener.socket.getsockname()[1]
    return port


async def exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` to the tunnel's ``port`` and read the whole answer, to its EOF."""
    with trio.fail_after(WAIT_SECONDS):
        stream = await trio.open_tcp_stream(LOOPBACK, port)
        async with stream:
            await stream.send_all(data)
            return await read_to_eof(stream)


def plain_get(host: str, target: str = "/x?y", method: str = "GET") -> bytes:
    return f"{method} {target} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n".encode()


def wss_echo(url: str, cafile: Path, message: str) -> str | bytes:
    """A real ``websockets`` client over TLS, trusting only ``cafile``: one message there and
    back."""
    context = ssl.create_default_context(cafile=str(cafile))
    with websockets.sync.client.connect(
        url, ssl=context, open_timeout=WAIT_SECONDS, close_timeout=5
    ) as ws:
        ws.send(message)
        return ws.recv(timeout=WAIT_SECONDS)


async def test_the_plain_listener_redirects_to_the_tls_listener_which_serves_wss(
    nursery: trio.Nursery, echo_backend: WsBackend, dev_certs: DevCertificates
) -> None:
    plain, secure = await nursery.start(serve, redirect_config(echo_backend, dev_certs))
    plain_port, tls_port = port_of(plain), port_of(secure)

    answer = await exchange(plain_port, plain_get(f"{LOOPBACK}:{plain_port}"))
    assert status_of(answer) == 308, answer
    assert header(answer, "Location") == f"https://{LOOPBACK}:{tls_port}/x?y"

    posted = await exchange(plain_port, plain_get("localhost", "/form", method="POST"))
    assert status_of(posted) == 308, posted
    assert header(posted, "Location") == f"https://localhost:{tls_port}/form"

    refused = await exchange(plain_port, upgrade_request(f"{LOOPBACK}:{plain_port}", path="/ws"))
    assert status_of(refused) == 426, refused
    wss_url = f"wss://{LOOPBACK}:{tls_port}/ws"
    assert header(refused, "Location") == wss_url
    assert wss_url.encode() in refused.partition(b"\r\n\r\n")[2], "the body names the URL"
    assert echo_backend.connections == 0, "nothing on the plain port reached the backend"

    url = f"wss://{LOOPBACK}:{tls_port}/"
    echoed = await trio.to_thread.run_sync(wss_echo, url, dev_certs.ca_cert, "over TLS")
    assert echoed == "over TLS"
    assert echo_backend.connections == 1


async def test_without_a_tls_listener_the_redirect_names_no_port(
    nursery: trio.Nursery, echo_backend: WsBackend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    [plain] = await nursery.start(serve, redirect_config(echo_backend, None))
    port = port_of(plain)

    answer = await exchange(port, plain_get(f"{LOOPBACK}:{port}"))
    assert status_of(answer) == 308, answer
    assert header(answer, "Location") == f"https://{LOOPBACK}/x?y"

    refused = await exchange(port, upgrade_request(f"example.com:{port}", path="/chat"))
    assert status_of(refused) == 426, refused
    assert header(refused, "Location") == "wss://example.com/chat"
    redirected = [r for r in caplog.records if r.getMessage().startswith("request redirected")]
    assert [r.levelno for r in redirected] == [logging.INFO, logging.INFO], (
        "both answers of a redirect listener are routine (info), not warnings"
    )


async def test_an_http10_request_without_host_gets_400_on_the_redirect_listener(
    nursery: trio.Nursery, echo_backend: WsBackend
) -> None:
    [plain] = await nursery.start(serve, redirect_config(echo_backend, None))
    answer = await exchange(port_of(plain), b"GET /x HTTP/1.0\r\n\r\n")
    assert status_of(answer) == 400, answer
    assert b"names no Host" in answer


def test_the_error_tree_places_the_redirect_outside_the_refusals() -> None:
    """308 is an answer, not a failure: it is no HandshakeError, yet a TunnelError that the
    handler's one ``except`` turns into response bytes."""
    assert issubclass(PermanentRedirect, TunnelError)
    assert not issubclass(PermanentRedirect, HandshakeError)
    assert issubclass(UpgradeRequired, HandshakeError)
