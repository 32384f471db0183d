"""Starting, stopping and measuring the processes the harness runs.

Every process here is one the harness started itself. Signals only ever go to the PID that
``subprocess.Popen`` returned (and, as a last resort once that process is gone, to the process
group it was started as the leader of, whose id is that same PID). Children of those processes
(nginx's worker, tunnel's workers) are only *read*: their CPU time and RSS from ``/proc``.
"""

from __future__ import annotations

import contextlib
import os
import resource
import selectors
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
STOP_SECONDS = 5.0


class ProcessError(RuntimeError):
    """A process did not start, did not answer in time, or said something unexpected."""


def raise_nofile_limit() -> tuple[int, int]:
    """Raise this process's soft descriptor limit to the hard one; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
        return port


def port_accepts(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout):
            return True
    except OSError:
        return False


class LineReader:
    """Lines from a child's stdout pipe, each read with a deadline (never blocks forever)."""

    def __init__(self, stream: int) -> None:
        self._fd = stream
        self._buffer = b""
        self._selector = selectors.DefaultSelector()
        self._selector.register(stream, selectors.EVENT_READ)
        self._eof = False

    def readline(self, timeout: float) -> str | None:
        """The next line without its newline; None at EOF or when ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if self._eof or remaining <= 0:
                return None
            if not self._selector.select(remaining):
                continue
            chunk = os.read(self._fd, 65536)
            if not chunk:
                self._eof = True
                continue
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode("utf-8", "replace")

    def close(self) -> None:
        self._selector.close()


@dataclass
class Managed:
    """A long-running process the harness started (a backend or a proxy), with its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    stdout: LineReader | None = None
    _log_offset: int = field(default=0, repr=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def new_log_lines(self) -> list[str]:
        """Log lines written since the previous call."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_offset)
                data = log.read()
        except OSError:
            return []
        complete = data.rfind(b"\n") + 1
        self._log_offset += complete
        return data[:complete].decode("utf-8", "replace").splitlines()

    def stop(self) -> list[str]:
        """SIGTERM, then SIGKILL after a grace period; returns notes on anything unusual."""
        notes: list[str] = []
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                notes.append(f"{self.name} (pid {self.pid}) ignored SIGTERM; sent SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(STOP_SECONDS)
        leftovers = group_members(self.pid)
        if leftovers:
            # Only processes of the session this Popen created: its own descendants.
            notes.append(f"{self.name}: {len(leftovers)} child process(es) outlived it; killed")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
        if self.stdout is not None:
            self.stdout.close()
        return notes


def start(
    name: str,
    argv: Sequence[str],
    log_path: Path,
    *,
    capture_stdout: bool = False,
    cwd: Path | None = None,
) -> Managed:
    """Start ``argv`` in a new session (so it is the leader of its own process group), with
    stderr (and stdout unless captured) appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture_stdout else log,
            stderr=log,
            cwd=cwd,
            start_new_session=True,
        )
    reader = LineReader(popen.stdout.fileno()) if popen.stdout is not None else None
    return Managed(name, popen, log_path, reader)


def wait_until(managed: Managed, ready: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``ready()`` until true; fail with the log's tail if the process exits or time runs
    out."""
    deadline = time.monotonic() + timeout
    while True:
        if not managed.alive():
            raise ProcessError(
                f"{managed.name} exited with status {managed.popen.returncode} before {what}:\n"
                f"{managed.log_tail()}"
            )
        if ready():
            return
        if time.monotonic() > deadline:
            raise ProcessError(
                f"{managed.name}: no {what} within {timeout:.0f}s:\n{managed.log_tail()}"
            )
        time.sleep(0.05)


# --- reading /proc: our own process trees only -------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (field 3, the state, is index 0)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def _all_parents() -> dict[int, int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                parents[int(entry)] = int(fields[1])
    return parents


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid``."""
    return sorted(child for child, parent in _all_parents().items() if parent == pid)


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants that are still running."""
    parents = _all_parents()
    if pid not in parents:
        return []
    found = [pid]
    frontier = [pid]
    while frontier:
        current = frontier.pop()
        for child, parent in parents.items():
            if parent == current:
                found.append(child)
                frontier.append(child)
    return sorted(found)


def group_members(pgid: int) -> list[int]:
    """Running processes in process group ``pgid`` (field 5 of /proc/PID/stat)."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None and int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry))
    return members


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime + stime of the processes (all their threads), in seconds."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def rss_kib(pids: Iterable[int]) -> int:
    """Sum of VmRSS of the processes, in KiB."""
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def machine_cpu_seconds() -> float:
    """Core-seconds the whole machine has spent busy since boot (all cores, all processes, the
    kernel's interrupt and softirq work included): user + nice + system + irq + softirq + steal
    of /proc/stat's ``cpu`` line (``guest`` is already inside ``user``; idle and iowait are not
    work)."""
    with open("/proc/stat", encoding="ascii") as stat:
        fields = stat.readline().split()
    # cpu user nice system idle iowait irq softirq steal guest guest_nice
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS
