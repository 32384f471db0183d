"""Draining and enabling a backend: the admin endpoints, their merge over workers, and the
``tunnel drain`` / ``tunnel enable`` commands.

The endpoints are served for real on loopback in front of ``FakeSource`` (tests/test_admin.py).
The commands run through click's ``CliRunner`` against a small threaded ``http.server`` that
mimics the admin listener (its /stats.json counts a backend's open tunnels down, one per read),
and once against the real admin listener.
"""

from __future__ import annotations

import http.server
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
from click.testing import CliRunner, Result

from tests.test_admin import LOOPBACK, Admin, FakeSource, call
from tunnel import cli
from tunnel.cli import main
from tunnel.net.admin import open_admin_listener, serve_admin
from tunnel.net.worker_admin import WorkersView

THREAD_JOIN_SECONDS = 10.0


@pytest.fixture
async def admin(nursery: trio.Nursery) -> Admin:
    source = FakeSource()
    listener = await open_admin_listener(f"{LOOPBACK}:0")
    nursery.start_soon(serve_admin, listener, source)
    return Admin(source, listener.socket.getsockname()[1])


# --- the endpoints -----------------------------------------------------------------------------


async def test_drain_and_enable_answer_the_backend_state(admin: Admin) -> None:
    answer = await call(admin.port, "POST", "/backends/chat/a/drain")
    assert (answer.status, answer.json) == (
        200,
        {"route": "chat", "backend": "a", "state": "draining", "open_tunnels": 1},
    )
    answer = await call(admin.port, "POST", "/backends/chat/a/enable")
    assert (answer.status, answer.json["state"]) == (200, "up")
    assert admin.source.changed == [("drain", "chat", "a"), ("enable", "chat", "a")]


@pytest.mark.parametrize(
    "target", ["/backends/chat/127.0.0.1:9001/drain", "/backends/chat/127.0.0.1%3A9001/drain"]
)
async def test_names_are_percent_decoded_path_segments(admin: Admin, target: str) -> None:
    answer = await call(admin.port, "POST", target)
    assert answer.status == 200
    assert answer.json["backend"] == "127.0.0.1:9001"
    assert admin.source.changed == [("drain", "chat", "127.0.0.1:9001")]


async def test_an_unknown_backend_is_404(admin: Admin) -> None:
    for action in ("drain", "enable"):
        answer = await call(admin.port, "POST", f"/backends/chat/zz/{action}")
        assert (answer.status, answer.json) == (404, {"error": "no backend zz in route chat"})
        answer = await call(admin.port, "POST", f"/backends/nope/a%2Fb/{action}")
        assert (answer.status, answer.json) == (404, {"error": "no backend a/b in route nope"})


@pytest.mark.parametrize(
    "target",
    [
        "/backends/chat/a/stop",
        "/backends/chat//drain",
        "/backends/chat/drain",
        "/backends/a/b/c/drain",
    ],
)
async def test_other_paths_are_no_endpoint(admin: Admin, target: str) -> None:
    answer = await call(admin.port, "POST", target)
    assert answer.status == 404
    assert admin.source.changed == []


async def test_drain_is_post_only(admin: Admin) -> None:
    answer = await call(admin.port, "GET", "/backends/chat/a/drain")
    assert (answer.status, answer.headers["allow"]) == (405, "POST")
    assert admin.source.changed == []


async def test_a_cross_site_drain_is_refused(admin: Admin) -> None:
    evil = [("Origin", "http://evil.example")]
    answer = await call(admin.port, "POST", "/backends/chat/a/drain", headers=evil)
    assert answer.status == 403
    assert admin.source.changed == []


async def test_a_failing_source_is_a_500(admin: Admin) -> None:
    admin.source.failing = RuntimeError("boom")
    answer = await call(admin.port, "POST", "/backends/chat/a/drain")
    assert answer.status == 500


# --- over workers ------------------------------------------------------------------------------


@dataclass
class Workers:
    """Canned answers of each worker's private socket, and what was asked."""

    answers: dict[str, tuple[int, bytes] | Exception]
    asked: list[tuple[str, str, str]] = field(default_factory=list)

    async def ask(self, path: str, method: str, target: str) -> tuple[int, bytes]:
        self.asked.append((path, method, target))
        answer = self.answers[path.rsplit("/", 1)[1]]
        if isinstance(answer, Exception):
            raise answer
        return answer


def state(open_tunnels: int, name: str = "a", status: str = "draining") -> tuple[int, bytes]:
    document = {"route": "chat", "backend": name, "state": status, "open_tunnels": open_tunnels}
    return 200, json.dumps(document).encode()


NOT_FOUND = (404, b'{"error": "no backend"}\n')


async def test_workers_are_all_asked_and_their_tunnels_summed() -> None:
    workers = Workers({"worker-1.sock": state(2), "worker-2.sock": state(3)})
    view = WorkersView("/run/t", 2, ask=workers.ask)
    merged = await view.drain_backend("chat", "127.0.0.1:9001")
    assert merged == {
        "route": "chat",
        "backend": "127.0.0.1:9001",
        "state": "draining",
        "open_tunnels": 5,
    }
    assert sorted(workers.asked) == [
        (f"/run/t/worker-{n}.sock", "POST", "/backends/chat/127.0.0.1%3A9001/drain") for n in (1, 2)
    ]
    workers.answers = {
        "worker-1.sock": state(0, status="up"),
        "worker-2.sock": state(1, status="up"),
    }
    assert await view.enable_backend("chat", "a") == {
        "route": "chat",
        "backend": "a",
        "state": "up",
        "open_tunnels": 1,
    }


async def test_workers_404_only_when_every_worker_says_so() -> None:
    workers = Workers({"worker-1.sock": NOT_FOUND, "worker-2.sock": NOT_FOUND})
    assert await WorkersView("/run/t", 2, ask=workers.ask).drain_backend("chat", "zz") is None


@pytest.mark.parametrize(
    "second", [NOT_FOUND, OSError("no such socket"), (500, b"internal error\n")]
)
async def test_a_worker_left_out_is_an_error(second: tuple[int, bytes] | Exception) -> None:
    workers = Workers({"worker-1.sock": state(2), "worker-2.sock": second})
    with pytest.raises(RuntimeError, match="1 of 2 workers did not drain chat/a"):
        await WorkersView("/run/t", 2, ask=workers.ask).drain_backend("chat", "a")


# --- the commands ------------------------------------------------------------------------------


_BACKEND_PATH = re.compile(r"/backends/([^/]+)/([^/]+)/(drain|enable)")


class MimicAdmin(http.server.ThreadingHTTPServer):
    """The drain/enable endpoints and /stats.json of one route ``chat`` with backend ``a``,
    whose open tunnels go down by ``step`` at every read of /stats.json, to ``floor``."""

    def __init__(self, open_tunnels: int, step: int = 1, floor: int = 0) -> None:
        super().__init__((LOOPBACK, 0), _MimicHandler)
        self.open_tunnels = open_tunnels
        self.step = step
        self.floor = floor
        self.state = "up"
        self.requests: list[tuple[str, str]] = []
        self.stats_reads = 0
        self.lock = threading.Lock()

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.server_address[1]}"

    def stats(self) -> dict[str, Any]:
        with self.lock:
            self.stats_reads += 1
            self.open_tunnels = max(self.floor, self.open_tunnels - self.step)
            backend = {
                "name": "a",
                "url": "ws://127.0.0.1:9000",
                "state": self.state,
                "open_tunnels": self.open_tunnels,
            }
        return {"listeners": [], "routes": [{"name": "chat", "backends": [backend]}], "tunnels": []}


class _MimicHandler(http.server.BaseHTTPRequestHandler):
    server: MimicAdmin

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet

    def _reply(self, status: int, document: Any) -> None:
        body = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.server.requests.append(("GET", self.path))
        if self.path == "/stats.json":
            self._reply(200, self.server.stats())
        else:
            self._reply(404, {"error": "no such endpoint"})

    def do_POST(self) -> None:
        self.server.requests.append(("POST", self.path))
        match = _BACKEND_PATH.fullmatch(self.path)
        if match is None:
            self._reply(404, {"error": "no such endpoint"})
            return
        route, backend, action = match.groups()
        if (route, backend) != ("chat", "a"):
            self._reply(404, {"error": f"no backend {backend} in route {route}"})
            return
        self.server.state = "draining" if action == "drain" else "up"
        document = {
            "route": route,
            "backend": backend,
            "state": self.server.state,
            "open_tunnels": self.server.open_tunnels,
        }
        self._reply(200, document)


@pytest.fixture
def mimic() -> Iterator[list[MimicAdmin]]:
    """Factory list: append ``MimicAdmin(...)`` objects; each is served until the test ends."""
    servers: list[MimicAdmin] = []
    threads: list[threading.Thread] = []

    class Starter(list[MimicAdmin]):
        def append(self, server: MimicAdmin) -> None:
            thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="mimic-admin"
            )
            thread.start()
            servers.append(server)
            threads.append(thread)
            super().append(server)

    yield Starter()
    for server, thread in zip(servers, threads, strict=True):
        server.shutdown()
        server.server_close()
        thread.join(THREAD_JOIN_SECONDS)
        assert not thread.is_alive()


@pytest.fixture
def fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "DRAIN_POLL_SECONDS", 0.02)


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def test_drain_prints_the_state(mimic: list[MimicAdmin]) -> None:
    mimic.append(server := MimicAdmin(open_tunnels=4))
    result = run("drain", "chat/a", "--admin", server.address)
    assert result.exit_code == 0, result.output
    assert result.stdout == "chat/a: draining, 4 open tunnels\n"
    assert server.requests == [("POST", "/backends/chat/a/drain")]


def test_drain_wait_returns_once_the_count_is_zero(
    mimic: list[MimicAdmin], fast_polls: None
) -> None:
    mimic.append(server := MimicAdmin(open_tunnels=3))
    result = run("drain", "chat/a", "--admin", server.address, "--wait", "--timeout", "1m")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "chat/a: draining, 3 open tunnels",
        "drained: chat/a has no open tunnels",
    ]
    assert result.stderr.splitlines() == [
        "waiting: chat/a has 3 open tunnels",
        "waiting: chat/a has 2 open tunnels",
        "waiting: chat/a has 1 open tunnel",
    ]
    assert server.stats_reads == 3  # 2, 1, 0: not one read more


def test_drain_wait_polls_every_half_second_by_default(mimic: list[MimicAdmin]) -> None:
    mimic.append(server := MimicAdmin(open_tunnels=2))
    result = run("drain", "chat/a", "--admin", server.address, "--wait")
    assert result.exit_code == 0, result.output
    assert server.stats_reads == 2
    assert cli.DRAIN_POLL_SECONDS == 0.5


def test_drain_wait_with_nothing_open_returns_at_once(mimic: list[MimicAdmin]) -> None:
    mimic.append(server := MimicAdmin(open_tunnels=0))
    result = run("drain", "chat/a", "--admin", server.address, "--wait")
    assert result.exit_code == 0, result.output
    assert "drained: chat/a has no open tunnels" in result.stdout
    assert server.stats_reads == 0


def test_drain_wait_times_out_with_the_count(mimic: list[MimicAdmin], fast_polls: None) -> None:
    mimic.append(server := MimicAdmin(open_tunnels=5, step=1, floor=2))
    result = run("drain", "chat/a", "--admin", server.address, "--wait", "--timeout", "300ms")
    assert result.exit_code == 1
    assert "tunnel: timed out after 300ms: chat/a has 2 open tunnels" in result.stderr
    assert "drained" not in result.stdout


def test_enable_prints_the_state(mimic: list[MimicAdmin]) -> None:
    mimic.append(server := MimicAdmin(open_tunnels=1))
    result = run("enable", "chat/a", "--admin", server.address)
    assert result.exit_code == 0, result.output
    assert result.stdout == "chat/a: up, 1 open tunnel\n"
    assert server.requests == [("POST", "/backends/chat/a/enable")]


@pytest.mark.parametrize("command", ["drain", "enable"])
def test_an_unknown_backend_exits_1(mimic: list[MimicAdmin], command: str) -> None:
    mimic.append(server := MimicAdmin(open_tunnels=1))
    result = run(command, "chat/zz", "--admin", server.address)
    assert result.exit_code == 1
    assert "no backend zz in route chat" in result.stderr
    assert "404" in result.stderr


@pytest.mark.parametrize("command", ["drain", "enable"])
def test_an_unreachable_admin_exits_1(dead_port: int, command: str) -> None:
    result = run(command, "chat/a", "--admin", f"{LOOPBACK}:{dead_port}")
    assert result.exit_code == 1
    assert f"admin listener {LOOPBACK}:{dead_port} unreachable" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["drain", "chat", "--admin", "127.0.0.1:1"], "is not ROUTE/BACKEND"),
        (["drain", "chat/", "--admin", "127.0.0.1:1"], "is not ROUTE/BACKEND"),
        (["enable", "/a", "--admin", "127.0.0.1:1"], "is not ROUTE/BACKEND"),
        (["drain", "chat/a", "--admin", "nowhere"], "--admin"),
        (["drain", "chat/a", "--admin", "127.0.0.1:1", "--timeout", "5m"], "only with --wait"),
        (["drain", "chat/a", "--admin", "127.0.0.1:1", "--wait", "--timeout", "5"], "--timeout"),
        (["drain", "chat/a"], "--admin"),
    ],
)
def test_bad_arguments_are_usage_errors(args: list[str], message: str) -> None:
    result = run(*args)
    assert result.exit_code == 2
    assert message in result.stderr


async def test_the_commands_against_the_real_admin_listener(admin: Admin) -> None:
    address = f"{LOOPBACK}:{admin.port}"

    def invoke(*args: str) -> Result:
        return run(*args)

    with trio.fail_after(30):
        drained = await trio.to_thread.run_sync(
            invoke, "drain", "chat/127.0.0.1:9001", "--admin", address
        )
        enabled = await trio.to_thread.run_sync(invoke, "enable", "chat/a", "--admin", address)
        missing = await trio.to_thread.run_sync(invoke, "drain", "chat/zz", "--admin", address)
    assert (drained.exit_code, drained.stdout) == (
        0,
        "chat/127.0.0.1:9001: draining, 0 open tunnels\n",
    )
    assert (enabled.exit_code, enabled.stdout) == (0, "chat/a: up, 1 open tunnel\n")
    assert missing.exit_code == 1
    assert "no backend zz in route chat" in missing.stderr
    assert admin.source.changed == [
        ("drain", "chat", "127.0.0.1:9001"),
        ("enable", "chat", "a"),
        ("drain", "chat", "zz"),
    ]
