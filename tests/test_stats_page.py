"""The ``/stats`` page in a real browser: headless Chromium driven over the DevTools protocol.

The admin listener runs in the test's nursery on 127.0.0.1 port 0 in front of plain-data
sources. Chromium is started as a subprocess with a fresh profile and
``--remote-debugging-port=0``; the port it picked is read from ``DevToolsActivePort`` in the
profile, and a ``DevTools`` client (the ``websockets`` sync client, called from a worker thread
so the trio server keeps serving) opens a page, evaluates JavaScript in it and takes screenshots.
Chromium is terminated, then killed, by the PID it was started with, whatever happens.

What is checked: the page fills in from ``stats.json`` and then, without navigating, updates a
tunnel row's bytes cell in place when the source's numbers change; rows come and go; text from
the document is inserted as text, never as markup; the close button POSTs the close. Another
test puts the page in front of a real tunnel (``serve`` with an admin listener, a raw echo
backend, a raw client): the row's bytes cell follows the bytes sent, and its close button ends
the client's connection. The screenshot test drives the page through five minutes of virtual
time against a source that moves like a real proxy, and saves a screenshot; with
``UPDATE_SCREENSHOT=1`` it also becomes ``docs/img/stats.png``.
"""

from __future__ import annotations

import base64
import json
import math
import os
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import websockets.sync.client
from chromium import browser_environment, headless, needs_chromium, stop
from rawhttp import read_to_eof
from test_admin import FakeSource, sample_stats
from test_admin_e2e import echo, eventually, serve_with_admin
from test_e2e import open_raw_tunnel

from tunnel.net.admin import AdminSource, open_admin_listener, serve_admin

LOOPBACK = "127.0.0.1"
pytestmark = needs_chromium

TEST_SECONDS = 90
"""Deadline for a whole test (``trio.fail_after``): server, browser, clean-up."""
START_SECONDS = 20
"""How long Chromium has to write ``DevToolsActivePort``."""
CALL_SECONDS = 20
"""Bound on one DevTools call."""
UPDATE_SECONDS = 10
"""How long the page has to show a change of the source (it refreshes every second)."""
POLL_SECONDS = 0.1
"""How long Chromium has to exit after SIGTERM before it gets SIGKILL."""
WIDTH = 1280
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "img" / "stats.png"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- Chromium and the DevTools protocol ------------------------------------------------------


class DevTools:
    """A blocking DevTools client on the browser endpoint, with one page session attached."""

    def __init__(self, url: str) -> None:
        self.socket = websockets.sync.client.connect(
            url, max_size=None, open_timeout=CALL_SECONDS, ping_interval=None, legacy=True
        )
        self.last_id = 0
        self.session = ""

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command (to the page session once there is one) and return its result;
        events that arrive meanwhile are dropped."""
        self.last_id += 1
        message: dict[str, Any] = {"id": self.last_id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            message["sessionId"] = self.session
        self.socket.send(json.dumps(message))
        deadline = time.monotonic() + CALL_SECONDS
        while (remaining := deadline - time.monotonic()) > 0:
            reply = json.loads(self.socket.recv(timeout=remaining))
            if reply.get("id") != self.last_id:
                continue
            if "error" in reply:
                raise RuntimeError(f"{method}: {reply['error']}")
            result: dict[str, Any] = reply["result"]
            return result
        raise TimeoutError(f"{method}: no answer within {CALL_SECONDS} s")

    def open_page(self) -> None:
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        attached = self.call("Target.attachToTarget", targetId=target, flatten=True)
        self.session = attached["sessionId"]

    def evaluate(self, expression: str) -> Any:
        answer = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in answer:
            raise RuntimeError(f"{expression!r} threw: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    def close(self) -> None:
        self.socket.close()


class Page:
    """The DevTools client as seen from trio: every call runs in a worker thread."""

    def __init__(self, devtools: DevTools) -> None:
        self.devtools = devtools

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        return await trio.to_thread.run_sync(lambda: self.devtools.call(method, **params))

    async def evaluate(self, expression: str) -> Any:
        return await trio.to_thread.run_sync(self.devtools.evaluate, expression)

    async def wait_for(self, expression: str, seconds: float = UPDATE_SECONDS) -> Any:
        """Poll ``expression`` until it is truthy, for at most ``seconds``; return its value."""
        with trio.move_on_after(seconds):
            while not (value := await self.evaluate(expression)):
                await trio.sleep(POLL_SECONDS)
            return value
        state = await self.evaluate("JSON.stringify(window.statsPage)")
        pytest.fail(f"{expression} still false after {seconds} s; statsPage = {state}")

    async def screenshot(self, height: int) -> bytes:
        await self.call(
            "Emulation.setDeviceMetricsOverride",
            width=WIDTH,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        shot = await self.call("Page.captureScreenshot", format="png")
        return base64.b64decode(shot["data"])


def chromium_args(profile: Path) -> list[str]:
    return headless(
        profile,
        "--hide-scrollbars",
        "--force-color-profile=srgb",
        f"--window-size={WIDTH},900",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        "about:blank",
    )


async def devtools_url(profile: Path, process: trio.Process) -> str:
    """The browser's DevTools websocket, from the ``DevToolsActivePort`` file it writes."""
    port_file = trio.Path(profile / "DevToolsActivePort")
    with trio.move_on_after(START_SECONDS):
        while process.returncode is None:
            if await port_file.exists():
                lines = (await port_file.read_text()).split()
                if len(lines) == 2:
                    return f"ws://{LOOPBACK}:{lines[0]}{lines[1]}"
            await trio.sleep(POLL_SECONDS)
    pytest.fail(f"chromium (exit status {process.returncode}) wrote no DevToolsActivePort")


@asynccontextmanager
async def chromium(workdir: Path) -> AsyncIterator[Page]:
    """Headless Chromium with one blank page; stopped by its own PID on the way out."""
    profile = workdir / "chromium-profile"
    profile.mkdir()
    with browser_environment() as environment:
        with (workdir / "chromium.stderr").open("wb") as stderr:
            process = await trio.lowlevel.open_process(
                chromium_args(profile),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env=environment,
            )
        try:
            url = await devtools_url(profile, process)
            devtools = await trio.to_thread.run_sync(DevTools, url)
            try:
                await trio.to_thread.run_sync(devtools.open_page)
                yield Page(devtools)
            finally:
                await trio.to_thread.run_sync(devtools.close)
        finally:
            with trio.CancelScope(shield=True):
                await stop(process)


async def start_admin(nursery: trio.Nursery, source: AdminSource) -> str:
    """Serve ``source`` in ``nursery``; return the URL of the page."""
    listener = await open_admin_listener(f"{LOOPBACK}:0")
    nursery.start_soon(serve_admin, listener, source)
    return f"http://{LOOPBACK}:{listener.socket.getsockname()[1]}/stats"


async def load(page: Page, url: str) -> None:
    await page.call("Page.navigate", url=url)
    await page.wait_for("window.statsPage && window.statsPage.refreshes >= 1")


# --- the page updates itself in place --------------------------------------------------------


def cell(tunnel_id: str, name: str) -> str:
    selector = json.dumps(f'tr[data-tunnel-id="{tunnel_id}"] .{name}')
    return f"(document.querySelector({selector})?.textContent ?? null)"


async def test_the_page_updates_rows_in_place(nursery: trio.Nursery, tmp_path: Path) -> None:
    source = FakeSource()
    with trio.fail_after(TEST_SECONDS):
        url = await start_admin(nursery, source)
        async with chromium(tmp_path) as page:
            await load(page, url)
            assert await page.evaluate(cell("17", "bytes-up")) == "10 B"
            assert await page.evaluate(cell("17", "client")) == "127.0.0.1:5555"
            assert await page.evaluate(cell("17", "age")) == "1.2s"
            load_id = await page.evaluate("statsPage.loadId")
            origin = await page.evaluate("performance.timeOrigin")

            tunnel = source.document["tunnels"][0]
            tunnel["bytes_up"] = 5 * 2**20 + 300 * 2**10
            tunnel["age"] = 185
            await page.wait_for(f"{cell('17', 'bytes-up')} === '5.3 MiB'")
            assert await page.evaluate(cell("17", "age")) == "3m 05s"
            assert await page.evaluate("statsPage.loadId") == load_id
            assert await page.evaluate("performance.timeOrigin") == origin
            assert await page.evaluate("performance.getEntriesByType('navigation').length") == 1
            assert await page.evaluate("statsPage.refreshes") >= 2

            # Rows come and go; text from the document stays text.
            marked_up = "<img src=x onerror=window.pwned=1>"
            source.document["tunnels"] = [dict(tunnel, id="2-18", route=marked_up)]
            source.document["routes"][0]["backends"][0]["state"] = "down"
            await page.wait_for(f"{cell('2-18', 'route')} !== null")
            assert await page.evaluate(cell("17", "route")) is None
            assert await page.evaluate(cell("2-18", "route")) == marked_up
            assert await page.evaluate("document.querySelectorAll('main img').length") == 0
            assert await page.evaluate("window.pwned === undefined")
            assert await page.evaluate("document.querySelector('#routes .pill.down') !== null")

            # The close button asks twice, then POSTs (a same-origin POST passes the check).
            source.open_ids.add("2-18")
            button = "document.querySelector('tr[data-tunnel-id=\"2-18\"] button.close')"
            await page.evaluate(f"{button}.click()")
            assert source.closed == []
            await page.evaluate(f"{button}.click()")
            await page.wait_for("document.querySelector('#notice').textContent !== ''")
            assert source.closed == ["2-18"]
            assert await page.evaluate("document.querySelector('#notice').textContent") == (
                "Closed tunnel 2-18."
            )
            assert await page.evaluate("statsPage.lastError") == ""


async def text_becomes(page: Page, expression: str, text: str, seconds: float) -> None:
    """Poll ``expression`` until it is ``text``, for at most ``seconds``."""
    seen = None
    with trio.move_on_after(seconds):
        while (seen := await page.evaluate(expression)) != text:
            await trio.sleep(POLL_SECONDS)
        return
    pytest.fail(f"{expression} is {seen!r}, not {text!r}, after {seconds} s")


async def test_the_page_follows_a_real_tunnel_and_closes_it(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(TEST_SECONDS):
        generation, port, admin = await serve_with_admin(nursery, caplog)
        client, rest = await open_raw_tunnel(port)
        await echo(client, b"x" * 1000, rest)

        async def listed() -> list[dict[str, Any]]:
            tunnels: list[dict[str, Any]] = (await generation.stats())["tunnels"]
            return tunnels

        [tunnel] = await eventually("the tunnel in the generation's statistics", listed)
        tunnel_id = tunnel["id"]
        bytes_up = cell(tunnel_id, "bytes-up")
        async with chromium(tmp_path) as page:
            await load(page, f"http://{LOOPBACK}:{admin}/stats")
            await page.wait_for(f"{bytes_up} !== null")
            before = await page.evaluate(bytes_up)
            load_id = await page.evaluate("statsPage.loadId")

            await echo(client, b"y" * 200 * 1024)
            # 1000 + 204800 bytes = 201 KiB; the page refreshes itself once a second.
            await text_becomes(page, bytes_up, "201 KiB", seconds=15)
            assert await page.evaluate("statsPage.loadId") == load_id, "updated in place"
            assert await page.evaluate("performance.getEntriesByType('navigation').length") == 1

            selector = json.dumps(f'tr[data-tunnel-id="{tunnel_id}"] button.close')
            button = f"document.querySelector({selector})"
            await page.evaluate(f"{button}.click()")
            await page.evaluate(f"{button}.click()")
            await page.wait_for("document.querySelector('#notice').textContent !== ''")
            notice = await page.evaluate("document.querySelector('#notice').textContent")
            ended = await read_to_eof(client)
            await page.wait_for(f"{bytes_up} === null")
            last_error = await page.evaluate("statsPage.lastError")
        await client.aclose()

    assert before == "1000 B"
    assert notice == f"Closed tunnel {tunnel_id}."
    assert ended == b"", "the client's tunnel ended"
    assert (await generation.stats())["tunnels"] == []
    [line] = [r for r in caplog.records if r.getMessage() == "tunnel closed"]
    assert line.fields["reason"] == "admin"  # type: ignore[attr-defined]
    assert last_error == ""


# --- a screenshot of a proxy at work ---------------------------------------------------------


@dataclass
class Flow:
    """One tunnel of the screenshot: open from ``start`` to ``end`` (seconds of the run)."""

    client: str
    route: str
    backend: str
    start: int
    end: int
    up: float
    """Bytes a second, client to backend; the backend sends ``down`` times as much."""
    down: float = 3.0


@dataclass
class BusySource:
    """A proxy at work: every ``stats()`` is one second later, tunnels open and close, and the
    backends' byte totals grow with the traffic of their open tunnels."""

    second: int = 0
    uptime: float = 3 * 86400 + 4 * 3600 + 17 * 60
    totals: dict[str, list[float]] = field(
        default_factory=lambda: {
            "chat-1": [412, 8.1e9, 2.9e10],
            "chat-2": [377, 7.4e9, 2.6e10],
            "feed-1": [96, 1.2e9, 9.8e10],
        }
    )
    flows: list[Flow] = field(default_factory=list)

    def __post_init__(self) -> None:
        clients = [
            "203.0.113.7:52144",
            "198.51.100.23:40110",
            "[2001:db8::42]:51000",
            "192.0.2.88:61203",
            "203.0.113.154:49822",
            "198.51.100.9:33871",
            "[2001:db8:7::15]:44102",
            "192.0.2.201:58016",
            "203.0.113.61:40993",
        ]
        for i, client in enumerate(clients):
            route, backend = ("feed", "feed-1") if i % 4 == 3 else ("chat", f"chat-{1 + i % 2}")
            start = -4000 + 700 * i if i < 4 else 40 * i - 120
            end = 10_000 if i % 3 != 2 else 180 + 25 * i
            self.flows.append(Flow(client, route, backend, start, end, 900.0 + 2400 * (i % 5)))

    async def healthy(self) -> bool:
        return True

    async def metrics(self) -> tuple[bytes, str]:
        return b"", "text/plain"

    async def close_tunnel(self, tunnel_id: str) -> bool:
        return False

    async def drain_backend(self, route: str, backend: str) -> dict[str, Any] | None:
        return None

    async def enable_backend(self, route: str, backend: str) -> dict[str, Any] | None:
        return None

    async def stats(self) -> dict[str, Any]:
        self.second += 1
        now = self.second
        wave = 1.0 + 0.6 * math.sin(now / 23.0) + 0.3 * math.sin(now / 7.0)
        open_flows = [(i, f) for i, f in enumerate(self.flows) if f.start <= now < f.end]
        for _, flow in open_flows:
            total = self.totals[flow.backend]
            total[1] += flow.up * wave
            total[2] += flow.up * flow.down * wave
        for flow in self.flows:
            if flow.start == now:
                self.totals[flow.backend][0] += 1
        routes = {"chat": ["chat-1", "chat-2"], "feed": ["feed-1"]}
        states = {"chat-1": "up", "chat-2": "draining", "feed-1": "up"}
        urls = {
            "chat-1": "ws://10.0.0.5:8080",
            "chat-2": "ws://10.0.0.6:8080",
            "feed-1": "wss://feed.internal:443/v2/stream",
        }
        hosts = {"chat": ["chat.example.com"], "feed": ["feed.example.com", "*.example.org"]}
        prefixes = {"chat": "/ws/", "feed": "/"}

        def opened(name: str) -> int:
            return sum(1 for _, f in open_flows if f.backend == name)

        return {
            "version": "0.1.0",
            "uptime": self.uptime + now,
            "healthy": True,
            "listeners": [
                {"address": "0.0.0.0:443", "tls": True, "redirect_https": False},
                {"address": "0.0.0.0:80", "tls": False, "redirect_https": True},
            ],
            "routes": [
                {
                    "name": route,
                    "hosts": hosts[route],
                    "path_prefix": prefixes[route],
                    "open_tunnels": sum(opened(b) for b in backends),
                    "backends": [
                        {
                            "name": b,
                            "url": urls[b],
                            "state": states[b],
                            "open_tunnels": opened(b),
                            "tunnels_total": int(self.totals[b][0]),
                            "bytes_up": int(self.totals[b][1]),
                            "bytes_down": int(self.totals[b][2]),
                        }
                        for b in backends
                    ],
                }
                for route, backends in routes.items()
            ],
            "tunnels": [
                {
                    "id": str(1041 + i),
                    "client": f.client,
                    "route": f.route,
                    "backend": f.backend,
                    "age": now - f.start + 0.4,
                    "idle": (i * 7.3 + now * 0.37) % 9.0,
                    "bytes_up": int(f.up * (now - f.start) * 0.9),
                    "bytes_down": int(f.up * f.down * (now - f.start) * 0.9),
                }
                for i, f in open_flows
            ],
        }


async def test_screenshot_of_five_busy_minutes(nursery: trio.Nursery, tmp_path: Path) -> None:
    source = BusySource()
    with trio.fail_after(TEST_SECONDS):
        url = await start_admin(nursery, source)
        async with chromium(tmp_path) as page:
            await load(page, url)
            # Timers run as fast as the page can fetch: five minutes of refreshes in seconds.
            await page.call(
                "Emulation.setVirtualTimePolicy",
                policy="pauseIfNetworkFetchesPending",
                budget=300_000,
            )
            await page.wait_for("statsPage.refreshes >= 290", seconds=60)
            await page.call("Emulation.setVirtualTimePolicy", policy="advance")
            # Under the virtual-time budget the page's fetch timeout can fire while a body is
            # still read (a virtual-time artefact): back in real time, refreshes must succeed
            # again, which clears the error.
            done = await page.evaluate("statsPage.refreshes")
            await page.evaluate("refresh(), 0")
            await page.wait_for(
                f"statsPage.refreshes > {done} && statsPage.lastError === ''", seconds=10
            )
            rows = await page.evaluate("document.querySelectorAll('#tunnels tbody tr').length")
            assert rows == len((await source.stats())["tunnels"])
            height = await page.evaluate("document.documentElement.scrollHeight")
            png = await page.screenshot(int(height))
    assert png.startswith(PNG_SIGNATURE)
    (tmp_path / "stats.png").write_bytes(png)
    if os.environ.get("UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        SCREENSHOT.write_bytes(png)


async def test_busy_source_matches_the_documented_shape() -> None:
    document = await BusySource().stats()
    shape = sample_stats()
    assert document.keys() == shape.keys()
    assert document["routes"][0].keys() == shape["routes"][0].keys()
    assert document["routes"][0]["backends"][0].keys() == shape["routes"][0]["backends"][0].keys()
    assert document["tunnels"][0].keys() == shape["tunnels"][0].keys()
