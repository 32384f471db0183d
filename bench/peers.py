"""The proxies under test: their config files, how to start them and which processes to measure.

The three configs are kept equivalent: one worker (or ``--workers N`` for all three), loopback
only, the same backend, the same forwarded headers (``Host`` kept, ``X-Forwarded-For``,
``-Proto``, ``-Host``, ``X-Real-IP``), a 1 h tunnel timeout, no access logging (tunnel cannot
turn off its two lines per tunnel; they go to a file) and connection limits large enough for
the idle test.

With ``Settings.tls`` every proxy terminates TLS on its listener (the backend side stays plain)
with the same certificate (EC P-256, made once per session by ``make_certificates``) and the
same policy, which is tunnel's: TLS 1.2 and 1.3, forward-secret AEAD suites for 1.2
(``TLS12_CIPHERS``) and OpenSSL's default suites for 1.3, the server's preference, OpenSSL's
default key-exchange groups, ALPN ``http/1.1``, session tickets on (OpenSSL's default, which
tunnel's Python ``ssl`` keeps: two tickets after a TLS 1.3 handshake). Session caches stay at
each one's default (HAProxy's is its shared cache; nginx has none; tunnel's is OpenSSL's, which
stateless TLS 1.3 tickets leave unused). All three link the same libssl at run time.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import procs

REPO_DIR = Path(__file__).resolve().parent.parent
PEER_NAMES = ("tunnel", "nginx", "haproxy", "haproxy-splice")
PROGRAMS = {"nginx": "nginx", "haproxy": "haproxy", "haproxy-splice": "haproxy"}
"""The program each peer runs (``haproxy-splice`` is HAProxy with forced kernel splicing)."""
HAPROXY_PIPESIZE = 256 * 1024
"""``tune.pipesize`` of ``haproxy-splice`` (0: not set, the kernel's default pipe size)."""
START_SECONDS = 20.0
TLS_HOSTS = ("localhost", "127.0.0.1")
"""The names the benchmark certificate covers; the load generator sends SNI "localhost"."""
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
"""tunnel's TLS 1.2 cipher list (``tunnel.net.tls.CIPHERS_TLS12``), given to nginx and HAProxy."""


@dataclass(frozen=True)
class TLSFiles:
    """The benchmark's certificate and key (PEM), and both in one file for HAProxy."""

    cert: Path
    key: Path
    combined: Path


def make_certificates(directory: Path) -> TLSFiles:
    """A throwaway CA and an EC P-256 certificate for ``TLS_HOSTS`` it signs, made with
    ``tunnel.certs`` (the code behind ``tunnel cert``), written into ``directory``."""
    from tunnel.certs import issue, make_ca  # here: only TLS sessions need cryptography

    directory.mkdir(parents=True, exist_ok=True)
    issued = issue(make_ca("tunnel bench CA"), list(TLS_HOSTS))
    files = TLSFiles(directory / "cert.pem", directory / "key.pem", directory / "combined.pem")
    files.cert.write_bytes(issued.cert_pem)
    for path, data in (
        (files.key, issued.key_pem),
        (files.combined, issued.cert_pem + issued.key_pem),
    ):
        path.touch(mode=0o600)
        path.write_bytes(data)
    return files


@dataclass(frozen=True)
class Settings:
    """What every proxy is configured with."""

    backend_port: int
    workers: int = 1
    relay: str = "auto"
    idle_tunnels: int = 5000
    nofile: int = 20000
    python: str = sys.executable
    tls: TLSFiles | None = None
    """Terminate TLS on the listener with these files (None: plain ws://)."""
    haproxy_pipesize: int = HAPROXY_PIPESIZE
    """``tune.pipesize`` for ``haproxy-splice``, in bytes; 0 leaves it unset."""


# --- config writers (pure) -------------------------------------------------------------------


def tunnel_config(port: int, settings: Settings) -> str:
    tls = ""
    if settings.tls is not None:  # tunnel's defaults otherwise: min_version = "1.2"
        tls = f'tls = {{ cert = "{settings.tls.cert}", key = "{settings.tls.key}" }}\n'
    return f"""\
[server]
relay = "{settings.relay}"
workers = {settings.workers}
idle_timeout = "1h"
max_tunnels = 100000

[[listeners]]
listen = "{procs.LOOPBACK}:{port}"
{tls}
[[routes]]
name = "bench"
backends = [ {{ name = "echo", url = "ws://{procs.LOOPBACK}:{settings.backend_port}" }} ]
"""


def nginx_worker_connections(settings: Settings) -> int:
    """Two connections per tunnel (client and upstream) plus headroom, within the fd limit.

    nginx starts closing connections it deems reusable (those still waiting for a request)
    once fewer than 1/16 of ``worker_connections`` are free ("worker_connections are not
    enough, reusing connections"), so twice the idle tunnels is not enough.
    """
    return max(1024, min(2 * settings.idle_tunnels * 5 // 4 + 1024, settings.nofile - 64))


def nginx_tls(settings: Settings) -> tuple[str, str]:
    """The ``listen`` flag and the server-block directives that make nginx terminate TLS."""
    if settings.tls is None:
        return "", ""
    # ssl_session_tickets on and no ssl_session_cache are nginx's defaults and tunnel's too.
    return (
        " ssl",
        f"""
        ssl_certificate {settings.tls.cert};
        ssl_certificate_key {settings.tls.key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ciphers {TLS12_CIPHERS};
        ssl_prefer_server_ciphers on;
        ssl_ecdh_curve auto;
        ssl_session_tickets on;
""",
    )


def nginx_config(port: int, prefix: Path, settings: Settings) -> str:
    user = "user root;\n" if os.geteuid() == 0 else ""
    temp = prefix / "tmp"
    ssl_flag, ssl_directives = nginx_tls(settings)
    return f"""\
worker_processes {settings.workers};
master_process on;
{user}error_log {prefix}/error.log warn;
pid {prefix}/nginx.pid;
worker_rlimit_nofile {settings.nofile};

events {{
    worker_connections {nginx_worker_connections(settings)};
}}

http {{
    access_log off;
    client_body_temp_path {temp}/client_body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;

    server {{
        listen {procs.LOOPBACK}:{port}{ssl_flag} backlog=4096;{ssl_directives}
        location / {{
            proxy_pass http://{procs.LOOPBACK}:{settings.backend_port};
            proxy_http_version 1.1;
            proxy_set_header Host $http_host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $http_host;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_buffer_size 64k;
            proxy_buffers 4 64k;
            proxy_busy_buffers_size 64k;
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
        }}
    }}
}}
"""


def haproxy_maxconn(settings: Settings) -> int:
    """Frontend connections; HAProxy needs about two descriptors for each."""
    return max(2000, min(settings.idle_tunnels + 1000, (settings.nofile - 200) // 2))


def haproxy_config(port: int, settings: Settings, splice: bool = False) -> str:
    """HAProxy's config; with ``splice`` it forces kernel splicing both ways
    (``option splice-request`` / ``splice-response``: without them HAProxy splices only when it
    guesses it pays) with ``tune.pipesize`` from ``settings.haproxy_pipesize``."""
    maxconn = haproxy_maxconn(settings)
    tune = ""
    if splice and settings.haproxy_pipesize > 0:
        tune = f"    tune.pipesize {settings.haproxy_pipesize}\n"
    options = "    option splice-request\n    option splice-response\n" if splice else ""
    bind, proto, ssl_global = "", "http", ""
    if settings.tls is not None:
        # HAProxy reads the certificate and its key from one file. Session tickets are on by
        # default, so is the server's cipher preference (prefer-client-ciphers unset), and its
        # key-exchange groups are OpenSSL's defaults (no ``curves``): X25519 is negotiated, as
        # with the other two (the load generator reports what each handshake negotiated).
        bind = f" ssl crt {settings.tls.combined} alpn http/1.1 ssl-min-ver TLSv1.2"
        proto = "https"
        ssl_global = f"    ssl-default-bind-ciphers {TLS12_CIPHERS}\n"
    return f"""\
global
    nbthread {settings.workers}
    maxconn {maxconn}
{tune}{ssl_global}
defaults
    mode http
    maxconn {maxconn}
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h
    timeout http-request 10s
    option forwardfor
{options}
frontend bench
    bind {procs.LOOPBACK}:{port}{bind}
    http-request set-header X-Forwarded-Proto {proto}
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    http-request set-header X-Real-IP %[src]
    default_backend echo

backend echo
    server echo {procs.LOOPBACK}:{settings.backend_port}
"""


# --- running peers -----------------------------------------------------------------------


@dataclass
class Running:
    """A started proxy (or the backend itself, ``direct``, with no process of its own)."""

    name: str
    port: int
    process: procs.Managed | None
    measured: Callable[[], list[int]] = field(default=list)
    config_text: str = ""
    tls: bool = False
    """Clients reach it over TLS."""

    def pids(self) -> list[int]:
        """The processes whose CPU and RSS count as the proxy's."""
        return self.measured()

    def problems(self) -> list[str]:
        """New log lines that report a warning or worse."""
        if self.process is None:
            return []
        return [line for line in self.process.new_log_lines() if is_problem(line)]

    def stop(self) -> list[str]:
        return self.process.stop() if self.process is not None else []


_PROBLEM_WORDS = (
    " warning ",
    " error ",
    " critical ",
    "[warn]",
    "[error]",
    "[crit]",
    "[alert]",
    "[emerg]",
    "[WARNING]",
    "[ALERT]",
    "Traceback",
    '"level": "warning"',
    '"level": "error"',
)


def is_problem(line: str) -> bool:
    return any(word in line for word in _PROBLEM_WORDS)


def direct(backend_port: int) -> Running:
    return Running("direct", backend_port, None)


def _find(program: str) -> str | None:
    found = shutil.which(program)
    if found is not None:
        return found
    for folder in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
        candidate = Path(folder) / program
        if candidate.exists():
            return str(candidate)
    return None


def missing_reason(name: str) -> str | None:
    """None when peer ``name`` can run here, else why not (naming what to install)."""
    if name == "tunnel":
        return None
    program = PROGRAMS.get(name, name)
    if _find(program) is None:
        return f"{program} not installed (apt-get install {program})"
    return None


def version(name: str, python: str = sys.executable) -> str:
    if name == "tunnel":
        argv = [python, "-m", "tunnel", "--version"]
    else:
        program = _find(PROGRAMS.get(name, name))
        if program is None:
            return "not installed"
        argv = [program, "-v"]
    result = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=REPO_DIR)
    text = (result.stdout + result.stderr).strip()
    return text.splitlines()[0] if text else f"exit status {result.returncode}"


def _git(*args: str) -> str:
    result = subprocess.run(
        ["git", *args], capture_output=True, text=True, check=False, cwd=REPO_DIR
    )
    return result.stdout.strip()


def tunnel_source() -> dict[str, str | bool]:
    """tunnel's git commit, whether ``tunnel/`` has uncommitted changes, and a fingerprint of
    those changes (so a session can tell that the code changed while it ran)."""
    status = _git("status", "--porcelain", "--", "tunnel")
    diff = _git("diff", "HEAD", "--", "tunnel")
    commit = _git("rev-parse", "HEAD")
    fingerprint = hashlib.sha256(f"{commit}\n{status}\n{diff}".encode()).hexdigest()[:16]
    return {"commit": commit, "dirty": bool(status), "fingerprint": fingerprint}


def _log_has(path: Path, needle: str, count: int) -> bool:
    try:
        return path.read_text(encoding="utf-8", errors="replace").count(needle) >= count
    except OSError:
        return False


def start_tunnel(workdir: Path, settings: Settings, label: str = "tunnel") -> Running:
    port = procs.free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "tunnel.toml"
    text = tunnel_config(port, settings)
    config_path.write_text(text)
    check = subprocess.run(
        [settings.python, "-m", "tunnel", "check", "--config", str(config_path)],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO_DIR,
    )
    if check.returncode != 0:
        raise procs.ProcessError(f"tunnel check rejected the config: {check.stderr.strip()}")
    log_path = workdir / "tunnel.log"
    process = procs.start(
        label,
        [settings.python, "-m", "tunnel", "run", "--config", str(config_path)],
        log_path,
        cwd=REPO_DIR,
    )
    try:
        procs.wait_until(
            process,
            lambda: _log_has(log_path, "listening", 1),
            START_SECONDS,
            "'listening' log line",
        )
        if settings.workers > 1:  # give the other workers a moment to log theirs too
            try:
                procs.wait_until(
                    process,
                    lambda: _log_has(log_path, "listening", settings.workers),
                    3.0,
                    "listening line from every worker",
                )
            except procs.ProcessError:
                if not process.alive():
                    raise
        procs.wait_until(process, lambda: procs.port_accepts(port), START_SECONDS, "open port")
    except BaseException:
        process.stop()
        raise
    tls = settings.tls is not None
    return Running(label, port, process, lambda: procs.tree(process.pid), text, tls)


def start_nginx(workdir: Path, settings: Settings) -> Running:
    program = _find("nginx")
    if program is None:
        raise procs.ProcessError("nginx not installed (apt-get install nginx)")
    port = procs.free_port()
    prefix = workdir.resolve()
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    config_path = prefix / "nginx.conf"
    text = nginx_config(port, prefix, settings)
    config_path.write_text(text)
    argv = [program, "-c", str(config_path), "-p", str(prefix), "-e", str(prefix / "error.log")]
    process = procs.start("nginx", [*argv, "-g", "daemon off;"], prefix / "nginx.stderr.log")
    process.log_path = prefix / "error.log"  # where nginx reports problems from now on

    def workers() -> list[int]:
        return procs.children(process.pid) or procs.tree(process.pid)

    try:
        procs.wait_until(process, lambda: procs.port_accepts(port), START_SECONDS, "open port")
        procs.wait_until(
            process, lambda: len(procs.children(process.pid)) >= 1, 5.0, "worker process"
        )
    except BaseException:
        process.stop()
        raise
    return Running("nginx", port, process, workers, text, settings.tls is not None)


def start_haproxy(workdir: Path, settings: Settings, splice: bool = False) -> Running:
    """HAProxy, or with ``splice`` the ``haproxy-splice`` peer (forced kernel splicing)."""
    program = _find("haproxy")
    if program is None:
        raise procs.ProcessError("haproxy not installed (apt-get install haproxy)")
    port = procs.free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "haproxy.cfg"
    text = haproxy_config(port, settings, splice)
    config_path.write_text(text)
    process = procs.start(
        "haproxy", [program, "-f", str(config_path), "-db"], workdir / "haproxy.log"
    )
    try:
        procs.wait_until(process, lambda: procs.port_accepts(port), START_SECONDS, "open port")
    except BaseException:
        process.stop()
        raise
    tls = settings.tls is not None
    name = "haproxy-splice" if splice else "haproxy"
    return Running(name, port, process, lambda: procs.tree(process.pid), text, tls)


def start(name: str, workdir: Path, settings: Settings) -> Running:
    """Start peer ``name`` (one of ``PEER_NAMES``) with its files in ``workdir``."""
    if name == "tunnel":
        return start_tunnel(workdir, settings)
    if name == "nginx":
        return start_nginx(workdir, settings)
    if name == "haproxy":
        return start_haproxy(workdir, settings)
    if name == "haproxy-splice":
        return start_haproxy(workdir, settings, splice=True)
    raise ValueError(f"unknown peer {name!r}; known: {', '.join(PEER_NAMES)}")
