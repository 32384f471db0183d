"""The Redis limit store against a real ``redis-server`` on a loopback port.

Redis keeps time with its own wall clock (the scripts read ``TIME``), so these tests wait on
real time, with windows wide enough for a loaded machine. Each server is started by a fixture
with persistence off, answers PING before a test uses it, and is stopped by its PID.
"""

from __future__ import annotations

import inspect
import logging
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import redis
import trio

from tunnel.net.redis_store import KEY_PREFIX, RedisStore, shown_url
from tunnel.policy.limits import LimitStore, Rate, StoreUnavailable

LOOPBACK = "127.0.0.1"
REDIS_SERVER = shutil.which("redis-server")
START_SECONDS = 10.0
"""Bound on a redis-server answering PING after its start."""
STOP_SECONDS = 10.0
REDIS_OPTIONS = ("--save", "", "--appendonly", "no", "--loglevel", "warning")
"""No persistence: a test's server leaves no files behind."""
CALL_BOUND = 3.0
"""A failing call must end within this (timeout 0.5 s plus a loaded machine's margin)."""
TTL = 3.0
"""A short holder lifetime: keep_alive refreshes every 1 s, so a loop stalled 2 s loses nothing."""
TOKEN_SECONDS = 1.5
"""One token of the bucket tests' rate: the takes that must see an empty bucket come well
within it on a loaded machine."""

pytestmark = pytest.mark.skipif(
    REDIS_SERVER is None, reason="redis-server is not installed (Debian package redis-server)"
)


@dataclass
class RedisServer:
    process: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host=LOOPBACK, port=self.port, socket_timeout=5)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_SECONDS)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
        return port


def _start_redis() -> RedisServer:
    """A redis-server on a free port; a port taken between probe and bind gets another try."""
    assert REDIS_SERVER is not None
    for _ in range(3):
        port = _free_port()
        process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(port), "--bind", LOOPBACK, *REDIS_OPTIONS],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        server = RedisServer(process, port)
        client = server.client()
        deadline = time.monotonic() + START_SECONDS
        while process.poll() is None and time.monotonic() < deadline:
            try:
                if client.ping():
                    client.close()
                    return server
            except redis.ConnectionError:
                time.sleep(0.05)
        client.close()
        server.stop()
    raise RuntimeError("redis-server did not start on a loopback port in 3 tries")


@pytest.fixture(scope="module")
def shared_server() -> Iterator[RedisServer]:
    server = _start_redis()
    yield server
    server.stop()


@pytest.fixture
def server(shared_server: RedisServer) -> RedisServer:
    """The module's server, emptied for this test."""
    client = shared_server.client()
    client.flushall()
    client.close()
    return shared_server


@pytest.fixture
def own_server() -> Iterator[RedisServer]:
    """A server of this test's own, which the test may kill."""
    server = _start_redis()
    yield server
    server.stop()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose listener accepts (through its backlog) and never answers."""
    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen(8)
        yield listener.getsockname()[1]


def _store(url: str, instance: str, ttl: float = 30.0) -> RedisStore:
    return RedisStore(url, instance=instance, ttl=ttl, timeout=0.5)


async def test_store_is_a_limit_store(server: RedisServer) -> None:
    store: LimitStore = _store(server.url, "a")  # mypy checks the Protocol; this at run time
    for name in ("take", "acquire", "release"):
        wanted = inspect.signature(getattr(LimitStore, name))
        assert inspect.signature(getattr(RedisStore, name)) == wanted, name
        assert inspect.iscoroutinefunction(getattr(store, name)), name
    assert isinstance(store, RedisStore)
    await store.aclose()


@pytest.mark.slow
def test_mypy_accepts_store_as_limit_store() -> None:
    api = pytest.importorskip("mypy.api")
    program = (
        "from tunnel.policy.limits import LimitStore\n"
        "from tunnel.net.redis_store import RedisStore\n"
        "store: LimitStore = RedisStore('redis://127.0.0.1:1/0', instance='a')\n"
    )
    out, err, status = api.run(
        ["--config-file=", "--strict", "--no-incremental", "--cache-dir=/dev/null", "-c", program]
    )
    assert status == 0, out + err


async def test_bucket_admits_burst_then_paces_and_refills(server: RedisServer) -> None:
    rate = Rate(1.0, TOKEN_SECONDS)
    first, second = _store(server.url, "a"), _store(server.url, "b")
    with trio.fail_after(30):
        assert await first.take("r|rate|x", rate, 3, 0.0) == 0.0
        assert await second.take("r|rate|x", rate, 3, 0.0) == 0.0  # one bucket for both
        assert await first.take("r|rate|x", rate, 3, 0.0) == 0.0
        wait = await second.take("r|rate|x", rate, 3, 0.0)
        assert 0.0 < wait <= TOKEN_SECONDS
        assert await first.take("r|rate|y", rate, 3, 0.0) == 0.0  # another client is apart
        pttl = server.client().pttl(KEY_PREFIX + "r|rate|x")
        assert 0 < pttl <= 3 * TOKEN_SECONDS * 1000 + 1  # gone once it would be full again

        await trio.sleep(wait + 0.1)
        assert await first.take("r|rate|x", rate, 3, 0.0) == 0.0
        assert await first.take("r|rate|x", rate, 3, 0.0) > 0.0

        await trio.sleep(3 * TOKEN_SECONDS + 0.5)  # a full refill, never more than burst
        assert [await second.take("r|rate|x", rate, 3, 0.0) for _ in range(3)] == [0.0] * 3
        assert await second.take("r|rate|x", rate, 3, 0.0) > 0.0
    await first.aclose()
    await second.aclose()


async def test_bucket_refuses_rates_a_memory_store_refuses(server: RedisServer) -> None:
    store = _store(server.url, "a")
    with pytest.raises(ValueError, match="rate above 0"):
        await store.take("r|rate|x", Rate(0.0, 1.0), 3, 0.0)
    with pytest.raises(ValueError, match="at least 1 token"):
        await store.take("r|rate|x", Rate(1.0, 1.0), 0, 0.0)
    await store.aclose()


async def test_two_instances_enforce_one_cap(server: RedisServer) -> None:
    first, second = _store(server.url, "a"), _store(server.url, "b")
    counter = [("r|ip|x", 2)]
    with trio.fail_after(30):
        assert await first.acquire("1", counter) is None
        assert await second.acquire("1", counter) is None  # same id, other instance: distinct
        assert await first.acquire("2", counter) == "r|ip|x"
        assert await second.acquire("2", counter) == "r|ip|x"
        await second.release("1", ["r|ip|x"])
        assert await first.acquire("2", counter) is None
        assert await second.acquire("3", counter) == "r|ip|x"
    assert server.client().zcard(KEY_PREFIX + "r|ip|x") == 2
    assert (first.live, second.live) == (2, 0)
    await first.aclose()
    await second.aclose()


async def test_acquire_is_all_or_nothing(server: RedisServer) -> None:
    store = _store(server.url, "a")
    with trio.fail_after(30):
        assert await store.acquire("1", [("r|ip|x", 5), ("r|id|alice", 1)]) is None
        assert await store.acquire("2", [("r|ip|x", 5), ("r|id|alice", 1)]) == "r|id|alice"
        assert await store.acquire("3", [("r|ip|y", 1), ("r|id|alice", 1)]) == "r|id|alice"
        assert await store.acquire("4", [("r|ip|x", 1), ("r|id|bob", 1)]) == "r|ip|x"
        assert await store.acquire("5", []) is None
    client = server.client()
    assert client.zrange(KEY_PREFIX + "r|ip|x", 0, -1) == [b"a/1"]
    assert client.exists(KEY_PREFIX + "r|ip|y", KEY_PREFIX + "r|id|bob") == 0
    assert 0 < client.pttl(KEY_PREFIX + "r|ip|x") <= 30_000
    assert store.live == 1
    await store.aclose()


async def test_release_frees_and_is_idempotent(server: RedisServer) -> None:
    store = _store(server.url, "a")
    counters = [("r|ip|x", 1), ("r|id|alice", 1)]
    with trio.fail_after(30):
        assert await store.acquire("1", counters) is None
        assert await store.acquire("2", counters) == "r|ip|x"
        await store.release("1", ["r|ip|x", "r|id|alice"])
        await store.release("1", ["r|ip|x", "r|id|alice"])
        await store.release("never", ["r|ip|x"])
        assert store.live == 0
        assert await store.acquire("2", counters) is None
    assert server.client().zrange(KEY_PREFIX + "r|id|alice", 0, -1) == [b"a/2"]
    await store.aclose()


async def test_holders_expire_unless_kept_alive(server: RedisServer) -> None:
    alive, crashed, other = (_store(server.url, name, ttl=TTL) for name in ("a", "b", "c"))
    counter = [("r|ip|x", 2)]
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(alive.keep_alive)
            assert await alive.acquire("1", counter) is None
            assert await crashed.acquire("1", counter) is None
            assert await other.acquire("1", counter) == "r|ip|x"
            await trio.sleep(TTL + 1.0)  # the crashed instance's slot is gone by now
            assert await other.acquire("1", counter) is None
            assert await other.acquire("2", counter) == "r|ip|x"  # the kept one still counts
            client = server.client()
            members = client.zrange(KEY_PREFIX + "r|ip|x", 0, -1, withscores=True)
            seconds, micros = client.time()
            now_ms = seconds * 1000 + micros // 1000
            assert {member for member, _ in members} == {b"a/1", b"c/1"}
            assert all(now_ms < score <= now_ms + TTL * 1000 for _, score in members)
            nursery.cancel_scope.cancel()
    for store in (alive, crashed, other):
        await store.aclose()


async def test_scripts_come_back_after_a_script_flush(server: RedisServer) -> None:
    """A restarted Redis has forgotten the scripts: NOSCRIPT loads them again, unseen."""
    store = _store(server.url, "a")
    assert await store.take("r|rate|x", Rate(1.0, 1.0), 5, 0.0) == 0.0
    assert await store.acquire("1", [("r|ip|x", 5)]) is None
    server.client().script_flush()
    assert await store.take("r|rate|x", Rate(1.0, 1.0), 5, 0.0) == 0.0
    assert await store.acquire("2", [("r|ip|x", 5)]) is None
    server.client().script_flush()
    await store.refresh()
    assert server.client().zcard(KEY_PREFIX + "r|ip|x") == 2
    await store.aclose()


async def test_refresh_never_revives_a_dropped_holder(server: RedisServer) -> None:
    store = _store(server.url, "a")
    counter = [("r|ip|x", 1)]
    assert await store.acquire("1", counter) is None
    client = server.client()
    client.zrem(KEY_PREFIX + "r|ip|x", "a/1")  # as an expiry would, while this instance stalled
    await store.refresh()
    assert client.zcard(KEY_PREFIX + "r|ip|x") == 0
    await store.aclose()


async def test_keep_alive_outlives_an_unavailable_store(
    own_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    store = _store(own_server.url, "a", ttl=0.3)
    assert await store.acquire("1", [("r|ip|x", 1)]) is None
    own_server.stop()

    def failed() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "could not keep tunnel slots alive" in r.getMessage()]

    # Failed refreshes (one every 0.1 s) are logged, not raised: one would end the nursery.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.keep_alive)
        with trio.fail_after(10):
            while len(failed()) < 2:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert len(failed()) >= 2
    assert store.live == 1  # still its slot: kept alive again once Redis answers
    await store.aclose()


async def test_stopped_redis_is_unavailable_quickly(own_server: RedisServer) -> None:
    store = _store(own_server.url, "a")
    assert await store.acquire("1", [("r|ip|x", 1)]) is None
    own_server.stop()
    calls = [
        lambda: store.take("r|rate|x", Rate(1.0, 1.0), 1, 0.0),
        lambda: store.acquire("2", [("r|ip|x", 1)]),
        store.refresh,
        lambda: store.release("1", ["r|ip|x"]),
    ]
    for call in calls:
        start = time.monotonic()
        with trio.fail_after(CALL_BOUND), pytest.raises(StoreUnavailable) as raised:
            await call()
        assert time.monotonic() - start < CALL_BOUND
        assert own_server.url in str(raised.value)
        assert "cannot reach the limit store" in str(raised.value)
    await store.aclose()
    with pytest.raises(StoreUnavailable, match="is closed"):
        await store.acquire("3", [("r|ip|x", 1)])


async def test_silent_redis_times_out_while_the_loop_runs(silent_port: int) -> None:
    url = f"redis://{LOOPBACK}:{silent_port}/0"
    store = _store(url, "a")
    ticks = 0
    done = trio.Event()

    async def tick() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await trio.sleep(0.01)

    start = time.monotonic()
    with trio.fail_after(CALL_BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tick)
            with pytest.raises(StoreUnavailable, match=r"did not answer within 0\.5s") as raised:
                await store.acquire("1", [("r|ip|x", 1)])
            done.set()
    elapsed = time.monotonic() - start
    assert 0.4 <= elapsed < CALL_BOUND
    assert url in str(raised.value)
    assert ticks >= 10  # the loop went on while a thread waited (about 50 in 0.5 s)
    await store.aclose()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:s3cret@10.0.0.1:6379/0", "redis://:***@10.0.0.1:6379/0"),
        ("rediss://user:s3cret@[::1]:6380/2", "rediss://user:***@[::1]:6380/2"),
        ("redis://user@host/0", "redis://user@host/0"),
    ],
)
def test_shown_url_hides_the_password(url: str, shown: str) -> None:
    assert shown_url(url) == shown


async def test_errors_never_name_the_password(silent_port: int) -> None:
    store = _store(f"redis://user:s3cret@{LOOPBACK}:{silent_port}/0", "a")
    with trio.fail_after(CALL_BOUND), pytest.raises(StoreUnavailable) as raised:
        await store.take("r|rate|x", Rate(1.0, 1.0), 1, 0.0)
    assert "s3cret" not in str(raised.value)
    assert f"user:***@{LOOPBACK}:{silent_port}" in str(raised.value)
    await store.aclose()
