"""sd_notify(3): tell systemd which process is the service's main one after a live hand-off.

Under systemd the service's main PID is the process systemd started; when it hands off and
exits, systemd would take the service for stopped (and stop the new process with it) unless
the new process says ``MAINPID=`` on ``$NOTIFY_SOCKET`` (accepted with ``NotifyAccess=all``).
"""

from __future__ import annotations

import os
import socket

NOTIFY_SOCKET = "NOTIFY_SOCKET"


def notify(state: str) -> bool:
    """Send ``state`` (``"MAINPID=123"``...) to systemd; False when not run by systemd or
    when the socket cannot be reached (nothing else depends on it)."""
    path = os.environ.get(NOTIFY_SOCKET, "")
    if not path or path[0] not in "/@":
        return False
    address = "\0" + path[1:] if path[0] == "@" else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.send(state.encode("ascii"))
    except OSError:
        return False
    return True
