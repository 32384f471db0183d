"""The admin listener end to end: a real tunnel, and the admin endpoints asked over real TCP.

In process: ``serve`` with ``[admin] listen = "127.0.0.1:0"`` in front of a raw echo backend;
the admin port is read from the ``admin listening`` log line, and a raw client tunnel is looked
at and closed through ``/stats.json``, ``/metrics`` and ``POST /tunnels/<id>/close``.

As a subprocess: ``tunnel run --workers 2 --admin ...`` in front of a ``websockets`` echo
backend, with 16 real ``websockets`` clients; worker 1 answers for both workers (ids ``N-id``,
``tunnel_*`` summed, ``process_*`` per worker) and routes a close to the worker that holds the
tunnel. Both ports are 0 and read from the supervisor's log, so no other test on the machine can
take them between a probe and the bind. The subprocess is stopped by the ``trio.Process`` this
test started (SIGTERM, then SIGKILL), never by name; the supervisor stops its own workers.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import websockets.sync.client
from conftest import WsBackend
from prometheus_client.parser import text_string_to_metric_families
from rawhttp import LOOPBACK, read_exactly, read_to_eof
from test_admin import Answer, call
from test_e2e import echo_after_upgrade, open_raw_tunnel, start_raw_backend
from websockets.exceptions import ConnectionClosed

from tunnel import Config, Control, serve
from tunnel.logs import LOGGER_NAME
from tunnel.reasons import CloseReason
from tunnel.server import Generation

WAIT_SECONDS = 30.0
"""Bound on waiting for anything the tunnel should do; healthy runs take well under a second."""
TEST_SECONDS = 90.0
"""Bound on a whole test: start, every wait, the stop of a subprocess."""
POLL_SECONDS = 0.02
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
Labels = tuple[tuple[str, str], ...]


async def eventually(what: str, check: Callable[[], Awaitable[Any]]) -> Any:
    """Poll ``check`` (bounded by count and time) until it returns something truthy."""
    with trio.move_on_after(WAIT_SECONDS):
        for _ in range(int(WAIT_SECONDS / POLL_SECONDS) + 1):
            if result := await check():
                return result
            await trio.sleep(POLL_SECONDS)
    raise AssertionError(f"gave up waiting for {what} after {WAIT_SECONDS} s")


async def get(port: int, target: str) -> Answer:
    return await call(port, "GET", target)


async def stats(port: int) -> dict[str, Any]:
    answer = await get(port, "/stats.json")
    assert answer.status == 200, answer
    document: dict[str, Any] = answer.json
    return document


async def metrics(port: int) -> dict[tuple[str, Labels], float]:
    """``/metrics`` as Prometheus' parser reads it: (name, sorted labels) → value."""
    answer = await get(port, "/metrics")
    assert (answer.status, answer.headers["content-type"]) == (200, METRICS_TYPE)
    found: dict[tuple[str, Labels], float] = {}
    for family in text_string_to_metric_families(answer.body.decode()):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in found, f"{key} written twice"
            found[key] = sample.value
    return found


async def close(port: int, tunnel_id: str) -> Answer:
    return await call(port, "POST", f"/tunnels/{tunnel_id}/close")


# --- in process ------------------------------------------------------------------------------

ROUTE = "echo"
BYTES_UP = ("tunnel_bytes_total", (("backend", "b0"), ("direction", "up"), ("route", ROUTE)))
BYTES_DOWN = ("tunnel_bytes_total", (("backend", "b0"), ("direction", "down"), ("route", ROUTE)))
OPEN = ("tunnel_open_tunnels", (("backend", "b0"), ("route", ROUTE)))


async def serve_with_admin(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> tuple[Generation, int, int]:
    """A tunnel with an admin listener in front of a raw echo backend: (generation, tunnel
    port, admin port), the admin port as the ``admin listening`` log line gives it."""
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    backend = await start_raw_backend(nursery, echo_after_upgrade)
    config = Config.from_mapping(
        {
            "admin": {"listen": f"{LOOPBACK}:0"},
            "listeners": [{"listen": f"{LOOPBACK}:0"}],
            "routes": [{"name": ROUTE, "backends": [{"name": "b0", "url": backend}]}],
        }
    )
    control = Control()
    listeners = await nursery.start(partial(serve, config, control=control))
    assert control.generation is not None
    [line] = [r for r in caplog.records if r.getMessage() == "admin listening"]
    host, _, port = line.fields["address"].rpartition(":")  # type: ignore[attr-defined]
    assert host == LOOPBACK
    return control.generation, listeners[0].socket.getsockname()[1], int(port)


async def echo(client: trio.SocketStream, data: bytes, received: bytes = b"") -> None:
    """Send ``data`` through a raw tunnel to the echo backend and read it back (``received``:
    echoed bytes already in hand), reading while sending, so no buffer has to hold it all."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, data)
        echoed = await read_exactly(client, len(received) + len(data), received)
    assert echoed == received + data


def client_address(client: trio.SocketStream) -> str:
    return f"{LOOPBACK}:{client.socket.getsockname()[1]}"


async def test_healthz_stats_and_metrics_show_a_real_tunnel_while_it_is_open(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(TEST_SECONDS):
        _, port, admin = await serve_with_admin(nursery, caplog)
        healthz = await get(admin, "/healthz")
        client, rest = await open_raw_tunnel(port)
        address = client_address(client)
        await echo(client, b"x" * 1000, rest)

        async def listed() -> list[dict[str, Any]]:
            document = await stats(admin)
            tunnels: list[dict[str, Any]] = document["tunnels"]
            done = tunnels and tunnels[0]["bytes_up"] == 1000 and tunnels[0]["bytes_down"] >= 1000
            return tunnels if done else []

        [tunnel] = await eventually("the tunnel in /stats.json", listed)
        first = await metrics(admin)

        await echo(client, b"y" * 5000)

        async def grown() -> dict[tuple[str, Labels], float] | None:
            scrape = await metrics(admin)
            done = scrape[BYTES_UP] >= first[BYTES_UP] + 5000
            return scrape if done and scrape[BYTES_DOWN] >= first[BYTES_DOWN] + 5000 else None

        second = await eventually("the bytes to grow in /metrics", grown)
        still_open = await stats(admin)
        await client.aclose()

    assert (healthz.status, healthz.body) == (200, b"ok\n")
    assert tunnel["route"] == ROUTE
    assert tunnel["backend"] == "b0"
    assert tunnel["client"] == address
    assert tunnel["bytes_up"] == first[BYTES_UP] == 1000
    # Down also counts the backend's 101 head, which the engine writes to the client first.
    assert tunnel["bytes_down"] == first[BYTES_DOWN] >= 1000
    assert second[BYTES_UP] - first[BYTES_UP] == 5000, "counted while the tunnel is open"
    assert second[BYTES_DOWN] - first[BYTES_DOWN] == 5000
    assert first[OPEN] == second[OPEN] == 1
    assert [t["id"] for t in still_open["tunnels"]] == [tunnel["id"]]
    assert still_open["routes"][0]["backends"][0]["open_tunnels"] == 1


async def test_post_close_ends_that_tunnel_with_reason_admin_and_unknown_ids_are_404(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(TEST_SECONDS):
        _, port, admin = await serve_with_admin(nursery, caplog)
        kept, kept_rest = await open_raw_tunnel(port)
        doomed, doomed_rest = await open_raw_tunnel(port)
        await echo(kept, b"k", kept_rest)
        await echo(doomed, b"d", doomed_rest)

        async def both_listed() -> dict[str, str]:
            tunnels = (await stats(admin))["tunnels"]
            return {t["client"]: t["id"] for t in tunnels} if len(tunnels) == 2 else {}

        ids = await eventually("both tunnels in /stats.json", both_listed)
        doomed_id, kept_id = ids[client_address(doomed)], ids[client_address(kept)]

        closed = await close(admin, doomed_id)
        after_close = await read_to_eof(doomed)
        await echo(kept, b"still here")

        async def logged() -> list[logging.LogRecord]:
            return [r for r in caplog.records if r.getMessage() == "tunnel closed"]

        [line] = await eventually("the 'tunnel closed' line", logged)
        remaining = [t["id"] for t in (await stats(admin))["tunnels"]]
        again = await close(admin, doomed_id)
        unknown = await close(admin, "999999")
        scrape = await metrics(admin)
        await kept.aclose()

    assert (closed.status, closed.json) == (200, {"closed": doomed_id})
    assert after_close == b"", "the client's tunnel ends: EOF, and nothing after it"
    assert line.fields["tunnel"] == doomed_id  # type: ignore[attr-defined]
    assert line.fields["reason"] == CloseReason.ADMIN  # type: ignore[attr-defined]
    assert remaining == [kept_id]
    assert (again.status, again.json) == (404, {"error": f"no open tunnel with id {doomed_id}"})
    assert (unknown.status, unknown.json) == (404, {"error": "no open tunnel with id 999999"})
    assert scrape[("tunnel_closed_total", (("reason", "admin"), ("route", ROUTE)))] == 1
    assert scrape[OPEN] == 1


# --- two worker processes behind one admin address -------------------------------------------

CLIENTS = 16
"""Connections spread over two workers by SO_REUSEPORT's hash of each 4-tuple; all 16 landing
on one worker happens with probability 2 * 2**-16 = 2**-15, a failure accepted as that rare."""
ADMIN_ADDRESS = re.compile(r" admin listening address=127\.0\.0\.1:(\d+)")
LISTEN_ADDRESS = re.compile(r" starting workers workers=2 pid=\d+ listen=127\.0\.0\.1:(\d+)")
WORKER_LISTENING = re.compile(r" info listening address=\S+ routes=\S+ worker=(\d+)")
TUNNEL_ID = re.compile(r"([12])-(\d+)")


class Subprocess:
    """The ``tunnel run`` this test started: its ``trio.Process`` and its log file."""

    def __init__(self, process: trio.Process, log_path: Path) -> None:
        self.process = process
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_for_log(self, what: str, ready: Callable[[str], Any]) -> Any:
        async def check() -> Any:
            assert self.process.returncode is None, f"exited early:\n{self.log()}"
            return ready(self.log())

        try:
            return await eventually(what, check)
        except AssertionError as error:
            raise AssertionError(f"{error}; log:\n{self.log()}") from None

    async def stop(self) -> int:
        """SIGTERM to the PID this test started; SIGKILL if it has not exited in time."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            with trio.move_on_after(WAIT_SECONDS):
                await self.process.wait()
        if self.process.returncode is None:
            self.process.kill()
            with trio.move_on_after(WAIT_SECONDS):
                await self.process.wait()
        assert self.process.returncode is not None
        return self.process.returncode


def open_clients(
    url: str, count: int, stack: ExitStack
) -> list[websockets.sync.client.ClientConnection]:
    """``count`` real ``websockets`` clients, each one message there and back, left open until
    ``stack`` closes."""
    clients = []
    for i in range(count):
        ws = stack.enter_context(
            websockets.sync.client.connect(url, open_timeout=10, close_timeout=5)
        )
        clients.append(ws)
        ws.send(f"client {i}")
        assert ws.recv(timeout=10) == f"client {i}"
    return clients


def closed_by_the_tunnel(ws: websockets.sync.client.ClientConnection) -> bool:
    """Whether the connection ends (within 10 s) without another message."""
    try:
        ws.recv(timeout=10)
    except ConnectionClosed:
        return True
    except TimeoutError:
        return False
    return False


def client_of(ws: websockets.sync.client.ClientConnection) -> str:
    host, port = ws.local_address[:2]
    return f"{host}:{port}"


async def test_two_workers_answer_as_one_admin_listener(
    tmp_path: Path, echo_backend: WsBackend
) -> None:
    log_path = tmp_path / "tunnel.log"
    with log_path.open("wb") as log:
        process = await trio.lowlevel.open_process(
            [
                sys.executable,
                "-m",
                "tunnel",
                "run",
                "--listen",
                f"{LOOPBACK}:0",
                "--backend",
                echo_backend.url,
                "--workers",
                "2",
                "--admin",
                f"{LOOPBACK}:0",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    tunnel = Subprocess(process, log_path)
    connections = ExitStack()
    try:
        with trio.fail_after(TEST_SECONDS):
            await tunnel.wait_for_log(
                "both workers to listen",
                lambda log: set(WORKER_LISTENING.findall(log)) == {"1", "2"},
            )
            log_text = tunnel.log()
            admin_match = ADMIN_ADDRESS.search(log_text)
            listen_match = LISTEN_ADDRESS.search(log_text)
            assert admin_match, log_text
            assert listen_match, log_text
            admin, port = int(admin_match[1]), int(listen_match[1])

            url = f"ws://{LOOPBACK}:{port}/"
            clients = await trio.to_thread.run_sync(open_clients, url, CLIENTS, connections)

            async def all_listed() -> dict[str, Any] | None:
                document = await stats(admin)
                return document if len(document["tunnels"]) == CLIENTS else None

            document = await eventually(f"{CLIENTS} tunnels in /stats.json", all_listed)
            scrape = await metrics(admin)

            ids = [t["id"] for t in document["tunnels"]]
            assert {i.partition("-")[0] for i in ids} == {"1", "2"}, "SO_REUSEPORT used both"
            by_client = {t["client"]: t["id"] for t in document["tunnels"]}
            assert set(by_client) == {client_of(ws) for ws in clients}
            # A tunnel of worker 2: the close goes from worker 1 over worker 2's Unix socket.
            victim = next(ws for ws in clients if by_client[client_of(ws)].startswith("2-"))
            victim_id = by_client[client_of(victim)]
            closed = await close(admin, victim_id)
            ended = await trio.to_thread.run_sync(closed_by_the_tunnel, victim)

            async def one_fewer() -> dict[str, Any] | None:
                document = await stats(admin)
                return document if len(document["tunnels"]) == CLIENTS - 1 else None

            after = await eventually("one tunnel fewer in /stats.json", one_fewer)
            again = await close(admin, victim_id)
            no_worker = await close(admin, "3-1")
            no_dash = await close(admin, victim_id.partition("-")[2])
            healthz = await get(admin, "/healthz")

            await trio.to_thread.run_sync(connections.close)
            returncode = await tunnel.stop()
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(connections.close)
            await tunnel.stop()

    log_text = tunnel.log()
    assert returncode == 0, log_text
    assert "Traceback" not in log_text

    # /stats.json: both workers, every tunnel once, each id naming the worker that holds it.
    assert (document["workers"], document["healthy"]) == (2, True)
    assert all(TUNNEL_ID.fullmatch(i) for i in ids), ids
    assert len(set(ids)) == CLIENTS
    [route] = document["routes"]
    assert route["open_tunnels"] == CLIENTS
    assert route["backends"][0]["open_tunnels"] == CLIENTS
    assert echo_backend.connections == CLIENTS

    # /metrics: tunnel_* summed over the workers, process_* once per worker.
    open_tunnels = [v for (name, _), v in scrape.items() if name == "tunnel_open_tunnels"]
    assert sum(open_tunnels) == CLIENTS
    upgrades = ("tunnel_upgrades_total", (("route", route["name"]), ("status", "101")))
    assert scrape[upgrades] == CLIENTS
    cpu_workers = {
        dict(labels).get("worker") for name, labels in scrape if name == "process_cpu_seconds_total"
    }
    assert cpu_workers == {"1", "2"}

    # POST /tunnels/N-id/close reaches worker N, and only that tunnel ends.
    assert (closed.status, closed.json) == (200, {"closed": victim_id})
    assert ended, "the closed tunnel's websockets client saw its connection end"
    assert victim_id not in {t["id"] for t in after["tunnels"]}
    assert {t["id"] for t in after["tunnels"]} == set(ids) - {victim_id}
    assert again.status == no_worker.status == no_dash.status == 404
    assert (healthz.status, healthz.body) == (200, b"ok\n")
    worker, local = victim_id.split("-")
    assert re.search(rf" tunnel closed .* tunnel={local} .*reason=admin worker={worker}", log_text)
