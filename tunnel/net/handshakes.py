"""The bound on connections still in their handshake (``[server] max_handshakes``).

``max_tunnels`` counts tunnels; before this bound, a connection that never finished its
request head held a descriptor for the whole ``handshake_timeout``, and a few hundred slow
clients could leave none for anyone else. When the bound is reached, the connection that has
waited longest for its client (TLS handshake, PROXY header or request head) is closed to make
room: a slow client is old by the time it matters, and a real client finishes its head within
milliseconds of its accept, so shedding the oldest keeps real clients served where refusing
the newest would hand the whole bound to the slowest. Connections already past their head
(routing, the backend's answer) are never shed; when every one is, the new connection is
closed at once.
"""

from __future__ import annotations

import logging
import resource
import socket
from collections import OrderedDict
from itertools import count

import trio

from tunnel.logs import LOGGER_NAME, Throttle, fields

log = logging.getLogger(LOGGER_NAME)

MIN_HANDSHAKES = 16
SHED_LOG_EVERY = 10.0
"""Seconds between two log lines about shed connections (one per shed would flood the log
exactly when an attack is under way)."""


def default_max_handshakes(nofile: int | None = None) -> int:
    """A quarter of the descriptor limit (at least 16): handshakes hold one descriptor each
    (two while connecting to the backend), so three quarters stay for tunnels, their backend
    connects, listeners and files."""
    if nofile is None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if nofile == resource.RLIM_INFINITY:
            nofile = 1 << 20
    return max(MIN_HANDSHAKES, nofile // 4)


class Ticket:
    """One connection in its handshake: its cancel scope, and whether it waits for its
    client (sheddable) or for the tunnel's own work (not)."""

    __slots__ = ("id", "scope", "sock", "waiting_on_client")

    def __init__(self, ticket_id: int, sock: socket.socket | None = None) -> None:
        self.id = ticket_id
        self.scope = trio.CancelScope()
        self.sock = sock
        """Closed at once when the ticket is shed, so its descriptor is free for the
        connection that made room, not when the cancelled task next runs."""
        self.waiting_on_client = True


class Handshakes:
    """Connections accepted and not yet tunnels, oldest first; process-wide, across reloads."""

    def __init__(self, limit: int = 0) -> None:
        self.limit = limit or default_max_handshakes()
        self._open: OrderedDict[int, Ticket] = OrderedDict()
        self._ids = count()
        self.shed = 0
        """Connections closed to stay within the bound, since start."""
        self._shed_lines = Throttle(SHED_LOG_EVERY)

    def configure(self, limit: int) -> None:
        self.limit = limit or default_max_handshakes()

    @property
    def open(self) -> int:
        return len(self._open)

    def enter(self, sock: socket.socket | None = None) -> Ticket | None:
        """A ticket for a new connection, or None when it must be closed at once (the bound is
        reached and no older connection is waiting for its client). The accept loop asks for
        one before it starts the connection's task, so that descriptors, not just tasks, stay
        within the bound."""
        if len(self._open) >= self.limit and not self._shed_oldest():
            self._count_shed("new connection closed: every handshake is past its head")
            return None
        ticket = Ticket(next(self._ids), sock)
        self._open[ticket.id] = ticket
        return ticket

    def leave(self, ticket: Ticket) -> None:
        self._open.pop(ticket.id, None)

    def _shed_oldest(self) -> bool:
        for ticket in self._open.values():
            if ticket.waiting_on_client:
                ticket.scope.cancel()
                del self._open[ticket.id]
                if ticket.sock is not None:
                    trio.lowlevel.notify_closing(ticket.sock)
                    ticket.sock.close()
                self._count_shed("the connection waiting longest for its client was closed")
                return True
        return False

    def _count_shed(self, what: str) -> None:
        self.shed += 1
        shed = self._shed_lines.count(trio.current_time())
        if shed is not None:
            log.warning(
                "max_handshakes reached; shedding connections that have not sent their "
                "request (slow clients or a flood); raise max_handshakes or the descriptor "
                "limit if real clients are refused",
                extra=fields(max_handshakes=self.limit, shed=shed, latest=what),
            )
