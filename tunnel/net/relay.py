"""What a relayed tunnel reports: its live counters and why it closed.

The relay itself is ``net.engine``, which serves plain and TLS tunnels alike; these names are
shared by the engine, the handler's log lines and the stats the ops pages will read.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunnel.reasons import CloseReason


@dataclass(slots=True)
class RelayStats:
    """Live counters of one tunnel; read them while bytes flow."""

    bytes_up: int = 0
    """Client → backend."""
    bytes_down: int = 0
    """Backend → client."""
    last_activity: float = 0.0
    close_reason: CloseReason | None = None
