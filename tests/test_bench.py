"""The benchmark harness (bench/) end to end, on loopback with real processes.

One smoke session (``python -m bench --smoke``: builds the C load generator and echo backend,
runs every workload for a fraction of a second against tunnel and, when installed, nginx)
feeds the tests below. A deliberately corrupting backend checks that the load generator's
byte-for-byte echo verification does catch a wrong byte, so "no mismatches" means something.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
NGINX_MISSING = "nginx not installed (apt-get install nginx)"
NGINX_INSTALLED = shutil.which("nginx") is not None or Path("/usr/sbin/nginx").exists()
SMOKE_TIMEOUT = 120
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# The figures each workload must produce, as positive numbers, for every proxy.
FIGURES = {
    "upgrade": ("upgrade_rate", "upgrade_cpu_us"),
    "echo": ("echo_rate", "echo_cpu_us"),
    "latency": ("latency_p50_us", "latency_p99_us"),
    "bulk": ("bulk_mb_s", "bulk_cpu_s_per_gib"),
    "idle": ("idle_rss_kib",),
}

pytestmark = pytest.mark.slow


def _need_compiler() -> None:
    if shutil.which(os.environ.get("CC", "gcc")) is None:
        pytest.skip("gcc not installed (apt-get install gcc)")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The JSON report of one smoke session, plus what it printed."""
    _need_compiler()
    out = tmp_path_factory.mktemp("bench-results")
    against = "nginx" if NGINX_INSTALLED else "none"
    command = [sys.executable, "-m", "bench", "--smoke", "--against", against, "--out", str(out)]
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=SMOKE_TIMEOUT, check=False
    )
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout}\n{result.stderr}"
    (json_path,) = out.glob("*.json")
    (md_path,) = out.glob("*.md")
    report: dict[str, Any] = json.loads(json_path.read_text(encoding="utf-8"))
    report["printed"] = result.stdout
    report["markdown"] = md_path.read_text(encoding="utf-8")
    return report


def _assert_positive_figures(report: dict[str, Any], peer: str) -> None:
    assert peer in report["peers"], report["skipped"]
    medians = report["medians"][peer]
    for workload, keys in FIGURES.items():
        for key in keys:
            assert medians.get(key, 0) > 0, f"{peer} {workload}: {key} = {medians.get(key)}"


def test_tunnel_figures_are_positive(smoke: dict[str, Any]) -> None:
    _assert_positive_figures(smoke, "tunnel")
    assert smoke["medians"]["direct"]["upgrade_rate"] > 0  # the baseline ran too


def test_nginx_figures_are_positive(smoke: dict[str, Any]) -> None:
    if not NGINX_INSTALLED:
        pytest.skip(NGINX_MISSING)
    _assert_positive_figures(smoke, "nginx")
    assert "tunnel/nginx" in smoke["table"]["header"]


def test_echo_verification_found_no_mismatches(smoke: dict[str, Any]) -> None:
    samples = smoke["samples"]
    assert samples
    for sample in samples:
        where = f"{sample['peer']} {sample['workload']}"
        assert sample["failure"] is None, where
        assert sample["mismatches"] == 0, where
        assert sample["errors"] == 0, f"{where}: {sample['loadgen'].get('first_error')}"
    echoed = [s for s in samples if s["workload"] == "bulk"]
    assert all(s["metrics"]["bulk_bytes"] > 0 for s in echoed)  # bytes were compared


def test_prints_one_table_and_writes_it(smoke: dict[str, Any]) -> None:
    printed = smoke["printed"]
    first = printed.splitlines()[0]
    assert first.startswith("| metric")
    assert printed.count("| metric") == 1
    for column in smoke["table"]["header"][1:]:
        assert column in first
    for row in smoke["table"]["rows"]:
        assert row[0] in printed
        assert row[0] in smoke["markdown"]
    assert smoke["machine"]["tunnel_commit"]


# --- the verification itself catches a corrupted echo ----------------------------------------


@pytest.fixture
def corrupting_backend() -> Iterator[int]:
    """A backend that answers the upgrade correctly, then echoes with byte 100 flipped."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        # The load generator resets the connection once it sees the wrong byte: OSError ends it.
        with conn, contextlib.suppress(OSError):
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                head += chunk
            key = next(
                line.split(b":", 1)[1].strip()
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"sec-websocket-key:")
            )
            accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
            conn.sendall(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )
            seen = 0
            while data := conn.recv(65536):
                if seen <= 100 < seen + len(data):
                    data = data[: 100 - seen] + bytes([data[100 - seen] ^ 1]) + data[101 - seen :]
                seen += len(data)
                conn.sendall(data)

    def accept_loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept_loop, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def test_loadgen_counts_a_corrupted_echo(corrupting_backend: int) -> None:
    _need_compiler()
    built = subprocess.run(
        [sys.executable, "-c", "from bench.build import build; print(build().loadgen)"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=SMOKE_TIMEOUT,
    )
    loadgen = built.stdout.strip()
    for mode in ("echo", "bulk"):
        argv = [loadgen, mode, "--port", str(corrupting_backend), "--conns", "2", "--seconds", "1"]
        if mode == "bulk":
            argv += ["--bytes", "1000000"]
        run = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)
        result = json.loads(run.stdout)
        assert result["mismatches"] == 2, result
        assert result["first_error"] == "echoed bytes differ from the bytes sent"
