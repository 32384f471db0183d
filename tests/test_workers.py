"""``workers = N``: the restart policy and the reuse-port sockets on their own, then the supervisor
as a real subprocess (``python -m tunnel run --workers 2``) in front of a real echo backend.

Every process a test starts is recorded: the supervisor by its ``Popen``, its workers by the pids
the supervisor logs about its own children. Cleanup signals only those, and only while they still
are what the test started (a worker pid is checked to still be a ``tunnel worker``).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.testing
import websockets.sync.client
from click.testing import CliRunner
from conftest import WsBackend
from cryptography import x509

from tunnel.app import SIGNALS
from tunnel.certs import issue, make_ca
from tunnel.cli import main
from tunnel.config import Address, ListenerConfig, ServerConfig
from tunnel.logs import LOGGER_NAME, TextFormatter, fields
from tunnel.net.listener import ListenError, bind_shared, open_listeners
from tunnel.policy.restart import (
    FAILED_STARTS_TO_GIVE_UP,
    FIRST_BACKOFF,
    MAX_BACKOFF,
    RestartPolicy,
)
from tunnel.supervisor import STOP_SLACK_SECONDS, WORKER_SIGNALS, describe_exit
from tunnel.worker import WorkerTag, wait_for_supervisor_exit

LOOPBACK = "127.0.0.1"
WAIT_SECONDS = 30.0
"""Bound on waiting for anything a subprocess should do; healthy runs take well under a second."""
POLL_SECONDS = 0.02
EXITED_GRACE = 10.0
"""How long the log is still watched once the watched process is gone."""
CONNECTIONS = 20
"""Connections opened to see both workers serve; all landing on one of two is a 1 in 2**19 event."""

# --- the restart policy (pure) ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("uptimes", "waits", "cannot_start"),
    [
        pytest.param([0.2], [0.1], False, id="first-crash"),
        pytest.param([0.2, 0.2, 0.2], [0.1, 0.2, 0.4], True, id="three-failed-starts"),
        pytest.param([5.0] * 8, [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0], False, id="capped"),
        pytest.param([5.0, 5.0, 10.0], [0.1, 0.2, 0.1], False, id="stable-resets-backoff"),
        pytest.param([0.2, 0.2, 1.0, 0.2], [0.1, 0.2, 0.4, 0.8], False, id="started-resets-count"),
        pytest.param([0.0, 0.0, 0.0], [0.1, 0.2, 0.4], True, id="spawn-failures"),
    ],
)
def test_restart_policy_backs_off_and_gives_up_on_failed_starts(
    uptimes: list[float], waits: list[float], cannot_start: bool
) -> None:
    policy = RestartPolicy()
    assert [policy.exited(uptime) for uptime in uptimes] == pytest.approx(waits)
    assert policy.cannot_start is cannot_start


def test_restart_policy_constants_are_the_documented_ones() -> None:
    assert (FIRST_BACKOFF, MAX_BACKOFF, FAILED_STARTS_TO_GIVE_UP) == (0.1, 5.0, 3)


@pytest.mark.parametrize(
    ("returncode", "text"),
    [
        (0, "exited with status 0"),
        (3, "exited with status 3"),
        (-signal.SIGKILL, "killed by SIGKILL"),
        (-signal.SIGSEGV, "killed by SIGSEGV"),
        (-200, "killed by signal 200"),
    ],
)
def test_exit_status_in_operator_language(returncode: int, text: str) -> None:
    assert describe_exit(returncode) == text


def test_worker_lines_are_tagged_with_the_worker_number() -> None:
    record = logging.LogRecord(LOGGER_NAME, logging.INFO, __file__, 1, "tunnel opened", (), None)
    record.__dict__.update(fields(client="1.2.3.4:5"))
    assert WorkerTag(3).filter(record)
    assert TextFormatter().format(record).endswith("tunnel opened client=1.2.3.4:5 worker=3")


def test_a_worker_is_spawned_with_exactly_the_signals_it_handles_blocked() -> None:
    """A signal the worker's ``serve_until_signal`` does not unblock would stay blocked for
    good; one not blocked while spawning could kill the worker before it handles it."""
    assert frozenset(SIGNALS) == WORKER_SIGNALS


# --- reuse-port sockets ----------------------------------------------------------------------


def test_bind_shared_gives_every_family_one_concrete_port() -> None:
    sockets = bind_shared(Address("", 0), listen=False)
    try:
        ports = {sock.getsockname()[1] for sock in sockets}
        assert len(ports) == 1
        assert ports != {0}
    finally:
        for sock in sockets:
            sock.close()


def test_a_reserved_port_takes_no_connections_from_the_listening_ones() -> None:
    [reserved] = bind_shared(Address(LOOPBACK, 0), listen=False)
    port = reserved.getsockname()[1]
    [listening] = bind_shared(Address(LOOPBACK, port), listen=True)
    listening.settimeout(WAIT_SECONDS)
    try:
        for _ in range(CONNECTIONS):
            with socket.create_connection((LOOPBACK, port), timeout=WAIT_SECONDS):
                accepted, _ = listening.accept()
                accepted.close()
    finally:
        reserved.close()
        listening.close()


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port held by a plain listening socket (no SO_REUSEPORT) for the whole test."""
    with socket.socket() as holder:
        holder.bind((LOOPBACK, 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_bind_shared_on_a_busy_port_says_cannot_listen(busy_port: int) -> None:
    with pytest.raises(ListenError) as caught:
        bind_shared(Address(LOOPBACK, busy_port), listen=False)
    assert caught.value.strerror == (
        f"cannot listen on {LOOPBACK}:{busy_port}: Address already in use; "
        "another process holds this port; stop it or pick another port"
    )


async def test_open_listeners_with_reuse_port_share_one_port() -> None:
    first = await open_listeners([ListenerConfig(Address(LOOPBACK, 0))], reuse_port=True)
    port = first[0].socket.getsockname()[1]
    second = await open_listeners([ListenerConfig(Address(LOOPBACK, port))], reuse_port=True)
    try:
        assert second[0].socket.getsockname()[1] == port
        # Without the option, the port is busy: a second tunnel never shares by accident.
        with pytest.raises(ListenError, match="Address already in use"):
            await open_listeners([ListenerConfig(Address(LOOPBACK, port))])
    finally:
        for listener in first + second:
            await listener.aclose()


async def test_a_worker_notices_when_its_supervisor_is_gone() -> None:
    read_end, write_end = os.pipe()
    with trio.fail_after(WAIT_SECONDS):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_for_supervisor_exit, read_end)
            await trio.testing.wait_all_tasks_blocked()
            os.close(write_end)  # what the kernel does when the supervisor exits


# --- the --workers flag ----------------------------------------------------------------------


@pytest.mark.parametrize("workers", ["0", "257", "-1"])
def test_run_refuses_a_worker_count_out_of_range(workers: str) -> None:
    result = CliRunner().invoke(
        main,
        ["run", "--listen", f"{LOOPBACK}:0", "--backend", f"{LOOPBACK}:9", "--workers", workers],
    )
    assert result.exit_code == 1
    assert "--workers: must be between 1 and 256" in result.stderr


# --- the supervisor as a real subprocess -----------------------------------------------------

STARTED = re.compile(r" worker started worker=(\d+) pid=(\d+)")


@dataclass
class TunnelProcess:
    """A ``tunnel`` subprocess whose stdout and stderr (its workers' too) go to ``log_path``."""

    process: subprocess.Popen[bytes]
    log_path: Path
    exited_at: float | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, what: str, ready: Callable[[str], bool]) -> str:
        """Poll the log (bounded by count and time) until ``ready(log)``; return the log."""
        deadline = time.monotonic() + WAIT_SECONDS
        for _ in range(int(WAIT_SECONDS / POLL_SECONDS) + 1):
            if self.process.poll() is not None:
                # Its workers may still write (a killed supervisor's notice its end): a little
                # longer, not the whole bound, for a process that is gone.
                deadline = min(deadline, self._exited_at(time.monotonic()) + EXITED_GRACE)
            text = self.log()
            if ready(text):
                return text
            if time.monotonic() > deadline:
                break
            time.sleep(POLL_SECONDS)
        raise AssertionError(f"gave up waiting for {what}; log:\n{self.log()}")

    def _exited_at(self, now: float) -> float:
        """When this test first saw the process gone."""
        if self.exited_at is None:
            self.exited_at = now
        return self.exited_at

    def wait_listening(self, workers: set[int]) -> None:
        """Until each worker in ``workers`` logged that it listens."""
        self.wait_for(f"workers {workers} listening", lambda log: listening(log) >= workers)

    def workers(self) -> dict[int, int]:
        """Worker number → pid of its latest process, as the supervisor logged them."""
        return {int(number): int(pid) for number, pid in STARTED.findall(self.log())}

    def all_worker_pids(self) -> set[int]:
        return {int(pid) for _, pid in STARTED.findall(self.log())}

    def port(self) -> int:
        """The concrete port (``--listen 127.0.0.1:0``) the supervisor or the process logged."""
        text = self.wait_for("the port", lambda log: PORT.search(log) is not None)
        match = PORT.search(text)
        assert match
        return int(match.group(1))

    def stop(self, signum: int = signal.SIGTERM) -> int:
        self.process.send_signal(signum)
        return self.process.wait(ServerConfig().drain_timeout + STOP_SLACK_SECONDS + WAIT_SECONDS)


PORT = re.compile(r" (?:listen|address)=127\.0\.0\.1:(\d+)")


def listening(log: str) -> set[int]:
    return {int(n) for n in re.findall(r" info listening address=\S+ routes=\S+ worker=(\d+)", log)}


def is_tunnel_worker(pid: int) -> bool:
    """True while ``pid`` is a live ``tunnel worker`` process (not a zombie, not a reused pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state != "Z" and b"tunnel" in cmdline and b"worker" in cmdline


def parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


@pytest.fixture
def start_tunnel_process(tmp_path: Path) -> Iterator[Callable[..., TunnelProcess]]:
    """Factory: ``start(*args)`` runs ``python -m tunnel *args`` (or, with ``script=``, that
    Python script) with its output in a log file; everything it started is stopped afterwards."""
    started: list[TunnelProcess] = []

    def start(
        *args: str, script: str | None = None, stdin: bytes = b"", cwd: Path | None = None
    ) -> TunnelProcess:
        log_path = tmp_path / f"tunnel-{len(started)}.log"
        # -P, as the ``tunnel`` console script: the current directory is not put on sys.path.
        command = [sys.executable, "-P", *(["-c", script] if script else ["-m", "tunnel"])]
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [*command, *args],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=log,
                cwd=cwd,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        assert process.stdin is not None
        process.stdin.write(stdin)
        process.stdin.close()
        running = TunnelProcess(process, log_path)
        started.append(running)
        return running

    yield start
    for running in started:
        process = running.process
        if process.poll() is None:
            process.kill()  # the supervisor this test started; its workers see the lifeline close
            process.wait(WAIT_SECONDS)
        for pid in running.all_worker_pids():
            if is_tunnel_worker(pid):
                os.kill(pid, signal.SIGKILL)  # a worker the supervisor logged as its own child


def echo_once(port: int, message: str = "hello") -> None:
    """A real ``websockets`` client: one message there and back through the tunnel."""
    url = f"ws://{LOOPBACK}:{port}/"
    with websockets.sync.client.connect(url, open_timeout=10, close_timeout=5) as ws:
        ws.send(message)
        assert ws.recv(timeout=10) == message


def run_workers_args(backend: WsBackend, workers: int = 2) -> list[str]:
    return [
        "run",
        "--workers",
        str(workers),
        "--listen",
        f"{LOOPBACK}:0",
        "--backend",
        backend.url,
    ]


def test_two_workers_share_the_port_and_both_serve(
    start_tunnel_process: Callable[..., TunnelProcess], echo_backend: WsBackend
) -> None:
    tunnel = start_tunnel_process(*run_workers_args(echo_backend))
    tunnel.wait_listening({1, 2})
    port = tunnel.port()

    for i in range(CONNECTIONS):
        echo_once(port, f"message {i}")

    log = tunnel.wait_for(
        f"{CONNECTIONS} tunnel opened lines",
        lambda log: log.count(" tunnel opened ") == CONNECTIONS,
    )
    served_by = set(re.findall(r" tunnel opened .* worker=(\d+)", log))
    assert served_by == {"1", "2"}, "the kernel spread the connections over both workers"
    assert echo_backend.connections == CONNECTIONS
    assert len(set(tunnel.workers().values())) == 2
    assert tunnel.stop() == 0


def test_workers_import_the_installed_package_whatever_the_current_directory(
    start_tunnel_process: Callable[..., TunnelProcess], echo_backend: WsBackend, tmp_path: Path
) -> None:
    """A ``tunnel/`` folder in the current directory (certificates kept in ``tunnel/certs/``)
    must not shadow the package in the workers, as ``python -m`` would let it."""
    project = tmp_path / "project"
    (project / "tunnel" / "certs").mkdir(parents=True)
    tunnel = start_tunnel_process(*run_workers_args(echo_backend), cwd=project)
    tunnel.wait_listening({1, 2})
    echo_once(tunnel.port())
    assert "unexpectedly" not in tunnel.log()
    assert tunnel.stop() == 0


def test_the_workers_flag_overrides_the_file(
    start_tunnel_process: Callable[..., TunnelProcess], echo_backend: WsBackend, tmp_path: Path
) -> None:
    config = tmp_path / "tunnel.toml"
    config.write_text(
        f'[server]\nworkers = 3\n[[listeners]]\nlisten = "{LOOPBACK}:0"\n'
        f'[[routes]]\nname = "r"\nbackends = [{{ url = "{echo_backend.url}" }}]\n',
        encoding="utf-8",
    )
    tunnel = start_tunnel_process("run", "--config", str(config), "--workers", "2")
    tunnel.wait_listening({1, 2})
    assert "starting workers workers=2 " in tunnel.log()
    echo_once(tunnel.port())
    assert tunnel.stop() == 0
    assert set(tunnel.workers()) == {1, 2}


def test_a_killed_worker_is_replaced_and_the_port_keeps_serving(
    start_tunnel_process: Callable[..., TunnelProcess], echo_backend: WsBackend
) -> None:
    tunnel = start_tunnel_process(*run_workers_args(echo_backend))
    tunnel.wait_listening({1, 2})
    port = tunnel.port()
    victim = tunnel.workers()[1]
    assert parent_of(victim) == tunnel.process.pid, "only the supervisor's own child is killed"

    os.kill(victim, signal.SIGKILL)

    log = tunnel.wait_for(
        "a replacement for worker 1",
        lambda log: tunnel.workers()[1] != victim and log.count("listening address=") == 3,
    )
    assert re.search(
        rf"worker exited unexpectedly worker=1 pid={victim} "
        r'status="killed by SIGKILL" uptime=\S+ restart_in=\S+',
        log,
    ), log
    replacement = tunnel.workers()[1]
    assert parent_of(replacement) == tunnel.process.pid
    for i in range(CONNECTIONS):
        echo_once(port, f"after the crash {i}")
    assert tunnel.process.poll() is None
    assert tunnel.stop() == 0


def test_sighup_reaches_every_worker_and_nothing_exits(
    start_tunnel_process: Callable[..., TunnelProcess], echo_backend: WsBackend
) -> None:
    tunnel = start_tunnel_process(*run_workers_args(echo_backend))
    tunnel.wait_listening({1, 2})
    workers = tunnel.workers()

    tunnel.process.send_signal(signal.SIGHUP)

    log = tunnel.wait_for(
        "both workers to log SIGHUP",
        lambda log: set(re.findall(r"nothing to reload: .* worker=(\d+)", log)) == {"1", "2"},
    )
    assert "SIGHUP received; passing it on to the workers workers=2" in log
    assert "exited" not in log
    assert tunnel.process.poll() is None
    assert tunnel.workers() == workers
    assert all(is_tunnel_worker(pid) for pid in workers.values())
    echo_once(tunnel.port())
    assert tunnel.stop() == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_stops_every_worker_and_exits_0(
    start_tunnel_process: Callable[..., TunnelProcess], echo_backend: WsBackend, signum: int
) -> None:
    tunnel = start_tunnel_process(*run_workers_args(echo_backend, workers=3))
    tunnel.wait_listening({1, 2, 3})
    port = tunnel.port()
    echo_once(port)
    workers = tunnel.workers()

    assert tunnel.stop(signum) == 0

    log = tunnel.log()
    assert f"stopping workers signal={signal.Signals(signum).name} workers=3" in log
    for number, pid in workers.items():
        assert f'worker stopped worker={number} pid={pid} status="exited with status 0"' in log
        assert not is_tunnel_worker(pid)
    assert "unexpectedly" not in log
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((LOOPBACK, port), timeout=WAIT_SECONDS).close()


def test_a_second_stop_signal_kills_a_worker_that_does_not_stop(
    start_tunnel_process: Callable[..., TunnelProcess], echo_backend: WsBackend
) -> None:
    tunnel = start_tunnel_process(*run_workers_args(echo_backend))
    tunnel.wait_listening({1, 2})
    stuck = tunnel.workers()[2]
    assert parent_of(stuck) == tunnel.process.pid, "only the supervisor's own child is stopped"
    os.kill(stuck, signal.SIGSTOP)  # a stopped process cannot act on SIGTERM; SIGKILL still works

    tunnel.process.send_signal(signal.SIGTERM)
    tunnel.wait_for("the stop to begin", lambda log: "stopping workers" in log)
    assert tunnel.stop() == 0

    log = tunnel.log()
    assert (
        f'killing worker worker=2 pid={stuck} reason="still running 5s after a second stop signal"'
        in log
    )
    assert f'worker stopped worker=2 pid={stuck} status="killed by SIGKILL"' in log
    assert not is_tunnel_worker(stuck)


def test_a_busy_port_exits_1_before_any_worker_starts(
    start_tunnel_process: Callable[..., TunnelProcess], busy_port: int
) -> None:
    tunnel = start_tunnel_process(
        "run", "--workers", "2", "--listen", f"{LOOPBACK}:{busy_port}", "--backend", f"{LOOPBACK}:9"
    )
    assert tunnel.process.wait(WAIT_SECONDS) == 1
    log = tunnel.log()
    assert (
        f"tunnel: cannot listen on {LOOPBACK}:{busy_port}: Address already in use; "
        "another process holds this port" in log
    )
    assert "worker started" not in log
    assert "Traceback" not in log


def test_workers_stop_by_themselves_when_the_supervisor_is_killed(
    start_tunnel_process: Callable[..., TunnelProcess], echo_backend: WsBackend
) -> None:
    tunnel = start_tunnel_process(*run_workers_args(echo_backend))
    tunnel.wait_listening({1, 2})
    workers = tunnel.workers()

    tunnel.process.kill()  # SIGKILL: the supervisor cannot stop its workers itself
    tunnel.process.wait(WAIT_SECONDS)

    tunnel.wait_for(
        "both workers to notice",
        lambda log: log.count("supervisor is gone; stopping this worker") == 2,
    )
    deadline = time.monotonic() + WAIT_SECONDS
    for _ in range(int(WAIT_SECONDS / POLL_SECONDS) + 1):
        if not any(is_tunnel_worker(pid) for pid in workers.values()):
            break
        assert time.monotonic() < deadline, "workers outlived their supervisor"
        time.sleep(POLL_SECONDS)


WORKERS_THAT_CANNOT_START = """\
import os, sys
from tunnel import Config, run_workers
from tunnel.logs import setup_logging

config = Config.from_toml(sys.stdin.read())
setup_logging("text")
os.environ["PYTHONHOME"] = "/nonexistent"  # every worker's interpreter fails as it starts
sys.exit(run_workers(config))
"""


def test_the_supervisor_gives_up_when_no_worker_can_start(
    start_tunnel_process: Callable[..., TunnelProcess],
) -> None:
    config = (
        "[server]\nworkers = 2\n"
        f'[[listeners]]\nlisten = "{LOOPBACK}:0"\n'
        f'[[routes]]\nname = "r"\nbackends = [{{ url = "{LOOPBACK}:9" }}]\n'
    )
    tunnel = start_tunnel_process(script=WORKERS_THAT_CANNOT_START, stdin=config.encode())

    assert tunnel.process.wait(WAIT_SECONDS) == 1
    log = tunnel.log()
    assert "workers cannot start; giving up workers=2" in log
    for number in (1, 2):
        failed = re.findall(rf"worker exited unexpectedly worker={number} ", log)
        assert len(failed) == FAILED_STARTS_TO_GIVE_UP
    assert not any(is_tunnel_worker(pid) for pid in tunnel.all_worker_pids())


def test_sighup_does_not_stop_a_single_process_run(
    start_tunnel_process: Callable[..., TunnelProcess], echo_backend: WsBackend
) -> None:
    tunnel = start_tunnel_process("run", "--listen", f"{LOOPBACK}:0", "--backend", echo_backend.url)
    port = tunnel.port()

    tunnel.process.send_signal(signal.SIGHUP)

    log = tunnel.wait_for("the SIGHUP line", lambda log: "SIGHUP received" in log)
    assert "info nothing to reload: no configuration file, no TLS files; still serving\n" in log
    assert "worker" not in log, "one process: no supervisor, no workers"
    assert tunnel.process.poll() is None
    echo_once(port)
    assert tunnel.stop() == 0


def test_tls_workers_serve_wss_and_sighup_reloads_every_worker(
    start_tunnel_process: Callable[..., TunnelProcess], echo_backend: WsBackend, tmp_path: Path
) -> None:
    """Each worker terminates TLS with the pair passed on the command line (the supervisor
    hands the paths on in the configuration), and SIGHUP to the supervisor makes every worker
    load the files again."""
    ca = make_ca()
    pki = tmp_path / "pki"
    pki.mkdir()
    (pki / "ca.pem").write_bytes(ca.cert_pem)
    first = issue(ca, [LOOPBACK])
    (pki / "cert.pem").write_bytes(first.cert_pem)
    (pki / "key.pem").write_bytes(first.key_pem)
    tunnel = start_tunnel_process(
        *run_workers_args(echo_backend),
        "--tls-cert",
        str(pki / "cert.pem"),
        "--tls-key",
        str(pki / "key.pem"),
    )
    tunnel.wait_listening({1, 2})
    port = tunnel.port()
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    for i in range(4):
        with websockets.sync.client.connect(
            f"wss://{LOOPBACK}:{port}/", ssl=context, open_timeout=10, close_timeout=5
        ) as ws:
            ws.send(f"over TLS {i}")
            assert ws.recv(timeout=10) == f"over TLS {i}"

    second = issue(ca, [LOOPBACK])
    (pki / "cert.pem").write_bytes(second.cert_pem)
    (pki / "key.pem").write_bytes(second.key_pem)
    tunnel.process.send_signal(signal.SIGHUP)
    log = tunnel.wait_for(
        "both workers to reload",
        lambda log: set(re.findall(r"TLS certificates reloaded.* worker=(\d+)", log)) == {"1", "2"},
    )
    assert "not reloaded" not in log
    with (
        socket.create_connection((LOOPBACK, port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=LOOPBACK) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    assert x509.load_der_x509_certificate(der).serial_number == (
        x509.load_pem_x509_certificate(second.cert_pem).serial_number
    )
    assert tunnel.stop() == 0


# --- reloads with workers --------------------------------------------------------------------

ADMIN = re.compile(r" admin listening address=127\.0\.0\.1:(\d+)")


def two_routes(echo_backend: WsBackend, *, keep_second: bool = True, extra: str = "") -> str:
    routes = [("kept", "kept.test"), *([("gone", "gone.test")] if keep_second else [])]
    return (
        f'[server]\nworkers = 2\ndrain_timeout = "3s"\n{extra}'
        f'[admin]\nlisten = "{LOOPBACK}:0"\n'
        f'[[listeners]]\nlisten = "{LOOPBACK}:0"\n'
        + "".join(
            f'[[routes]]\nname = "{name}"\nhosts = ["{host}"]\n'
            f'backends = [{{ name = "b", url = "{echo_backend.url}" }}]\n'
            for name, host in routes
        )
    )


def status_for_host(port: int, host: str) -> int:
    """The status a WebSocket upgrade for ``host`` gets (101 when it echoes)."""
    sock = socket.create_connection((LOOPBACK, port), timeout=WAIT_SECONDS)
    try:
        with websockets.sync.client.connect(f"ws://{host}/", sock=sock, open_timeout=10) as ws:
            ws.send("ping")
            assert ws.recv(timeout=10) == "ping"
            return 101
    except websockets.exceptions.InvalidStatus as refused:
        return refused.response.status_code


def admin_post(port: int, path: str) -> tuple[int, dict[str, object]]:
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=WAIT_SECONDS)
    try:
        connection.request("POST", path)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_a_reload_with_workers_is_checked_once_and_reaches_every_worker(
    start_tunnel_process: Callable[..., TunnelProcess], echo_backend: WsBackend, tmp_path: Path
) -> None:
    config_file = tmp_path / "tunnel.toml"
    config_file.write_text(two_routes(echo_backend))
    tunnel = start_tunnel_process("run", "--config", str(config_file))
    tunnel.wait_listening({1, 2})
    port = int(re.findall(r"starting workers .* listen=127\.0\.0\.1:(\d+)", tunnel.log())[0])
    admin = int(ADMIN.findall(tunnel.wait_for("the admin port", ADMIN.search))[0])
    assert status_for_host(port, "gone.test") == 101

    # A broken file: one error line, from the supervisor alone, and nothing changes.
    config_file.write_text(two_routes(echo_backend).replace('"3s"', '"3 parsecs"'))
    tunnel.process.send_signal(signal.SIGHUP)
    log = tunnel.wait_for("the refusal", lambda log: "configuration not reloaded" in log)
    [refusal] = [line for line in log.splitlines() if "configuration not reloaded" in line]
    assert "server.drain_timeout" in refusal
    assert "worker=" not in refusal, "the supervisor reads the file once, not each worker"
    status, answer = admin_post(admin, "/reload")
    assert status == 400
    assert "server.drain_timeout" in str(answer["error"])
    assert status_for_host(port, "gone.test") == 101

    # A good file through POST /reload on the shared admin address: every worker applies it.
    config_file.write_text(two_routes(echo_backend, keep_second=False))
    status, answer = admin_post(admin, "/reload")
    assert status == 200
    assert answer == {
        "reloaded": True,
        "workers": 2,
        "routes_added": [],
        "routes_removed": ["gone"],
    }
    tunnel.wait_for(
        "both workers to apply it",
        lambda log: (
            set(re.findall(r"info configuration reloaded .* worker=(\d+)", log)) == {"1", "2"}
        ),
    )
    # Connections land on either worker: each of them must know the route is gone.
    assert {status_for_host(port, "gone.test") for _ in range(8)} == {404}
    assert status_for_host(port, "kept.test") == 101
    assert tunnel.process.poll() is None
    assert tunnel.workers().keys() == {1, 2}
    assert "exited unexpectedly" not in tunnel.log()
    assert tunnel.stop() == 0
    assert "stopping workers signal=SIGTERM workers=2 stop_timeout=10s" in tunnel.log()
