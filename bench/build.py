"""Compile the C load generator and echo backend (gcc -O2) into a cache directory.

A binary's name carries a hash of its sources and flags, so an edit rebuilds it and concurrent
runs never see a half-written file (each compiles to a temporary name and renames).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
SOURCE_DIR = BENCH_DIR / "c"
CACHE_DIR = BENCH_DIR / ".build"
CFLAGS = ("-O2", "-Wall", "-Wextra", "-std=gnu11")
LIBS = ("-lm",)
PROGRAMS = ("echo_backend", "loadgen")
SHARED_HEADERS = ("wsutil.h",)


class BuildError(RuntimeError):
    """The C programs could not be compiled."""


@dataclass(frozen=True)
class Binaries:
    echo_backend: Path
    loadgen: Path
    compiler: str


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


def _build_one(cc: str, program: str, cache_dir: Path) -> Path:
    source = SOURCE_DIR / f"{program}.c"
    digest = hashlib.sha256()
    for path in (source, *(SOURCE_DIR / h for h in SHARED_HEADERS)):
        digest.update(path.read_bytes())
    digest.update(" ".join((cc, *CFLAGS, *LIBS)).encode())
    target = cache_dir / f"{program}-{digest.hexdigest()[:12]}"
    if target.exists():
        return target
    partial = cache_dir / f".{target.name}.{os.getpid()}.tmp"
    command = [cc, *CFLAGS, "-o", str(partial), str(source), *LIBS]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise BuildError(f"{' '.join(command)} failed:\n{result.stderr}")
    partial.replace(target)
    for stale in cache_dir.glob(f"{program}-*"):  # binaries of earlier sources
        if stale != target:
            stale.unlink(missing_ok=True)
    return target


def build(cache_dir: Path = CACHE_DIR) -> Binaries:
    """Compile both programs (or reuse the cached binaries) and return their paths."""
    cc = compiler()
    cache_dir.mkdir(parents=True, exist_ok=True)
    paths = {program: _build_one(cc, program, cache_dir) for program in PROGRAMS}
    return Binaries(paths["echo_backend"], paths["loadgen"], compiler_version(cc))
