"""What a relayed tunnel reports: its live counters and why it closed.

The relay itself is ``net.engine``, which serves plain and TLS tunnels alike; these names are
shared by the engine, the handler's log lines and the stats the ops pages will read.
"""

from __future__ import annotations

from dataclasses import dataclass

CLIENT_EOF = "client EOF"
BACKEND_EOF = "backend EOF"
CLIENT_RESET = "client reset"
BACKEND_RESET = "backend reset"
IDLE_TIMEOUT = "idle timeout"


@dataclass(slots=True)
class RelayStats:
    """Live counters of one tunnel; read them while bytes flow."""

    bytes_up: int = 0
    """Client → backend."""
    bytes_down: int = 0
    """Backend → client."""
    last_activity: float = 0.0
    close_reason: str = ""
