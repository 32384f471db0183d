"""systemd socket activation: the protocol (``LISTEN_PID``, ``LISTEN_FDS``, ``LISTEN_FDNAMES``)
read from real descriptors, matching inherited sockets to listener addresses, the listeners
built on them, then ``tunnel run`` as a real subprocess started the way systemd starts it (a
listening socket as fd 3, the variables set for its own pid), alone and with ``--workers 2``,
and the example unit files.

Every socket a test binds is on 127.0.0.1 or ::1. Every process a test starts is recorded and
stopped by that record: the launcher's ``Popen`` (it execs the tunnel, so its pid is the
tunnel's), and workers only by the pids their supervisor logged, checked to be its children.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
import websockets.sync.client
from conftest import WsBackend
from test_workers import TunnelProcess

from tunnel.config import Address, Config, ListenerConfig
from tunnel.logs import LOGGER_NAME
from tunnel.net.activation import (
    ActivationError,
    Inherited,
    InheritedSocket,
    check_listening,
    from_supervisor,
    listen_fd_argument,
    listen_fds,
    parse_listen_fd,
    serves,
)
from tunnel.net.listener import open_listener_groups

LOOPBACK = "127.0.0.1"
WAIT_SECONDS = 30.0
"""Bound on waiting for anything a subprocess should do; healthy runs take about a second."""
POLL_SECONDS = 0.02
PID = 4242
"""The pid the pure tests read the variables as (any number: no process is involved)."""
ROOT = Path(__file__).resolve().parent.parent

# --- helpers ---------------------------------------------------------------------------------


def listening_socket(host: str = LOOPBACK, family: int = socket.AF_INET) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen()
    return sock


def free_fds(count: int) -> int:
    """The first of ``count`` consecutive descriptor numbers that are not open."""
    for base in range(64, 1024):
        if not any(is_open(fd) for fd in range(base, base + count)):
            return base
    raise AssertionError("no free descriptor numbers between 64 and 1024")


def is_open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError as exc:
        if exc.errno != errno.EBADF:
            raise
        return False
    return True


@contextmanager
def passed_as_fds(*files: socket.socket | int) -> Iterator[int]:
    """Duplicates of ``files`` at consecutive descriptor numbers, inheritable, as systemd passes
    them; yields the first number. Those left open afterwards are closed."""
    base = free_fds(len(files))
    for i, file in enumerate(files):
        os.dup2(file if isinstance(file, int) else file.fileno(), base + i, inheritable=True)
    try:
        yield base
    finally:
        for fd in range(base, base + len(files)):
            if is_open(fd):
                os.close(fd)


def environment(fds: int, pid: int = PID, names: str | None = None) -> dict[str, str]:
    env = {"LISTEN_PID": str(pid), "LISTEN_FDS": str(fds), "OTHER": "kept"}
    if names is not None:
        env["LISTEN_FDNAMES"] = names
    return env


class Records(logging.Handler):
    """The tunnel logger's records during one test (whatever ``setup_logging`` did before)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def named(self, message: str) -> list[dict[str, object]]:
        return [r.fields for r in self.records if r.getMessage() == message]  # type: ignore[attr-defined]


@pytest.fixture
def records() -> Iterator[Records]:
    logger = logging.getLogger(LOGGER_NAME)
    handler, level = Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


# --- the protocol (sd_listen_fds) ------------------------------------------------------------


def test_no_listen_pid_means_no_sockets_and_the_variables_are_removed() -> None:
    env = {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b", "OTHER": "kept"}
    assert listen_fds(env, PID) == []
    assert env == {"OTHER": "kept"}


def test_sockets_for_another_pid_are_not_taken(records: Records) -> None:
    with listening_socket() as sock, passed_as_fds(sock) as fd:
        env = environment(1, pid=PID + 1)
        assert listen_fds(env, PID, start=fd) == []
        assert env == {"OTHER": "kept"}, "unset as sd_listen_fds(1) does: a child must not read"
        assert os.get_inheritable(fd), "not ours: left exactly as it was"
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC == 0
    [line] = records.named("LISTEN_FDS is for another process; not taking its sockets")
    assert line["pid"] == PID
    assert f"LISTEN_PID={PID + 1}" in str(line["reason"])
    assert "exec" in str(line["reason"])


def test_count_and_names_take_each_socket_close_on_exec() -> None:
    with (
        listening_socket() as first,
        listening_socket("::1", socket.AF_INET6) as second,
        passed_as_fds(first, second) as fd,
    ):
        env = environment(2, names="web:admin")
        taken = listen_fds(env, PID, start=fd)
        try:
            assert [(t.fd, t.name) for t in taken] == [(fd, "web"), (fd + 1, "admin")]
            assert [t.sock.getsockname()[:2] for t in taken] == [
                first.getsockname()[:2],
                second.getsockname()[:2],
            ]
            assert [t.address for t in taken] == [
                f"{LOOPBACK}:{first.getsockname()[1]}",
                f"[::1]:{second.getsockname()[1]}",
            ]
            assert all(not os.get_inheritable(t.fd) for t in taken), "FD_CLOEXEC set"
            assert env == {"OTHER": "kept"}
            assert taken[0].describe() == f'fd {fd} ({taken[0].address}, name "web")'
        finally:
            for t in taken:
                t.sock.close()


def test_without_names_every_socket_is_unknown() -> None:
    with listening_socket() as sock, passed_as_fds(sock) as fd:
        [taken] = listen_fds(environment(1), PID, start=fd)
        with taken.sock:
            assert taken.name == "unknown"
            assert taken.describe() == f"fd {fd} ({taken.address})"


def test_no_listen_fds_or_zero_means_no_sockets() -> None:
    assert listen_fds({"LISTEN_PID": str(PID)}, PID) == []
    assert listen_fds(environment(0, names="web"), PID) == []


@pytest.mark.parametrize(
    ("env", "message"),
    [
        pytest.param(
            {"LISTEN_PID": "me", "LISTEN_FDS": "1"},
            "LISTEN_PID='me' is not a process id",
            id="pid-not-a-number",
        ),
        pytest.param(
            {"LISTEN_PID": str(PID), "LISTEN_FDS": "-1"},
            "LISTEN_FDS='-1' is not a number of descriptors",
            id="count-negative",
        ),
        pytest.param(
            {"LISTEN_PID": str(PID), "LISTEN_FDS": "two"},
            "LISTEN_FDS='two' is not a number of descriptors",
            id="count-not-a-number",
        ),
        pytest.param(
            {"LISTEN_PID": str(PID), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "a:b"},
            "LISTEN_FDNAMES='a:b' names 2 sockets but LISTEN_FDS=1",
            id="names-miscounted",
        ),
    ],
)
def test_malformed_variables_are_refused_naming_the_variable(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ActivationError) as caught:
        listen_fds(env, PID, start=free_fds(2))
    assert caught.value.strerror.startswith(message)
    assert env == {}


@contextmanager
def udp_socket() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((LOOPBACK, 0))
        yield sock


@contextmanager
def bound_not_listening() -> Iterator[socket.socket]:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        yield sock


@contextmanager
def unix_listening(tmp_path: Path) -> Iterator[socket.socket]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(tmp_path / "s"))
        sock.listen()
        yield sock


@contextmanager
def pipe_end() -> Iterator[int]:
    read_end, write_end = os.pipe()
    try:
        yield read_end
    finally:
        os.close(read_end)
        os.close(write_end)


@contextmanager
def regular_file(tmp_path: Path) -> Iterator[int]:
    fd = os.open(tmp_path / "file", os.O_RDWR | os.O_CREAT)
    try:
        yield fd
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        pytest.param(lambda tmp: pipe_end(), "is not a socket but a pipe", id="pipe"),
        pytest.param(regular_file, "is not a socket but a regular file", id="file"),
        pytest.param(lambda tmp: udp_socket(), "is a UDP socket (127.0.0.1:", id="udp"),
        pytest.param(
            lambda tmp: bound_not_listening(), "is a TCP socket (127.0.0.1:", id="not-listening"
        ),
        pytest.param(unix_listening, "is a Unix socket", id="unix"),
    ],
)
def test_anything_but_a_listening_tcp_socket_is_refused_naming_the_fd(
    tmp_path: Path,
    make: Callable[[Path], AbstractContextManager[socket.socket | int]],
    problem: str,
) -> None:
    with (
        listening_socket() as good,
        make(tmp_path) as bad,
        passed_as_fds(good, bad) as fd,
    ):
        env = environment(2, names="web:other")
        with pytest.raises(ActivationError) as caught:
            listen_fds(env, PID, start=fd)
        message = caught.value.strerror
        assert message.startswith(f'inherited fd {fd + 1} (name "other") {problem}'), message
        assert "ListenStream=" in message, "says what to do"
        assert is_open(fd), "nothing taken, nothing closed"
        assert is_open(fd + 1)
        assert os.get_inheritable(fd), "the good one is left as it was too"


def test_a_descriptor_that_is_not_open_is_refused() -> None:
    fd = free_fds(1)
    with pytest.raises(ActivationError) as caught:
        check_listening(fd)
    assert caught.value.errno == errno.EBADF
    assert caught.value.strerror.startswith(f"inherited fd {fd} is not open")


# --- which listener an inherited socket serves -----------------------------------------------


@pytest.mark.parametrize(
    ("listen", "host", "port", "expected"),
    [
        (":8080", "0.0.0.0", 8080, True),
        (":8080", "::", 8080, True),
        (":8080", "127.0.0.1", 8080, False),
        ("0.0.0.0:8080", "0.0.0.0", 8080, True),
        ("0.0.0.0:8080", "::", 8080, False),
        ("[::]:8080", "::", 8080, True),
        ("127.0.0.1:8080", "127.0.0.1", 8080, True),
        ("127.0.0.1:8080", "127.0.0.1", 8081, False),
        ("127.0.0.1:8080", "0.0.0.0", 8080, False),
        ("[::1]:8080", "::1", 8080, True),
        ("[0:0:0:0:0:0:0:1]:8080", "::1", 8080, True),
        ("localhost:8080", "127.0.0.1", 8080, True),
        ("localhost:8080", "10.0.0.1", 8080, False),
        ("127.0.0.1:0", "127.0.0.1", 0, False),
        (":0", "0.0.0.0", 0, False),
    ],
)
def test_a_listener_serves_the_socket_it_would_have_bound(
    listen: str, host: str, port: int, expected: bool
) -> None:
    assert serves(Address.parse(listen, "listen"), host, port) is expected


def address_of(sock: socket.socket) -> Address:
    host, port = sock.getsockname()[:2]
    return Address(host, port)


def inherit(*socks: socket.socket) -> list[InheritedSocket]:
    """The tests' own sockets as inherited ones (duplicates, which ``Inherited`` owns)."""
    return [InheritedSocket(100 + i, f"s{i}", s.dup()) for i, s in enumerate(socks)]


def test_claim_assigns_matching_sockets_and_closes_the_others(records: Records) -> None:
    with listening_socket() as used, listening_socket() as stray:
        used_one, stray_one = inherit(used, stray)
        inherited = Inherited([used_one, stray_one])
        assert not inherited.settled
        other = Address(LOOPBACK, 0)

        assert inherited.claim([other, address_of(used)]) == [[], [used_one]]

        assert inherited.settled
        assert stray_one.sock.fileno() == -1, "closed"
        assert used_one.sock.fileno() != -1
        [warning] = records.named("inherited socket matches no listener; closed")
        assert warning["address"] == str(address_of(stray))
        assert f'fd 101 ({address_of(stray)}, name "s1")' in str(warning["reason"])
        assert "Add a listener for it, or remove it from the .socket unit" in str(warning["reason"])
        [info] = records.named("using an inherited listening socket")
        assert info == {"address": used_one.address, "listener": str(address_of(used))}
        # Later calls (a reload) find what the first assigned, and nothing else.
        assert inherited.claim([address_of(stray), address_of(used)]) == [[], [used_one]]
        assert inherited.assigned() == [(address_of(used), 100)]
        used_one.sock.close()


def test_an_ipv6_socket_that_takes_ipv4_is_warned_about(records: Records) -> None:
    """As ``ListenStream=8080`` makes by default: ``[::]`` without IPV6_V6ONLY. The same on
    loopback only is an IPv4-mapped address."""
    with socket.socket(socket.AF_INET6) as sock:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::ffff:127.0.0.1", 0))
        sock.listen()
        [one] = inherit(sock)
        Inherited([one]).claim([address_of(sock)])
        one.sock.close()
    [warning] = records.named("inherited IPv6 socket also accepts IPv4")
    assert "BindIPv6Only=ipv6-only" in str(warning["reason"])


async def test_listeners_accept_on_duplicates_of_inherited_sockets() -> None:
    """A listener with an inherited socket accepts on it (even with ``reuse_port``, as every
    worker does), one without binds; closing a listener leaves the inherited socket open."""
    with listening_socket() as held:
        [one] = inherit(held)
        inherited = Inherited([one])
        configs = [ListenerConfig(address_of(held)), ListenerConfig(Address(LOOPBACK, 0))]
        for reuse_port in (False, True):
            [[from_held], [bound]] = await open_listener_groups(
                configs, reuse_port=reuse_port, inherited=inherited
            )
            async with from_held, bound:
                assert from_held.socket.fileno() != one.sock.fileno(), "a duplicate"
                assert from_held.socket.getsockname() == held.getsockname()
                assert bound.socket.getsockname()[1] not in (0, held.getsockname()[1])
                with trio.fail_after(WAIT_SECONDS):
                    client = await trio.testing.open_stream_to_socket_listener(from_held)
                    async with client, await from_held.accept() as server:
                        await client.send_all(b"ping")
                        assert await server.receive_some(4) == b"ping"
            assert one.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        one.sock.close()


# --- what a supervisor passes to its workers -------------------------------------------------


@pytest.mark.parametrize("listen", ["127.0.0.1:8080", ":8080", "[::1]:8080", "localhost:9"])
def test_listen_fd_arguments_round_trip(listen: str) -> None:
    address = Address.parse(listen, "listen")
    assert parse_listen_fd(listen_fd_argument(address, 7)) == (address, 7)


@pytest.mark.parametrize("value", ["127.0.0.1:8080", "127.0.0.1:8080=x", "nohost=3", "=3"])
def test_a_malformed_listen_fd_is_refused(value: str) -> None:
    with pytest.raises(ActivationError, match="--listen-fd"):
        parse_listen_fd(value)


def test_a_worker_takes_the_sockets_its_supervisor_names() -> None:
    with listening_socket() as held, passed_as_fds(held) as fd:
        address = Address("", held.getsockname()[1])  # the listener's spelling, not the socket's
        inherited = from_supervisor([listen_fd_argument(address, fd)])
        assert inherited.settled
        [[one]] = inherited.claim([address])
        with one.sock:
            assert one.fd == fd
            assert not os.get_inheritable(fd)
            assert inherited.assigned() == [(address, fd)]


# --- tunnel run, started as systemd starts it ------------------------------------------------

LAUNCH = """\
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)  # inheritable, as systemd passes it
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())  # exec keeps the pid: the tunnel's own
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""
"""What systemd does between fork and exec: the socket as fd 3, ``LISTEN_PID`` the pid that
runs the tunnel. ``LISTEN_FDS`` and ``LISTEN_FDNAMES`` come in the environment."""


Activated = TunnelProcess
"""A ``tunnel run`` started with an inherited socket (``tests/test_workers.py``'s harness)."""


@pytest.fixture
def activate(tmp_path: Path) -> Iterator[Callable[..., Activated]]:
    """Factory: ``activate(sock, *args)`` runs ``tunnel *args`` with ``sock`` as fd 3 and
    ``LISTEN_FDS=1``; whatever it started is stopped afterwards."""
    started: list[Activated] = []

    def start(sock: socket.socket, *args: str) -> Activated:
        log_path = tmp_path / f"tunnel-{len(started)}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
        env.update(PYTHONUNBUFFERED="1", LISTEN_FDS="1", LISTEN_FDNAMES="web")
        command = [sys.executable, "-P", "-c", LAUNCH, str(sock.fileno())]
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [*command, "-P", "-m", "tunnel", *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                pass_fds=[sock.fileno()],
            )
        started.append(Activated(process, log_path))
        return started[-1]

    yield start
    for activated in started:
        process = activated.process
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(WAIT_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(WAIT_SECONDS)
        for pid in activated.workers().values():
            if is_worker_of(pid, process.pid):  # its supervisor is gone, so normally not
                os.kill(pid, signal.SIGKILL)


def is_worker_of(pid: int, parent: int) -> bool:
    """True while ``pid`` is a live ``tunnel worker`` whose parent is ``parent``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return stat[0] != "Z" and int(stat[1]) == parent and b"worker" in cmdline


def config_file(tmp_path: Path, port: int, backend: WsBackend, workers: int = 1) -> Path:
    path = tmp_path / "tunnel.toml"
    path.write_text(
        f'[server]\nworkers = {workers}\n[[listeners]]\nlisten = "{LOOPBACK}:{port}"\n'
        f'[[routes]]\nname = "echo"\nbackends = [{{ url = "{backend.url}" }}]\n',
        encoding="utf-8",
    )
    return path


def echo_once(port: int, message: str, sock: socket.socket | None = None) -> str:
    """A real ``websockets`` client, on ``sock`` when given (already connected)."""
    with websockets.sync.client.connect(
        f"ws://{LOOPBACK}:{port}/",
        sock=sock,
        open_timeout=WAIT_SECONDS,
        close_timeout=5,
        proxy=None,
    ) as ws:
        ws.send(message)
        answer = ws.recv(timeout=WAIT_SECONDS)
    assert isinstance(answer, str)
    return answer


def serving(port: int, worker: str = "") -> Callable[[str], bool]:
    return lambda log: f"info listening address={LOOPBACK}:{port} routes=echo{worker}" in log


def test_run_serves_on_the_inherited_socket_and_a_restart_refuses_nobody(
    activate: Callable[..., Activated], echo_backend: WsBackend, tmp_path: Path
) -> None:
    clients = 5
    with listening_socket() as held, ExitStack() as cleanup:
        port = held.getsockname()[1]
        config = str(config_file(tmp_path, port, echo_backend))
        first = activate(held, "run", "--config", config)
        log = first.wait_for("the first tunnel to listen", serving(port))
        assert f"using an inherited listening socket address={LOOPBACK}:{port} " in log
        assert echo_once(port, "before") == "before"
        assert first.stop() == 0

        # No tunnel runs now; the socket, held here as systemd holds it, still takes
        # connections: the kernel queues them in its backlog.
        waiting = []
        for _ in range(clients):
            sock = socket.create_connection((LOOPBACK, port), timeout=WAIT_SECONDS)
            cleanup.callback(sock.close)
            waiting.append(sock)
        assert accept_queue(port) == clients
        pool = cleanup.enter_context(ThreadPoolExecutor(clients))
        answers = [
            pool.submit(echo_once, port, f"queued {i}", sock) for i, sock in enumerate(waiting)
        ]
        assert not any(answer.done() for answer in answers), "nobody can answer yet"

        second = activate(held, "run", "--config", config)
        second.wait_for("the second tunnel to listen", serving(port))
        assert [a.result(WAIT_SECONDS) for a in answers] == [f"queued {i}" for i in range(clients)]
        assert echo_once(port, "after") == "after"
        assert second.stop() == 0
        log = second.log()
        assert log.count(" tunnel opened ") == clients + 1
        assert "Traceback" not in first.log() + log
        assert echo_backend.connections == clients + 2


def test_workers_all_accept_on_the_one_inherited_socket(
    activate: Callable[..., Activated], echo_backend: WsBackend, tmp_path: Path
) -> None:
    with listening_socket() as held:
        port = held.getsockname()[1]
        config = str(config_file(tmp_path, port, echo_backend, workers=2))
        tunnel = activate(held, "run", "--config", config)
        tunnel.wait_for(
            "both workers", lambda log: all(serving(port, f" worker={n}")(log) for n in (1, 2))
        )
        log = tunnel.log()
        assert f"using an inherited listening socket address={LOOPBACK}:{port} " in log
        assert (
            f"starting workers workers=2 pid={tunnel.process.pid} listen={LOOPBACK}:{port}" in log
        )
        workers = tunnel.workers()
        assert sorted(workers) == [1, 2]
        # Each worker holds the inherited socket itself, and it is the only one on the port.
        inode = os.fstat(held.fileno()).st_ino
        for pid in workers.values():
            assert inode in socket_inodes(pid), f"worker {pid} has the inherited socket"
        assert listening_inodes(port) == {inode}, "no worker bound a socket of its own"

        # Each worker accepts on it: with the other one stopped, it serves every connection.
        served = 0
        for number in workers:
            other = workers[3 - number]
            assert is_worker_of(other, tunnel.process.pid)
            os.kill(other, signal.SIGSTOP)
            try:
                for i in range(3):
                    assert echo_once(port, f"to {number}: {i}") == f"to {number}: {i}"
            finally:
                os.kill(other, signal.SIGCONT)
            served += 3
            log = tunnel.wait_for(
                f"{served} tunnels", lambda log, n=served: log.count(" tunnel opened ") == n
            )
            opened_by = re.findall(r" tunnel opened .* worker=(\d+)", log)
            assert opened_by[-3:] == [str(number)] * 3
        assert tunnel.stop() == 0
        assert "unexpectedly" not in tunnel.log()
        # The tunnel's stop closed its copies only: the socket still takes connections.
        socket.create_connection((LOOPBACK, port), timeout=WAIT_SECONDS).close()


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for link in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(link)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:[") : -1]))
    return inodes


def listening_rows(port: int) -> list[list[str]]:
    """The rows of /proc/net/tcp and tcp6 for sockets listening on ``port``."""
    rows = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            columns = line.split()
            local, state = columns[1], columns[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                rows.append(columns)
    return rows


def listening_inodes(port: int) -> set[int]:
    return {int(columns[9]) for columns in listening_rows(port)}


def accept_queue(port: int) -> int:
    """Connections the kernel completed on ``port`` that nobody accepted yet (for a listening
    socket, /proc/net/tcp's rx_queue is its accept queue)."""
    [columns] = listening_rows(port)
    return int(columns[4].split(":")[1], 16)


def test_a_udp_socket_as_fd_3_exits_1_naming_it(
    activate: Callable[..., Activated], tmp_path: Path
) -> None:
    with udp_socket() as sock:
        tunnel = activate(sock, "run", "--listen", f"{LOOPBACK}:0", "--backend", f"{LOOPBACK}:9")
        assert tunnel.process.wait(WAIT_SECONDS) == 1
    log = tunnel.log()
    assert f'tunnel: inherited fd 3 (name "web") is a UDP socket ({LOOPBACK}:' in log, log
    assert "Traceback" not in log


# --- the example unit files ------------------------------------------------------------------


def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit as sections of keys, each with its values in order (keys may repeat).

    Fails on anything systemd would not read as a section, an assignment, a comment or blank.
    """
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        assert not stripped.endswith("\\"), f"{path.name}:{number}: no continuation lines"
        if header := re.fullmatch(r"\[([A-Za-z]+)\]", stripped):
            current = sections.setdefault(header.group(1), {})
            continue
        assignment = re.fullmatch(r"([A-Za-z][A-Za-z0-9]*)=(.*)", stripped)
        assert assignment, f"{path.name}:{number}: not KEY=VALUE: {line!r}"
        assert current is not None, f"{path.name}:{number}: assignment before any [Section]"
        current.setdefault(assignment.group(1), []).append(assignment.group(2).strip())
    return sections


SERVICE = ROOT / "examples" / "tunnel.service"
SOCKET = ROOT / "examples" / "tunnel.socket"


def test_the_example_service_is_hardened_and_stops_after_the_drain() -> None:
    unit = read_unit(SERVICE)
    service = {key: values[-1] for key, values in unit["Service"].items()}
    assert {
        "Type": "exec",
        "DynamicUser": "yes",
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "LimitNOFILE": "65536",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "KillSignal": "SIGTERM",
        "Restart": "on-failure",
    }.items() <= service.items()
    command = service["ExecStart"].split()
    assert command[0].startswith("/")
    assert command[0].endswith("/tunnel")
    assert command[1:3] == ["run", "--config"]
    drain = Config().server.drain_timeout
    assert service["TimeoutStopSec"] == "45s"
    assert float(service["TimeoutStopSec"].removesuffix("s")) >= drain + 10
    assert "tunnel.socket" in unit["Unit"]["Requires"][0].split()


def test_the_example_socket_listens_where_the_example_config_does() -> None:
    unit = read_unit(SOCKET)
    streams = unit["Socket"]["ListenStream"]
    config = Config.from_file(ROOT / "examples" / "tunnel.toml", partial=True)
    listeners = [listener.listen for listener in config.listeners]
    assert [Address.parse(stream, "ListenStream") for stream in streams] == listeners
    assert "ListenDatagram" not in unit["Socket"]
    assert unit["Socket"].get("Accept", ["no"]) == ["no"], "one socket, not one per connection"
    assert unit["Install"]["WantedBy"] == ["sockets.target"]


def test_systemd_analyze_verifies_the_example_units(tmp_path: Path) -> None:
    """``systemd-analyze verify`` when it is installed (it checks that ExecStart's program
    exists, so the copies here point at this environment's ``tunnel``); the parse above
    otherwise."""
    analyze = shutil.which("systemd-analyze")
    units = [read_unit(SERVICE), read_unit(SOCKET)]
    assert all(units)
    if analyze is None:
        return
    program = Path(sys.executable).with_name("tunnel")  # the console script beside python
    if not program.exists():
        program = Path(sys.executable)
    (tmp_path / "tunnel.socket").write_bytes(SOCKET.read_bytes())
    service = SERVICE.read_text(encoding="utf-8")
    (tmp_path / "tunnel.service").write_text(
        service.replace("ExecStart=/usr/local/bin/tunnel ", f"ExecStart={program} "),
        encoding="utf-8",
    )
    result = subprocess.run(
        [analyze, "verify", "--man=no", "tunnel.socket", "tunnel.service"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=WAIT_SECONDS,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == "", "no warnings either"
