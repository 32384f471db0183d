"""``[server] pid_file``: the serving process's PID, as nginx's ``pid`` and HAProxy's ``-p``.

Written atomically (a temporary file renamed over it), so a reader never sees half a number;
removed at a clean exit only while it still names this process, so the old process of a live
hand-off, which exits after the new one wrote its own PID, leaves the file alone.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from tunnel.errors import ConfigError


def write_pid_file(path: str, pid: int | None = None) -> None:
    """Raises ``ConfigError`` naming ``server.pid_file`` when it cannot be written."""
    pid = os.getpid() if pid is None else pid
    target = Path(path)
    temporary = target.with_name(f".{target.name}.{pid}.tmp")
    try:
        temporary.write_text(f"{pid}\n", encoding="ascii")
        os.replace(temporary, target)
    except OSError as error:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise ConfigError("server.pid_file", f"cannot write {path}: {error.strerror}") from error


def read_pid_file(path: str) -> int | None:
    try:
        return int(Path(path).read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return None


def remove_pid_file(path: str, pid: int | None = None) -> None:
    """Remove ``path`` if it names ``pid`` (this process by default)."""
    pid = os.getpid() if pid is None else pid
    if read_pid_file(path) == pid:
        with contextlib.suppress(OSError):
            Path(path).unlink()
