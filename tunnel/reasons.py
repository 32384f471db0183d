"""Why a tunnel closed: one vocabulary for the log field ``reason``, the metric label
``reason`` and the stats page, so an operator can join the three."""

from __future__ import annotations

from enum import StrEnum


class CloseReason(StrEnum):
    """The close reasons of DESIGN.md. A value is what logs, metrics and JSON show."""

    CLIENT_EOF = "client_eof"
    """The client closed first (FIN); the backend's direction was allowed to finish."""
    BACKEND_EOF = "backend_eof"
    CLIENT_RESET = "client_reset"
    """The client's socket failed (reset, broken pipe), also after it had half-closed."""
    BACKEND_RESET = "backend_reset"
    IDLE_TIMEOUT = "idle_timeout"
    """No byte either way for ``server.idle_timeout``."""
    MAX_LIFETIME = "max_lifetime"
    DRAIN = "drain"
    SHUTDOWN = "shutdown"
    """The process stopped with the tunnel still open."""
    CREDENTIAL_EXPIRED = "credential_expired"
    ADMIN = "admin"
    """Closed through the admin listener (``POST /tunnels/<id>/close``)."""
    BACKEND_DOWN = "backend_down"
    HALF_CLOSE_TIMEOUT = "half_close_timeout"
    ERROR = "error"
