"""Compile the C load generator and echo backend (gcc -O2) into a cache directory.

A binary's name carries a hash of its sources and flags, so an edit rebuilds it and concurrent
runs never see a half-written file (each compiles to a temporary name and renames).

The load generator speaks TLS (``--tls``) when OpenSSL's headers and libraries are there
(``libssl-dev``): it is then compiled with ``-DBENCH_TLS -lssl -lcrypto``. Without them it is
compiled without TLS (as ``loadgen_notls-*``) and ``Binaries.tls_missing`` says why, so that the
plain workloads still run and the TLS ones report that they were skipped.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
SOURCE_DIR = BENCH_DIR / "c"
CACHE_DIR = BENCH_DIR / ".build"
CFLAGS = ("-O2", "-Wall", "-Wextra", "-std=gnu11")
LIBS = ("-lm",)
SHARED_HEADERS = ("wsutil.h",)
TLS_CFLAGS = ("-DBENCH_TLS",)
TLS_LIBS = ("-lssl", "-lcrypto")
OPENSSL_MISSING = "libssl-dev missing (apt-get install libssl-dev): the load generator has no TLS"
_OPENSSL_PROBE = """\
#include <openssl/ssl.h>
int main(void) { return SSL_CTX_new(TLS_client_method()) == NULL; }
"""


class BuildError(RuntimeError):
    """The C programs could not be compiled."""


@dataclass(frozen=True)
class Binaries:
    echo_backend: Path
    loadgen: Path
    compiler: str
    tls_missing: str | None = None
    """None when the load generator speaks TLS; else why not (naming the package)."""


def compiler() -> str:
    """The C compiler to use: $CC, else gcc; raises BuildError naming what is missing."""
    name = os.environ.get("CC", "gcc")
    path = shutil.which(name)
    if path is None:
        raise BuildError(f"C compiler {name!r} not found (apt-get install gcc, or set CC)")
    return path


def compiler_version(cc: str) -> str:
    result = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False)
    return result.stdout.splitlines()[0] if result.stdout else cc


@functools.cache
def openssl_missing(cc: str) -> str | None:
    """None when ``cc`` can compile and link against OpenSSL; else ``OPENSSL_MISSING``."""
    with tempfile.TemporaryDirectory(prefix="bench-openssl-") as scratch:
        source = Path(scratch) / "probe.c"
        source.write_text(_OPENSSL_PROBE)
        command = [cc, "-o", str(Path(scratch) / "probe"), str(source), *TLS_LIBS]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    return None if result.returncode == 0 else OPENSSL_MISSING


def _build_one(
    cc: str,
    program: str,
    cache_dir: Path,
    *,
    name: str | None = None,
    cflags: tuple[str, ...] = (),
    libs: tuple[str, ...] = (),
) -> Path:
    """Compile ``program``.c into ``cache_dir/<name>-<hash>`` (``name`` defaults to the
    program's; variants built with other flags get a name of their own, so that each keeps its
    binary instead of deleting the other's as stale)."""
    name = name or program
    all_cflags, all_libs = (*CFLAGS, *cflags), (*libs, *LIBS)
    source = SOURCE_DIR / f"{program}.c"
    digest = hashlib.sha256()
    for path in (source, *(SOURCE_DIR / h for h in SHARED_HEADERS)):
        digest.update(path.read_bytes())
    digest.update(" ".join((cc, *all_cflags, *all_libs)).encode())
    target = cache_dir / f"{name}-{digest.hexdigest()[:12]}"
    if target.exists():
        return target
    partial = cache_dir / f".{target.name}.{os.getpid()}.tmp"
    command = [cc, *all_cflags, "-o", str(partial), str(source), *all_libs]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise BuildError(f"{' '.join(command)} failed:\n{result.stderr}")
    partial.replace(target)
    for stale in cache_dir.glob(f"{name}-*"):  # binaries of earlier sources
        if stale != target:
            stale.unlink(missing_ok=True)
    return target


def build(cache_dir: Path = CACHE_DIR) -> Binaries:
    """Compile both programs (or reuse the cached binaries) and return their paths. The load
    generator gets TLS when OpenSSL is there (see the module's docstring)."""
    cc = compiler()
    cache_dir.mkdir(parents=True, exist_ok=True)
    echo_backend = _build_one(cc, "echo_backend", cache_dir)
    tls_missing = openssl_missing(cc)
    if tls_missing is None:
        loadgen = _build_one(cc, "loadgen", cache_dir, cflags=TLS_CFLAGS, libs=TLS_LIBS)
    else:
        loadgen = _build_one(cc, "loadgen", cache_dir, name="loadgen_notls")
    return Binaries(echo_backend, loadgen, compiler_version(cc), tls_missing)
