"""Live hand-off end to end: ``tunnel run --config FILE`` as operators run it, then SIGUSR2 or
``POST /upgrade``, with real clients and backends on loopback.

Shown here: a ``websockets`` tunnel echoing every 20 ms and a 64 MiB stream each way keep their
TCP connections on both sides across the hand-off (each backend accepts once; every message in
order; SHA-256 identical both ways), new upgrades every 100 ms all get 101, the pid file names
the new process, the old one exits 0 and ``/stats.json`` (now the new process's) lists the moved
tunnels with their ids and counters; a wss tunnel stays in the old process, which serves it
until it ends; a broken config file refuses the hand-off and changes nothing; 20 hand-offs in a
row leave no descriptor behind. The ``slow`` test measures the hand-off of many idle tunnels.

Processes: see ``handoffpeers`` (the test is the subreaper of the chain it started, and signals
only processes running ``tunnel run`` with its own config file).
"""

from __future__ import annotations

import re
import resource
import signal
import ssl
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
from conftest import WsBackend
from handoffpeers import (
    DRAIN,
    EXIT_SLACK,
    TAKEN_OVER,
    BulkBackend,
    BulkClient,
    Chatter,
    IdleBackend,
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
    tunnels_by_route,
    upgrade_status,
    wait_bulk_both_ways,
    wait_until,
    ws_connect,
)

from tunnel.certs import write_dev_certificates

BULK_BYTES = 64 * 2**20
SLOW_RATE = 4 * 2**20
"""Bytes a second each bulk direction sends until the hand-off is done: slow enough that the
hand-off always lands in the middle of the stream, with bytes in flight both ways."""
FD_SLACK = 2
"""Descriptors the last process of a chain may hold beyond the first's: none is expected
(the hand-off socket is closed once the tunnels are adopted); two allow for a descriptor the
runtime opens lazily (an epoll set, a wake-up pipe) in one process and not yet in the other."""
HAND_OFFS = 20


# --- 1. SIGUSR2 moves a chatty tunnel and a 64 MiB stream; new upgrades never fail ------------


def test_sigusr2_moves_live_tunnels_to_the_new_process(
    start_chain: Callable[..., TunnelChain], start_ws_backend: Callable[..., WsBackend]
) -> None:
    chat_backend, probe_backend = start_ws_backend(), start_ws_backend()
    fast = threading.Event()
    bulk_backend = BulkBackend(BULK_BYTES, SLOW_RATE, fast)
    try:
        chain = start_chain(
            config_text(
                {
                    "chat.test": chat_backend.url,
                    "bulk.test": bulk_backend.url,
                    "probe.test": probe_backend.url,
                }
            )
        )
        port, admin_port = chain.port(), chain.admin_port()
        chatter = Chatter(ws_connect(port, "chat.test")).start()
        bulk = BulkClient.open(port, "bulk.test", BULK_BYTES, SLOW_RATE, fast)
        chatter.wait_echoed(10)
        wait_bulk_both_ways(bulk, bulk_backend)
        before = tunnels_by_route(admin_port)
        assert {"chat", "bulk"} <= before.keys()
        prober = Prober(port, "probe.test").start()
        wait_until("two upgrades before the signal", lambda: len(prober.statuses) >= 2)

        old, new = chain.hand_off(1)
        in_flight = bulk_received(bulk, bulk_backend)
        fast.set()
        handed_off_at = len(prober.statuses)
        wait_until("two upgrades after", lambda: len(prober.statuses) >= handed_off_at + 2)
        statuses = prober.finish()
        assert chain.wait_exit(old, DRAIN + EXIT_SLACK) == 0

        [(pid, sent, kept, seconds)] = chain.hand_offs()
        assert (pid, kept) == (new, 0)
        assert sent >= 2  # chat, bulk (and perhaps a probe caught between 101 and close)
        print(f"hand-off of {sent} tunnels under load: {seconds:.3f}s")
        assert all(status == 101 for status in statuses), statuses
        assert len(statuses) >= 4, statuses  # two before the hand-off, two after
        after = tunnels_by_route(admin_port)  # the old process is gone: the new one answers
        for route in ("chat", "bulk"):
            assert after[route]["id"] == before[route]["id"]
            assert after[route]["bytes_up"] >= before[route]["bytes_up"] > 0
            assert after[route]["bytes_down"] >= before[route]["bytes_down"] > 0

        check_bulk_intact(bulk, bulk_backend, in_flight)
        echoes = chatter.finish()
        assert echoes >= 20
        bulk.sock.close()
        assert (chat_backend.connections, bulk_backend.accepted) == (1, 1)
        assert chat_backend.digests == [sha256(str(n)) for n in range(echoes)]  # in order
        assert error_lines(chain.log()) == []
        stop_last(chain)
    finally:
        fast.set()
        bulk_backend.close()


# --- 2. POST /upgrade does the same and says so ----------------------------------------------


def test_post_upgrade_hands_off_and_answers_the_new_pid(
    start_chain: Callable[..., TunnelChain], start_ws_backend: Callable[..., WsBackend]
) -> None:
    backend = start_ws_backend()
    chain = start_chain(config_text({"chat.test": backend.url}))
    port, admin_port = chain.port(), chain.admin_port()
    old = chain.serving_pid()
    chatter = Chatter(ws_connect(port, "chat.test")).start()
    chatter.wait_echoed(5)
    before = tunnels_by_route(admin_port)["chat"]

    status, answer = admin(admin_port, "POST", "/upgrade")

    assert status == 200, answer
    assert answer["handed_off"] is True
    assert answer["tunnels_sent"] == 1
    assert answer["tunnels_kept"] == 0
    assert old is not None
    new = chain.wait_new_pid(old, 1)
    assert answer["pid"] == new
    assert chain.wait_exit(old, DRAIN + EXIT_SLACK) == 0
    echoed = chatter.echoed
    chatter.wait_echoed(echoed + 10)
    after = tunnels_by_route(admin_port)["chat"]
    assert after["id"] == before["id"]
    assert after["bytes_up"] >= before["bytes_up"] > 0
    assert upgrade_status(port, "chat.test") == 101
    status, metrics = admin(admin_port, "GET", "/metrics")
    assert status == 200
    assert 'tunnel_handoff_tunnels_total{direction="received"} 1.0' in metrics
    [duration] = re.findall(r"^tunnel_handoff_last_duration_seconds (\S+)$", metrics, re.M)
    assert 0 < float(duration) <= answer["seconds"] + 1, (duration, answer)
    chatter.finish()
    assert backend.connections == 2  # the tunnel, and the one upgrade after the hand-off
    assert "by=POST /upgrade" in chain.log() or 'by="POST /upgrade"' in chain.log()
    stop_last(chain)


# --- 3. a wss tunnel stays in the old process until it ends -----------------------------------


@pytest.fixture
def certificates(tmp_path: Path) -> tuple[Path, Path, ssl.SSLContext]:
    paths = write_dev_certificates(tmp_path / "certs", ["localhost"])
    context = ssl.create_default_context(cafile=str(paths.ca_cert))
    return paths.cert, paths.key, context


def test_a_wss_tunnel_stays_in_the_old_process_until_it_ends(
    start_chain: Callable[..., TunnelChain],
    start_ws_backend: Callable[..., WsBackend],
    certificates: tuple[Path, Path, ssl.SSLContext],
) -> None:
    cert, key, context = certificates
    backend = start_ws_backend()
    tls_port = free_port()
    chain = start_chain(config_text({"localhost": backend.url}, tls=(cert, key), tls_port=tls_port))
    chain.wait_for("two listeners", lambda _: len(chain.ports()) == 2)
    [plain_port] = [port for port in chain.ports() if port != tls_port]
    secure = Chatter(ws_connect(tls_port, "localhost", context)).start()
    plain = Chatter(ws_connect(plain_port, "localhost")).start()
    secure.wait_echoed(5)
    plain.wait_echoed(5)

    old, new = chain.hand_off(1)

    [(_, sent, kept, _)] = chain.hand_offs()
    assert (sent, kept) == (1, 1)
    time.sleep(1.0)  # the old process keeps serving the wss tunnel meanwhile
    assert chain.first.poll() is None, chain.log()
    echoed = secure.echoed
    secure.wait_echoed(echoed + 10)
    fresh = ws_connect(tls_port, "localhost", context)  # the TLS listener moved too
    fresh.send("new")
    assert fresh.recv(timeout=10) == "new"
    fresh.close()
    closed_at = time.monotonic()
    secure.finish()
    assert chain.wait_exit(old, DRAIN + EXIT_SLACK) == 0
    assert time.monotonic() - closed_at < DRAIN, "the old process waited for its drain bound"
    plain.wait_echoed(plain.echoed + 5)
    plain.finish()
    assert backend.connections == 3
    assert chain.serving_pid() == new
    assert error_lines(chain.log()) == []
    stop_last(chain)


def test_a_wss_tunnel_that_never_ends_is_closed_within_drain_timeout(
    start_chain: Callable[..., TunnelChain],
    start_ws_backend: Callable[..., WsBackend],
    certificates: tuple[Path, Path, ssl.SSLContext],
) -> None:
    cert, key, context = certificates
    backend = start_ws_backend()
    drain = 3.0
    tls_port = free_port()
    chain = start_chain(
        config_text(
            {"localhost": backend.url},
            tls=(cert, key),
            tls_port=tls_port,
            drain_timeout=f"{drain:g}s",
        )
    )
    chain.wait_for("two listeners", lambda _: len(chain.ports()) == 2)
    ws = ws_connect(tls_port, "localhost", context)
    ws.send("before")
    assert ws.recv(timeout=10) == "before"

    old, _ = chain.hand_off(1)
    signalled = time.monotonic()

    assert chain.wait_exit(old, drain + EXIT_SLACK) == 0
    assert time.monotonic() - signalled < drain + EXIT_SLACK
    # Closes are spread over the drain window (no reconnect herd): any moment within it.
    assert re.search(r" tunnel closed .* tunnel=1 .* reason=(shutdown|drain)\b", chain.log())
    with pytest.raises(Exception, match="1001"):
        ws.recv(timeout=10)
    ws.close()
    stop_last(chain)


def test_two_listeners_on_port_0_keep_their_own_sockets_across_a_hand_off(
    start_chain: Callable[..., TunnelChain],
    start_ws_backend: Callable[..., WsBackend],
    certificates: tuple[Path, Path, ssl.SSLContext],
) -> None:
    """Each door of the new process accepts on its own socket only: every one of
    ``FRESH_TLS`` new wss connections to the TLS port meets TLS (one door of two on the same
    socket, answering plain HTTP, fails one in two)."""
    cert, key, context = certificates
    backend = start_ws_backend()
    chain = start_chain(config_text({"localhost": backend.url}, tls=(cert, key)))
    ports = chain.wait_for("two listeners", lambda _: len(chain.ports()) == 2 and chain.ports())
    tls_port = next(port for port in ports if wss_works(port, context))

    chain.hand_off(1)

    assert all(wss_works(tls_port, context) for _ in range(FRESH_TLS))


FRESH_TLS = 20


def wss_works(port: int, context: ssl.SSLContext) -> bool:
    try:
        with ws_connect(port, "localhost", context) as ws:
            ws.send("tls?")
            return bool(ws.recv(timeout=10) == "tls?")
    except (ssl.SSLError, OSError):
        return False


# --- 4. a broken config file refuses the hand-off ---------------------------------------------


def test_a_broken_config_refuses_the_hand_off_and_the_old_process_keeps_serving(
    start_chain: Callable[..., TunnelChain], start_ws_backend: Callable[..., WsBackend]
) -> None:
    backend = start_ws_backend()
    chain = start_chain(config_text({"chat.test": backend.url}))
    port, admin_port = chain.port(), chain.admin_port()
    pid = chain.serving_pid()
    assert pid == chain.first.pid
    chatter = Chatter(ws_connect(port, "chat.test")).start()
    chatter.wait_echoed(5)
    chain.config_path.write_text(
        chain.config_path.read_text().replace('drain_timeout = "10s"', 'drain_timeout = "ever"')
    )

    chain.signal(pid, signal.SIGUSR2)
    [line] = chain.wait_for("the refusal", lambda log: error_lines(log))
    assert "hand-off refused" in line, line
    assert "drain_timeout" in line, line
    status, answer = admin(admin_port, "POST", "/upgrade")

    assert status == 400, answer
    assert "drain_timeout" in str(answer)
    assert len(error_lines(chain.log())) == 2  # one line for each attempt
    assert chain.hand_offs() == []
    assert "SIGUSR2 received" in chain.log()
    assert chain.serving_pid() == pid
    assert chain.first.poll() is None
    assert upgrade_status(port, "chat.test") == 101
    chatter.wait_echoed(chatter.echoed + 5)
    chatter.finish()
    assert backend.connections == 2
    stop_last(chain)


# --- 5. twenty hand-offs in a row leave no descriptor behind ----------------------------------


def test_twenty_hand_offs_keep_a_tunnel_and_leave_no_descriptor_behind(
    start_chain: Callable[..., TunnelChain], start_ws_backend: Callable[..., WsBackend]
) -> None:
    backend = start_ws_backend()
    chain = start_chain(config_text({"chat.test": backend.url}))
    chatter = Chatter(ws_connect(chain.port(), "chat.test")).start()
    chatter.wait_echoed(5)
    counts = [descriptors(chain.first.pid)]

    for number in range(1, HAND_OFFS + 1):
        old, new = chain.hand_off(number)
        assert chain.wait_exit(old, DRAIN + EXIT_SLACK) == 0, number
        chain.wait_for(f"adoption {number}", partial(adopted, count=number))
        chatter.wait_echoed(chatter.echoed + 3)
        counts.append(descriptors(new))

    print(f"descriptors after each of {HAND_OFFS} hand-offs: {counts}")
    assert [sent for _, sent, _, _ in chain.hand_offs()] == [1] * HAND_OFFS
    assert 0 <= counts[-1] - counts[0] <= FD_SLACK, counts
    assert max(counts[1:]) - min(counts[1:]) <= FD_SLACK, counts
    chatter.finish()
    assert backend.connections == 1
    assert error_lines(chain.log()) == []
    stop_last(chain)


def adopted(log: str, count: int) -> bool:
    return log.count(TAKEN_OVER) >= count


# --- 6. how long a hand-off of many idle tunnels takes (slow) ---------------------------------

IDLE_TUNNELS = (1000,)
"""10,000 tunnels need 20,000 descriptors in the tunnel process (two each), the hard
RLIMIT_NOFILE here: ``tests/test_handoff_workers.py`` measures them over two workers."""
FD_HEADROOM = 500
MANY_STOP_SECONDS = 120.0
"""Bound on the drain of the adopted tunnels at the end (the Close frames and their grace are
paced by the tunnel, and this process's one-thread backend reads them all)."""


@pytest.mark.slow
@pytest.mark.parametrize("count", IDLE_TUNNELS)
def test_hand_off_duration_for_many_idle_tunnels(
    start_chain: Callable[..., TunnelChain], count: int
) -> None:
    saved = resource.getrlimit(resource.RLIMIT_NOFILE)
    if 2 * count + FD_HEADROOM > saved[1]:
        pytest.skip(
            f"{count} tunnels need {2 * count + FD_HEADROOM} descriptors; hard limit {saved[1]}"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (saved[1], saved[1]))
    backend = IdleBackend()
    clients = []
    try:
        chain = start_chain(
            config_text({"idle.test": backend.url}, max_tunnels=count + 100, splice_pipes=16),
            raise_nofile=True,
        )
        clients = open_idle_tunnels(chain.port(), "idle.test", count)
        before = descriptors(chain.first.pid)

        old, new = chain.hand_off(1)

        [(_, sent, kept, seconds)] = chain.hand_offs()
        print(f"hand-off of {sent} idle tunnels: {seconds:.3f}s (old process held {before} fds)")
        assert (sent, kept) == (count, 0)
        assert chain.wait_exit(old, DRAIN + EXIT_SLACK) == 0
        assert descriptors(new) >= 2 * count
        assert upgrade_status(chain.port(), "idle.test") == 101
        stopping = time.monotonic()
        chain.signal(new, signal.SIGTERM)
        assert chain.wait_exit(new, MANY_STOP_SECONDS) == 0
        print(f"then SIGTERM drained {count} tunnels in {time.monotonic() - stopping:.1f}s")
    finally:
        for sock in clients:
            sock.close()
        backend.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, saved)


# --- per-client caps follow the tunnels they count ----------------------------------------------


def test_a_moved_tunnel_still_counts_against_its_clients_cap(
    start_chain: Callable[..., TunnelChain], start_ws_backend: Callable[..., WsBackend]
) -> None:
    """per_ip_tunnels = 1: the one tunnel is handed over, and the new process refuses the
    same client a second one until it closes."""
    backend = start_ws_backend()
    text = config_text({"chat.test": backend.url})
    text += "[routes.limits]\nper_ip_tunnels = 1\n"
    chain = start_chain(text)
    port = chain.port()
    old = chain.serving_pid()
    chatter = Chatter(ws_connect(port, "chat.test")).start()
    chatter.wait_echoed(3)
    assert upgrade_status(port, "chat.test") == 429
    assert old is not None
    chain.hand_off(1)
    assert chain.wait_exit(old, DRAIN + EXIT_SLACK) == 0
    chatter.wait_echoed(chatter.echoed + 5)
    assert upgrade_status(port, "chat.test") == 429
    chatter.finish()
    deadline = time.monotonic() + 10
    while upgrade_status(port, "chat.test") != 101:
        assert time.monotonic() < deadline, "the moved tunnel's slot was never given back"
        time.sleep(0.1)
    stop_last(chain)
