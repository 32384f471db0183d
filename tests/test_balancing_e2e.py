"""Balancing, stickiness, health and drain end to end: several real backends on loopback.

Every backend here is a small trio server in the test's nursery that answers the upgrade with a
101 and, in the same write, one WebSocket text frame holding its own name; each frame a client
sends later is answered with that frame again. So a client knows at once where its tunnel
landed, and a test can ask an open tunnel whether it still reaches its backend. A backend can
stop listening (its open connections stay), be killed (listener and connections closed) and be
started again on the same port. The tunnel is ``serve`` with an admin listener on port 0, read
from its ``admin listening`` log line; a restart cancels one ``serve`` and starts another.
``tunnel drain``/``tunnel enable`` run as real subprocesses, stopped only through the
``trio.Process`` this test holds.

Wall-clock windows are generous (a loaded 2-core machine); every test is bounded by
``trio.fail_after`` and every loop by a count.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from rawhttp import (
    LOOPBACK,
    read_exactly,
    read_head,
    read_to_eof,
    status_of,
    switching,
    upgrade_request,
)
from rawhttp import header as header_of
from test_admin import call
from test_admin_e2e import metrics, stats

from tunnel import Config, Control, serve
from tunnel.certs import issue, make_ca
from tunnel.core.wsframes import close_frame
from tunnel.logs import LOGGER_NAME
from tunnel.policy.sticky import sign, verify

TEST_SECONDS = 30.0
"""Bound on one test; healthy runs take a few seconds at most."""
POLL_SECONDS = 0.05
MAX_POLLS = 2000
MAX_ACCEPTS = 10_000
MAX_READS = 10_000
READ_SIZE = 65536
HEALTH_USER_AGENT = b"tunnel-health-check"
SECRET = "0123456789abcdef-first-secret"
OTHER_SECRET = "0123456789abcdef-other-secret"


def text_frame(payload: bytes) -> bytes:
    """An unmasked text frame (a server's), payload under 126 bytes."""
    return bytes((0x81, len(payload))) + payload


def masked_frame(payload: bytes, mask: bytes = b"\x01\x02\x03\x04") -> bytes:
    """A masked text frame (a client's), payload under 126 bytes."""
    body = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    return bytes((0x81, 0x80 | len(payload))) + mask + body


# --- backends --------------------------------------------------------------------------------


@dataclass(eq=False)
class Backend:
    """A loopback WebSocket backend that names itself (see the module docstring).

    ``silent``: accepts TCP and reads, never answers the handshake.
    """

    name: str
    silent: bool = False
    port: int = 0
    heads: list[bytes] = field(default_factory=list)
    """Request heads of tunnels (health checks left out)."""
    checks: int = 0
    closed_unasked: int = 0
    """Connections closed before sending a request: tcp health checks."""
    open: int = 0
    _accepting: trio.CancelScope | None = None
    _everything: trio.CancelScope | None = None
    _done: trio.Event | None = None

    @property
    def url(self) -> str:
        return f"ws://{LOOPBACK}:{self.port}"

    async def start(self, nursery: trio.Nursery) -> Backend:
        """Listen (on the same port as before, when restarted)."""
        await nursery.start(self._run)
        return self

    async def _run(self, task_status: trio.TaskStatus[None]) -> None:
        [listener] = await trio.open_tcp_listeners(self.port, host=LOOPBACK)
        self.port = listener.socket.getsockname()[1]
        self._done = done = trio.Event()
        try:
            with trio.CancelScope() as everything:
                self._everything = everything
                async with trio.open_nursery() as connections:
                    with trio.CancelScope() as accepting:
                        self._accepting = accepting
                        task_status.started()
                        async with listener:
                            for _ in range(MAX_ACCEPTS):
                                stream = await listener.accept()
                                connections.start_soon(self._serve, stream)
        finally:
            done.set()

    def stop_listening(self) -> None:
        """Close the listening socket; open connections stay."""
        assert self._accepting is not None
        self._accepting.cancel()

    async def kill(self) -> None:
        """Close the listening socket and every connection; returns once they are closed."""
        assert self._everything is not None
        assert self._done is not None
        self._everything.cancel()
        await self._done.wait()

    async def _serve(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                head, _ = await read_head(stream)
            except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
                self.closed_unasked += 1
                return  # a tcp health check, or a client that gave up
            if HEALTH_USER_AGENT in head:
                self.checks += 1
            else:
                self.heads.append(head)
            try:
                if self.silent:
                    for _ in range(MAX_READS):
                        if not await stream.receive_some(READ_SIZE):
                            return
                    return
                key = header_of(head, "Sec-WebSocket-Key")
                await stream.send_all(switching(key) + text_frame(self.name.encode()))
                self.open += 1
                try:
                    for _ in range(MAX_READS):
                        data = await stream.receive_some(READ_SIZE)
                        if not data or data[0] & 0x0F == 0x8:  # EOF or a Close frame
                            return
                        await stream.send_all(text_frame(self.name.encode()))
                finally:
                    self.open -= 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return


async def start_backends(nursery: trio.Nursery, *names: str) -> list[Backend]:
    return [await Backend(name).start(nursery) for name in names]


# --- clients ---------------------------------------------------------------------------------


@dataclass(eq=False)
class Answer:
    """What a client got: the head, and for a 101 the backend's name and the open stream, for
    anything else the body (the connection read to its end)."""

    status: int
    head: bytes
    backend: str = ""
    body: bytes = b""
    stream: trio.SocketStream | None = None

    def header(self, name: str) -> str | None:
        try:
            return header_of(self.head, name)
        except AssertionError:
            return None

    async def ask(self) -> str:
        """Send a frame; the name of the backend that answered it."""
        assert self.stream is not None
        await self.stream.send_all(masked_frame(b"who?"))
        return await read_name(self.stream)

    async def aclose(self) -> None:
        if self.stream is not None:
            await self.stream.aclose()


async def read_name(stream: trio.SocketStream, received: bytes = b"") -> str:
    start = await read_exactly(stream, 2, received)
    assert start[0] == 0x81, start
    whole = await read_exactly(stream, 2 + (start[1] & 0x7F), start)
    return whole[2:].decode()


def request(host: str, headers: Sequence[str] = (), path: str = "/") -> bytes:
    """An upgrade request head with ``headers`` (``"Name: value"``) added."""
    extra = "".join(f"{line}\r\n" for line in headers).encode("latin-1")
    return upgrade_request(host, path=path)[:-2] + extra + b"\r\n"


async def upgrade(
    port: int, headers: Sequence[str] = (), *, host: str = "t.test", keep: bool = False
) -> Answer:
    """One upgrade through the tunnel; the stream stays open with ``keep`` (and a 101)."""
    stream = await trio.open_tcp_stream(LOOPBACK, port)
    await stream.send_all(request(host, headers))
    head, rest = await read_head(stream)
    status = status_of(head)
    if status != 101:
        body = await read_to_eof(stream, rest)
        await stream.aclose()
        return Answer(status, head, body=body)
    name = await read_name(stream, rest)
    if not keep:
        await stream.aclose()
        return Answer(status, head, name)
    return Answer(status, head, name, stream=stream)


# --- the tunnel ------------------------------------------------------------------------------


def route(name: str, backends: Sequence[Backend], /, **keys: Any) -> dict[str, Any]:
    """A route over ``backends``; ``per_backend={"a": {...}}`` adds keys to one backend."""
    per_backend: dict[str, dict[str, Any]] = keys.pop("per_backend", {})
    return {
        "name": name,
        "backends": [
            {"name": b.name, "url": b.url, **per_backend.get(b.name, {})} for b in backends
        ],
        **keys,
    }


def make_config(*routes: dict[str, Any], listener: dict[str, Any] | None = None) -> Config:
    return Config.from_mapping(
        {
            "admin": {"listen": f"{LOOPBACK}:0"},
            "listeners": [{"listen": f"{LOOPBACK}:0", **(listener or {})}],
            "routes": list(routes),
        }
    )


@dataclass(eq=False)
class Running:
    port: int
    admin: int
    control: Control
    scope: trio.CancelScope

    def stop(self) -> None:
        self.scope.cancel()

    async def state(self, route_name: str, backend: str) -> str:
        return str((await backend_entry(self.admin, route_name, backend))["state"])

    async def open_on(self, route_name: str, backend: str) -> int:
        return int((await backend_entry(self.admin, route_name, backend))["open_tunnels"])


async def backend_entry(admin: int, route_name: str, backend: str) -> dict[str, Any]:
    document = await stats(admin)
    [listed] = [r for r in document["routes"] if r["name"] == route_name]
    [entry] = [b for b in listed["backends"] if b["name"] == backend]
    return dict(entry)


async def start_tunnel(
    nursery: trio.Nursery, config: Config, caplog: pytest.LogCaptureFixture
) -> Running:
    """Serve ``config`` in a scope of its own (``stop()`` cancels it)."""
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    before = len(caplog.records)

    async def run(task_status: trio.TaskStatus[Any]) -> None:
        with trio.CancelScope() as scope:
            control = Control()
            async with trio.open_nursery() as inner:
                listeners = await inner.start(partial(serve, config, control=control))
                task_status.started((scope, control, listeners))

    scope, control, listeners = await nursery.start(run)
    [line] = [r for r in caplog.records[before:] if r.getMessage() == "admin listening"]
    admin = int(line.fields["address"].rpartition(":")[2])  # type: ignore[attr-defined]
    return Running(listeners[0].socket.getsockname()[1], admin, control, scope)


async def until(what: str, check: Any, seconds: float = 10.0) -> float:
    """Poll the async ``check`` until truthy; the seconds it took. Bounded in time and count."""
    started = trio.current_time()
    with trio.move_on_after(seconds):
        for _ in range(MAX_POLLS):
            if await check():
                return trio.current_time() - started
            await trio.sleep(POLL_SECONDS)
    raise AssertionError(f"gave up waiting for {what} after {seconds} s")


def records(caplog: pytest.LogCaptureFixture, message: str) -> list[dict[str, Any]]:
    return [
        dict(r.fields)  # type: ignore[attr-defined]
        for r in caplog.records
        if r.getMessage() == message and hasattr(r, "fields")
    ]


# 1. Weights ----------------------------------------------------------------------------------


async def test_weights_3_to_1_give_exactly_3_to_1_interleaved(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(TEST_SECONDS):
        a, b = await start_backends(nursery, "a", "b")
        config = make_config(route("r", [a, b], per_backend={"a": {"weight": 3}}))
        tunnel = await start_tunnel(nursery, config, caplog)
        landed = [(await upgrade(tunnel.port)).backend for _ in range(40)]

    assert Counter(landed) == {"a": 30, "b": 10}
    blocks = ["".join(landed[i : i + 4]) for i in range(0, 40, 4)]
    assert all(block.count("b") == 1 for block in blocks), blocks
    assert "bb" not in "".join(landed)
    assert "aaaa" not in "".join(landed)
    assert (len(a.heads), len(b.heads)) == (30, 10), "each backend saw exactly its tunnels"


# 2. Least connections ------------------------------------------------------------------------


async def test_least_conn_fills_the_emptiest_backend_first(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(TEST_SECONDS):
        backends = await start_backends(nursery, "a", "b", "c")
        tunnel = await start_tunnel(
            nursery, make_config(route("r", backends, balance="least-conn")), caplog
        )
        held: list[Answer] = [await upgrade(tunnel.port, keep=True) for _ in range(9)]
        assert Counter(t.backend for t in held) == {"a": 3, "b": 3, "c": 3}
        # Shape the load to a 3, b 1, c 0.
        for answer in [t for t in held if t.backend == "c"] + [t for t in held if t.backend == "b"][
            :2
        ]:
            await answer.aclose()
            held.remove(answer)

        async def shaped() -> bool:
            counts = [await tunnel.open_on("r", n) for n in "abc"]
            return counts == [3, 1, 0]

        await until("open tunnels 3, 1, 0", shaped)
        following = []
        for _ in range(5):
            answer = await upgrade(tunnel.port, keep=True)
            held.append(answer)
            following.append(answer.backend)
        counts = [await tunnel.open_on("r", n) for n in "abc"]
        sixth = await upgrade(tunnel.port, keep=True)
        held.append(sixth)
        for answer in held:
            await answer.aclose()

    assert following[0] == "c", following
    assert sorted(following[1:3]) == ["b", "c"], following
    assert "a" not in following, "a held the most and got none until all were level"
    assert counts == [3, 3, 3]


# 3. Consistent hashing -----------------------------------------------------------------------


async def placement(port: int, users: Sequence[str]) -> dict[str, str]:
    found = {}
    for user in users:
        first = await upgrade(port, [f"X-User: {user}"])
        again = await upgrade(port, [f"X-User: {user}"])
        assert first.backend == again.backend, f"{user} moved between two upgrades"
        found[user] = first.backend
    return found


async def test_hash_on_a_header_keeps_each_key_on_one_backend_across_restart_and_removal(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    users = [f"user-{i}" for i in range(50)]
    with trio.fail_after(TEST_SECONDS):
        backends = await start_backends(nursery, "a", "b", "c", "d")

        def config(over: Sequence[Backend]) -> Config:
            return make_config(route("r", over, balance="hash", hash_key="header:X-User"))

        first = await start_tunnel(nursery, config(backends), caplog)
        before = await placement(first.port, users)
        first.stop()
        second = await start_tunnel(nursery, config(backends), caplog)
        after_restart = await placement(second.port, users)
        await second.control.reload(config(backends[:3]))
        after_removal = await placement(second.port, users)

    assert set(before.values()) == {"a", "b", "c", "d"}, "50 keys spread over all four"
    assert after_restart == before, "the same backend after a restart"
    moved = {user for user in users if after_removal[user] != before[user]}
    held_by_d = {user for user in users if before[user] == "d"}
    assert moved == held_by_d, "only the removed backend's keys move"
    assert 4 <= len(moved) <= 22, f"about a quarter of 50 keys, not {len(moved)}"
    assert "d" not in after_removal.values()


async def test_hash_on_ip_uses_the_client_a_trusted_proxy_names(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """``hash_key = "ip"`` hashes "the client's address (after trusted_proxies)": behind a
    trusted proxy (here the loopback peer), the address in X-Forwarded-For, not the proxy's."""
    clients = [f"203.0.113.{i}" for i in range(1, 21)]
    with trio.fail_after(TEST_SECONDS):
        backends = await start_backends(nursery, "a", "b", "c", "d")
        config = Config.from_mapping(
            {
                "server": {"trusted_proxies": [f"{LOOPBACK}/32"]},
                "admin": {"listen": f"{LOOPBACK}:0"},
                "listeners": [{"listen": f"{LOOPBACK}:0"}],
                "routes": [route("r", backends, balance="hash")],
            }
        )
        tunnel = await start_tunnel(nursery, config, caplog)
        found = {}
        for ip in clients:
            first = await upgrade(tunnel.port, [f"X-Forwarded-For: {ip}"])
            again = await upgrade(tunnel.port, [f"X-Forwarded-For: {ip}"])
            assert first.backend == again.backend, f"{ip} moved between two upgrades"
            found[ip] = first.backend

    assert len(set(found.values())) > 1, (
        f"20 client addresses behind one trusted proxy all hashed to {set(found.values())}"
    )


# 4. Sticky cookies ---------------------------------------------------------------------------

SET_COOKIE = re.compile(
    r"tunnel_backend=([A-Za-z0-9_-]+\.[A-Za-z0-9_-]{22}); Path=/; HttpOnly; SameSite=Lax"
)


def sticky_routes(backends: Sequence[Backend], secret: str = SECRET) -> list[dict[str, Any]]:
    return [
        route(
            "plain",
            backends,
            hosts=["plain.test"],
            balance="cookie",
            sticky_cookie={"secret": secret},
        ),
        route(
            "aged",
            backends,
            hosts=["aged.test"],
            balance="cookie",
            sticky_cookie={"secret": secret, "max_age": "1h"},
        ),
        route(
            "stripped",
            backends,
            hosts=["strip.test"],
            balance="cookie",
            sticky_cookie={"secret": secret, "strip": True},
        ),
    ]


def cookie_of(answer: Answer) -> str:
    """The sticky cookie value the 101 sets; fails when it sets none or another form."""
    value = answer.header("Set-Cookie")
    assert value is not None, answer.head
    match = SET_COOKIE.match(value)
    assert match, value
    return match.group(1)


async def test_sticky_cookie_brings_the_client_back_and_cannot_be_forged(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(TEST_SECONDS):
        backends = await start_backends(nursery, "a", "b")
        first = await start_tunnel(nursery, make_config(*sticky_routes(backends)), caplog)
        port = first.port
        fresh = await upgrade(port, host="plain.test")
        value = cookie_of(fresh)
        home = fresh.backend
        assert verify(value, "plain", SECRET.encode()) == home
        sent = [f"Cookie: theme=dark; tunnel_backend={value}"]
        returning = [await upgrade(port, sent, host="plain.test") for _ in range(20)]
        without = [(await upgrade(port, host="plain.test")).backend for _ in range(4)]
        aged = await upgrade(port, host="aged.test")
        first.stop()

        second = await start_tunnel(nursery, make_config(*sticky_routes(backends)), caplog)
        after_restart = [await upgrade(second.port, sent, host="plain.test") for _ in range(5)]
        other_name = "b" if home == "a" else "a"
        name_part, _, tag = value.partition(".")
        forged_name = sign("plain", other_name, b"x" * 16).partition(".")[0] + "." + tag
        forged_tag = name_part + "." + tag[:-2] + ("AA" if tag[-2:] != "AA" else "BA")
        forgeries = [
            await upgrade(second.port, [f"Cookie: tunnel_backend={forged}"], host="plain.test")
            for forged in (forged_name, forged_tag) * 2
        ]
        foreign = await upgrade(second.port, [f"Cookie: tunnel_backend={value}"], host="aged.test")
        second.stop()

        third = await start_tunnel(
            nursery, make_config(*sticky_routes(backends, OTHER_SECRET)), caplog
        )
        rekeyed = await upgrade(third.port, sent, host="plain.test")

    assert sorted(without) == ["a", "a", "b", "b"], "new clients still go round-robin"
    assert all(r.backend == home for r in returning), [r.backend for r in returning]
    assert all(r.header("Set-Cookie") is None for r in returning), "a valid cookie is kept"
    assert (aged.header("Set-Cookie") or "").endswith("; Max-Age=3600"), aged.head
    assert SET_COOKIE.fullmatch(fresh.header("Set-Cookie") or ""), "no Secure on plain TCP"
    assert all(r.backend == home for r in after_restart), "the same secret after a restart"
    assert all(r.header("Set-Cookie") is None for r in after_restart)
    for forged, answer in zip((forged_name, forged_tag) * 2, forgeries, strict=True):
        replaced = cookie_of(answer)
        assert replaced != forged
        assert verify(replaced, "plain", SECRET.encode()) == answer.backend
    assert verify(cookie_of(foreign), "aged", SECRET.encode()) == foreign.backend, (
        "a cookie of another route is replaced"
    )
    new_value = cookie_of(rekeyed)
    assert new_value != value, "another secret replaces the cookie"
    assert verify(new_value, "plain", OTHER_SECRET.encode()) == rekeyed.backend


async def test_strip_removes_the_sticky_cookie_from_the_backend_request_and_false_keeps_it(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(TEST_SECONDS):
        [a] = await start_backends(nursery, "a")
        tunnel = await start_tunnel(nursery, make_config(*sticky_routes([a])), caplog)
        value = cookie_of(await upgrade(tunnel.port, host="plain.test"))
        stripped_value = cookie_of(await upgrade(tunnel.port, host="strip.test"))
        await upgrade(
            tunnel.port, [f"Cookie: theme=dark; tunnel_backend={value}"], host="plain.test"
        )
        await upgrade(
            tunnel.port,
            [f"Cookie: theme=dark; tunnel_backend={stripped_value}; lang=en"],
            host="strip.test",
        )
        await upgrade(tunnel.port, [f"Cookie: tunnel_backend={stripped_value}"], host="strip.test")

    kept, stripped, alone = (head.decode("latin-1") for head in a.heads[-3:])
    assert re.search(rf"(?im)^cookie: theme=dark; tunnel_backend={value}\r$", kept), kept
    assert "tunnel_backend" not in stripped
    assert re.search(r"(?im)^cookie: theme=dark; lang=en\r$", stripped), stripped
    assert "tunnel_backend" not in alone
    assert not re.search(r"(?im)^cookie:", alone), "a Cookie left empty is dropped"


async def test_a_tls_listener_marks_the_sticky_cookie_secure(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    ca = make_ca("balancing test CA")
    site = issue(ca, ["localhost"])
    (tmp_path / "site.pem").write_bytes(site.cert_pem)
    (tmp_path / "site.key").write_bytes(site.key_pem)
    tls = {"cert": str(tmp_path / "site.pem"), "key": str(tmp_path / "site.key")}
    with trio.fail_after(TEST_SECONDS):
        [a] = await start_backends(nursery, "a")
        config = make_config(*sticky_routes([a])[:2], listener={"tls": tls})
        tunnel = await start_tunnel(nursery, config, caplog)
        context = ssl.create_default_context(cadata=ca.cert_pem.decode())
        heads = []
        for host in ("plain.test", "aged.test"):
            tcp = await trio.open_tcp_stream(LOOPBACK, tunnel.port)
            stream = trio.SSLStream(tcp, context, server_hostname="localhost")
            await stream.send_all(request(host))
            head, _ = await read_head(stream)
            heads.append(head)
            await trio.aclose_forcefully(stream)

    plain, aged = (header_of(head, "Set-Cookie") for head in heads)
    assert SET_COOKIE.match(plain), plain
    assert plain.endswith("; SameSite=Lax; Secure"), plain
    assert aged.endswith("; Secure; Max-Age=3600"), aged


# 5. and 6. Active health checks --------------------------------------------------------------

FAST_CHECKS = {"interval": "0.5s", "timeout": "0.45s", "rise": 1, "fall": 2}
"""Checks whose timing a test measures (a timeout near the interval: a passing check fails only
if the loop stalls that long)."""
STEADY_CHECKS = {"interval": "1.5s", "timeout": "1s", "rise": 1, "fall": 2}
"""Checks that must keep passing on a loaded machine: a stalled loop must not fail one."""
HEALTH_SLACK_SECONDS = 2.5
"""How late a health change may come in process under coverage on a loaded machine; a bound with
it stays below the 4-6 s of the defaults (3 failed checks 2 s apart), so it still shows that the
route's interval and fall were used."""


async def test_tcp_checks_mark_a_killed_backend_down_and_back_up(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(TEST_SECONDS):
        a, b = await start_backends(nursery, "a", "b")
        config = make_config(route("r", [a, b], health={"kind": "tcp", **FAST_CHECKS}))
        tunnel = await start_tunnel(nursery, config, caplog)
        assert {(await upgrade(tunnel.port)).backend for _ in range(4)} == {"a", "b"}
        await a.kill()
        took_down = await until("a marked down", lambda: _state_is(tunnel, "a", "down"), seconds=10)
        down_metrics = await metrics(tunnel.admin)
        answers = [await upgrade(tunnel.port) for _ in range(10)]
        await a.start(nursery)
        took_up = await until("a up again", lambda: _state_is(tunnel, "a", "up"), seconds=10)
        up_metrics = await metrics(tunnel.admin)
        back = {(await upgrade(tunnel.port)).backend for _ in range(4)}

    assert took_down <= 2 * 0.5 + HEALTH_SLACK_SECONDS, f"marked down after {took_down:.2f} s"
    assert took_up <= 1 * 0.5 + HEALTH_SLACK_SECONDS, f"marked up after {took_up:.2f} s"
    up = ("tunnel_backend_up", (("backend", "a"), ("route", "r")))
    assert (down_metrics[up], up_metrics[up]) == (0, 1)
    changes = (
        "tunnel_backend_health_changes_total",
        (("backend", "a"), ("route", "r"), ("to", "down")),
    )
    assert down_metrics[changes] == 1
    [line] = [f for f in records(caplog, "backend marked down") if f["backend"] == "a"]
    assert line["route"] == "r"
    assert [(x.status, x.backend) for x in answers] == [(101, "b")] * 10, "no 502, only b"
    assert back == {"a", "b"}


async def _state_is(tunnel: Running, backend: str, state: str, route_name: str = "r") -> bool:
    return await tunnel.state(route_name, backend) == state


async def test_a_backend_that_never_answers_the_handshake_fails_websocket_checks_not_tcp(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(TEST_SECONDS):
        silent = await Backend("s", silent=True).start(nursery)
        config = make_config(
            route("ws", [silent], hosts=["ws.test"], health={"kind": "websocket", **FAST_CHECKS}),
            route("tcp", [silent], hosts=["tcp.test"], health={"kind": "tcp", **STEADY_CHECKS}),
        )
        tunnel = await start_tunnel(nursery, config, caplog)
        took = await until("ws route's backend down", lambda: _state_is(tunnel, "s", "down", "ws"))

        async def tcp_checked_thrice() -> bool:
            return silent.closed_unasked >= 3  # the first two (= fall) have their results

        await until("three tcp checks", tcp_checked_thrice)
        tcp = await backend_entry(tunnel.admin, "tcp", "s")

    assert took <= 2 * 0.5 + 0.45 + HEALTH_SLACK_SECONDS, f"marked down after {took:.2f} s"
    assert (tcp["state"], tcp["went_down"]) == ("up", 0)
    [line] = records(caplog, "backend marked down")
    assert line["route"] == "ws", line
    assert "no answer" in line["reason"], line
    assert silent.checks >= 2, "websocket checks sent their handshake"


# 7. Nothing up -------------------------------------------------------------------------------


async def test_all_backends_down_answers_503_with_a_generic_body(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(TEST_SECONDS):
        a, b = await start_backends(nursery, "a", "b")
        checks = {"kind": "tcp", **FAST_CHECKS, "fall": 1}
        tunnel = await start_tunnel(
            nursery, make_config(route("lobby", [a, b], health=checks)), caplog
        )
        await a.kill()
        await b.kill()
        for name in "ab":
            await until(f"{name} down", partial(_state_is, tunnel, name, "down", "lobby"))
        answer = await upgrade(tunnel.port)

    assert answer.status == 503, answer.head
    body = answer.body.decode()
    assert "unavailable" in body, body
    for private in ("lobby", LOOPBACK, str(a.port), str(b.port)):
        assert private not in body, body
    [line] = [f for f in records(caplog, "request refused") if f.get("status") == 503]
    assert line["route"] == "lobby", line
    assert "lobby" in line["reason"], line


# 8. Passive failures -------------------------------------------------------------------------


async def test_passive_failures_mark_a_dead_backend_down_and_skip_it_until_the_interval(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, dead_port: int
) -> None:
    with trio.fail_after(TEST_SECONDS):
        [b] = await start_backends(nursery, "b")
        config = make_config(
            {
                "name": "r",
                "passive_failures": 2,
                "health": {"interval": "6s"},  # the burst below fits in it on a loaded machine
                "backends": [
                    {"name": "dead", "url": f"ws://{LOOPBACK}:{dead_port}"},
                    {"name": "b", "url": b.url},
                ],
            }
        )
        tunnel = await start_tunnel(nursery, config, caplog)
        first = [await upgrade(tunnel.port) for _ in range(3)]
        marked_at = trio.current_time()
        dead = await backend_entry(tunnel.admin, "r", "dead")
        burst = [await upgrade(tunnel.port) for _ in range(10)]
        after_burst = await backend_entry(tunnel.admin, "r", "dead")
        await trio.sleep_until(marked_at + 6.2)
        later = [await upgrade(tunnel.port) for _ in range(4)]
        after_interval = await backend_entry(tunnel.admin, "r", "dead")

    assert [(x.status, x.backend) for x in first + burst + later] == [(101, "b")] * 17
    assert (dead["state"], dead["connect_failures"]) == ("down", 2)
    assert after_burst["connect_failures"] == 2, "no connect to a backend marked down"
    assert (after_interval["state"], after_interval["connect_failures"]) == ("down", 3), (
        "one more try once the interval passed, then down again"
    )
    [line] = records(caplog, "backend marked down")
    assert (line["route"], line["backend"]) == ("r", "dead")


# 9. Caps -------------------------------------------------------------------------------------


async def test_max_tunnels_sends_the_next_tunnel_elsewhere_and_503_when_all_are_full(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(TEST_SECONDS):
        a, b = await start_backends(nursery, "a", "b")
        per_backend = {"a": {"weight": 10, "max_tunnels": 1}, "b": {"max_tunnels": 1}}
        tunnel = await start_tunnel(
            nursery, make_config(route("r", [a, b], per_backend=per_backend)), caplog
        )
        one = await upgrade(tunnel.port, keep=True)
        two = await upgrade(tunnel.port, keep=True)
        full = await upgrade(tunnel.port)
        await one.aclose()
        await until("a's tunnel counted closed", lambda: _open_is(tunnel, "a", 0))
        three = await upgrade(tunnel.port, keep=True)
        for answer in (two, three):
            await answer.aclose()

    assert (one.backend, two.backend) == ("a", "b"), "a is full, so b despite its weight"
    assert full.status == 503, full.head
    assert full.header("Retry-After") == "5", full.head
    assert three.backend == "a"


async def _open_is(tunnel: Running, backend: str, count: int) -> bool:
    return await tunnel.open_on("r", backend) == count


# 10. on_down = "close" -----------------------------------------------------------------------


async def test_on_down_close_ends_open_tunnels_with_close_1001_backend_down(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(TEST_SECONDS):
        a, b = await start_backends(nursery, "a", "b")
        checks = {"kind": "tcp", **STEADY_CHECKS, "fall": 1}  # b's passing checks never fail
        config = make_config(route("r", [a, b], on_down="close", health=checks))
        tunnel = await start_tunnel(nursery, config, caplog)
        on_a = await upgrade(tunnel.port, keep=True)
        on_b = await upgrade(tunnel.port, keep=True)
        assert (on_a.backend, on_b.backend) == ("a", "b")
        a.stop_listening()  # its open connection stays: only the tunnel can end it
        assert on_a.stream is not None
        expected = close_frame("backend_down")
        received = await read_exactly(on_a.stream, len(expected))
        still = await on_b.ask()
        await on_a.aclose()
        await on_b.aclose()
        closed = ("tunnel_closed_total", (("reason", "backend_down"), ("route", "r")))

        async def counted() -> bool:
            return (await metrics(tunnel.admin)).get(closed) == 1

        await until("the close counted with reason backend_down", counted)

    assert received == expected
    assert still == "b", "the up backend's tunnel is left alone"


# 11. Drain -----------------------------------------------------------------------------------


async def tunnel_command(*args: str) -> trio.Process:
    return await trio.lowlevel.open_process(
        [sys.executable, "-P", "-m", "tunnel", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


async def output_until(process: trio.Process, text: bytes, seen: bytearray) -> None:
    assert process.stdout is not None
    for _ in range(MAX_READS):
        if text in seen:
            return
        chunk = await process.stdout.receive_some(4096)
        assert chunk, f"exited before printing {text!r}: {bytes(seen)!r}"
        seen += chunk


async def test_drain_keeps_open_tunnels_and_tunnel_drain_wait_returns_when_the_last_ends(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    processes: list[trio.Process] = []
    try:
        with trio.fail_after(TEST_SECONDS):
            a, b = await start_backends(nursery, "a", "b")
            tunnel = await start_tunnel(nursery, make_config(route("r", [a, b])), caplog)
            on_a = await upgrade(tunnel.port, keep=True)
            on_b = await upgrade(tunnel.port, keep=True)
            assert (on_a.backend, on_b.backend) == ("a", "b")
            drained = await call(tunnel.admin, "POST", "/backends/r/a/drain")
            state = await tunnel.state("r", "a")
            draining_metrics = await metrics(tunnel.admin)
            avoided = [(await upgrade(tunnel.port)).backend for _ in range(6)]
            still = await on_a.ask()

            admin = f"{LOOPBACK}:{tunnel.admin}"
            waiter = await tunnel_command(
                "drain", "r/a", "--admin", admin, "--wait", "--timeout", "20s"
            )
            processes.append(waiter)
            seen = bytearray()
            await output_until(waiter, b"draining", seen)
            await trio.sleep(1.0)  # it polls while the tunnel stays open
            assert waiter.returncode is None, bytes(seen)
            await on_a.aclose()
            closed_at = trio.current_time()
            await output_until(waiter, b"drained", seen)
            code = await waiter.wait()
            waited = trio.current_time() - closed_at

            enabler = await tunnel_command("enable", "r/a", "--admin", admin)
            processes.append(enabler)
            enabled_code = await enabler.wait()
            enabled_state = await tunnel.state("r", "a")
            back = {(await upgrade(tunnel.port)).backend for _ in range(4)}
            await on_b.aclose()
    finally:
        for process in processes:
            if process.returncode is None:
                process.kill()  # only the processes this test started
                with trio.move_on_after(5):
                    await process.wait()

    assert drained.status == 200, drained
    assert drained.json["state"] == "draining", drained
    assert state == "draining"
    assert draining_metrics[("tunnel_backend_up", (("backend", "a"), ("route", "r")))] == 0
    assert avoided == ["b"] * 6, "a draining backend takes no new tunnels"
    assert still == "a", "its open tunnel stays"
    assert code == 0, bytes(seen)
    # It polls every 0.5 s: 10 s allows a loaded machine yet is far below its 20 s --timeout.
    assert waited <= 10.0, f"drain --wait returned {waited:.2f} s after the last tunnel closed"
    assert enabled_code == 0
    assert enabled_state == "up"
    assert back == {"a", "b"}


# 12. Wildcard hosts --------------------------------------------------------------------------


@pytest.mark.parametrize("exact_first", [True, False])
async def test_wildcard_route_takes_names_below_it_and_an_exact_route_wins(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, exact_first: bool
) -> None:
    with trio.fail_after(TEST_SECONDS):
        wild, exact = await start_backends(nursery, "wild", "exact")
        routes = [
            route("wild", [wild], hosts=["*.example.org"]),
            route("exact", [exact], hosts=["a.example.org"]),
        ]
        if exact_first:
            routes.reverse()
        tunnel = await start_tunnel(nursery, make_config(*routes), caplog)
        hosts = [
            "b.example.org",
            "deep.sub.example.org",
            "B.Example.ORG:8080",
            "a.example.org",
            "A.EXAMPLE.ORG",
            "example.org",
            "notexample.org",
        ]
        answers = {host: await upgrade(tunnel.port, host=host) for host in hosts}

    assert {host: a.backend or str(a.status) for host, a in answers.items()} == {
        "b.example.org": "wild",
        "deep.sub.example.org": "wild",
        "B.Example.ORG:8080": "wild",
        "a.example.org": "exact",
        "A.EXAMPLE.ORG": "exact",
        "example.org": "404",
        "notexample.org": "404",
    }
