"""The running generation: one configuration and everything that outlives a connection.

A ``Generation`` owns the configuration, the per-route upstreams (balancers, backend TLS, the
tunnels of each backend), the relay engine and the handler that serves new connections. It is
the one object the admin listener reads (``statistics()``, ``stats()``, ``metrics()``) and acts
on (``close_tunnel``, ``reload``), and what a reload and a drain change: those touch the
generation, never the handler's protocol code.

A reload (``reload``) builds the next configuration's handler and upstreams beside the running
ones and swaps them in one step; every tunnel stays where it is, in the one engine of the
process. Routes and backends that did not change keep their tunnels and their counters; the
tunnels of those that are gone are drained (``Engine.drain``, reason ``drain``).
"""

from __future__ import annotations

import itertools
import logging
import ssl
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio

from tunnel._version import __version__
from tunnel.config import Config
from tunnel.errors import ConfigError
from tunnel.logs import LOGGER_NAME, fields
from tunnel.metrics import Exposition
from tunnel.net.admin import ReloadRefused
from tunnel.net.engine import Engine, Tunnel
from tunnel.net.guard import Guarding
from tunnel.net.handler import Handler, Tally, log_closed
from tunnel.net.handoff import TunnelItem
from tunnel.net.tls import backend_contexts
from tunnel.net.upstream import TunnelRecord, Upstream
from tunnel.reasons import CloseReason
from tunnel.stats import ListenerStatistics, ServerStatistics

log = logging.getLogger(LOGGER_NAME)


class Generation:
    """One configuration being served. Build it once the listeners are bound (the engine's
    epoll descriptor lives until ``engine.run`` ends)."""

    def __init__(self, config: Config, listeners: tuple[ListenerStatistics, ...] = ()) -> None:
        """Raises ``ConfigError`` when a route's ``backend_tls`` files cannot be loaded."""
        server = config.server
        self.config = config
        self.listeners = listeners
        self.engine = Engine(
            relay=server.relay,
            splice_pipes=server.splice_pipes,
            idle_timeout=server.idle_timeout,
            close_grace=server.close_grace,
            half_close_timeout=server.half_close_timeout,
        )
        contexts = backend_contexts(config)
        self.upstreams = {
            route.name: Upstream(route, contexts.get(route.name), self._close_record)
            for route in config.routes
        }
        self.removed: list[Upstream] = []
        """Routes a reload removed, shown (draining) until their last tunnel ends."""
        self.tally = Tally()
        self.guarding = Guarding(config)
        self.handoffs: Counter[str] = Counter()
        self.handoff_tunnels: Counter[str] = Counter()
        self.handoff_seconds = 0.0
        self.handler = Handler(
            config,
            self.engine,
            self.upstreams,
            self.tally,
            self.guarding,
            self.guarding.guards(config),
        )
        self.started_at = trio.current_time()
        self.draining = False
        """Set by a drain: ``/healthz`` then answers 503."""
        self._exposition = Exposition(self.statistics)
        for i, route in enumerate(config.routes):
            if route.name in contexts and not route.backend_tls.verify:
                log.warning(
                    "backend certificates are NOT verified (verify = false): anyone on the "
                    "path can pose as these backends",
                    extra=fields(route=route.name, key=f"routes[{i}].backend_tls.verify"),
                )

    def reload(
        self, config: Config, listeners: tuple[ListenerStatistics, ...] | None = None
    ) -> Reloaded:
        """Serve ``config`` from now on (its listeners are the caller's business).

        New upgrades see the new routes, backends and keys at once; handshakes already under
        way finish with the configuration they started with. Raises ``ConfigError`` (nothing
        changed) when a route's ``backend_tls`` files cannot be loaded."""
        contexts = backend_contexts(config)
        guards = self.guarding.guards(config)
        before = set(self.upstreams)
        upstreams: dict[str, Upstream] = {}
        leaving: list[TunnelRecord] = []
        for route in config.routes:
            upstream = self.upstreams.get(route.name)
            if upstream is None:
                upstreams[route.name] = Upstream(
                    route, contexts.get(route.name), self._close_record
                )
            else:
                leaving += upstream.reconfigure(route, contexts.get(route.name))
                upstreams[route.name] = upstream
        removed = [u for name, u in self.upstreams.items() if name not in upstreams]
        for upstream in removed:
            leaving += upstream.remove()
        self.removed = [u for u in (*self.removed, *removed) if u.open_tunnels]
        server = config.server
        self.engine.configure(
            relay=server.relay,
            splice_pipes=server.splice_pipes,
            idle_timeout=server.idle_timeout,
            close_grace=server.close_grace,
            half_close_timeout=server.half_close_timeout,
        )
        self.config = config
        self.upstreams = upstreams
        self.handler = Handler(config, self.engine, upstreams, self.tally, self.guarding, guards)
        if listeners is not None:
            self.listeners = listeners
        handles = [record.handle for record in leaving if record.handle is not None]
        self.engine.drain(handles, CloseReason.DRAIN, server.drain_timeout)
        return Reloaded(
            added=tuple(name for name in upstreams if name not in before),
            removed=tuple(u.name for u in removed),
            draining=len(handles),
        )

    def _close_record(self, record: TunnelRecord, reason: CloseReason) -> None:
        if record.handle is not None:
            self.engine.close(record.handle, reason)

    def shut_down(self) -> float:
        """Begin a graceful stop: ``/healthz`` answers 503, and every tunnel, open or still
        in its handshake, is drained within ``drain_timeout`` (reason ``shutdown``). Returns
        the drain's end on trio's clock."""
        self.draining = True
        return self.engine.drain(
            (), CloseReason.SHUTDOWN, self.config.server.drain_timeout, every=True
        )

    @property
    def reloads_backend_tls(self) -> bool:
        return any(upstream.tls is not None for upstream in self.upstreams.values())

    def reload_backend_tls(self) -> bool:
        """Load the ``backend_tls`` files again (CA bundles, client certificates); new backend
        connections use them. All or nothing: on failure the previous ones stay, logged."""
        if not self.reloads_backend_tls:
            return False
        try:
            contexts: Mapping[str, ssl.SSLContext] = backend_contexts(self.config)
        except ConfigError as error:
            log.error(
                "backend TLS files not reloaded; the previous ones stay in use",
                extra=fields(error=error.message),
            )
            return False
        for name, context in contexts.items():
            self.upstreams[name].tls = context
        log.info("backend TLS files reloaded", extra=fields(routes=",".join(contexts)))
        return True

    def statistics(self) -> ServerStatistics:
        now = trio.current_time()
        return ServerStatistics(
            version=__version__,
            uptime=now - self.started_at,
            healthy=not self.draining,
            listeners=self.listeners,
            routes=tuple(
                upstream.statistics(now)
                for upstream in (*self.upstreams.values(), *self.removed)
                if not upstream.removed or upstream.open_tunnels
            ),
            unrouted_answers=tuple(sorted(self.tally.unrouted.items())),
            handshake_seconds=self.tally.handshake.statistics(),
            proxy_refused=self.tally.proxy_refused,
            handshakes_open=self.tally.handshakes.open,
            handshakes_shed=self.tally.handshakes.shed,
            left_early=self.tally.left_early,
            handoffs=tuple(sorted(self.handoffs.items())),
            handoff_tunnels=tuple(sorted(self.handoff_tunnels.items())),
            handoff_seconds=self.handoff_seconds,
        )

    # The admin listener's view (tunnel.net.admin.AdminSource).

    async def healthy(self) -> bool:
        return not self.draining

    async def stats(self) -> dict[str, Any]:
        """The ``/stats.json`` document (its shape is in DESIGN.md)."""
        return stats_document(self.statistics())

    async def metrics(self) -> tuple[bytes, str]:
        return self._exposition.render(), self._exposition.content_type

    async def reload_config(self) -> dict[str, Any]:
        """A generation alone has no file to read: ``serve`` answers ``POST /reload``."""
        raise ReloadRefused(409, "reload through the tunnel's admin listener")

    async def upgrade(self) -> dict[str, Any]:
        """A generation alone cannot start a process: ``serve`` answers ``POST /upgrade``."""
        raise ReloadRefused(409, "hand off through the tunnel's admin listener")

    async def drain_backend(self, route: str, backend: str) -> dict[str, Any] | None:
        """An operator's drain: the backend takes no new tunnels and keeps its open ones."""
        return self._set_draining(route, backend, draining=True)

    async def enable_backend(self, route: str, backend: str) -> dict[str, Any] | None:
        return self._set_draining(route, backend, draining=False)

    def _set_draining(self, route: str, backend: str, *, draining: bool) -> dict[str, Any] | None:
        upstream = self.upstreams.get(route)
        entry = (
            None
            if upstream is None
            else upstream.set_draining(backend, draining, trio.current_time())
        )
        if entry is None:
            return None
        return {
            "route": route,
            "backend": backend,
            "state": entry.state,
            "open_tunnels": len(entry.open),
        }

    # Live hand-off (tunnel.successor).

    def handed_off(self, sent: int, kept: int, seconds: float) -> None:
        """Count a hand-off this process made (its metrics)."""
        self.handoffs["done"] += 1
        self.moved(sent, kept, seconds)

    def moved(self, sent: int, kept: int, seconds: float) -> None:
        """Count the tunnels this process sent and kept in a hand-off. With workers that is a
        worker's share of the supervisor's hand-off, whose outcome the supervisor counts
        (``count_hand_off`` in worker 1)."""
        self.handoff_tunnels["sent"] += sent
        self.handoff_tunnels["kept"] += kept
        self.handoff_seconds = seconds

    def reserve_ids(self) -> int:
        """The first tunnel id the next process may use: past every id this process has
        given or may still give (its handshakes under way each become one tunnel at most)."""
        ids = self.tally.ids
        first = next(ids)
        self.tally.ids = itertools.count(first)
        return first + self.tally.handshakes.limit + 1

    def export_tunnels(self) -> tuple[list[TunnelItem], int]:
        """Take every tunnel that can move out of the engine (plain at both ends, not closing
        politely), with the names the next process needs; and how many stay."""
        items: list[TunnelItem] = []
        kept = 0
        for upstream in (*self.upstreams.values(), *self.removed):
            for record in upstream.records():
                if record.handle is None:
                    continue
                meta = {
                    "id": record.id,
                    "client": record.client,
                    "route": record.route,
                    "backend": record.backend,
                    "slots": "\n".join(record.slots),
                }
                exported = self.engine.export(record.handle, meta)
                if exported is None:
                    kept += 1
                    continue
                items.append(exported)
                if record.on_leave is not None:
                    record.on_leave()
                upstream.left(record)
        return items, kept

    def adopt_tunnels(self, items: Iterable[TunnelItem]) -> None:
        """Serve tunnels another process exported (or ours, back after a failed hand-off):
        each joins its route and backend by name, keeping its id and counters; one whose route
        or backend this configuration lacks is drained (reason ``drain``)."""
        now = trio.current_time()
        leaving = []
        for client, backend_sock, state in items:
            meta = state.meta
            upstream = self.upstreams.get(meta.get("route", ""))
            backend = None if upstream is None else upstream.backend_named(meta.get("backend", ""))
            record = TunnelRecord(
                meta.get("id") or str(next(self.tally.ids)),
                meta.get("client", "?"),
                meta.get("route", "?"),
                meta.get("backend", "?"),
                now - state.age,
            )
            self.tally.active += 1
            record.on_leave = partial(self._give_back, record)
            if slots := meta.get("slots", ""):
                record.slots = tuple(slots.split("\n"))
                self.guarding.hold(self._holder(record), record.slots)
            record.handle = self.engine.adopt_state(
                client, backend_sock, state, self._adopted_closed(record, upstream), record.stats
            )
            if upstream is not None and backend is not None:
                upstream.opened(record, backend)
            else:
                leaving.append(record.handle)
        if leaving:
            self.engine.drain(leaving, CloseReason.DRAIN, self.config.server.drain_timeout)

    def _give_back(self, record: TunnelRecord) -> None:
        """What an adopted tunnel holds here, when it moves on again."""
        self.tally.active -= 1
        self.guarding.release(self._holder(record), record.slots)

    def _holder(self, record: TunnelRecord) -> str:
        return f"{self.guarding.instance}:handed:{record.id}"

    def _adopted_closed(
        self, record: TunnelRecord, upstream: Upstream | None
    ) -> Callable[[Tunnel], None]:
        def closed(tunnel: Tunnel) -> None:
            self._give_back(record)
            if upstream is not None:
                upstream.closed(record)
            log_closed(record, tunnel)

        return closed

    async def close_tunnel(self, tunnel_id: str) -> bool:
        """Close one open tunnel with reason ``admin``; False when no tunnel has that id."""
        for upstream in (*self.upstreams.values(), *self.removed):
            record = upstream.find(tunnel_id)
            if record is not None and record.handle is not None:
                log.info(
                    "closing a tunnel on request",
                    extra=fields(tunnel=tunnel_id, client=record.client, route=record.route),
                )
                self.engine.close(record.handle, CloseReason.ADMIN)
                return True
        return False


@dataclass(frozen=True, slots=True)
class Reloaded:
    """What a reload changed, for its log line and ``POST /reload``'s answer."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    draining: int
    """Tunnels of removed routes and backends, now draining."""


def stats_document(snapshot: ServerStatistics) -> dict[str, Any]:
    """A snapshot as the JSON document of ``/stats.json``."""
    return {
        "version": snapshot.version,
        "uptime": round(snapshot.uptime, 3),
        "healthy": snapshot.healthy,
        "listeners": [
            {"address": li.address, "tls": li.tls, "redirect_https": li.redirect_https}
            for li in snapshot.listeners
        ],
        "routes": [
            {
                "name": route.name,
                "hosts": list(route.hosts),
                "path_prefix": route.path_prefix,
                "open_tunnels": route.open_tunnels,
                "backends": [
                    {
                        "name": b.name,
                        "url": b.url,
                        "state": b.state,
                        "open_tunnels": b.open_tunnels,
                        "tunnels_total": b.tunnels_total,
                        "bytes_up": b.bytes_up,
                        "bytes_down": b.bytes_down,
                        "connect_failures": b.connect_failures,
                        "went_down": b.went_down,
                        "went_up": b.went_up,
                    }
                    for b in route.backends
                ],
            }
            for route in snapshot.routes
        ],
        "tunnels": [
            {
                "id": t.id,
                "client": t.client,
                "route": t.route,
                "backend": t.backend,
                "age": round(t.age, 3),
                "idle": round(t.idle, 3),
                "bytes_up": t.bytes_up,
                "bytes_down": t.bytes_down,
            }
            for route in snapshot.routes
            for t in route.tunnels
        ],
    }
