"""The ``tunnel`` command: ``check``, ``run`` and ``demo`` through click's CliRunner, plus three
real subprocesses (``demo --once``, ``run`` stopped with SIGTERM, and ``run --tls-cert`` reloading
its certificates on SIGHUP)."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import websockets.sync.client
from click.testing import CliRunner, Result
from conftest import WsBackend
from cryptography import x509

from tunnel import Config, __version__
from tunnel.certs import DevCertificates, Issued, issue, make_ca, write_dev_certificates
from tunnel.cli import main
from tunnel.config import RouteConfig, ServerConfig
from tunnel.echo import serve_echo
from tunnel.logs import LOGGER_NAME

SUBPROCESS_SECONDS = 60.0
"""Bound on any real subprocess; a healthy one takes well under a second or two."""

VALID = """\
[server]
idle_timeout = "0s"
max_tunnels = 7

[[listeners]]
listen = "127.0.0.1:8080"

[[routes]]
name = "chat"
hosts = ["chat.example.com"]
backends = [ { name = "a", url = "ws://10.0.0.5:8080/ws" }, { url = "10.0.0.6:9000" } ]
"""


@pytest.fixture(autouse=True)
def restore_tunnel_logger() -> Iterator[None]:
    """``run`` and ``demo`` point the tunnel logger at CliRunner's stderr, which closes after
    the call; put the logger back so later tests (and caplog) are not affected."""
    logger = logging.getLogger(LOGGER_NAME)
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def write_config(tmp_path: Path, text: str, name: str = "tunnel.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- tunnel check ----------------------------------------------------------------------------


def test_check_prints_the_effective_config_with_defaults_spelled_out(tmp_path: Path) -> None:
    path = write_config(tmp_path, VALID)
    result = invoke("check", "--config", str(path))

    assert result.exit_code == 0, result.output
    assert "configuration is valid" in result.stderr
    printed = tomllib.loads(result.stdout)
    server = printed["server"]
    # Every server key is spelled out, the ones the file set and the defaults alike.
    assert set(server) == {f.name for f in dataclasses.fields(ServerConfig)}
    assert server["idle_timeout"] == "0s"
    assert server["max_tunnels"] == 7
    assert server["handshake_timeout"] == "10s"
    assert server["connect_timeout"] == "5s"
    assert server["max_header_bytes"] == "32KiB"
    assert server["log_format"] == "text"
    [route] = printed["routes"]
    assert set(route) == {f.name for f in dataclasses.fields(RouteConfig)}
    assert route["path_prefix"] == "/"
    assert route["upgrades"] == ["websocket"]
    assert route["backends"][0] == {"name": "a", "url": "ws://10.0.0.5:8080/ws"}
    assert route["backends"][1]["url"] == "ws://10.0.0.6:9000"
    assert printed["listeners"] == [{"listen": "127.0.0.1:8080"}]


def test_check_output_reads_back_as_the_same_config(tmp_path: Path) -> None:
    text = VALID.replace('name = "chat"', 'name = "say \\"hi\\" \\\\ bye"')
    path = write_config(tmp_path, text)
    result = invoke("check", "--config", str(path))

    assert result.exit_code == 0, result.output
    assert Config.from_toml(result.stdout) == Config.from_file(path)
    # And printing the printed config again changes nothing.
    again = invoke("check", "--config", str(write_config(tmp_path, result.stdout, "again.toml")))
    assert again.stdout == result.stdout


@pytest.mark.parametrize(
    ("text", "key", "why"),
    [
        pytest.param(
            VALID.replace("ws://10.0.0.5:8080/ws", "http://10.0.0.5:8080"),
            "routes[0].backends[0].url",
            "'http' is not supported",
            id="backend-scheme",
        ),
        pytest.param(
            VALID.replace('{ url = "10.0.0.6:9000" }', '{ url = "10.0.0.6" }'),
            "routes[0].backends[1].url",
            "needs a port",
            id="backend-port",
        ),
        pytest.param(
            VALID.replace('idle_timeout = "0s"', 'idle_timeout = "10 parsecs"'),
            "server.idle_timeout",
            "is not a duration",
            id="duration",
        ),
        pytest.param(
            VALID.replace("max_tunnels = 7", "max_tunnels = 0"),
            "server.max_tunnels",
            "must be 1 or more",
            id="max-tunnels",
        ),
        pytest.param(
            VALID.replace('listen = "127.0.0.1:8080"', 'listen = "127.0.0.1:99999"'),
            "listeners[0].listen",
            "not a number from 0 to 65535",
            id="listen-port",
        ),
        pytest.param(
            VALID.replace("[server]", "[server]\ncolour = 'blue'"),
            "server.colour",
            "unknown key",
            id="unknown-server-key",
        ),
        pytest.param(
            VALID + "\n[frobnicate]\nlevel = 11\n",
            "frobnicate",
            "unknown key",
            id="unknown-table",
        ),
        pytest.param(
            VALID.replace('{ url = "10.0.0.6:9000" }', '{ url = "10.0.0.6:9000", colour = 1 }'),
            "routes[0].backends[1].colour",
            "unknown key",
            id="unknown-backend-key",
        ),
    ],
)
def test_check_refuses_a_bad_file_naming_the_key_and_why(
    tmp_path: Path, text: str, key: str, why: str
) -> None:
    path = write_config(tmp_path, text)
    result = invoke("check", "--config", str(path))

    assert result.exit_code == 1
    assert result.stdout == "", "nothing is printed as an effective config"
    assert str(path) in result.stderr
    assert f"{key}: " in result.stderr
    assert why in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("text", "notes"),
    [
        (VALID.split("[[routes]]")[0], ["no route: tunnel run needs --backend"]),
        (
            VALID.split("[[listeners]]")[0],
            ["no listener: tunnel run needs --listen", "no route: tunnel run needs --backend"],
        ),
    ],
    ids=["no-routes", "server-only"],
)
def test_check_passes_a_file_that_leaves_listeners_or_routes_to_flags(
    tmp_path: Path, text: str, notes: list[str]
) -> None:
    path = write_config(tmp_path, text)
    result = invoke("check", "--config", str(path))

    assert result.exit_code == 0, result.stderr
    assert "max_tunnels = 7" in result.stdout
    for note in notes:
        assert f"# {path}: {note}\n" in result.stderr
    assert result.stderr.endswith(f"# {path}: configuration is valid\n")


def test_run_refuses_a_file_without_routes_when_no_backend_flag_supplies_them(
    tmp_path: Path,
) -> None:
    path = write_config(tmp_path, VALID.split("[[routes]]")[0])
    result = invoke("run", "--config", str(path))
    assert result.exit_code == 1
    assert "routes: no route; add [[routes]] or pass --backend" in result.stderr


@pytest.mark.parametrize("command", ["check", "run"])
def test_a_missing_config_file_is_named_once(tmp_path: Path, command: str) -> None:
    path = tmp_path / "absent.toml"
    result = invoke(command, "--config", str(path))
    assert result.exit_code == 1
    assert result.stderr.endswith(f"{path}: cannot read the file: No such file or directory\n")
    assert result.stderr.count(str(path)) == 1


@pytest.mark.parametrize("command", ["check", "run"])
def test_a_config_file_that_is_not_toml_is_named_with_the_problem(
    tmp_path: Path, command: str
) -> None:
    path = write_config(tmp_path, "x = [")
    result = invoke(command, "--config", str(path))
    assert result.exit_code == 1
    assert f"{path}: not valid TOML: " in result.stderr
    assert "(file)" not in result.stderr


# --- tunnel run (no server started) -----------------------------------------------------------


@pytest.mark.parametrize(
    ("backend", "why"),
    [
        ("http://127.0.0.1:9000", "scheme 'http' is not supported"),
        ("127.0.0.1", "needs a port"),
        ("[::1:9000", "opens [ but never closes it"),
    ],
)
def test_run_with_a_bad_backend_exits_1_naming_the_flag(backend: str, why: str) -> None:
    result = invoke("run", "--listen", "127.0.0.1:0", "--backend", backend)
    assert result.exit_code == 1
    assert "configuration error" in result.stderr
    assert f"--backend {backend}" in result.stderr
    assert why in result.stderr
    assert "Traceback" not in result.output


def test_run_without_listener_or_backend_explains_what_is_missing() -> None:
    result = invoke("run", "--backend", "127.0.0.1:9000")
    assert result.exit_code == 1
    assert "no listener" in result.stderr
    assert "--listen" in result.stderr


def test_run_refuses_an_unknown_flag() -> None:
    result = invoke("run", "--colour", "blue")
    assert result.exit_code == 2
    assert "No such option" in result.stderr


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port held by a listening socket for the whole test."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_run_on_a_port_in_use_exits_1_with_cannot_listen_on(busy_port: int) -> None:
    result = invoke("run", "--listen", f"127.0.0.1:{busy_port}", "--backend", "127.0.0.1:9")
    assert result.exit_code == 1
    assert f"cannot listen on 127.0.0.1:{busy_port}" in result.stderr
    assert "another process holds this port" in result.stderr
    assert "Traceback" not in result.output
    assert "ExceptionGroup" not in result.output


def test_run_with_relay_splice_where_splice_is_missing_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Linux has splice(2); what a machine without it sees is simulated at the one check.
    monkeypatch.setattr("tunnel.app.splice_available", lambda: False)
    path = write_config(tmp_path, VALID.replace("[server]", '[server]\nrelay = "splice"'))
    result = invoke("run", "--config", str(path), "--listen", "127.0.0.1:0")
    assert result.exit_code == 1
    assert "configuration error: server.relay: splice(2) is not available here" in result.stderr
    assert "Traceback" not in result.output


def test_demo_on_a_port_in_use_exits_1_with_cannot_listen_on(busy_port: int) -> None:
    result = invoke("demo", "--once", "--listen", f"127.0.0.1:{busy_port}")
    assert result.exit_code == 1
    assert f"cannot listen on 127.0.0.1:{busy_port}" in result.stderr
    assert "Traceback" not in result.output


def test_demo_with_a_bad_listen_address_exits_1() -> None:
    result = invoke("demo", "--listen", "localhost")
    assert result.exit_code == 1
    assert "needs a port" in result.stderr


def test_run_with_a_bad_config_file_names_the_key(tmp_path: Path) -> None:
    path = write_config(tmp_path, VALID.replace("max_tunnels = 7", "max_tunnels = true"))
    result = invoke("run", "--config", str(path))
    assert result.exit_code == 1
    assert f"{path}: server.max_tunnels: expected an integer" in result.stderr


def test_run_flags_override_the_file(tmp_path: Path, busy_port: int) -> None:
    # The file listens on 127.0.0.1:8080; --listen replaces it, as the failure to bind shows.
    path = write_config(tmp_path, VALID)
    result = invoke("run", "--config", str(path), "--listen", f"127.0.0.1:{busy_port}")
    assert result.exit_code == 1
    assert f"cannot listen on 127.0.0.1:{busy_port}" in result.stderr
    assert "8080" not in result.stderr


def test_demo_once_in_process_reports_the_url_and_a_passed_self_check() -> None:
    result = invoke("demo", "--once")
    assert result.exit_code == 0, result.output
    assert "WebSocket URL: ws://127.0.0.1:" in result.stdout
    assert "self-check: passed" in result.stdout


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout == f"tunnel, version {__version__}\n"


# --- real subprocesses -----------------------------------------------------------------------


def test_demo_once_in_a_subprocess_passes_its_self_check() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "tunnel", "demo", "--once"],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_SECONDS,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert "self-check: passed" in completed.stdout
    assert "WebSocket URL: ws://127.0.0.1:" in completed.stdout
    # The demo stops cleanly: the self-check's tunnel ends as it closed, not cut by the exit.
    [closed] = [line for line in completed.stderr.splitlines() if " tunnel closed " in line]
    assert re.search(r" reason=(backend_eof|client_eof)$", closed), completed.stderr
    assert "stopped tunnels_left=0 drained=True" in completed.stderr, completed.stderr


def wait_for_text(path: Path, process: subprocess.Popen[bytes], text: str) -> str:
    """Poll ``path`` (bounded by count and time) until it holds ``text``; return its contents."""
    deadline = time.monotonic() + SUBPROCESS_SECONDS
    for _ in range(int(SUBPROCESS_SECONDS / 0.05) + 1):
        contents = path.read_text(errors="replace")
        if text in contents or process.poll() is not None or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert text in contents, f"no {text!r} in:\n{contents}"
    return contents


def terminal_sigint() -> None:
    """In the child, before exec: SIGINT back to its default, as in a terminal (a shell starts
    background jobs with SIGINT ignored, and the child would inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_serving_demo_stops_on_a_stop_signal_and_exits_0(tmp_path: Path, signum: int) -> None:
    out_path, err_path = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "tunnel", "demo"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=terminal_sigint,
        )
    try:
        wait_for_text(out_path, process, "serving; press Ctrl-C to stop")
        process.send_signal(signum)
        returncode = process.wait(SUBPROCESS_SECONDS)
    finally:
        if process.poll() is None:
            process.kill()  # the demo this test started, by its Popen
            process.wait(SUBPROCESS_SECONDS)
    stderr = err_path.read_text(errors="replace")
    assert returncode == 0, stderr
    assert f"info stopping signal={signal.Signals(signum).name}\n" in stderr
    assert "Traceback" not in stderr


def free_port() -> int:
    """A loopback port nobody listens on right now (bind to 0, read it, let it go)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def wait_until_accepting(port: int, process: trio.Process, seconds: float) -> None:
    """Poll the port (bounded by count and time) until the tunnel subprocess accepts."""
    with trio.fail_after(seconds):
        for _ in range(int(seconds / 0.05) + 1):
            assert process.returncode is None, f"tunnel exited early ({process.returncode})"
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return
    raise AssertionError(f"nothing accepted on 127.0.0.1:{port}")


def websocket_echo(url: str) -> list[str | bytes]:
    """A real ``websockets`` client: two messages there and back, then a clean close."""
    with websockets.sync.client.connect(url, open_timeout=10, close_timeout=5) as ws:
        ws.send("hello through a real tunnel")
        ws.send(b"\x00\x01binary\xff")
        return [ws.recv(timeout=10), ws.recv(timeout=10)]


async def test_run_in_a_subprocess_tunnels_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    log_path = tmp_path / "tunnel.log"
    async with trio.open_nursery() as nursery:
        echo = await nursery.start(serve_echo)
        echo_port = echo[0].socket.getsockname()[1]
        port = free_port()
        with log_path.open("wb") as log:
            process = await trio.lowlevel.open_process(
                [
                    sys.executable,
                    "-m",
                    "tunnel",
                    "run",
                    "--listen",
                    f"127.0.0.1:{port}",
                    "--backend",
                    f"127.0.0.1:{echo_port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        pid = process.pid
        try:
            await wait_until_accepting(port, process, SUBPROCESS_SECONDS)
            echoed = await trio.to_thread.run_sync(websocket_echo, f"ws://127.0.0.1:{port}/")
            assert echoed == ["hello through a real tunnel", b"\x00\x01binary\xff"]

            assert pid == process.pid
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(10):
                returncode = await process.wait()
            assert returncode == 0, log_path.read_text(errors="replace")
        finally:
            if process.returncode is None:
                process.kill()  # the Process object signals the PID it started, nothing else
                with trio.move_on_after(10):
                    await process.wait()
            nursery.cancel_scope.cancel()
    log_text = log_path.read_text(errors="replace")
    assert "tunnel opened" in log_text
    assert "tunnel closed" in log_text


# --- TLS: tunnel check, run flags, and SIGHUP in a real subprocess -----------------------------

TLS_CONFIG = """\
[[listeners]]
listen = "127.0.0.1:8443"
tls = { cert = "certs/cert.pem", key = "certs/key.pem", min_version = "1.3" }

[[routes]]
name = "chat"
backends = [ { url = "wss://127.0.0.1:9443" } ]
[routes.backend_tls]
ca = "certs/ca.pem"
"""


@pytest.fixture
def dev_certs(tmp_path: Path) -> DevCertificates:
    """A development CA and a 127.0.0.1 certificate in ``tmp_path/certs``."""
    return write_dev_certificates(tmp_path / "certs", ["127.0.0.1", "localhost"])


def test_check_loads_the_tls_files_and_prints_the_tls_section(
    tmp_path: Path, dev_certs: DevCertificates
) -> None:
    path = write_config(tmp_path, TLS_CONFIG)
    result = invoke("check", "--config", str(path))

    assert result.exit_code == 0, result.output
    assert "configuration is valid" in result.stderr
    assert "[listeners.tls]" in result.stdout
    printed = tomllib.loads(result.stdout)
    [listener] = printed["listeners"]
    assert listener["tls"] == {
        "certs": [{"cert": str(dev_certs.cert), "key": str(dev_certs.key)}],
        "min_version": "1.3",
        "client_ca": "",
        "client_subject_header": "",
    }
    [route] = printed["routes"]
    assert route["backends"][0]["url"] == "wss://127.0.0.1:9443"
    assert route["backend_tls"]["ca"] == str(dev_certs.ca_cert)
    assert Config.from_toml(result.stdout) == Config.from_file(path)


@pytest.mark.parametrize(
    ("replace", "by", "key", "file"),
    [
        pytest.param(
            "certs/cert.pem", "certs/absent.pem", "listeners[0].tls", "absent.pem", id="cert"
        ),
        pytest.param(
            "certs/key.pem", "certs/absent.key", "listeners[0].tls", "absent.key", id="key"
        ),
        pytest.param(
            'min_version = "1.3"',
            'client_ca = "certs/absent-ca.pem"',
            "listeners[0].tls",
            "absent-ca.pem",
            id="client-ca",
        ),
        pytest.param(
            'ca = "certs/ca.pem"',
            'ca = "certs/absent-ca.pem"',
            "routes[0].backend_tls.ca",
            "absent-ca.pem",
            id="backend-ca",
        ),
    ],
)
def test_check_with_a_missing_tls_file_exits_1_naming_the_key_and_the_file(
    tmp_path: Path, dev_certs: DevCertificates, replace: str, by: str, key: str, file: str
) -> None:
    path = write_config(tmp_path, TLS_CONFIG.replace(replace, by))
    result = invoke("check", "--config", str(path))

    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert f"{key}: cannot read {tmp_path / 'certs' / file}: No such file or directory" in (
        result.stderr
    )
    assert "Traceback" not in result.output


def test_check_with_a_key_that_does_not_match_the_certificate_exits_1(
    tmp_path: Path, dev_certs: DevCertificates
) -> None:
    other = write_dev_certificates(tmp_path / "other", ["127.0.0.1"])
    path = write_config(tmp_path, TLS_CONFIG.replace("certs/key.pem", str(other.key)))
    result = invoke("check", "--config", str(path))

    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert (
        f"listeners[0].tls.cert: cannot load certificate {dev_certs.cert} with key {other.key}"
        in result.stderr
    )
    assert "the key must match the certificate" in result.stderr
    assert "Traceback" not in result.output


def test_check_with_a_client_ca_that_is_no_certificate_exits_1(
    tmp_path: Path, dev_certs: DevCertificates
) -> None:
    text = TLS_CONFIG.replace('min_version = "1.3"', 'client_ca = "certs/key.pem"')
    result = invoke("check", "--config", str(write_config(tmp_path, text)))
    assert result.exit_code == 1, result.output
    assert f"listeners[0].tls.client_ca: {dev_certs.key}: no usable CA certificate" in (
        result.stderr
    )


@pytest.mark.parametrize(
    "flags",
    [
        pytest.param(["--tls-cert", "cert.pem"], id="cert-alone"),
        pytest.param(["--tls-key", "key.pem"], id="key-alone"),
    ],
)
def test_run_with_one_tls_flag_exits_1_naming_both(flags: list[str]) -> None:
    result = invoke("run", "--listen", "127.0.0.1:0", "--backend", "127.0.0.1:9", *flags)
    assert result.exit_code == 1
    assert "configuration error: --tls-cert/--tls-key: give both, or neither" in result.stderr
    assert "Traceback" not in result.output


def test_run_with_a_tls_file_that_cannot_be_read_exits_1_before_listening(
    tmp_path: Path, dev_certs: DevCertificates
) -> None:
    missing = tmp_path / "missing.pem"
    result = invoke(
        "run",
        "--listen",
        "127.0.0.1:0",
        "--backend",
        "127.0.0.1:9",
        "--tls-cert",
        str(dev_certs.cert),
        "--tls-key",
        str(missing),
    )
    assert result.exit_code == 1
    assert f"listeners[0].tls: cannot read {missing}: No such file or directory" in result.stderr
    assert "listening" not in result.stderr
    assert "Traceback" not in result.output


def wait_for_log(log_path: Path, process: subprocess.Popen[bytes], text: str) -> str:
    """Poll the log (bounded by count and time) until it holds ``text``; return the log."""
    deadline = time.monotonic() + SUBPROCESS_SECONDS
    for _ in range(int(SUBPROCESS_SECONDS / 0.05) + 1):
        log = log_path.read_text(errors="replace")
        if text in log:
            return log
        assert process.poll() is None, f"tunnel exited early ({process.returncode}):\n{log}"
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    raise AssertionError(f"no {text!r} in the log:\n{log_path.read_text(errors='replace')}")


def serial_of(tls: ssl.SSLSocket) -> int:
    """The serial number of the certificate the server presented on ``tls``."""
    der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def handshake_serial(port: int, context: ssl.SSLContext) -> int:
    """A new TLS handshake with the tunnel: the serial of the certificate it presents now."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
        context.wrap_socket(sock, server_hostname="127.0.0.1") as tls,
    ):
        return serial_of(tls)


def replace_pair(certs: DevCertificates) -> int:
    """Write a new certificate and key from the same CA over ``cert.pem``/``key.pem``, each
    replaced atomically; return the new serial."""
    ca = Issued(certs.ca_cert.read_bytes(), certs.ca_key.read_bytes())
    fresh = issue(ca, ["127.0.0.1", "localhost"])
    for path, data in ((certs.key, fresh.key_pem), (certs.cert, fresh.cert_pem)):
        temporary = path.with_name(f".{path.name}.new")
        temporary.write_bytes(data)
        os.replace(temporary, path)
    return x509.load_pem_x509_certificate(fresh.cert_pem).serial_number


def websocket_echo_tls(url: str, context: ssl.SSLContext) -> str | bytes:
    """A new ``wss://`` client: one message there and back."""
    with websockets.sync.client.connect(url, ssl=context, open_timeout=10, close_timeout=5) as ws:
        ws.send("after the reload")
        return ws.recv(timeout=10)


def test_run_in_a_subprocess_serves_wss_and_reloads_certificates_on_sighup(
    tmp_path: Path, dev_certs: DevCertificates, echo_backend: WsBackend
) -> None:
    # The file only turns the periodic check off, so that only SIGHUP can load the new pair;
    # its listener and route are replaced by the flags.
    config = write_config(
        tmp_path,
        '[server]\ncert_check_interval = "0s"\n[[listeners]]\nlisten = "127.0.0.1:1"\n'
        '[[routes]]\nname = "file"\nbackends = [{ url = "127.0.0.1:1" }]\n',
    )
    port = free_port()
    log_path = tmp_path / "tunnel.log"
    context = ssl.create_default_context(cafile=str(dev_certs.ca_cert))
    url = f"wss://127.0.0.1:{port}/"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tunnel",
                "run",
                "--config",
                str(config),
                "--listen",
                f"127.0.0.1:{port}",
                "--backend",
                echo_backend.url,
                "--tls-cert",
                str(dev_certs.cert),
                "--tls-key",
                str(dev_certs.key),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    pid = process.pid
    try:
        wait_for_log(log_path, process, f"listening address=127.0.0.1:{port}")
        with websockets.sync.client.connect(
            url, ssl=context, open_timeout=10, close_timeout=5
        ) as first:
            first.send("before the reload")
            assert first.recv(timeout=10) == "before the reload"
            assert isinstance(first.socket, ssl.SSLSocket)
            old_serial = serial_of(first.socket)
            assert handshake_serial(port, context) == old_serial

            new_serial = replace_pair(dev_certs)
            assert new_serial != old_serial
            assert "reloaded" not in log_path.read_text(errors="replace")
            assert process.pid == pid
            process.send_signal(signal.SIGHUP)  # Popen signals only the PID it started

            log = wait_for_log(log_path, process, "TLS certificates reloaded")
            assert "SIGHUP received; reloading" in log
            assert handshake_serial(port, context) == new_serial
            assert websocket_echo_tls(url, context) == "after the reload"
            # The tunnel opened before the reload keeps its session and still carries data.
            first.send("still open")
            assert first.recv(timeout=10) == "still open"
            assert serial_of(first.socket) == old_serial
        assert process.poll() is None
        assert echo_backend.connections == 2

        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0, log_path.read_text(errors="replace")
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()  # the Popen object kills only the PID it started
                process.wait(10)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_run_with_a_missing_tls_key_exits_1_before_any_worker_starts(
    tmp_path: Path, workers: str
) -> None:
    """With workers, the files are loaded once by the supervisor, which fails at once with the
    key and the file, instead of every worker failing and being restarted."""
    cert = tmp_path / "cert.pem"
    cert.write_bytes(issue(make_ca(), ["localhost"]).cert_pem)
    missing = tmp_path / "missing-key.pem"
    result = invoke(
        "run",
        "--listen",
        "127.0.0.1:0",
        "--backend",
        "127.0.0.1:9",
        "--workers",
        workers,
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(missing),
    )
    assert result.exit_code == 1
    assert "configuration error: listeners[0].tls" in result.stderr
    assert str(missing) in result.stderr
    assert "starting workers" not in result.stderr


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_the_example_configuration_is_valid() -> None:
    result = invoke("check", "--config", str(EXAMPLES / "tunnel.toml"))
    assert result.exit_code == 0, result.output


def test_the_tls_example_is_valid_once_its_certificates_exist(tmp_path: Path) -> None:
    """The steps its header gives: two ``tunnel cert`` runs, then ``tunnel check``."""
    shutil.copy(EXAMPLES / "tunnel-tls.toml", tmp_path / "tunnel-tls.toml")
    for out, hosts in (
        ("certs", ["--host", "localhost", "--host", "127.0.0.1"]),
        ("certs/chat", ["--host", "chat.localhost", "--host", "*.chat.localhost"]),
    ):
        made = invoke("cert", *hosts, "--out", str(tmp_path / out))
        assert made.exit_code == 0, made.output
    result = invoke("check", "--config", str(tmp_path / "tunnel-tls.toml"))
    assert result.exit_code == 0, result.output
    assert str(tmp_path / "certs" / "chat" / "cert.pem") in result.stdout


# --- what the README's commands leave in a checkout -----------------------------------------

ROOT = EXAMPLES.parent


def git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", "-C", str(ROOT), *args],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_SECONDS,
        check=False,
    )


@pytest.fixture
def checkout() -> None:
    if shutil.which("git") is None or git("rev-parse", "--git-dir").returncode != 0:
        pytest.skip("not a git checkout")


@pytest.mark.usefixtures("checkout")
@pytest.mark.parametrize(
    "path",
    [
        "certs/ca-key.pem",  # tunnel cert --out certs/, as the README says
        "certs/chat/key.pem",
        "bench/results/20991231T235959Z.json",  # python -m bench
        "bench/results/20991231T235959Z-tls.md",
    ],
)
def test_files_the_readme_commands_write_are_ignored(path: str) -> None:
    assert git("check-ignore", "--no-index", "--quiet", path).returncode == 0


@pytest.mark.usefixtures("checkout")
def test_the_certs_rule_is_for_the_top_level_directory_only() -> None:
    """``/certs/`` is the top-level directory only: a ``certs/`` elsewhere (a fixture, say)
    stays visible to git."""
    assert git("check-ignore", "--no-index", "--quiet", "tests/certs/x.pem").returncode == 1


@pytest.mark.usefixtures("checkout")
def test_every_benchmark_result_the_docs_cite_is_committed() -> None:
    """A cited run's report (``.md``) is committed, and its data (``.json``) wherever the docs
    name it or a figure comes from a full run (a pipe-size session's report alone is cited)."""
    cited: set[str] = set()
    data: set[str] = set()
    for doc in [ROOT / "README.md", ROOT / "bench" / "README.md", *(ROOT / "docs").glob("*.md")]:
        text = doc.read_text(encoding="utf-8")
        cited |= set(re.findall(r"\b(\d{8}T\d{6}Z(?:-[a-z]+)?)\.(?:md|json)\b", text))
        cited |= set(re.findall(r"bench/results/(\d{8}T\d{6}Z(?:-[a-z]+)?)\.", text))
        data |= set(re.findall(r"\b(\d{8}T\d{6}Z(?:-[a-z]+)?)\.json\b", text))
        data |= set(re.findall(r"`bench/results/(\d{8}T\d{6}Z(?:-[a-z]+)?)\.md`:", text))
    assert "20261123T154619Z" in cited, "the scan finds the citations"
    assert "20261123T154619Z" in data, "the scan finds the figures' runs"
    tracked = set(git("ls-files", "bench/results").stdout.split())
    reports = {f"bench/results/{name}.md" for name in cited}
    reports |= {f"bench/results/{name}.json" for name in data}
    assert sorted(reports - tracked) == []
