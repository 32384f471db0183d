"""The benchmark harness (bench/) end to end, on loopback with real processes.

One smoke session (``python -m bench --smoke``: builds the C load generator and echo backend,
runs every workload for a fraction of a second against tunnel and, when installed, nginx and
HAProxy with forced splicing, and draws the ratio chart) feeds the tests below. A second one
runs over TLS (``--smoke --tls``, against tunnel and whichever of nginx and HAProxy are
installed; skipped, with the reason, without libssl-dev).
A deliberately corrupting backend checks that the load generator's byte-for-byte echo
verification does catch a wrong byte, so "no mismatches" means something.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tunnel.certs import issue, make_ca

REPO = Path(__file__).resolve().parent.parent
NGINX_MISSING = "nginx not installed (apt-get install nginx)"
NGINX_INSTALLED = shutil.which("nginx") is not None or Path("/usr/sbin/nginx").exists()
HAPROXY_MISSING = "haproxy not installed (apt-get install haproxy)"
HAPROXY_INSTALLED = shutil.which("haproxy") is not None or Path("/usr/sbin/haproxy").exists()
SMOKE_TIMEOUT = 120
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# The figures each workload must produce, as positive numbers, for every proxy.
FIGURES = {
    "upgrade": ("upgrade_rate", "upgrade_cpu_us", "upgrade_machine_cpu_us"),
    "echo": ("echo_rate", "echo_cpu_us", "echo_machine_cpu_us"),
    "latency": ("latency_p50_us", "latency_p99_us"),
    "latency10": ("latency10_p50_us", "latency10_p99_us"),
    "bulk": ("bulk_mb_s", "bulk_cpu_s_per_gib", "bulk_machine_cpu_s_per_gib"),
    "bulk1": ("bulk1_mb_s", "bulk1_cpu_s_per_gib", "bulk1_machine_cpu_s_per_gib"),
    "idle": ("idle_rss_kib",),
}
# The machine-wide figures, which the direct baseline (no proxy) has too.
MACHINE_FIGURES = (
    "upgrade_machine_cpu_us",
    "echo_machine_cpu_us",
    "bulk_machine_cpu_s_per_gib",
    "bulk1_machine_cpu_s_per_gib",
)
CHART_KEYS = (
    "upgrade_cpu_us",
    "echo_cpu_us",
    "bulk_cpu_s_per_gib",
    "bulk1_cpu_s_per_gib",
    "added10_p50_us",
    "idle_rss_kib",
)
SVG = "{http://www.w3.org/2000/svg}"

pytestmark = pytest.mark.slow


def _need_compiler() -> None:
    if shutil.which(os.environ.get("CC", "gcc")) is None:
        pytest.skip("gcc not installed (apt-get install gcc)")


def _openssl_missing() -> str:
    """Why the load generator cannot speak TLS here ("" when it can), as bench.build says."""
    probe = (
        "from bench.build import compiler, openssl_missing\n"
        "print(openssl_missing(compiler()) or '')"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=SMOKE_TIMEOUT,
    )
    return result.stdout.strip()


def _bench_patched(patch: str, *options: str) -> subprocess.CompletedProcess[str]:
    """``python -m bench OPTIONS`` in a child that first runs ``patch`` (lines of Python that
    make this machine look as if something were missing)."""
    script = f"import sys\n{patch}from bench.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run(
        [sys.executable, "-c", script, *options],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT,
        check=False,
    )


def _smoke_session(out: Path, *options: str) -> dict[str, Any]:
    """Run ``python -m bench --smoke OPTIONS``; its JSON report, plus what it printed and the
    path of its chart (None when it wrote none)."""
    command = [sys.executable, "-m", "bench", "--smoke", *options, "--out", str(out)]
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=SMOKE_TIMEOUT, check=False
    )
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout}\n{result.stderr}"
    (json_path,) = out.glob("*.json")
    (md_path,) = out.glob("*.md")
    report: dict[str, Any] = json.loads(json_path.read_text(encoding="utf-8"))
    report["printed"] = result.stdout
    report["markdown"] = md_path.read_text(encoding="utf-8")
    report["json_name"] = json_path.name
    charts = list(out.glob("*.svg"))
    report["chart"] = charts[0] if charts else None
    return report


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The JSON report of one smoke session, plus what it printed."""
    _need_compiler()
    installed = [
        name
        for name, ok in (("nginx", NGINX_INSTALLED), ("haproxy-splice", HAPROXY_INSTALLED))
        if ok
    ]
    out = tmp_path_factory.mktemp("bench-results")
    chart = tmp_path_factory.mktemp("bench-docs") / "img" / "benchmarks.svg"
    report = _smoke_session(out, "--against", ",".join(installed) or "none", "--chart", str(chart))
    report["chart_copy"] = chart
    return report


@pytest.fixture(scope="module")
def tls_smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same over TLS, against tunnel and whichever of nginx and HAProxy are installed."""
    _need_compiler()
    missing = _openssl_missing()
    if missing:
        pytest.skip(missing)
    installed = [
        name for name, ok in (("nginx", NGINX_INSTALLED), ("haproxy", HAPROXY_INSTALLED)) if ok
    ]
    against = ",".join(installed) or "none"
    out = tmp_path_factory.mktemp("bench-tls-results")
    return _smoke_session(out, "--tls", "--against", against)


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


def test_haproxy_splice_figures_are_positive(smoke: dict[str, Any]) -> None:
    """The forced-splice HAProxy peer ran every workload, with its splice options in force."""
    if not HAPROXY_INSTALLED:
        pytest.skip(HAPROXY_MISSING)
    _assert_positive_figures(smoke, "haproxy-splice")
    assert "tunnel/haproxy-splice" in smoke["table"]["header"]
    config = smoke["configs"]["haproxy-splice"]
    assert "option splice-request" in config
    assert "option splice-response" in config
    assert "tune.pipesize 262144" in config


def test_machine_cpu_covers_the_proxy_and_the_baseline(smoke: dict[str, Any]) -> None:
    """Machine-wide CPU per unit is reported for every peer, direct included, and for a proxy it
    is more than the proxy's own CPU (it also holds the load generator and the backend)."""
    for peer in smoke["peers"]:
        medians = smoke["medians"][peer]
        for key in MACHINE_FIGURES:
            assert medians.get(key, 0) > 0, f"{peer}: {key} = {medians.get(key)}"
        if peer != "direct":
            assert medians["upgrade_machine_cpu_us"] > medians["upgrade_cpu_us"], peer
            assert medians["bulk1_machine_cpu_s_per_gib"] > medians["bulk1_cpu_s_per_gib"], peer
    for sample in smoke["samples"]:
        if sample["workload"] != "idle":
            # /proc/stat counts in 10 ms ticks: a smoke run's short, light latency run may
            # see none (the medians above are the positive figures).
            assert sample["machine_cpu_seconds"] >= 0, sample
            assert sample["unattributed_cpu_seconds"] is not None, sample
    # Other jobs, measured first over 0.2 s of /proc/stat's 10 ms ticks: a tick or two per core
    # more than the window holds reads as a little above every core busy (CI saw 2.05 of 2).
    cores = os.cpu_count() or 1
    assert 0 <= smoke["background_cores"] <= cores * 1.25, smoke["background_cores"]
    assert "machine CPU = busy core-seconds of the whole machine" in smoke["printed"]
    labels = [row[0] for row in smoke["table"]["rows"]]
    assert any(label.startswith("machine CPU per upgrade") for label in labels)
    assert any(label.startswith("machine CPU s per GiB sent (1 conn)") for label in labels)


def test_chart_has_a_bar_per_row_and_peer(smoke: dict[str, Any]) -> None:
    """The SVG next to the results (and its copy at --chart) parses as XML and has, for each
    charted row and compared peer, a bar with tunnel's ratio, or "n/a" where a figure is not
    positive; and the 1.0x reference line."""
    compared = [p for p in ("nginx", "haproxy", "haproxy-splice") if p in smoke["peers"]]
    if not compared:
        pytest.skip(NGINX_MISSING + "; " + HAPROXY_MISSING)
    assert smoke["chart"] is not None
    text = smoke["chart"].read_text(encoding="utf-8")
    assert smoke["chart_copy"].read_text(encoding="utf-8") == text
    root = ElementTree.fromstring(text)
    assert root.tag == f"{SVG}svg"
    bars = {
        (bar.get("data-row"), bar.get("data-peer")): float(bar.get("data-ratio", "nan"))
        for bar in root.iter(f"{SVG}rect")
        if bar.get("class") == "bar"
    }
    missing = {
        (text.get("data-row"), text.get("data-peer"))
        for text in root.iter(f"{SVG}text")
        if text.get("class") == "missing"
    }
    medians = smoke["medians"]
    for key in CHART_KEYS:
        for peer in compared:
            tunnel, other = medians["tunnel"].get(key, 0), medians[peer].get(key, 0)
            if tunnel > 0 and other > 0:
                assert bars[(key, peer)] == pytest.approx(tunnel / other, rel=1e-3), (key, peer)
            else:
                assert (key, peer) in missing, (key, peer)
    assert len(bars) + len(missing) == len(CHART_KEYS) * len(compared)
    assert [line for line in root.iter(f"{SVG}line") if line.get("class") == "reference"]


def test_haproxy_splice_without_haproxy_is_skipped_with_the_reason(tmp_path: Path) -> None:
    """Where haproxy is not installed the haproxy-splice peer is skipped, naming the package,
    and the rest of the session runs."""
    _need_compiler()
    result = _bench_patched(
        "import bench.peers as peers\n"
        "found = peers._find\n"
        "peers._find = lambda program: None if program == 'haproxy' else found(program)\n",
        "--smoke",
        "--only",
        "upgrade",
        "--against",
        "haproxy-splice",
        "--out",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert f"skipping haproxy-splice: {HAPROXY_MISSING}" in result.stderr
    assert f"skipped haproxy-splice: {HAPROXY_MISSING}" in result.stdout
    (json_path,) = tmp_path.glob("*.json")
    report = json.loads(json_path.read_text(encoding="utf-8"))
    assert report["skipped"] == {"haproxy-splice": HAPROXY_MISSING}
    assert report["peers"] == ["direct", "tunnel"]
    assert report["medians"]["tunnel"]["upgrade_cpu_us"] > 0
    assert not list(tmp_path.glob("*.svg"))  # no peer, no ratio to draw


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
    one = [s for s in samples if s["workload"] == "bulk1"]
    assert one
    assert all(s["metrics"]["bulk1_bytes"] > 0 for s in one)
    assert all(s["loadgen"]["conns"] == 1 for s in one)


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


# --- over TLS ---------------------------------------------------------------------------------


def test_tls_tunnel_figures_are_positive(tls_smoke: dict[str, Any]) -> None:
    _assert_positive_figures(tls_smoke, "tunnel")
    assert tls_smoke["medians"]["direct"]["upgrade_rate"] > 0  # the plain reference ran too


@pytest.mark.parametrize(
    ("peer", "installed", "missing"),
    [("nginx", NGINX_INSTALLED, NGINX_MISSING), ("haproxy", HAPROXY_INSTALLED, HAPROXY_MISSING)],
)
def test_tls_peer_figures_are_positive(
    tls_smoke: dict[str, Any], peer: str, installed: bool, missing: str
) -> None:
    if not installed:
        pytest.skip(missing)
    _assert_positive_figures(tls_smoke, peer)
    assert f"tunnel/{peer}" in tls_smoke["table"]["header"]


def test_tls_runs_had_no_errors_or_mismatches(tls_smoke: dict[str, Any]) -> None:
    for sample in tls_smoke["samples"]:
        where = f"{sample['peer']} {sample['workload']} over TLS"
        assert sample["failure"] is None, where
        assert sample["mismatches"] == 0, where
        assert sample["errors"] == 0, f"{where}: {sample['loadgen'].get('first_error')}"
    assert any(s["metrics"].get("bulk_bytes", 0) > 0 for s in tls_smoke["samples"])


def test_tls_handshakes_were_full_and_the_same_for_every_proxy(tls_smoke: dict[str, Any]) -> None:
    """Every proxy was reached over TLS 1.3 with the same suite, group and ALPN; no handshake
    was resumed (each upgrade pays a full one)."""
    per_peer = tls_smoke["tls"]["peers"]
    proxies = [p for p in tls_smoke["peers"] if p != "direct"]
    assert sorted(per_peer) == sorted(proxies)
    negotiated = {peer: tuple(entry["negotiated"]) for peer, entry in per_peer.items()}
    assert len(set(negotiated.values())) == 1, negotiated
    (what,) = negotiated["tunnel"]
    assert what.startswith("TLSv1.3 "), what
    assert what.endswith("ALPN http/1.1"), what
    for peer, entry in per_peer.items():
        assert entry["handshakes"] > 0, peer
        assert entry["resumed"] == 0, peer
    direct = [s for s in tls_smoke["samples"] if s["peer"] == "direct"]
    assert direct
    assert all("tls" not in s["loadgen"] for s in direct)  # the plain reference


def test_tls_report_says_tls(tls_smoke: dict[str, Any]) -> None:
    assert tls_smoke["options"]["tls"] is True
    assert tls_smoke["json_name"].endswith("-tls.json")
    header = tls_smoke["table"]["header"]
    assert header[0] == "metric (over TLS)"
    assert "direct (plain)" in header
    assert tls_smoke["printed"].splitlines()[0].startswith("| metric (over TLS)")
    assert tls_smoke["markdown"].startswith("# tunnel benchmark over TLS (wss://)")
    labels = [row[0] for row in tls_smoke["table"]["rows"]]
    assert any("TLS handshake + upgrade" in label for label in labels)


def test_plain_report_is_not_tls(smoke: dict[str, Any]) -> None:
    assert smoke["options"]["tls"] is False
    assert smoke["table"]["header"][0] == "metric"
    assert not smoke["json_name"].endswith("-tls.json")
    assert all("tls" not in s["loadgen"] for s in smoke["samples"])


def test_tls_without_openssl_is_skipped_with_the_reason(tmp_path: Path) -> None:
    """Where libssl-dev is missing the load generator is built without TLS, ``--tls`` reports
    "skipped: libssl-dev missing" and exits 0, and that load generator refuses ``--tls``."""
    _need_compiler()
    result = _bench_patched(
        "import bench.build as build\nbuild.openssl_missing = lambda cc: build.OPENSSL_MISSING\n",
        "--smoke",
        "--tls",
        "--against",
        "none",
        "--out",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert "skipped: libssl-dev missing" in result.stderr
    assert "TLS workloads skipped: libssl-dev missing" in result.stdout
    (json_path,) = tmp_path.glob("*-tls.json")
    report = json.loads(json_path.read_text(encoding="utf-8"))
    assert report["samples"] == []
    assert report["tls"]["skipped"].startswith("libssl-dev missing")
    (loadgen,) = (REPO / "bench" / ".build").glob("loadgen_notls-*")
    refused = subprocess.run(
        [str(loadgen), "echo", "--port", "9", "--tls"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert refused.returncode == 2
    assert "libssl-dev" in refused.stderr


# --- the verification itself catches a corrupted echo ----------------------------------------


@pytest.fixture(params=["plain", "tls"])
def corrupting_backend(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[int, bool]]:
    """A backend that answers the upgrade correctly, then echoes with byte 100 flipped; plain,
    or behind TLS (which the load generator then speaks): (its port, whether TLS)."""
    tls = request.param == "tls"
    context: ssl.SSLContext | None = None
    if tls:
        issued = issue(make_ca(), ["localhost"])
        (tmp_path / "cert.pem").write_bytes(issued.cert_pem)
        (tmp_path / "key.pem").write_bytes(issued.key_pem)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        # The load generator resets the connection once it sees the wrong byte: OSError ends it.
        with contextlib.suppress(OSError):
            conn.settimeout(10)
            if context is not None:
                conn = context.wrap_socket(conn, server_side=True)
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
        yield listener.getsockname()[1], tls
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def test_loadgen_counts_a_corrupted_echo(corrupting_backend: tuple[int, bool]) -> None:
    _need_compiler()
    port, tls = corrupting_backend
    if tls and (missing := _openssl_missing()):
        pytest.skip(missing)
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
        argv = [loadgen, mode, "--port", str(port), "--conns", "2", "--seconds", "1"]
        if mode == "bulk":
            argv += ["--bytes", "1000000"]
        if tls:
            argv.append("--tls")
        run = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)
        result = json.loads(run.stdout)
        assert result["mismatches"] == 2, result
        assert result["first_error"] == "echoed bytes differ from the bytes sent"
        if tls:
            assert result["tls"]["handshakes"] == 2, result
