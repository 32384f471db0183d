"""Fleet-wide limits: two tunnel instances counting in one real ``redis-server``
(``[limits] store = "redis://..."``) enforce one per-IP cap and one per-IP rate between them.

The instances are ``tunnel run`` subprocesses (two processes, as a fleet is), each on its own
loopback port read from its log, in front of one raw backend served by the test; the Redis
server is started on a free loopback port by the fixture of test_redis_store.py and stopped by
its PID. Redis keeps the buckets on its own clock, so the refill wait is real and generous.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from test_guard_e2e import (
    Answer,
    Running,
    close_all,
    eventually,
    knock,
    knock_together,
    refused_by,
    route,
    start_backend,
)
from test_redis_store import REDIS_SERVER, RedisServer, _start_redis
from test_workers import TunnelProcess

from tunnel import Config, Control, serve

LOOPBACK = "127.0.0.1"
TEST_SECONDS = 60.0
"""Bound on one test: two processes started and stopped, a few upgrades, one refill."""
STOP_SECONDS = 10.0
PACED_RATE = "20/m"
"""One token every 3 s: the four-request storm fits in that on a loaded machine (at "2/s" a
storm spread over more than 0.5 s got a refilled token, three 101s)."""
PACED_REFILL_SECONDS = 4.0
"""Past the 3 s one token takes to come back, with a margin for Redis's clock against ours."""

pytestmark = pytest.mark.skipif(
    REDIS_SERVER is None,
    reason="redis-server is not installed (Debian package redis-server; .ci/run installs it)",
)

StartInstance = Callable[[str], TunnelProcess]


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = _start_redis()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The module's server, emptied for this test."""
    client = redis_server.client()
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def start_instance(tmp_path: Path) -> Iterator[StartInstance]:
    """Factory: ``start(config_text)`` runs ``tunnel run --config`` with it; each process is
    stopped afterwards by the ``Popen`` this fixture holds (SIGTERM, then SIGKILL)."""
    started: list[TunnelProcess] = []

    def start(config: str) -> TunnelProcess:
        index = len(started)
        config_path = tmp_path / f"instance-{index}.toml"
        config_path.write_text(config)
        log_path = tmp_path / f"instance-{index}.log"
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-P", "-m", "tunnel", "run", "--config", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        running = TunnelProcess(process, log_path)
        started.append(running)
        return running

    yield start
    for running in started:
        process = running.process
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_SECONDS)


def fleet_config(store: str, backend: str) -> str:
    """Two routes of the fleet: ``/capped/`` with per_ip_tunnels = 2, ``/paced/`` with
    per_ip_rate = "20/m" and a burst of 2; every count in ``store``."""
    return f"""
[limits]
store = "{store}"

[[listeners]]
listen = "{LOOPBACK}:0"

[[routes]]
name = "capped"
path_prefix = "/capped/"
backends = [{{ name = "b0", url = "{backend}" }}]
[routes.limits]
per_ip_tunnels = 2

[[routes]]
name = "paced"
path_prefix = "/paced/"
backends = [{{ name = "b0", url = "{backend}" }}]
[routes.limits]
per_ip_rate = "{PACED_RATE}"
per_ip_burst = 2
"""


async def start_fleet(start_instance: StartInstance, config: str) -> list[TunnelProcess]:
    """Two instances of ``config``, each listening (its port read from its log)."""
    return [start_instance(config), start_instance(config)]


async def where(process: TunnelProcess) -> Running:
    return Running(await trio.to_thread.run_sync(process.port), 0)


def refusal_lines(process: TunnelProcess, rule: str) -> list[str]:
    return [
        line
        for line in process.log().splitlines()
        if " request refused " in line and f" rule={rule} " in f"{line} "
    ]


async def test_two_instances_enforce_one_per_ip_cap_and_one_per_ip_rate(
    nursery: trio.Nursery, start_instance: StartInstance, redis_url: str
) -> None:
    """One pair of processes for both limits: starting one costs seconds on a loaded machine."""
    backend = await start_backend(nursery)
    with trio.fail_after(TEST_SECONDS):
        fleet = await start_fleet(start_instance, fleet_config(redis_url, backend.url))
        a, b = [await where(process) for process in fleet]

        # per_ip_tunnels = 2: one tunnel through each, then neither lets a third through.
        held = [await knock(a, "/capped/"), await knock(b, "/capped/")]
        assert [answer.status for answer in held] == [101, 101]
        over_a, over_b = await knock(a, "/capped/"), await knock(b, "/capped/")
        assert (over_a.status, over_b.status) == (429, 429)
        assert over_a.body.startswith(b"429 Too Many Requests"), over_a.body
        assert backend.accepted == 2

        gone = held.pop(0)  # through a
        assert gone.stream is not None
        await gone.stream.aclose()

        async def passed_through_b() -> Answer | None:
            answer = await knock(b, "/capped/")
            return answer if answer.status == 101 else None

        held.append(await eventually("the slot a freed to reach b", passed_through_b))
        again = await knock(a, "/capped/")
        assert again.status == 429
        assert backend.accepted == 3

        # per_ip_rate = "20/m", burst 2: apart, each instance's bucket would pass all four.
        storm = await knock_together([a, b, a, b], "/paced/")
        await close_all(storm)
        statuses = sorted(answer.status for answer in storm)
        assert statuses == [101, 101, 429, 429], statuses
        waits = [int(answer.header("Retry-After")) for answer in storm if answer.stream is None]
        assert min(waits) >= 1
        assert backend.accepted == 5
        await trio.sleep(max(PACED_REFILL_SECONDS, min(waits)))
        refilled = await knock(b, "/paced/")
        await close_all([*held, refilled])

    assert refilled.status == 101
    assert backend.accepted == 6
    for process in fleet:
        assert len(refusal_lines(process, "per_ip_tunnels")) >= 1, process.log()
    # Which instance refuses is a race (both 101s may land on one: CI saw it); each got two
    # requests its own bucket would pass, so two refusals in all prove the bucket is shared.
    assert sum(len(refusal_lines(process, "per_ip_rate")) for process in fleet) == 2


async def test_two_serves_in_one_process_enforce_one_per_ip_cap(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, redis_url: str
) -> None:
    backend = await start_backend(nursery)
    data: dict[str, Any] = {
        "limits": {"store": redis_url},
        "listeners": [{"listen": f"{LOOPBACK}:0"}],
        "routes": [route("capped", backend, limits={"per_ip_tunnels": 2})],
    }
    with trio.fail_after(TEST_SECONDS):
        ports = []
        for _ in range(2):
            listeners = await nursery.start(
                partial(serve, Config.from_mapping(data), control=Control())
            )
            ports.append(listeners[0].socket.getsockname()[1])
        a, b = Running(ports[0], 0), Running(ports[1], 0)
        held = [await knock(a), await knock(b)]
        third = await knock(a)
        await close_all([*held, third])

    assert [answer.status for answer in held] == [101, 101]
    assert third.status == 429
    assert len(refused_by(caplog, "per_ip_tunnels")) == 1
