"""TLS end to end over loopback: ``wss://`` listeners (versions, ALPN, SNI, rotation, client
certificates) and ``wss://`` backends (verification, server_name, client certificates).

Certificates come from ``tunnel.certs`` in each test and live in ``tmp_path``. Every client
verifies the tunnel's certificate against the test CA (CERT_REQUIRED); the only clients that
skip the host name check are the ones that by design send no name, or an unknown one. Blocking
``websockets`` clients run in worker threads, raw TLS clients are ``trio.SSLStream``; every
wait is bounded by ``trio.fail_after``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import ssl
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio
import websockets.sync.client
from cryptography import x509
from rawhttp import LOOPBACK, status_of, upgrade_request
from test_e2e import CLIENT_TIMEOUT, in_thread, refused, ws_connect
from websockets.http11 import Request, Response
from websockets.sync.server import ServerConnection

from tunnel import Config, serve
from tunnel.app import Control
from tunnel.certs import Issued, issue, make_ca
from tunnel.logs import LOGGER_NAME, TextFormatter

if TYPE_CHECKING:
    from conftest import WsBackend

StartBackend = Callable[..., "WsBackend"]

TEST_TIMEOUT = 20.0
SERVER_HOSTS = ["localhost", "127.0.0.1"]
MiB = 2**20


# Certificates --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """A certificate and key written to PEM files."""

    cert: Path
    key: Path
    issued: Issued

    @property
    def serial(self) -> int:
        return x509.load_pem_x509_certificate(self.issued.cert_pem).serial_number

    def toml(self) -> dict[str, str]:
        return {"cert": str(self.cert), "key": str(self.key)}


@dataclass(frozen=True)
class Pki:
    """The test CA (its certificate in ``ca_file``) and a way to issue pairs into files."""

    ca: Issued
    ca_file: Path
    directory: Path

    def pair(self, stem: str, hosts: Sequence[str], *, client: bool = False) -> Pair:
        issued = issue(self.ca, list(hosts), client=client)
        return write_pair(self.directory / f"{stem}.pem", self.directory / f"{stem}.key", issued)


def write_pair(cert: Path, key: Path, issued: Issued) -> Pair:
    """Write ``issued`` over ``cert`` and ``key``, each replaced atomically (a watcher never
    reads half a file)."""
    replace_file(cert, issued.cert_pem)
    replace_file(key, issued.key_pem)
    return Pair(cert, key, issued)


def replace_file(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".new")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def make_pki(directory: Path, name: str = "tunnel test CA") -> Pki:
    ca = make_ca(name)
    ca_file = directory / f"{name.replace(' ', '-')}.pem"
    ca_file.write_bytes(ca.cert_pem)
    return Pki(ca, ca_file, directory)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path)


@pytest.fixture
def site(pki: Pki) -> Pair:
    """The tunnel's server certificate, for localhost and 127.0.0.1."""
    return pki.pair("site", SERVER_HOSTS)


def client_context(
    ca_file: Path,
    *,
    cert: Pair | None = None,
    maximum: ssl.TLSVersion | None = None,
    check_hostname: bool = True,
) -> ssl.SSLContext:
    """A client context that verifies the server against ``ca_file`` (CERT_REQUIRED)."""
    context = ssl.create_default_context(cafile=str(ca_file))
    context.check_hostname = check_hostname
    assert context.verify_mode == ssl.CERT_REQUIRED
    if maximum is not None:
        context.maximum_version = maximum
    if cert is not None:
        context.load_cert_chain(cert.cert, cert.key)
    return context


def server_context(pair: Pair, client_ca: Path | None = None) -> ssl.SSLContext:
    """A backend's server context; with ``client_ca`` it requires a client certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pair.cert, pair.key)
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=str(client_ca))
    return context


def sans(der: bytes | None) -> list[str]:
    assert der, "no peer certificate"
    cert = x509.load_der_x509_certificate(der)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(name) for name in san.get_values_for_type(x509.DNSName)]


# The tunnel ----------------------------------------------------------------------------------


def tls_config(
    backends: Sequence[str],
    *,
    tls: dict[str, Any] | None = None,
    backend_tls: dict[str, Any] | None = None,
    **server: str | int,
) -> Config:
    """One loopback listener (TLS when ``tls`` is given) and one catch-all route."""
    listener: dict[str, Any] = {"listen": f"{LOOPBACK}:0"}
    if tls is not None:
        listener["tls"] = tls
    route: dict[str, Any] = {
        "name": "default",
        "backends": [{"name": f"b{i}", "url": url} for i, url in enumerate(backends)],
    }
    if backend_tls is not None:
        route["backend_tls"] = backend_tls
    return Config.from_mapping({"server": server, "listeners": [listener], "routes": [route]})


async def start(nursery: trio.Nursery, config: Config, control: Control | None = None) -> int:
    """Serve ``config`` in ``nursery``; the listener's port."""
    listeners: list[trio.SocketListener] = await nursery.start(
        partial(serve, config, control=control)
    )
    port: int = listeners[0].socket.getsockname()[1]
    return port


def tunnel_log(caplog: pytest.LogCaptureFixture, level: int = logging.DEBUG) -> str:
    """The tunnel's log lines at ``level`` or above as operators read them, fields included."""
    formatter = TextFormatter()
    return "\n".join(
        formatter.format(record)
        for record in caplog.records
        if record.name == LOGGER_NAME and record.levelno >= level
    )


# Clients -------------------------------------------------------------------------------------


def exchange(url: str, messages: Sequence[str | bytes], **options: Any) -> list[str | bytes]:
    """Open a WebSocket, send each message and collect its echo, close."""
    options.setdefault("max_size", None)
    answers: list[str | bytes] = []
    with ws_connect(url, **options) as ws:
        for message in messages:
            ws.send(message)
            answers.append(ws.recv(timeout=CLIENT_TIMEOUT))
    return answers


def echo(ws: websockets.sync.client.ClientConnection, message: str) -> str | bytes:
    ws.send(message)
    return ws.recv(timeout=CLIENT_TIMEOUT)


async def tls_open(
    port: int, context: ssl.SSLContext, server_hostname: str | None
) -> trio.SSLStream[trio.SocketStream]:
    """A raw TLS connection to the tunnel, handshake done."""
    stream = trio.SSLStream(
        await trio.open_tcp_stream(LOOPBACK, port), context, server_hostname=server_hostname
    )
    try:
        await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


async def peer_certificate(
    port: int, context: ssl.SSLContext, server_hostname: str | None
) -> bytes | None:
    """The DER certificate the tunnel serves to a new handshake."""
    stream = await tls_open(port, context, server_hostname)
    der: bytes | None = stream.getpeercert(binary_form=True)
    await trio.aclose_forcefully(stream)
    return der


async def peer_serial(port: int, context: ssl.SSLContext) -> int:
    der = await peer_certificate(port, context, "localhost")
    assert der
    return x509.load_der_x509_certificate(der).serial_number


async def handshake_error(
    port: int, context: ssl.SSLContext, server_hostname: str | None
) -> ssl.SSLError:
    """Expect the TLS handshake to fail; OpenSSL's error on the client side."""
    with pytest.raises(trio.BrokenResourceError) as info:
        await peer_certificate(port, context, server_hostname)
    cause = info.value.__cause__
    assert isinstance(cause, ssl.SSLError), repr(cause)
    return cause


async def read_until_closed(stream: trio.abc.ReceiveStream, limit: int = MiB) -> tuple[bytes, str]:
    """Everything the peer sends until it closes: ``(data, "EOF" or "reset")``."""
    data = bytearray()
    try:
        while chunk := await stream.receive_some(65536):
            data += chunk
            assert len(data) < limit, "peer never closed"
    except trio.BrokenResourceError:
        return bytes(data), "reset"
    return bytes(data), "EOF"


async def refused_before_http(port: int, context: ssl.SSLContext) -> str:
    """Handshake (in TLS 1.3 a client finishes before the server has judged its certificate),
    send an upgrade request, read. Fails if any byte of HTTP comes back; else how it ended."""
    try:
        stream = await tls_open(port, context, "localhost")
    except trio.BrokenResourceError as exc:
        return f"handshake: {exc.__cause__!r}"
    try:
        await stream.send_all(upgrade_request(f"localhost:{port}"))
        data, how = await read_until_closed(stream)
    except trio.BrokenResourceError as exc:
        data, how = b"", f"send: {exc.__cause__!r}"
    finally:
        await trio.aclose_forcefully(stream)
    assert data == b"", f"the client got an answer: {data[:200]!r}"
    return how


# 1. A wss:// listener ------------------------------------------------------------------------


async def test_wss_listener_echoes_text_and_1_mib_binary_byte_identical(
    nursery: trio.Nursery, pki: Pki, site: Pair, echo_backend: WsBackend
) -> None:
    """A verifying websockets client gets its messages back unchanged through a TLS listener,
    and the backend is told the client spoke https."""
    blob = os.urandom(MiB)
    with trio.fail_after(TEST_TIMEOUT):
        port = await start(nursery, tls_config([echo_backend.url], tls=site.toml()))
        answers = await in_thread(
            exchange,
            f"wss://127.0.0.1:{port}",
            ["héllo over TLS ✓", blob],
            ssl=client_context(pki.ca_file),
        )

    assert answers[0] == "héllo over TLS ✓"
    assert isinstance(answers[1], bytes)
    assert answers[1] == blob
    assert echo_backend.connections == 1
    assert echo_backend.request_headers[0]["X-Forwarded-Proto"] == "https"


async def test_wss_listener_negotiates_http11_alpn_and_tls_1_3(
    nursery: trio.Nursery, pki: Pki, site: Pair, echo_backend: WsBackend
) -> None:
    """ALPN picks http/1.1 even when h2 is offered first; TLS 1.3 is the default version."""
    context = client_context(pki.ca_file)
    context.set_alpn_protocols(["h2", "http/1.1"])
    with trio.fail_after(TEST_TIMEOUT):
        port = await start(nursery, tls_config([echo_backend.url], tls=site.toml()))
        stream = await tls_open(port, context, "localhost")
        alpn, version = stream.selected_alpn_protocol(), stream.version()
        await trio.aclose_forcefully(stream)

    assert alpn == "http/1.1"
    assert version == "TLSv1.3"


async def test_wss_listener_serves_a_client_capped_at_tls_1_2(
    nursery: trio.Nursery, pki: Pki, site: Pair, echo_backend: WsBackend
) -> None:
    """The default min_version (1.2) lets a TLS 1.2 client in, with ALPN, end to end."""
    context = client_context(pki.ca_file, maximum=ssl.TLSVersion.TLSv1_2)
    context.set_alpn_protocols(["http/1.1"])
    with trio.fail_after(TEST_TIMEOUT):
        port = await start(nursery, tls_config([echo_backend.url], tls=site.toml()))
        stream = await tls_open(port, context, "localhost")
        alpn, version = stream.selected_alpn_protocol(), stream.version()
        await trio.aclose_forcefully(stream)
        answers = await in_thread(
            exchange, f"wss://localhost:{port}", ["over TLS 1.2"], ssl=context
        )

    assert version == "TLSv1.2"
    assert alpn == "http/1.1"
    assert answers == ["over TLS 1.2"]


# 2. min_version ------------------------------------------------------------------------------


async def test_min_version_1_3_refuses_a_tls_1_2_client(
    nursery: trio.Nursery, pki: Pki, site: Pair, echo_backend: WsBackend
) -> None:
    """``min_version = "1.3"``: a client that cannot go above 1.2 fails the handshake with a
    protocol_version alert, while a 1.3 client is served."""
    tls = {**site.toml(), "min_version": "1.3"}
    with trio.fail_after(TEST_TIMEOUT):
        port = await start(nursery, tls_config([echo_backend.url], tls=tls))
        error = await handshake_error(
            port, client_context(pki.ca_file, maximum=ssl.TLSVersion.TLSv1_2), "localhost"
        )
        answers = await in_thread(
            exchange, f"wss://localhost:{port}", ["1.3 is fine"], ssl=client_context(pki.ca_file)
        )

    assert isinstance(error, ssl.SSLError)  # the alert itself: see the TLS 1.1 test
    assert answers == ["1.3 is fine"]
    assert echo_backend.connections == 1


# 3. TLS 1.1 ----------------------------------------------------------------------------------


def tls11_context() -> ssl.SSLContext | None:
    """A client context that offers TLS 1.1 only, or None when this OpenSSL cannot."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = ssl.TLSVersion.TLSv1_1
            context.maximum_version = ssl.TLSVersion.TLSv1_1
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    except (ValueError, ssl.SSLError):
        return None
    return context


async def s_client_tls11(port: int) -> str | None:
    """``openssl s_client -tls1_1`` against the port; its output, or None if it is missing or
    cannot offer TLS 1.1 either."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    command = [
        openssl,
        "s_client",
        "-connect",
        f"{LOOPBACK}:{port}",
        "-tls1_1",
        "-cipher",
        "DEFAULT:@SECLEVEL=0",
    ]
    # trio.run_process kills the process it started if the guard fires.
    with trio.fail_after(10):
        result = await trio.run_process(command, stdin=b"", capture_stdout=True, check=False)
    output = (result.stdout or b"").decode(errors="replace")
    if "no protocols available" in output.lower():
        return None
    return output


async def test_tls_1_1_client_is_refused_with_a_protocol_version_alert(
    nursery: trio.Nursery, site: Pair, echo_backend: WsBackend
) -> None:
    """A TLS 1.1 ClientHello is answered with the protocol_version alert, not served."""
    context = tls11_context()
    with trio.fail_after(TEST_TIMEOUT):
        port = await start(nursery, tls_config([echo_backend.url], tls=site.toml()))
        if context is not None:
            error = await handshake_error(port, context, None)
            if "NO_PROTOCOLS_AVAILABLE" not in (error.reason or ""):
                assert "TLSV1_ALERT_PROTOCOL_VERSION" in (error.reason or ""), error
                return
        output = await s_client_tls11(port)
    if output is None:
        pytest.skip("neither Python's ssl nor openssl s_client here can offer TLS 1.1")
    assert "alert protocol version" in output.lower(), output
    assert echo_backend.connections == 0


# 4. Handshake timeout and non-TLS clients ----------------------------------------------------


async def test_silent_tcp_client_is_cut_at_handshake_timeout(
    nursery: trio.Nursery, site: Pair, echo_backend: WsBackend
) -> None:
    """The TLS handshake counts inside handshake_timeout: a client that connects and never
    sends its ClientHello is closed after about 1 s."""
    with trio.fail_after(TEST_TIMEOUT):
        config = tls_config([echo_backend.url], tls=site.toml(), handshake_timeout="1s")
        port = await start(nursery, config)
        async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
            started = trio.current_time()
            with trio.fail_after(10):
                data, _ = await read_until_closed(stream)
            elapsed = trio.current_time() - started

    assert data == b""
    # Its clock may start (at accept) a little before ours; 5 s of lateness on a loaded machine.
    assert 0.5 <= elapsed < 1.0 + 5.0


async def test_tls_client_that_sends_no_request_is_cut_at_handshake_timeout(
    nursery: trio.Nursery, pki: Pki, site: Pair, echo_backend: WsBackend
) -> None:
    """Completing the TLS handshake does not restart the clock: a client silent after it is
    answered 408 (or closed) within the same handshake_timeout."""
    with trio.fail_after(TEST_TIMEOUT):
        config = tls_config([echo_backend.url], tls=site.toml(), handshake_timeout="1s")
        port = await start(nursery, config)
        started = trio.current_time()
        stream = await tls_open(port, client_context(pki.ca_file), "localhost")
        try:
            with trio.fail_after(10):
                data, _ = await read_until_closed(stream)
        finally:
            await trio.aclose_forcefully(stream)
        elapsed = trio.current_time() - started

    assert data == b"" or status_of(data) == 408, data[:200]
    # Our clock started before the connect, its clock after; 5 s of lateness on a loaded machine.
    assert 0.9 <= elapsed < 1.0 + 5.0
    assert echo_backend.connections == 0


async def test_plain_http_on_a_tls_listener_gets_400_and_the_tunnel_keeps_serving(
    nursery: trio.Nursery,
    pki: Pki,
    site: Pair,
    echo_backend: WsBackend,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Cleartext HTTP sent to a TLS port gets a plain 400 saying so (as nginx answers), is
    closed promptly and logged, and the next (TLS) client is served normally."""
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    with trio.fail_after(TEST_TIMEOUT):
        port = await start(nursery, tls_config([echo_backend.url], tls=site.toml()))
        async with await trio.open_tcp_stream(LOOPBACK, port) as stream:
            await stream.send_all(upgrade_request(f"{LOOPBACK}:{port}"))
            with trio.fail_after(5):
                data, _ = await read_until_closed(stream)
        answers = await in_thread(
            exchange, f"wss://localhost:{port}", ["still serving"], ssl=client_context(pki.ca_file)
        )

    assert data.startswith(b"HTTP/1.1 400 "), data[:200]
    assert b"plain HTTP was sent to a TLS port; use https:// or wss://" in data
    assert answers == ["still serving"]
    assert echo_backend.connections == 1
    assert "request refused" in tunnel_log(caplog)
    assert "plain HTTP was sent to a TLS port" in tunnel_log(caplog)


# 5. SNI --------------------------------------------------------------------------------------


SNI_CASES = [
    ("a.test", ["a.test"]),
    ("b.test", ["b.test", "*.wild.test"]),
    ("x.wild.test", ["b.test", "*.wild.test"]),
    ("unknown.test", ["a.test"]),
    ("deep.x.wild.test", ["a.test"]),  # a wildcard covers one label only
    (None, ["a.test"]),  # no SNI at all
]


async def test_sni_picks_the_pair_covering_the_name_else_the_first(
    nursery: trio.Nursery, pki: Pki, echo_backend: WsBackend
) -> None:
    """Each SNI name gets the certificate that covers it, exact or by wildcard; unknown names
    and clients without SNI get the first pair; routing by Host is unaffected."""
    first = pki.pair("a", ["a.test"])
    second = pki.pair("b", ["b.test", "*.wild.test"])
    seen: dict[str | None, list[str]] = {}
    with trio.fail_after(TEST_TIMEOUT):
        tls = {"certs": [first.toml(), second.toml()]}
        port = await start(nursery, tls_config([echo_backend.url], tls=tls))
        for name, _ in SNI_CASES:
            covered = name in ("a.test", "b.test", "x.wild.test")
            context = client_context(pki.ca_file, check_hostname=covered)
            seen[name] = sans(await peer_certificate(port, context, name))
        answers = await in_thread(
            exchange,
            f"wss://127.0.0.1:{port}",
            ["routed"],
            ssl=client_context(pki.ca_file),
            server_hostname="x.wild.test",
        )

    assert seen == {name: expected for name, expected in SNI_CASES}
    assert answers == ["routed"]


# 6. Rotation ---------------------------------------------------------------------------------


async def test_reload_certificates_switches_new_handshakes_and_keeps_open_tunnels(
    nursery: trio.Nursery, pki: Pki, site: Pair, echo_backend: WsBackend
) -> None:
    """Control.reload_certificates() puts the replaced files in use for new handshakes only;
    a tunnel opened before keeps working. Without it (no watcher) nothing changes."""
    control = Control()
    context = client_context(pki.ca_file)
    url = "wss://localhost:{port}"
    with trio.fail_after(TEST_TIMEOUT):
        config = tls_config([echo_backend.url], tls=site.toml(), cert_check_interval="0s")
        port = await start(nursery, config, control)
        ws = await in_thread(ws_connect, url.format(port=port), ssl=context, legacy=True)
        try:
            before = await in_thread(echo, ws, "before")
            rotated = write_pair(site.cert, site.key, issue(pki.ca, SERVER_HOSTS))
            unchanged = await peer_serial(port, context)
            during = await in_thread(echo, ws, "during")
            reloaded = control.reload_certificates()
            after_reload = await peer_serial(port, context)
            after = await in_thread(echo, ws, "after")
            fresh = await in_thread(exchange, url.format(port=port), ["fresh"], ssl=context)
        finally:
            await in_thread(ws.close)

    assert rotated.serial != site.serial
    assert unchanged == site.serial  # cert_check_interval = 0s: no reload by itself
    assert reloaded == 1
    assert after_reload == rotated.serial
    assert [before, during, after, *fresh] == ["before", "during", "after", "fresh"]


async def test_changed_files_are_picked_up_by_the_watcher(
    nursery: trio.Nursery,
    pki: Pki,
    site: Pair,
    echo_backend: WsBackend,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With a short cert_check_interval, new file contents are used without any call; the open
    tunnel survives."""
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    context = client_context(pki.ca_file)
    with trio.fail_after(TEST_TIMEOUT):
        config = tls_config([echo_backend.url], tls=site.toml(), cert_check_interval="100ms")
        port = await start(nursery, config)
        ws = await in_thread(ws_connect, f"wss://localhost:{port}", ssl=context, legacy=True)
        try:
            before = await in_thread(echo, ws, "before")
            assert await peer_serial(port, context) == site.serial
            rotated = write_pair(site.cert, site.key, issue(pki.ca, SERVER_HOSTS))
            with trio.fail_after(5):
                while (serial := await peer_serial(port, context)) != rotated.serial:
                    await trio.sleep(0.05)
            after = await in_thread(echo, ws, "after")
        finally:
            await in_thread(ws.close)

    assert serial == rotated.serial
    assert [before, after] == ["before", "after"]
    assert "TLS certificates reloaded" in tunnel_log(caplog)


async def test_broken_new_pair_is_rejected_and_the_old_one_stays(
    nursery: trio.Nursery,
    pki: Pki,
    site: Pair,
    echo_backend: WsBackend,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A garbage key, or a key that does not match the certificate, is not loaded: handshakes
    keep the old pair and an error line names the file. A good pair afterwards loads."""
    control = Control()
    context = client_context(pki.ca_file)
    other = issue(pki.ca, SERVER_HOSTS)
    with trio.fail_after(TEST_TIMEOUT):
        config = tls_config([echo_backend.url], tls=site.toml(), cert_check_interval="0s")
        port = await start(nursery, config, control)

        replace_file(site.key, b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
        garbage_reloaded = control.reload_certificates()
        after_garbage = await peer_serial(port, context)
        garbage_log = tunnel_log(caplog, logging.ERROR)
        caplog.clear()

        # The new certificate with the old key: they do not match.
        replace_file(site.cert, other.cert_pem)
        replace_file(site.key, site.issued.key_pem)
        mismatch_reloaded = control.reload_certificates()
        after_mismatch = await peer_serial(port, context)
        mismatch_log = tunnel_log(caplog, logging.ERROR)

        write_pair(site.cert, site.key, other)
        good_reloaded = control.reload_certificates()
        after_good = await peer_serial(port, context)
        answers = await in_thread(
            exchange, f"wss://localhost:{port}", ["still serving"], ssl=context
        )

    assert garbage_reloaded == 0
    assert after_garbage == site.serial
    assert str(site.key) in garbage_log, garbage_log
    assert mismatch_reloaded == 0
    assert after_mismatch == site.serial
    assert str(site.cert) in mismatch_log, mismatch_log
    assert good_reloaded == 1
    assert after_good == x509.load_pem_x509_certificate(other.cert_pem).serial_number
    assert answers == ["still serving"]


# 7. Client certificates ----------------------------------------------------------------------


@pytest.fixture
def subject_backend(start_ws_backend: StartBackend) -> tuple[WsBackend, list[list[str]]]:
    """An echo backend that records every ``X-Client-Subject`` value of each request."""
    subjects: list[list[str]] = []

    def record(_: ServerConnection, request: Request) -> Response | None:
        subjects.append(request.headers.get_all("X-Client-Subject"))
        return None

    return start_ws_backend(process_request=record), subjects


def mtls(site: Pair, ca_file: Path, header: str = "") -> dict[str, Any]:
    tls: dict[str, Any] = {**site.toml(), "client_ca": str(ca_file)}
    if header:
        tls["client_subject_header"] = header
    return tls


@pytest.mark.parametrize("presented", ["no certificate", "one from another CA"])
async def test_mtls_refuses_a_client_without_a_valid_certificate(
    nursery: trio.Nursery,
    tmp_path: Path,
    pki: Pki,
    site: Pair,
    echo_backend: WsBackend,
    caplog: pytest.LogCaptureFixture,
    presented: str,
) -> None:
    """With client_ca set, a client that presents no certificate, or one signed by a CA that
    client_ca does not hold, is refused at TLS and never gets to HTTP."""
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    cert = None
    if presented != "no certificate":
        cert = make_pki(tmp_path, "another CA").pair("intruder", ["client1"], client=True)
    with trio.fail_after(TEST_TIMEOUT):
        port = await start(nursery, tls_config([echo_backend.url], tls=mtls(site, pki.ca_file)))
        how = await refused_before_http(port, client_context(pki.ca_file, cert=cert))

    assert how
    assert echo_backend.connections == 0
    assert "TLS handshake failed" in tunnel_log(caplog)


async def test_mtls_valid_client_gets_through_with_only_the_verified_subject(
    nursery: trio.Nursery, pki: Pki, site: Pair, subject_backend: tuple[WsBackend, list[list[str]]]
) -> None:
    """A valid client certificate gets through; client_subject_header carries its subject, and
    a value the client sent itself under that name (any case) is replaced, not kept."""
    backend, subjects = subject_backend
    client = pki.pair("client1", ["client1"], client=True)
    tls = mtls(site, pki.ca_file, "X-Client-Subject")
    forged = [("X-Client-Subject", "CN=admin"), ("x-client-subject", "CN=root")]
    with trio.fail_after(TEST_TIMEOUT):
        port = await start(nursery, tls_config([backend.url], tls=tls))
        answers = await in_thread(
            exchange,
            f"wss://localhost:{port}",
            ["authenticated"],
            ssl=client_context(pki.ca_file, cert=client),
            additional_headers=forged,
        )

    assert answers == ["authenticated"]
    assert len(subjects) == 1
    assert len(subjects[0]) == 1, subjects
    assert "CN=client1" in subjects[0][0].split(","), subjects
    assert "admin" not in subjects[0][0]


async def test_mtls_without_subject_header_sends_no_subject(
    nursery: trio.Nursery, pki: Pki, site: Pair, subject_backend: tuple[WsBackend, list[list[str]]]
) -> None:
    """client_ca alone verifies clients but tells the backend nothing about them."""
    backend, subjects = subject_backend
    client = pki.pair("client1", ["client1"], client=True)
    with trio.fail_after(TEST_TIMEOUT):
        port = await start(nursery, tls_config([backend.url], tls=mtls(site, pki.ca_file)))
        answers = await in_thread(
            exchange,
            f"wss://localhost:{port}",
            ["authenticated"],
            ssl=client_context(pki.ca_file, cert=client),
        )

    assert answers == ["authenticated"]
    assert subjects == [[]]


# 8. wss:// backends --------------------------------------------------------------------------


@dataclass(frozen=True)
class WssBackend:
    backend: WsBackend
    pki: Pki

    def url(self, host: str = "localhost") -> str:
        return f"wss://{host}:{self.backend.port}"


@pytest.fixture
def wss_backend(start_ws_backend: StartBackend, pki: Pki) -> WssBackend:
    """A websockets echo backend over TLS, its certificate (for "localhost" only) from the CA."""
    pair = pki.pair("backend", ["localhost"])
    return WssBackend(start_ws_backend(ssl=server_context(pair), max_size=None), pki)


@pytest.fixture
def mtls_backend(start_ws_backend: StartBackend, pki: Pki) -> WssBackend:
    """A TLS echo backend that requires a client certificate from the test CA."""
    pair = pki.pair("backend", ["localhost"])
    context = server_context(pair, client_ca=pki.ca_file)
    return WssBackend(start_ws_backend(ssl=context), pki)


async def test_wss_backend_verified_against_the_configured_ca(
    nursery: trio.Nursery, wss_backend: WssBackend
) -> None:
    """``backend_tls.ca`` verifies a wss:// backend; a plain ws:// client is served."""
    backend_tls = {"ca": str(wss_backend.pki.ca_file)}
    with trio.fail_after(TEST_TIMEOUT):
        config = tls_config([wss_backend.url()], backend_tls=backend_tls)
        port = await start(nursery, config)
        answers = await in_thread(exchange, f"ws://{LOOPBACK}:{port}", ["to a wss backend"])

    assert answers == ["to a wss backend"]
    assert wss_backend.backend.connections == 1


async def test_wss_backend_untrusted_by_the_system_store_answers_502(
    nursery: trio.Nursery, wss_backend: WssBackend, caplog: pytest.LogCaptureFixture
) -> None:
    """Without ``ca`` the system store is used, the test CA is not in it: 502, and the log
    says the certificate failed verification."""
    with trio.fail_after(TEST_TIMEOUT):
        port = await start(nursery, tls_config([wss_backend.url()]))
        response = await in_thread(refused, f"ws://{LOOPBACK}:{port}")

    assert response.status_code == 502
    log = tunnel_log(caplog, logging.WARNING).lower()
    assert "unable to get local issuer" in log or "certificate verify" in log, log
    assert wss_backend.backend.connections == 0


async def test_wss_backend_server_name_overrides_the_host_checked(
    nursery: trio.Nursery, wss_backend: WssBackend, caplog: pytest.LogCaptureFixture
) -> None:
    """The backend is addressed as 127.0.0.1 but its certificate says localhost: that fails
    verification, unless ``server_name = "localhost"``."""
    ca = str(wss_backend.pki.ca_file)
    with trio.fail_after(TEST_TIMEOUT):
        by_ip = await start(
            nursery, tls_config([wss_backend.url(LOOPBACK)], backend_tls={"ca": ca})
        )
        mismatch = await in_thread(refused, f"ws://{LOOPBACK}:{by_ip}")
        named = await start(
            nursery,
            tls_config(
                [wss_backend.url(LOOPBACK)], backend_tls={"ca": ca, "server_name": "localhost"}
            ),
        )
        answers = await in_thread(exchange, f"ws://{LOOPBACK}:{named}", ["by name"])

    assert mismatch.status_code == 502
    assert "mismatch" in tunnel_log(caplog, logging.WARNING).lower()
    assert answers == ["by name"]
    assert wss_backend.backend.connections == 1


async def test_wss_backend_verify_false_connects_and_warns_at_start(
    nursery: trio.Nursery, wss_backend: WssBackend, caplog: pytest.LogCaptureFixture
) -> None:
    """``verify = false`` reaches a backend no store trusts, and says loudly at start that
    backends are not verified."""
    with trio.fail_after(TEST_TIMEOUT):
        port = await start(nursery, tls_config([wss_backend.url()], backend_tls={"verify": False}))
        warned_at_start = tunnel_log(caplog, logging.WARNING)
        answers = await in_thread(exchange, f"ws://{LOOPBACK}:{port}", ["unverified"])

    assert "NOT verified" in warned_at_start
    assert answers == ["unverified"]


async def test_wss_backend_requiring_a_client_certificate(
    nursery: trio.Nursery, mtls_backend: WssBackend
) -> None:
    """A backend that demands a client certificate accepts the tunnel with ``cert``/``key``
    set, and the client gets 502 without them."""
    pki = mtls_backend.pki
    client = pki.pair("tunnel-client", ["tunnel"], client=True)
    ca = str(pki.ca_file)
    with trio.fail_after(TEST_TIMEOUT):
        with_cert = await start(
            nursery,
            tls_config(
                [mtls_backend.url()],
                backend_tls={"ca": ca, "cert": str(client.cert), "key": str(client.key)},
            ),
        )
        answers = await in_thread(exchange, f"ws://{LOOPBACK}:{with_cert}", ["with a cert"])
        without = await start(nursery, tls_config([mtls_backend.url()], backend_tls={"ca": ca}))
        response = await in_thread(refused, f"ws://{LOOPBACK}:{without}")

    assert answers == ["with a cert"]
    assert response.status_code == 502
    assert mtls_backend.backend.connections == 1


# 9. TLS at both ends -------------------------------------------------------------------------


async def test_4_mib_each_way_through_tls_at_both_ends(
    nursery: trio.Nursery, pki: Pki, site: Pair, wss_backend: WssBackend
) -> None:
    """wss client → tunnel → wss backend: a 4 MiB message each way arrives byte-identical."""
    up = os.urandom(4 * MiB)
    with trio.fail_after(TEST_TIMEOUT):
        config = tls_config(
            [wss_backend.url()], tls=site.toml(), backend_tls={"ca": str(pki.ca_file)}
        )
        port = await start(nursery, config)
        answers = await in_thread(
            exchange,
            f"wss://localhost:{port}",
            [up],
            ssl=client_context(pki.ca_file),
            compression=None,
        )

    assert isinstance(answers[0], bytes)
    assert len(answers[0]) == len(up)
    assert answers[0] == up
    assert wss_backend.backend.digests == [hashlib.sha256(up).hexdigest()]


async def test_reload_picks_up_a_new_backend_ca(
    nursery: trio.Nursery,
    wss_backend: WssBackend,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``backend_tls`` files are reloaded with the listeners' (SIGHUP, or
    ``Control.reload_certificates``): a CA bundle that did not cover the backend's issuer and
    now does lets new connections through, without a restart."""
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    bundle = tmp_path / "backend-ca.pem"
    bundle.write_bytes(make_ca().cert_pem)
    control = Control()
    with trio.fail_after(TEST_TIMEOUT):
        config = tls_config([wss_backend.url()], backend_tls={"ca": str(bundle)})
        port = await start(nursery, config, control)
        before = await in_thread(refused, f"ws://{LOOPBACK}:{port}")
        replace_file(bundle, wss_backend.pki.ca_file.read_bytes())
        control.reload_certificates()
        answers = await in_thread(exchange, f"ws://{LOOPBACK}:{port}", ["new CA"])

    assert before.status_code == 502
    assert answers == ["new CA"]
    assert "backend TLS files reloaded" in tunnel_log(caplog)


async def test_a_wss_tunnel_the_tunnel_ends_gets_a_close_frame_inside_tls(
    nursery: trio.Nursery, pki: Pki, site: Pair, echo_backend: WsBackend
) -> None:
    """Polite closes work through TLS too: an idle timeout reaches a verifying client as a
    Close 1001 (idle_timeout) inside the TLS stream, not as a bare TCP close (1006)."""

    def client(url: str) -> tuple[str | bytes, object]:
        with ws_connect(url, ssl=client_context(pki.ca_file)) as ws:
            ws.send("hello")
            answer = ws.recv(timeout=CLIENT_TIMEOUT)
            try:
                ws.recv(timeout=CLIENT_TIMEOUT)
            except websockets.exceptions.ConnectionClosed as closed:
                return answer, closed.rcvd and (closed.rcvd.code, closed.rcvd.reason)
            return answer, "no close"

    with trio.fail_after(TEST_TIMEOUT):
        config = tls_config([echo_backend.url], tls=site.toml(), idle_timeout="1s")
        port = await start(nursery, config)
        answer, received = await in_thread(client, f"wss://127.0.0.1:{port}")

    assert answer == "hello"
    assert received == (1001, "idle_timeout")


async def test_a_configuration_reload_also_reloads_the_certificates_of_kept_listeners(
    nursery: trio.Nursery, pki: Pki, site: Pair, echo_backend: WsBackend
) -> None:
    """SIGHUP with a configuration file goes through ``Control.reload``: a listener kept
    across it (same address, same TLS settings) keeps its socket and its open tunnel, and its
    certificate files are read again, as SIGHUP did before reloads existed."""
    control = Control()
    context = client_context(pki.ca_file)
    url = "wss://localhost:{port}"
    with trio.fail_after(TEST_TIMEOUT):
        config = tls_config([echo_backend.url], tls=site.toml(), cert_check_interval="0s")
        port = await start(nursery, config, control)
        ws = await in_thread(ws_connect, url.format(port=port), ssl=context, legacy=True)
        try:
            before = await in_thread(echo, ws, "before")
            rotated = write_pair(site.cert, site.key, issue(pki.ca, SERVER_HOSTS))
            outcome = await control.reload(config)
            after_reload = await peer_serial(port, context)
            after = await in_thread(echo, ws, "after")
        finally:
            await in_thread(ws.close)

    assert outcome.draining == 0
    assert after_reload == rotated.serial
    assert [before, after] == ["before", "after"]
