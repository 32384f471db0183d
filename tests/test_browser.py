"""A real browser through the tunnel: headless Chromium opens a WebSocket and echoes messages.

The harness, reusable for any ``ws://`` or ``wss://`` URL:

1. a tiny trio + h11 HTTP server on 127.0.0.1 port 0 serves one page whose script opens a
   WebSocket to the URL written into the page, sends text messages and a 100 KiB binary message
   of a known pattern, checks that every echo comes back identical and in order, then reports by
   fetching ``/result?ok=1`` or ``/result?ok=0&why=...`` from the same server;
2. Chromium runs headless as a subprocess on that page with a fresh profile; the harness waits
   for the report on a ``trio.Event`` for at most ``REPORT_SECONDS`` (the whole test is under
   ``trio.fail_after(TEST_SECONDS)``), and Chromium is terminated, then killed, by the PID it was
   started with, whatever happens; its stderr is kept in ``tmp_path`` and quoted on failure.

The backend is conftest's real ``websockets`` echo server, which also records what it received,
so the test checks both ends: the browser saw its echoes, and the backend saw the browser's bytes.
The tests skip when the ``chromium`` binary is missing; the ``wss://`` test also while
``tunnel.certs`` or ``[[listeners]] tls`` is missing, naming which.

Chromium quirks the flags answer: ``--ignore-certificate-errors`` accepts the development CA,
which the browser does not trust (without it the handshake fails with ``net_error -202``);
``--no-proxy-server`` keeps a proxy from the environment out of the loopback test. The page's
``error`` event says nothing (by design); Chromium's stderr names the ``net_error``. D-Bus errors
on stderr are harmless without a session bus and are left out of the quote.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

import h11
import pytest
import trio
from chromium import browser_environment, headless, needs_chromium, stop

from tunnel import Config, serve
from tunnel.errors import ConfigError

if TYPE_CHECKING:
    from conftest import WsBackend

LOOPBACK = "127.0.0.1"

TEST_SECONDS = 30
"""Deadline for a whole test (``trio.fail_after``): tunnel, page server, browser, clean-up."""
REPORT_SECONDS = 20
"""How long the harness waits for the page's report, Chromium's start-up included."""
PAGE_SECONDS = 15
"""The page's own deadline: it reports a failure if the exchange has not finished by then."""
"""How long Chromium has to exit after SIGTERM before it gets SIGKILL (it takes ~30 ms)."""
STDERR_TAIL = 3000
"""Characters of Chromium's stderr quoted in a failure message."""
STDERR_NOISE = ("dbus/",)
MAX_REQUEST_BYTES = 64 * 1024

BINARY_SIZE = 100 * 1024
TEXT_MESSAGES = ("hello", "héllo wörld ✓", "x" * 1000)


def binary_pattern() -> bytes:
    """The 100 KiB binary message; the page builds the same bytes with the same formula."""
    return bytes((i * 31 + 7) & 0xFF for i in range(BINARY_SIZE))


def sent_messages() -> list[str | bytes]:
    """What the page sends, in order: the first text message, the binary one, the rest."""
    return [TEXT_MESSAGES[0], binary_pattern(), *TEXT_MESSAGES[1:]]


PAGE = """<!doctype html>
<meta charset="utf-8">
<title>tunnel browser test</title>
<script>
"use strict";
const WS_URL = __WS_URL__;
const TEXTS = __TEXTS__;
const SIZE = __SIZE__;
let reported = false;

function report(ok, why) {
  if (reported) return;
  reported = true;
  let query = "ok=" + (ok ? "1" : "0");
  if (why) query += "&why=" + encodeURIComponent(why);
  fetch("/result?" + query).catch(() => {});
}

function pattern() {
  const bytes = new Uint8Array(SIZE);
  for (let i = 0; i < SIZE; i++) bytes[i] = (i * 31 + 7) & 0xff;
  return bytes;
}

function describe(m) {
  return typeof m === "string"
    ? "text of " + m.length + " chars"
    : "binary of " + m.byteLength + " bytes";
}

function same(expected, got) {
  if (typeof expected === "string") return got === expected;
  if (!(got instanceof ArrayBuffer) || got.byteLength !== expected.byteLength) return false;
  const view = new Uint8Array(got);
  for (let i = 0; i < view.length; i++) if (view[i] !== expected[i]) return false;
  return true;
}

const sent = [TEXTS[0], pattern(), ...TEXTS.slice(1)];
let received = 0;
setTimeout(() => report(false, "no full echo within __PAGE_SECONDS__ s"), __PAGE_SECONDS__ * 1000);
try {
  const ws = new WebSocket(WS_URL);
  ws.binaryType = "arraybuffer";
  ws.onopen = () => { for (const m of sent) ws.send(m); };
  ws.onmessage = (event) => {
    const expected = sent[received];
    if (expected === undefined) return report(false, "an extra message: " + describe(event.data));
    if (!same(expected, event.data)) {
      return report(false, "echo " + received + " differs: sent " + describe(expected)
        + ", got " + describe(event.data));
    }
    received += 1;
    if (received === sent.length) {
      ws.close(1000, "done");
      report(true, "");
    }
  };
  ws.onerror = () => report(false, "error event after " + received + " echoes");
  ws.onclose = (event) => report(false, "closed after " + received + " echoes, code "
    + event.code + " " + event.reason);
} catch (error) {
  report(false, "new WebSocket threw " + error);
}
</script>
"""


def render_page(ws_url: str) -> bytes:
    replacements = {
        "__WS_URL__": json.dumps(ws_url),
        "__TEXTS__": json.dumps(list(TEXT_MESSAGES)),
        "__SIZE__": str(BINARY_SIZE),
        "__PAGE_SECONDS__": str(PAGE_SECONDS),
    }
    page = PAGE
    for marker, value in replacements.items():
        page = page.replace(marker, value)
    return page.encode("utf-8")


# The page server ---------------------------------------------------------------------------


@dataclasses.dataclass
class PageServer:
    """Serves the page at ``/`` and waits for the page's report at ``/result``."""

    page: bytes
    port: int = 0
    reported: trio.Event = dataclasses.field(default_factory=trio.Event)
    result: dict[str, str] = dataclasses.field(default_factory=dict)
    """The report's query: ``ok`` is ``"1"`` or ``"0"``; ``why`` says what went wrong."""
    requests: list[str] = dataclasses.field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/"

    async def handle(self, stream: trio.SocketStream) -> None:
        """One request per connection: read its head with h11, answer, close."""
        async with stream:
            connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
            # A speculative connection that closes early or garbles its head is no concern of
            # the test: only the page's requests count.
            with suppress(h11.ProtocolError, trio.BrokenResourceError):
                await self._answer(connection, stream)

    async def _answer(self, connection: h11.Connection, stream: trio.SocketStream) -> None:
        request = await self._read_request(connection, stream)
        if request is None:
            return
        target = request.target.decode("ascii", "replace")
        self.requests.append(target)
        parts = urlsplit(target)
        if parts.path == "/":
            await self._respond(connection, stream, 200, "text/html; charset=utf-8", self.page)
        elif parts.path == "/result":
            if not self.reported.is_set():
                query = parse_qs(parts.query, keep_blank_values=True)
                self.result = {name: values[0] for name, values in query.items()}
                self.reported.set()
            await self._respond(connection, stream, 204, None, b"")
        else:
            await self._respond(connection, stream, 404, "text/plain", b"not found\n")

    @staticmethod
    async def _read_request(
        connection: h11.Connection, stream: trio.SocketStream
    ) -> h11.Request | None:
        while True:
            event = connection.next_event()
            if isinstance(event, h11.Request):
                return event
            if event is h11.NEED_DATA:
                connection.receive_data(await stream.receive_some(MAX_REQUEST_BYTES))
                continue
            return None  # the peer closed, or sent something that is not a request

    @staticmethod
    async def _respond(
        connection: h11.Connection,
        stream: trio.SocketStream,
        status: int,
        content_type: str | None,
        body: bytes,
    ) -> None:
        headers = [("Content-Length", str(len(body))), ("Connection", "close")]
        headers += [("Cache-Control", "no-store")]
        if content_type is not None:
            headers.append(("Content-Type", content_type))
        data = connection.send(h11.Response(status_code=status, headers=headers))
        if body:
            data += connection.send(h11.Data(data=body))
        data += connection.send(h11.EndOfMessage())
        await stream.send_all(data)


async def start_page_server(nursery: trio.Nursery, ws_url: str) -> PageServer:
    """Serve the page that opens ``ws_url`` on a loopback port in ``nursery``."""
    server = PageServer(render_page(ws_url))
    listeners: list[trio.SocketListener] = await nursery.start(
        partial(trio.serve_tcp, server.handle, 0, host=LOOPBACK)
    )
    server.port = listeners[0].socket.getsockname()[1]
    return server


# Chromium ------------------------------------------------------------------------------------


def chromium_args(profile: Path, url: str) -> list[str]:
    return headless(profile, "--ignore-certificate-errors", url)


@asynccontextmanager
async def run_chromium(url: str, workdir: Path) -> AsyncIterator[trio.Process]:
    """Chromium on ``url`` for the body of the ``async with``; then SIGTERM to the PID we
    started, up to ``chromium.EXIT_SECONDS`` to exit, then SIGKILL. Its stderr goes to
    ``workdir / "chromium.stderr"``."""
    profile = workdir / "chromium-profile"
    await trio.Path(profile).mkdir()
    log = await trio.Path(workdir / "chromium.stderr").open("wb")
    try:
        with browser_environment() as environment:
            process = await trio.lowlevel.open_process(
                chromium_args(profile, url),
                stdin=subprocess.DEVNULL,
                stdout=log.wrapped,
                stderr=log.wrapped,
                env=environment,
            )
            try:
                yield process
            finally:
                with trio.CancelScope(shield=True):
                    await stop(process)
    finally:
        with trio.CancelScope(shield=True):
            await log.aclose()


async def stderr_tail(workdir: Path) -> str:
    """The end of Chromium's stderr without its D-Bus complaints (no session bus in CI), which
    would otherwise crowd out the lines that matter, like ``net_error -202``."""
    path = trio.Path(workdir / "chromium.stderr")
    if not await path.exists():
        return "(no stderr file)"
    lines = (await path.read_bytes()).decode("utf-8", "replace").splitlines()
    kept = [line for line in lines if not any(noise in line for noise in STDERR_NOISE)]
    dropped = f"({len(lines) - len(kept)} D-Bus lines left out)\n" if len(kept) < len(lines) else ""
    return dropped + ("\n".join(kept)[-STDERR_TAIL:] or "(nothing else)")


@dataclasses.dataclass(frozen=True)
class BrowserRun:
    """What one browser run reported, and what the harness saw."""

    result: dict[str, str]
    requests: list[str]
    """The page server's request targets, in order."""
    page_origin: str
    """The page's origin, as the browser's ``Origin`` header should name it."""
    seconds: float


async def open_in_chromium(ws_url: str, workdir: Path) -> BrowserRun:
    """Have headless Chromium open ``ws_url`` from a page, echo the messages, and report.

    Fails (quoting Chromium's stderr) when the page reports a failure, Chromium exits before
    the report, or no report arrives within ``REPORT_SECONDS``."""
    start = trio.current_time()
    problem = ""
    async with trio.open_nursery() as nursery:
        server = await start_page_server(nursery, ws_url)
        with trio.move_on_after(REPORT_SECONDS) as deadline:
            async with run_chromium(server.url, workdir) as process:
                problem = await report_or_exit(server, process)
        if deadline.cancelled_caught:
            problem = f"no report from the page within {REPORT_SECONDS} s"
        nursery.cancel_scope.cancel()
    if not problem and server.result.get("ok") != "1":
        problem = f"the page reported a failure: {server.result.get('why')!r}"
    if problem:
        pytest.fail(
            f"{problem}; result {server.result}, requests {server.requests}"
            f"\n--- chromium stderr (tail) ---\n{await stderr_tail(workdir)}"
        )
    origin = server.url.rstrip("/")
    return BrowserRun(dict(server.result), server.requests, origin, trio.current_time() - start)


async def report_or_exit(server: PageServer, process: trio.Process) -> str:
    """Wait for the page's report or Chromium's exit, whichever comes first; return what went
    wrong ("" when the report came)."""
    async with trio.open_nursery() as race:

        async def first(event: Callable[[], Awaitable[object]]) -> None:
            await event()
            race.cancel_scope.cancel()

        race.start_soon(first, server.reported.wait)
        race.start_soon(first, process.wait)
    if server.reported.is_set():
        return ""
    return f"chromium exited with status {process.returncode} before the page reported"


def digests(messages: list[str | bytes]) -> list[str]:
    return [hashlib.sha256(m.encode() if isinstance(m, str) else m).hexdigest() for m in messages]


# The tests -----------------------------------------------------------------------------------


def config_toml(backend_url: str, listener: str = "") -> str:
    """One listener on 127.0.0.1 port 0 (plus the ``listener`` lines), one route to the backend."""
    return f"""
        [[listeners]]
        listen = "{LOOPBACK}:0"
        {listener}

        [[routes]]
        name = "default"
        backends = [{{ name = "echo", url = "{backend_url}" }}]
        """


async def start_tunnel(nursery: trio.Nursery, config: Config) -> int:
    """Serve the tunnel in ``nursery``; return its first listener's port."""
    listeners: list[trio.SocketListener] = await nursery.start(serve, config)
    port: int = listeners[0].socket.getsockname()[1]
    return port


@needs_chromium
async def test_chromium_opens_a_websocket_through_a_plain_listener(
    nursery: trio.Nursery, echo_backend: WsBackend, tmp_path: Path
) -> None:
    with trio.fail_after(TEST_SECONDS):
        port = await start_tunnel(nursery, Config.from_toml(config_toml(echo_backend.url)))
        run = await open_in_chromium(f"ws://{LOOPBACK}:{port}/", tmp_path)

    assert run.requests[0] == "/"
    assert echo_backend.connections == 1
    assert echo_backend.digests == digests(sent_messages())
    headers = {name.lower(): value for name, value in echo_backend.request_headers[0].items()}
    assert headers["origin"] == run.page_origin
    assert "Chrome/" in headers["user-agent"]


def tls_config_or_skip(cert: Path, key: Path, backend_url: str) -> Config:
    """The config with a TLS listener; skips only while ``Config`` does not know
    ``[[listeners]] tls``, any other error fails."""
    tls = f"tls = {{ cert = {json.dumps(str(cert))}, key = {json.dumps(str(key))} }}"
    try:
        return Config.from_toml(config_toml(backend_url, tls))
    except ConfigError as exc:
        if exc.key == "listeners[0].tls" and exc.problem.startswith("unknown key"):
            pytest.skip(f"TLS listeners are not built yet: Config refuses listeners.tls ({exc})")
        raise


@pytest.fixture
def site_cert(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for localhost and 127.0.0.1 from a fresh development CA, and its key, as
    PEM files; skips only while ``tunnel.certs`` does not exist."""
    certs = pytest.importorskip(
        "tunnel.certs", reason="tunnel.certs (make_ca, issue) is not written yet"
    )
    site = certs.issue(certs.make_ca(), ["localhost", LOOPBACK])
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(site.cert_pem)
    key.write_bytes(site.key_pem)
    return cert, key


@needs_chromium
async def test_chromium_opens_a_secure_websocket_through_a_tls_listener(
    nursery: trio.Nursery, echo_backend: WsBackend, site_cert: tuple[Path, Path], tmp_path: Path
) -> None:
    config = tls_config_or_skip(*site_cert, echo_backend.url)
    with trio.fail_after(TEST_SECONDS):
        port = await start_tunnel(nursery, config)
        # localhost, as a browser user would write it, and a name the certificate covers.
        run = await open_in_chromium(f"wss://localhost:{port}/", tmp_path)

    assert run.requests[0] == "/"
    assert echo_backend.connections == 1
    assert echo_backend.digests == digests(sent_messages())
    headers = {name.lower(): value for name, value in echo_backend.request_headers[0].items()}
    assert headers["origin"] == run.page_origin
