"""The guard end to end: access rules, per-client limits, admission pacing and the limit store's
failure modes, each accepted and refused over real loopback sockets.

Each case runs ``serve`` in process with an admin listener in front of a raw backend that counts
the connections it accepts and records every request head, so a refusal is seen four ways: the
status line, headers and body the client reads; the ``request refused`` log line naming the
rule; ``tunnel_refusals_total`` and ``tunnel_upgrades_total`` on ``/metrics``; and a backend
that never saw the request. Buckets and slots run on the real clock here (policy tests use a
fake one), so waits for a refill are generous and every poll is bounded in count and time.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from rawhttp import KEY, assert_switching, read_head, read_to_eof, serve_loopback, switching
from rawhttp import header as header_of
from test_admin import call
from test_admin_e2e import metrics, stats

from tunnel import Config, Control, serve
from tunnel.logs import LOGGER_NAME

LOOPBACK = "127.0.0.1"
TEST_SECONDS = 30.0
"""Bound on one test: the tunnel answers each request in milliseconds on a quiet machine."""
WAIT_SECONDS = 10.0
"""Bound on waiting for something asynchronous (a slot given back, a tunnel closed)."""
POLL_SECONDS = 0.05
REFILL_SECONDS = 1.6
"""Real time for a "2/s" bucket to hold a token again after it was emptied (0.5 s needed)."""
BYE = b"bye"
"""Sent through a tunnel to the raw backend, it makes the backend hang up."""
TOKEN_A = "alpha-token-0123456789abcdef"
TOKEN_B = "bravo-token-0123456789abcdef"


# --- the raw backend --------------------------------------------------------------------------


@dataclass
class RawBackend:
    """A backend on a loopback port that answers each upgrade with ``answer`` (a 101 when
    None), then echoes until EOF or a ``BYE``; it counts what it accepts and keeps each head."""

    answer: bytes | None = None
    accepted: int = 0
    heads: list[bytes] = field(default_factory=list)
    url: str = ""

    async def handle(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        async with stream:
            try:
                head, _ = await read_head(stream)
            except (EOFError, trio.BrokenResourceError):
                return
            self.heads.append(head)
            if self.answer is not None:
                await stream.send_all(self.answer)
                return
            await stream.send_all(switching(header_of(head, "Sec-WebSocket-Key")))
            try:
                while data := await stream.receive_some(16384):
                    if BYE in data:
                        return
                    await stream.send_all(data)
            except trio.BrokenResourceError:
                return


async def start_backend(nursery: trio.Nursery, answer: bytes | None = None) -> RawBackend:
    backend = RawBackend(answer)
    backend.url = f"ws://{LOOPBACK}:{await serve_loopback(nursery, backend.handle)}"
    return backend


REFUSE_403 = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 9\r\nConnection: close\r\n\r\nno thanks"


# --- the tunnel -------------------------------------------------------------------------------


@dataclass
class Running:
    port: int
    admin: int
    host: str = LOOPBACK


async def start(
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
    routes: list[dict[str, Any]],
    *,
    listen: str = f"{LOOPBACK}:0",
    **tables: dict[str, Any],
) -> Running:
    """``serve`` ``routes`` (and ``server``/``limits`` tables) with an admin listener; the
    admin port comes from the ``admin listening`` log line."""
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    config = Config.from_mapping(
        {
            "admin": {"listen": f"{LOOPBACK}:0"},
            "listeners": [{"listen": listen}],
            "routes": routes,
            **tables,
        }
    )
    before = len(caplog.records)
    listeners = await nursery.start(partial(serve, config, control=Control()))
    [line] = [r for r in caplog.records[before:] if r.getMessage() == "admin listening"]
    admin = int(line.fields["address"].rpartition(":")[2])  # type: ignore[attr-defined]
    host, port = listeners[0].socket.getsockname()[:2]
    return Running(port, admin, host)


def route(name: str, backend: RawBackend, path: str = "", **tables: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"name": name, "backends": [{"name": "b0", "url": backend.url}]}
    if path:
        data["path_prefix"] = path
    return {**data, **tables}


# --- the client -------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    head: bytes
    body: bytes
    stream: trio.SocketStream | None = None
    """The open tunnel of a 101 (the caller closes it)."""

    def header(self, name: str) -> str:
        return header_of(self.head, name)


def request_head(host: str, path: str, headers: Sequence[tuple[str, str]]) -> bytes:
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Connection: Upgrade",
        "Upgrade: websocket",
        f"Sec-WebSocket-Key: {KEY}",
        "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def knock(
    tunnel: Running, path: str = "/", headers: Sequence[tuple[str, str]] = ()
) -> Answer:
    """One upgrade: a 101 keeps its stream open in the answer; anything else is read to the
    tunnel's EOF and closed."""
    host = f"[{tunnel.host}]" if ":" in tunnel.host else tunnel.host
    stream = await trio.open_tcp_stream(tunnel.host, tunnel.port)
    await stream.send_all(request_head(f"{host}:{tunnel.port}", path, headers))
    head, rest = await read_head(stream)
    answer = Answer(int(head.split(b" ", 2)[1]), head, rest)
    if answer.status == 101:
        assert_switching(head, KEY)
        answer.stream = stream
        return answer
    async with stream:
        answer.body = await read_to_eof(stream, rest)
    return answer


async def knock_together(targets: Sequence[Running], path: str = "/") -> list[Answer]:
    """One upgrade to each of ``targets``, sent as nearly at once as loopback allows: every
    connection is open before any head is sent."""
    streams = [await trio.open_tcp_stream(t.host, t.port) for t in targets]
    answers: list[Answer | None] = [None] * len(targets)

    async def one(index: int) -> None:
        stream, target = streams[index], targets[index]
        await stream.send_all(request_head(f"{target.host}:{target.port}", path, ()))
        head, rest = await read_head(stream)
        answer = Answer(int(head.split(b" ", 2)[1]), head, rest)
        if answer.status == 101:
            answer.stream = stream
        else:
            async with stream:
                answer.body = await read_to_eof(stream, rest)
        answers[index] = answer

    async with trio.open_nursery() as nursery:
        for index in range(len(targets)):
            nursery.start_soon(one, index)
    return [answer for answer in answers if answer is not None]


async def close_all(answers: Sequence[Answer]) -> None:
    for answer in answers:
        if answer.stream is not None:
            await answer.stream.aclose()


async def eventually(what: str, check: Callable[[], Awaitable[Any]]) -> Any:
    """Poll ``check`` (bounded by count and time) until it returns something truthy."""
    with trio.move_on_after(WAIT_SECONDS):
        for _ in range(int(WAIT_SECONDS / POLL_SECONDS) + 1):
            if result := await check():
                return result
            await trio.sleep(POLL_SECONDS)
    raise AssertionError(f"gave up waiting for {what} after {WAIT_SECONDS} s")


def refusals(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The fields of every ``request refused`` log line so far."""
    return [
        r.fields  # type: ignore[attr-defined]
        for r in caplog.records
        if r.getMessage() == "request refused"
    ]


def refused_by(caplog: pytest.LogCaptureFixture, rule: str) -> list[dict[str, Any]]:
    return [line for line in refusals(caplog) if line.get("rule") == rule]


async def counters(admin: int) -> dict[tuple[str, str, str], float]:
    """``tunnel_refusals_total`` as (route, "rule", rule) and ``tunnel_upgrades_total`` as
    (route, "status", status)."""
    found: dict[tuple[str, str, str], float] = {}
    for (name, labels), value in (await metrics(admin)).items():
        named = dict(labels)
        if name == "tunnel_refusals_total":
            found[named["route"], "rule", named["rule"]] = value
        elif name == "tunnel_upgrades_total":
            found[named["route"], "status", named["status"]] = value
    return found


# --- access: addresses ------------------------------------------------------------------------


async def test_address_lists_deny_wins_and_an_allow_list_without_the_client_refuses(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    backend = await start_backend(nursery)
    with trio.fail_after(TEST_SECONDS):
        tunnel = await start(
            nursery,
            caplog,
            [
                route(
                    "denied",
                    backend,
                    "/denied/",
                    access={"allow": ["127.0.0.0/8"], "deny": ["127.0.0.1/32"]},
                ),
                route("elsewhere", backend, "/elsewhere/", access={"allow": ["10.0.0.0/8"]}),
                route("allowed", backend, "/allowed/", access={"allow": ["127.0.0.0/8", "::1"]}),
            ],
        )
        denied = await knock(tunnel, "/denied/x")
        elsewhere = await knock(tunnel, "/elsewhere/x")
        assert backend.accepted == 0
        allowed = await knock(tunnel, "/allowed/x")
        await close_all([allowed])
        counted = await counters(tunnel.admin)

    assert (denied.status, elsewhere.status, allowed.status) == (403, 403, 101)
    for refused in (denied, elsewhere):
        assert refused.body.startswith(b"403 Forbidden"), refused.body
        assert refused.header("Connection") == "close"
    assert backend.accepted == 1
    assert [(line["route"], line["status"]) for line in refused_by(caplog, "access")] == [
        ("denied", 403),
        ("elsewhere", 403),
    ]
    assert counted["denied", "rule", "access"] == 1
    assert counted["elsewhere", "rule", "access"] == 1
    assert counted["denied", "status", "403"] == 1
    assert counted["allowed", "status", "101"] == 1
    assert ("allowed", "rule", "access") not in counted


# --- access: origins --------------------------------------------------------------------------

ORIGINS = {"allowed_origins": ["https://app.example.com", "https://*.example.org"]}


async def test_allowed_origins_exact_and_wildcard_pass_and_everything_else_is_403(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    backend = await start_backend(nursery)
    cases: list[tuple[str, list[tuple[str, str]], int]] = [
        ("exact", [("Origin", "https://app.example.com")], 101),
        ("wildcard, one label", [("Origin", "https://chat.example.org")], 101),
        ("wildcard, two labels", [("Origin", "https://a.b.example.org")], 101),
        ("no Origin, allowed by default", [], 101),
        ("another site", [("Origin", "https://evil.example.com")], 403),
        ("scheme differs", [("Origin", "http://app.example.com")], 403),
        ("port differs", [("Origin", "https://app.example.com:8443")], 403),
        ("the wildcard's own name", [("Origin", "https://example.org")], 403),
        ("a look-alike suffix", [("Origin", "https://evilexample.org")], 403),
        ("null", [("Origin", "null")], 403),
        (
            "two Origin fields, both allowed",
            [("Origin", "https://app.example.com"), ("Origin", "https://app.example.com")],
            403,
        ),
    ]
    with trio.fail_after(TEST_SECONDS):
        tunnel = await start(nursery, caplog, [route("site", backend, access=ORIGINS)])
        seen: dict[str, int] = {}
        for name, headers, _ in cases:
            answer = await knock(tunnel, "/", headers)
            await close_all([answer])
            seen[name] = answer.status
        counted = await counters(tunnel.admin)

    assert seen == {name: status for name, _, status in cases}
    passed = sum(1 for *_, status in cases if status == 101)
    refused = len(cases) - passed
    assert backend.accepted == passed
    assert len(refused_by(caplog, "origin")) == refused
    assert counted["site", "rule", "origin"] == refused
    assert counted["site", "status", "403"] == refused
    assert counted["site", "status", "101"] == passed


async def test_allow_missing_origin_false_refuses_a_request_without_origin(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    backend = await start_backend(nursery)
    access = {**ORIGINS, "allow_missing_origin": False}
    with trio.fail_after(TEST_SECONDS):
        tunnel = await start(nursery, caplog, [route("browsers", backend, access=access)])
        missing = await knock(tunnel)
        assert backend.accepted == 0
        present = await knock(tunnel, "/", [("Origin", "https://app.example.com")])
        await close_all([present])

    assert (missing.status, present.status) == (403, 101)
    assert missing.body.startswith(b"403 Forbidden")
    [line] = refused_by(caplog, "origin")
    assert line["route"] == "browsers"
    assert backend.accepted == 1


# --- access: stripped headers -----------------------------------------------------------------


STRIPPED = [
    ("Cookie", "session=secret-1"),
    ("cookie", "session=secret-2"),
    ("X-Api-Key", "secret-3"),
    ("X_Api_Key", "secret-4"),
    ("x_api_KEY", "secret-5"),
    ("X-Api-Keys", "kept-1"),
    ("X-Kept", "kept-2"),
]
"""Sent with ``strip_headers = ["Cookie", "X-Api-Key"]``: every ``secret`` goes, each ``kept``
stays."""


async def stripped_head(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, access: dict[str, Any]
) -> bytes:
    """The head the backend receives for ``STRIPPED`` through a route with ``access``."""
    backend = await start_backend(nursery)
    with trio.fail_after(TEST_SECONDS):
        tunnel = await start(nursery, caplog, [route("strip", backend, access=access)])
        answer = await knock(tunnel, "/", STRIPPED)
        assert answer.status == 101
        assert answer.stream is not None
        await answer.stream.send_all(b"ping")
        assert await answer.stream.receive_some(16) == b"ping"
        await close_all([answer])
    [head] = backend.heads
    return head


def assert_stripped(head: bytes) -> None:
    assert b"secret" not in head, head.decode()
    names = {line.split(b":", 1)[0].lower() for line in head.split(b"\r\n")[1:] if b":" in line}
    assert not names & {b"cookie", b"x-api-key", b"x_api_key"}, head
    assert b"X-Api-Keys: kept-1\r\n" in head
    assert b"X-Kept: kept-2\r\n" in head


async def test_strip_headers_beside_another_rule_removes_each_spelling(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    access = {"strip_headers": ["Cookie", "X-Api-Key"], "allow": ["127.0.0.0/8"]}
    assert_stripped(await stripped_head(nursery, caplog, access))


async def test_strip_headers_alone_removes_each_spelling(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    access = {"strip_headers": ["Cookie", "X-Api-Key"]}
    assert_stripped(await stripped_head(nursery, caplog, access))


# --- per_ip_tunnels ---------------------------------------------------------------------------


async def test_per_ip_tunnels_refuses_the_third_and_frees_a_slot_however_a_tunnel_ends(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    backend = await start_backend(nursery)
    with trio.fail_after(TEST_SECONDS):
        tunnel = await start(
            nursery, caplog, [route("capped", backend, limits={"per_ip_tunnels": 2})]
        )
        first, second = await knock(tunnel), await knock(tunnel)
        third = await knock(tunnel)
        assert (first.status, second.status, third.status) == (101, 101, 429)
        assert third.body.startswith(b"429 Too Many Requests"), third.body
        assert backend.accepted == 2
        [line] = refused_by(caplog, "per_ip_tunnels")
        assert (line["route"], line["status"]) == ("capped", 429)
        assert "127.0.0.1" in line["reason"]
        held = [first, second]

        async def replaced(how: str) -> None:
            """After one held tunnel ended by ``how``, a new one gets its slot."""

            async def knocked() -> Answer | None:
                answer = await knock(tunnel)
                return answer if answer.status == 101 else None

            fresh = await eventually(f"a slot freed by {how}", knocked)
            held.append(fresh)
            assert (await knock(tunnel)).status == 429, f"two slots again after {how}"

        # The client closes.
        gone = held.pop(0)
        assert gone.stream is not None
        await gone.stream.aclose()
        await replaced("a client close")

        # The backend hangs up.
        gone = held.pop(0)
        assert gone.stream is not None
        await gone.stream.send_all(BYE)
        assert await read_to_eof(gone.stream) == b""
        await gone.stream.aclose()
        await replaced("a backend close")

        # An admin close.
        [doomed, *_] = (await stats(tunnel.admin))["tunnels"]
        closed = await call(tunnel.admin, "POST", f"/tunnels/{doomed['id']}/close")
        assert closed.status == 200, closed
        await replaced("an admin close")

        await close_all(held)
        counted = await counters(tunnel.admin)

    assert counted["capped", "status", "101"] == 5
    assert counted["capped", "rule", "per_ip_tunnels"] == counted["capped", "status", "429"]
    assert backend.accepted == 5


async def test_a_handshake_failing_after_the_guard_gives_its_slot_back(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, dead_port: int
) -> None:
    refusing = await start_backend(nursery, REFUSE_403)
    unreachable = RawBackend(url=f"ws://{LOOPBACK}:{dead_port}")
    one = {"per_ip_tunnels": 1}
    with trio.fail_after(TEST_SECONDS):
        tunnel = await start(
            nursery,
            caplog,
            [
                route("refusing", refusing, "/refusing/", limits=one),
                route("unreachable", unreachable, "/unreachable/", limits=one, passive_failures=0),
            ],
        )
        for path, status in (("/refusing/", 403), ("/unreachable/", 502)):
            for attempt in range(3):

                async def answered(path: str = path) -> Answer | None:
                    answer = await knock(tunnel, path)
                    return None if answer.status == 429 else answer

                answer = await eventually(f"attempt {attempt} on {path} past the cap", answered)
                assert answer.status == status, (path, attempt, answer)
        counted = await counters(tunnel.admin)

    assert refusing.accepted == 3
    assert counted["refusing", "status", "403"] == 3
    assert counted["unreachable", "status", "502"] == 3


# --- per_ip_rate ------------------------------------------------------------------------------


async def test_per_ip_rate_passes_the_burst_refuses_the_next_and_refills(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    backend = await start_backend(nursery)
    limits = {"per_ip_rate": "2/s", "per_ip_burst": 2}
    with trio.fail_after(TEST_SECONDS):
        tunnel = await start(nursery, caplog, [route("paced", backend, limits=limits)])
        burst = await knock_together([tunnel] * 3)
        await close_all(burst)
        statuses = sorted(answer.status for answer in burst)
        assert statuses == [101, 101, 429], statuses
        [refused] = [answer for answer in burst if answer.status == 429]
        retry_after = int(refused.header("Retry-After"))
        assert retry_after >= 1
        assert backend.accepted == 2
        await trio.sleep(max(retry_after, REFILL_SECONDS))
        again = await knock(tunnel)
        await close_all([again])
        counted = await counters(tunnel.admin)

    assert again.status == 101
    [line] = refused_by(caplog, "per_ip_rate")
    assert (line["route"], line["status"]) == ("paced", 429)
    assert counted["paced", "rule", "per_ip_rate"] == 1
    assert counted["paced", "status", "101"] == 3
    assert backend.accepted == 3


# --- admission_rate ---------------------------------------------------------------------------

STORM = 30


async def test_admission_rate_lets_one_through_and_spreads_the_retry_after_of_the_rest(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    backend = await start_backend(nursery)
    with trio.fail_after(TEST_SECONDS):
        tunnel = await start(
            nursery, caplog, [route("storm", backend)], server={"admission_rate": "1/s"}
        )
        answers = await knock_together([tunnel] * STORM)
        await close_all(answers)
        counted = await counters(tunnel.admin)

    statuses = [answer.status for answer in answers]
    passed = statuses.count(101)
    # One token, and at most one more if the storm straddled a second on a loaded machine.
    assert 1 <= passed <= 2, statuses
    refused = [answer for answer in answers if answer.status != 101]
    assert {answer.status for answer in refused} == {503}
    waits = sorted(int(answer.header("Retry-After")) for answer in refused)
    assert waits[0] >= 1
    assert len(set(waits)) >= len(refused) * 2 // 3, waits
    assert waits[-1] - waits[0] >= len(refused) // 2, waits
    lines = [line for line in refusals(caplog) if line["status"] == 503]
    assert len(lines) == len(refused)
    assert all("admission_rate" in line["reason"] for line in lines)
    assert backend.accepted == passed
    assert counted["storm", "rule", "admission_rate"] == len(refused)
    assert counted["storm", "status", "503"] == len(refused)


async def test_an_admission_refusal_names_its_rule_in_the_log_line(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    backend = await start_backend(nursery)
    with trio.fail_after(TEST_SECONDS):
        tunnel = await start(
            nursery, caplog, [route("storm", backend)], server={"admission_rate": "1/m"}
        )
        answers = [await knock(tunnel), await knock(tunnel)]
        await close_all(answers)

    assert [answer.status for answer in answers] == [101, 503]
    [line] = refusals(caplog)
    assert line.get("rule") == "admission_rate", line


# --- IPv6 grouping ----------------------------------------------------------------------------


def ipv6_loopback_usable() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback_usable(), reason="::1 cannot be bound on this machine")
async def test_ipv6_clients_count_by_their_prefix_network(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    backend = await start_backend(nursery)
    with trio.fail_after(TEST_SECONDS):
        tunnel = await start(
            nursery,
            caplog,
            [
                route("net64", backend, "/64/", limits={"per_ip_tunnels": 1, "ipv6_prefix": 64}),
                route(
                    "host128", backend, "/128/", limits={"per_ip_tunnels": 1, "ipv6_prefix": 128}
                ),
            ],
            listen="[::1]:0",
        )
        assert tunnel.host == "::1"
        held = [await knock(tunnel, "/64/"), await knock(tunnel, "/128/")]
        second64, second128 = await knock(tunnel, "/64/"), await knock(tunnel, "/128/")
        await close_all(held)

    assert [answer.status for answer in held] == [101, 101]
    assert (second64.status, second128.status) == (429, 429)
    reasons = {line["route"]: line["reason"] for line in refused_by(caplog, "per_ip_tunnels")}
    assert "client ::/64 " in reasons["net64"], reasons
    assert "client ::1/128 " in reasons["host128"], reasons
    assert backend.accepted == 2


# --- per_identity_tunnels ---------------------------------------------------------------------


async def test_per_identity_tunnels_counts_the_bearer_token_not_the_connection(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN_A}\n{TOKEN_B}\n")
    backend = await start_backend(nursery)
    with trio.fail_after(TEST_SECONDS):
        tunnel = await start(
            nursery,
            caplog,
            [
                route(
                    "api",
                    backend,
                    auth={"kind": "bearer", "tokens_file": str(tokens)},
                    limits={"per_identity_tunnels": 1},
                )
            ],
        )
        first = await knock(tunnel, "/", [("Authorization", f"Bearer {TOKEN_A}")])
        same = await knock(tunnel, "/", [("Authorization", f"Bearer {TOKEN_A}")])
        other = await knock(tunnel, "/", [("Authorization", f"Bearer {TOKEN_B}")])
        await close_all([first, same, other])
        counted = await counters(tunnel.admin)

    assert (first.status, same.status, other.status) == (101, 429, 101)
    [line] = refused_by(caplog, "per_identity_tunnels")
    assert (line["route"], line["status"]) == ("api", 429)
    assert counted["api", "rule", "per_identity_tunnels"] == 1
    assert backend.accepted == 2
    subjects = [header_of(head, "X-Auth-Subject") for head in backend.heads]
    assert len(set(subjects)) == 2
    assert all(subject.startswith("token:") for subject in subjects), subjects
    for secret in (TOKEN_A, TOKEN_B):
        assert secret not in caplog.text
        assert all(secret.encode() not in head for head in backend.heads)


# --- on_store_error ---------------------------------------------------------------------------


async def test_an_unreachable_store_admits_with_one_error_line_when_open(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, dead_port: int
) -> None:
    backend = await start_backend(nursery)
    store = f"redis://{LOOPBACK}:{dead_port}/0"
    with trio.fail_after(TEST_SECONDS):
        tunnel = await start(
            nursery,
            caplog,
            [route("fleet", backend, limits={"per_ip_tunnels": 1})],
            limits={"store": store, "on_store_error": "open"},
        )
        answers = [await knock(tunnel), await knock(tunnel)]
        await close_all(answers)

    assert [answer.status for answer in answers] == [101, 101]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        "limit store unavailable; admitting without limits (on_store_error = open); "
        "check the Redis server"
    ]
    assert backend.accepted == 2


async def test_an_unreachable_store_refuses_with_503_when_closed(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, dead_port: int
) -> None:
    backend = await start_backend(nursery)
    store = f"redis://{LOOPBACK}:{dead_port}/0"
    with trio.fail_after(TEST_SECONDS):
        tunnel = await start(
            nursery,
            caplog,
            [route("fleet", backend, limits={"per_ip_tunnels": 1})],
            limits={"store": store, "on_store_error": "closed"},
        )
        answer = await knock(tunnel)
        counted = await counters(tunnel.admin)

    assert answer.status == 503
    assert int(answer.header("Retry-After")) >= 1
    assert answer.body.startswith(b"503 Service Unavailable")
    [line] = refused_by(caplog, "limit_store")
    assert (line["route"], line["status"]) == ("fleet", 503)
    assert counted["fleet", "rule", "limit_store"] == 1
    assert backend.accepted == 0
