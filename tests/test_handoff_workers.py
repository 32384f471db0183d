"""Live hand-off with ``workers = 2``: ``tunnel run --config FILE`` as operators run it, a
supervisor and its workers, then SIGUSR2 or ``POST /upgrade`` to the supervisor, with real
clients and backends on loopback.

Shown here: every worker's tunnels (``websockets`` clients echoing every 20 ms on both workers,
a 64 MiB stream each way) keep their TCP connections on both sides and their ids (``N-id``:
worker N of the old generation hands to worker N of the new one), every message in order and
the stream's SHA-256 identical; new upgrades every 100 ms all get 101; the pid file names the
new supervisor and the old one exits 0 once its workers drained; a wss tunnel keeps the old
supervisor and its worker until it ends; a broken file, or one that changes ``workers``, refuses
the hand-off; a new supervisor that cannot start (a port the new file adds is taken) leaves the
old one serving everything with one error line; hand-offs in a row leave no descriptor behind.
"""

from __future__ import annotations

import re
import resource
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import WsBackend
from handoffpeers import (
    DRAIN,
    EXIT_SLACK,
    WAIT_SECONDS,
    BulkBackend,
    BulkClient,
    Chatter,
    IdleBackendProcess,
    Prober,
    TunnelChain,
    admin,
    bulk_received,
    check_bulk_intact,
    config_text,
    descriptors,
    error_lines,
    free_port,
    open_idle_tunnels,
    sha256,
    stop_last,
    upgrade_status,
    wait_bulk_both_ways,
    wait_until,
    ws_connect,
)
from rawhttp import status_of, upgrade_request

from tunnel.certs import write_dev_certificates

WORKERS = 2
BULK_BYTES = 64 * 2**20
SLOW_RATE = 4 * 2**20
"""Bytes a second each bulk direction sends until the hand-off is done (so that it lands in
the middle of the stream)."""
MAX_CHATTERS = 24
"""Clients opened until both workers hold some (the kernel spreads connections by a hash of
the addresses; 24 all landing on one of two workers has odds of 2**-23)."""
HAND_OFFS = 5
FD_SLACK = 2
WORKER_STARTED = re.compile(r" info worker started worker=(\d+) pid=(\d+)")


def workers_config(routes: dict[str, str], **settings: str | int) -> str:
    return config_text(routes, workers=WORKERS, **settings)


def tunnels(admin_port: int) -> dict[str, dict[str, object]]:
    """Every open tunnel in the merged ``/stats.json``, by id (``worker-id``), once every
    worker answers (a worker that just started may not yet)."""
    answers: list[dict[str, Any]] = []

    def merged() -> bool:
        status, stats = admin(admin_port, "GET", "/stats.json")
        assert status == 200, stats
        answers.append(stats)
        return bool(stats["workers"] == WORKERS)

    wait_until(f"{WORKERS} workers in /stats.json", merged)
    return {str(tunnel["id"]): tunnel for tunnel in answers[-1]["tunnels"]}


def merged_metric(admin_port: int, sample: str) -> float:
    """``sample`` (a name with its labels) in the merged ``/metrics`` once every worker
    answers; 0 while it is absent."""
    values: list[float] = []

    def every_worker() -> bool:
        status, text = admin(admin_port, "GET", "/metrics")
        assert status == 200, text
        found = re.findall(rf"^{re.escape(sample)} (\S+)$", text, re.M)
        values.append(float(found[0]) if found else 0.0)
        answering = set(re.findall(r'^process_cpu_seconds_total\{worker="(\d+)"', text, re.M))
        return len(answering) == WORKERS

    wait_until(f"{WORKERS} workers in /metrics", every_worker)
    return values[-1]


def chatters_on_both_workers(port: int, admin_port: int, host: str) -> list[Chatter]:
    """``websockets`` clients echoing every 20 ms, opened until both workers hold at least
    two."""
    chatters = []
    for _ in range(MAX_CHATTERS):
        chatters.append(Chatter(ws_connect(port, host)).start())
        workers = [key.split("-")[0] for key in tunnels(admin_port)]
        if all(workers.count(str(n)) >= 2 for n in range(1, WORKERS + 1)):
            return chatters
    raise AssertionError(f"{MAX_CHATTERS} connections did not reach both workers")


def worker_pids(chain: TunnelChain, supervisor: int) -> list[int]:
    """The pids of the workers ``supervisor`` started (from its log lines: each generation
    logs its start after the previous one's)."""
    log = chain.log()
    start = log.rindex(f"starting workers workers={WORKERS} pid={supervisor}")
    return [int(pid) for _, pid in WORKER_STARTED.findall(log[start:])][:WORKERS]


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


# --- 1. SIGUSR2 to the supervisor moves every worker's tunnels ---------------------------------


def test_sigusr2_moves_every_workers_tunnels_to_the_new_workers(
    start_chain: Callable[..., TunnelChain], start_ws_backend: Callable[..., WsBackend]
) -> None:
    chat_backend, probe_backend = start_ws_backend(), start_ws_backend()
    fast = threading.Event()
    bulk_backend = BulkBackend(BULK_BYTES, SLOW_RATE, fast)
    try:
        chain = start_chain(
            workers_config(
                {
                    "chat.test": chat_backend.url,
                    "bulk.test": bulk_backend.url,
                    "probe.test": probe_backend.url,
                }
            )
        )
        port, admin_port = chain.port(), chain.admin_port()
        chatters = chatters_on_both_workers(port, admin_port, "chat.test")
        bulk = BulkClient.open(port, "bulk.test", BULK_BYTES, SLOW_RATE, fast)
        for chatter in chatters:
            chatter.wait_echoed(5)
        wait_bulk_both_ways(bulk, bulk_backend)
        before = tunnels(admin_port)
        assert len(before) == len(chatters) + 1
        old_workers = worker_pids(chain, chain.first.pid)
        prober = Prober(port, "probe.test").start()
        wait_until("two upgrades before the signal", lambda: len(prober.statuses) >= 2)

        old, new = chain.hand_off(1)
        in_flight = bulk_received(bulk, bulk_backend)
        fast.set()
        handed_off_at = len(prober.statuses)
        wait_until("three upgrades after", lambda: len(prober.statuses) >= handed_off_at + 3)
        statuses = prober.finish()
        assert chain.wait_exit(old, DRAIN + EXIT_SLACK) == 0
        assert not any(map(alive, old_workers)), old_workers

        [(pid, sent, kept, seconds)] = chain.hand_offs()
        assert (pid, kept) == (new, 0)
        assert sent >= len(before)
        print(f"hand-off of {sent} tunnels from {WORKERS} workers under load: {seconds:.3f}s")
        assert all(status == 101 for status in statuses), statuses
        assert len(statuses) >= 5, statuses  # two before the hand-off, three after
        after = tunnels(admin_port)  # the new supervisor's worker 1 answers now
        for key, tunnel in before.items():
            assert key in after, (key, sorted(after))
            assert after[key]["route"] == tunnel["route"]
            assert after[key]["bytes_up"] >= tunnel["bytes_up"]  # type: ignore[operator]

        check_bulk_intact(bulk, bulk_backend, in_flight)
        echoes = [chatter.finish() for chatter in chatters]
        assert min(echoes) >= 20, echoes
        bulk.sock.close()
        assert (chat_backend.connections, bulk_backend.accepted) == (len(chatters), 1)
        # Every client's messages reached the backend once each, in order.
        expected = sorted(sha256(str(n)) for count in echoes for n in range(count))
        assert sorted(chat_backend.digests) == expected
        assert error_lines(chain.log()) == []
        stop_last(chain)
    finally:
        fast.set()
        bulk_backend.close()


# --- 2. POST /upgrade on the admin listener ---------------------------------------------------


def test_post_upgrade_with_workers_hands_off_and_answers_the_new_supervisors_pid(
    start_chain: Callable[..., TunnelChain], start_ws_backend: Callable[..., WsBackend]
) -> None:
    backend = start_ws_backend()
    chain = start_chain(workers_config({"chat.test": backend.url}))
    port, admin_port = chain.port(), chain.admin_port()
    old = chain.serving_pid()
    assert old is not None
    chatters = chatters_on_both_workers(port, admin_port, "chat.test")
    before = tunnels(admin_port)

    status, answer = admin(admin_port, "POST", "/upgrade")

    assert status == 200, answer
    assert answer["handed_off"] is True
    assert (answer["tunnels_sent"], answer["tunnels_kept"]) == (len(chatters), 0)
    new = chain.wait_new_pid(old, 1)
    assert answer["pid"] == new
    assert chain.wait_exit(old, DRAIN + EXIT_SLACK) == 0
    for chatter in chatters:
        chatter.wait_echoed(chatter.echoed + 5)
    assert tunnels(admin_port).keys() == before.keys()
    assert upgrade_status(port, "chat.test") == 101
    received = 'tunnel_handoff_tunnels_total{direction="received"}'
    assert merged_metric(admin_port, received) == len(chatters)
    duration = merged_metric(admin_port, "tunnel_handoff_last_duration_seconds")
    assert 0 < duration <= answer["seconds"] + 1, (duration, answer)
    for chatter in chatters:
        chatter.finish()
    assert 'by="worker 1 (POST /upgrade)"' in chain.log()
    assert error_lines(chain.log()) == []
    stop_last(chain)


def tls_chain(
    start_chain: Callable[..., TunnelChain], backend: WsBackend, directory: Path, workers: int
) -> tuple[TunnelChain, ssl.SSLContext, int]:
    """A chain with a plain and a TLS listener (development certificates for ``localhost``)
    in front of ``backend``: the chain, a client context trusting its CA, the TLS port."""
    paths = write_dev_certificates(directory / "certs", ["localhost"])
    context = ssl.create_default_context(cafile=str(paths.ca_cert))
    tls_port = free_port()
    text = config_text(
        {"localhost": backend.url},
        tls=(paths.cert, paths.key),
        tls_port=tls_port,
        workers=workers,
    )
    chain = start_chain(text)
    chain.wait_for("two listeners", lambda _: len(chain.ports()) == 2)
    return chain, context, tls_port


# --- 3. a wss tunnel keeps the old supervisor until it ends -----------------------------------


def test_a_wss_tunnel_keeps_its_old_worker_and_supervisor_until_it_ends(
    start_chain: Callable[..., TunnelChain],
    start_ws_backend: Callable[..., WsBackend],
    tmp_path: Path,
) -> None:
    chain, context, tls_port = tls_chain(start_chain, start_ws_backend(), tmp_path, WORKERS)
    [plain_port] = [port for port in chain.ports() if port != tls_port]
    secure = Chatter(ws_connect(tls_port, "localhost", context)).start()
    plain = Chatter(ws_connect(plain_port, "localhost")).start()
    secure.wait_echoed(5)
    plain.wait_echoed(5)

    old, new = chain.hand_off(1)

    [(_, sent, kept, _)] = chain.hand_offs()
    assert (sent, kept) == (1, 1)
    time.sleep(1.0)
    assert chain.first.poll() is None, "the old supervisor left while its worker served wss"
    secure.wait_echoed(secure.echoed + 10)
    plain.wait_echoed(plain.echoed + 10)
    closed_at = time.monotonic()
    secure.finish()
    assert chain.wait_exit(old, DRAIN + EXIT_SLACK) == 0
    assert time.monotonic() - closed_at < DRAIN, "the old supervisor waited for the drain bound"
    plain.finish()
    assert chain.serving_pid() == new
    assert error_lines(chain.log()) == []
    stop_last(chain)


# --- 4. what the old supervisor refuses, and a new one that cannot start ----------------------


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda text: text + "[[routes]\n", "tunnel.toml"),
        (lambda text: text.replace("workers = 2", "workers = 3"), "server.workers"),
    ],
    ids=["broken-file", "workers-changed"],
)
def test_a_file_the_running_supervisor_cannot_take_refuses_the_hand_off(
    start_chain: Callable[..., TunnelChain],
    start_ws_backend: Callable[..., WsBackend],
    change: Callable[[str], str],
    error: str,
) -> None:
    backend = start_ws_backend()
    chain = start_chain(workers_config({"chat.test": backend.url}))
    port, admin_port = chain.port(), chain.admin_port()
    chatter = Chatter(ws_connect(port, "chat.test")).start()
    chatter.wait_echoed(3)
    chain.config_path.write_text(change(chain.config_path.read_text()))

    chain.signal(chain.first.pid, signal.SIGUSR2)
    line = chain.wait_for(
        "the refusal", lambda log: next((x for x in error_lines(log) if "hand-off" in x), None)
    )
    status, answer = admin(admin_port, "POST", "/upgrade")

    assert "hand-off refused; the configuration does not load" in line, line
    assert error in line, line
    assert status == 400, answer
    assert error in answer["error"], answer
    assert chain.serving_pid() == chain.first.pid
    assert chain.hand_offs() == []
    refused = 'tunnel_handoffs_total{outcome="refused"}'
    wait_until("both refusals counted", lambda: merged_metric(admin_port, refused) >= 2)
    assert merged_metric(admin_port, refused) == 2
    chatter.wait_echoed(chatter.echoed + 5)
    assert upgrade_status(port, "chat.test") == 101
    chatter.finish()
    stop_last(chain)


def test_a_new_supervisor_that_cannot_start_leaves_the_old_one_serving_everything(
    start_chain: Callable[..., TunnelChain], start_ws_backend: Callable[..., WsBackend]
) -> None:
    """The new file adds a listener on a port someone else holds: the check passes (nothing
    is bound by a check), the new supervisor cannot bind it and exits."""
    backend = start_ws_backend()
    chain = start_chain(workers_config({"chat.test": backend.url}))
    port, admin_port = chain.port(), chain.admin_port()
    chatters = chatters_on_both_workers(port, admin_port, "chat.test")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        busy = taken.getsockname()[1]
        added = f'\n[[listeners]]\nlisten = "127.0.0.1:{busy}"\n'
        chain.config_path.write_text(chain.config_path.read_text() + added)
        status, answer = admin(admin_port, "POST", "/upgrade")

    assert status == 409, answer
    assert "the new supervisor" in answer["error"], answer
    errors = error_lines(chain.log())
    assert len([x for x in errors if "hand-off failed" in x]) == 1, errors
    assert "this process keeps serving everything" in errors[-1]
    assert chain.serving_pid() == chain.first.pid
    assert merged_metric(admin_port, 'tunnel_handoffs_total{outcome="failed"}') == 1
    assert merged_metric(admin_port, 'tunnel_handoffs_total{outcome="refused"}') == 0
    for chatter in chatters:
        chatter.wait_echoed(chatter.echoed + 5)
    assert upgrade_status(port, "chat.test") == 101
    for chatter in chatters:
        chatter.finish()
    stop_last(chain)


# --- 5. hand-offs in a row leave no descriptor behind ----------------------------------------


def test_hand_offs_in_a_row_keep_the_tunnels_and_leave_no_descriptor_behind(
    start_chain: Callable[..., TunnelChain], start_ws_backend: Callable[..., WsBackend]
) -> None:
    backend = start_ws_backend()
    chain = start_chain(workers_config({"chat.test": backend.url}))
    port, admin_port = chain.port(), chain.admin_port()
    chatters = chatters_on_both_workers(port, admin_port, "chat.test")
    ids = tunnels(admin_port).keys()

    def held(supervisor: int) -> list[int]:
        return [descriptors(supervisor), *map(descriptors, worker_pids(chain, supervisor))]

    counts = [held(chain.first.pid)]
    for number in range(1, HAND_OFFS + 1):
        old, new = chain.hand_off(number)
        assert chain.wait_exit(old, DRAIN + EXIT_SLACK) == 0, number
        for chatter in chatters:
            chatter.wait_echoed(chatter.echoed + 3)
        counts.append(held(new))
        assert tunnels(admin_port).keys() == ids, number

    print(f"descriptors (supervisor, workers) after each of {HAND_OFFS} hand-offs: {counts}")
    for place in range(1 + WORKERS):
        series = [count[place] for count in counts]
        assert max(series[1:]) - min(series[1:]) <= FD_SLACK, counts
        assert series[-1] - series[0] <= FD_SLACK, counts
    assert [sent for _, sent, _, _ in chain.hand_offs()] == [len(chatters)] * HAND_OFFS
    for chatter in chatters:
        chatter.finish()
    assert backend.connections == len(chatters)
    assert error_lines(chain.log()) == []
    stop_last(chain)


# --- 6. how long a hand-off of 10,000 idle tunnels takes (slow) ------------------------------

MANY = 10_000
FD_HEADROOM = 500
MANY_STOP_SECONDS = 120.0


@pytest.mark.slow
def test_hand_off_duration_for_10000_idle_tunnels_over_two_workers(
    start_chain: Callable[..., TunnelChain],
) -> None:
    """10,000 tunnels take 20,000 descriptors in the tunnel: two workers of 10,000 each fit
    the hard limit of 20,000 per process here, where one process does not."""
    saved = resource.getrlimit(resource.RLIMIT_NOFILE)
    if saved[1] < MANY + FD_HEADROOM:
        pytest.skip(f"{MANY} clients need {MANY + FD_HEADROOM} descriptors; hard limit {saved[1]}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (saved[1], saved[1]))
    backend = IdleBackendProcess()
    clients = []
    try:
        chain = start_chain(
            workers_config({"idle.test": backend.url}, max_tunnels=MANY, splice_pipes=16),
            raise_nofile=True,
        )
        clients = open_idle_tunnels(chain.port(), "idle.test", MANY)

        old, new = chain.hand_off(1)

        [(_, sent, kept, seconds)] = chain.hand_offs()
        print(f"hand-off of {sent} idle tunnels over {WORKERS} workers: {seconds:.3f}s")
        assert (sent, kept) == (MANY, 0)
        assert chain.wait_exit(old, DRAIN + EXIT_SLACK) == 0
        assert upgrade_status(chain.port(), "idle.test") == 101
        stopping = time.monotonic()
        chain.signal(new, signal.SIGTERM)
        assert chain.wait_exit(new, MANY_STOP_SECONDS) == 0
        print(f"then SIGTERM drained {MANY} tunnels in {time.monotonic() - stopping:.1f}s")
    finally:
        for sock in clients:
            sock.close()
        backend.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, saved)


# --- 7. under systemd: the new process says it is the main one --------------------------------


@pytest.mark.parametrize("workers", [1, WORKERS])
def test_the_new_process_tells_systemd_it_is_the_main_process(
    start_chain: Callable[..., TunnelChain],
    start_ws_backend: Callable[..., WsBackend],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    workers: int,
) -> None:
    """What ``NotifyAccess=all`` lets systemd act on (``examples/tunnel.service``): after the
    hand-off, ``MAINPID=`` names the new process (the supervisor with workers), the one in the
    pid file; nothing is said before it took over."""
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    systemd.bind(str(tmp_path / "notify"))
    systemd.settimeout(WAIT_SECONDS)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    try:
        backend = start_ws_backend()
        chain = start_chain(config_text({"chat.test": backend.url}, workers=workers))
        systemd.setblocking(False)
        with pytest.raises(BlockingIOError):
            systemd.recv(100)
        systemd.settimeout(WAIT_SECONDS)

        _, new = chain.hand_off(1)

        assert systemd.recv(100) == f"MAINPID={new}".encode()
        assert chain.serving_pid() == new
        stop_last(chain)
    finally:
        systemd.close()


# --- 8. TLS sessions resume on any worker, and on the next generation -------------------------

RESUMPTIONS = 12
"""Returning visits: with two workers, the odds that all land on the worker that issued the
ticket are 2**-12."""


def tls_visit(
    port: int, context: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> tuple[bool, ssl.SSLSession]:
    """One TLS 1.3 connection offering ``session``: upgrade, read the answer's head (the
    server's tickets come before it), close. Whether the session was resumed, and the one to
    offer next time."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with raw, context.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
        tls.sendall(upgrade_request("localhost"))
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = tls.recv(4096)
            assert chunk, head
            head += chunk
        assert status_of(head) == 101, head
        assert tls.session is not None
        return bool(tls.session_reused), tls.session


@pytest.mark.parametrize("workers", [1, WORKERS])
def test_tls_sessions_resume_on_any_worker_and_across_a_hand_off(
    start_chain: Callable[..., TunnelChain],
    start_ws_backend: Callable[..., WsBackend],
    tmp_path: Path,
    workers: int,
) -> None:
    """The supervisor gives every worker the secret the ticket keys are derived from, and a
    hand-off gives it to the next supervisor: a client resumes wherever it lands."""
    chain, context, tls_port = tls_chain(start_chain, start_ws_backend(), tmp_path, workers)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    reused, session = tls_visit(tls_port, context)
    assert not reused
    visits = [tls_visit(tls_port, context, session)[0] for _ in range(RESUMPTIONS)]
    assert all(visits), visits

    chain.hand_off(1)

    visits = [tls_visit(tls_port, context, session)[0] for _ in range(RESUMPTIONS)]
    assert all(visits), visits
    assert error_lines(chain.log()) == []
    assert "TLS session tickets are per process" not in chain.log()
    stop_last(chain)
