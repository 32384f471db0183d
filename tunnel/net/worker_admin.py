"""The admin view of all workers, served by worker 1: each answer is read from every worker's
private admin socket and merged (``tunnel.federation`` says how and why).

A worker that does not answer within ``WORKER_TIMEOUT`` (restarting, stuck) is left out of the
merged figures and makes ``/healthz`` answer 503: an operator sees fewer workers in
``/stats.json`` rather than a hung admin page.
"""

from __future__ import annotations

import json
import logging
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import h11
import trio

from tunnel.federation import merge_metrics, merge_stats, split_tunnel_id
from tunnel.logs import LOGGER_NAME, fields
from tunnel.metrics import CONTENT_TYPE
from tunnel.net.admin import ReloadRefused

log = logging.getLogger(LOGGER_NAME)

WORKER_TIMEOUT = 2.0
"""Seconds a worker has to answer one admin request over its socket."""
MAX_ANSWER = 64 * 1024 * 1024
"""Bound on one worker's answer (a stats document with every open tunnel)."""


def socket_path(directory: str, worker: int) -> str:
    """Where worker ``worker`` serves its own admin endpoints."""
    return f"{directory}/worker-{worker}.sock"


async def request(path: str, method: str, target: str) -> tuple[int, bytes]:
    """One HTTP/1.1 request over the Unix socket at ``path``: (status, body).

    Raises ``OSError`` or ``trio.TooSlowError`` when the worker does not answer in time.
    """
    with trio.fail_after(WORKER_TIMEOUT):
        stream = await trio.open_unix_socket(path)
        async with stream:
            conn = h11.Connection(h11.CLIENT)
            head = h11.Request(
                method=method,
                target=target,
                headers=[("Host", "worker"), ("Connection", "close"), ("Content-Length", "0")],
            )
            await stream.send_all(conn.send(head) + conn.send(h11.EndOfMessage()))
            status, body = 0, bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > MAX_ANSWER:
                        raise OSError(f"worker admin answer over {MAX_ANSWER} bytes")
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    return status, bytes(body)


class WorkersView:
    """What the public admin listener shows with ``workers = N``: every worker, merged."""

    def __init__(
        self,
        directory: str,
        workers: int,
        ask: Callable[[str, str, str], Awaitable[tuple[int, bytes]]] = request,
        reload: Callable[[], Awaitable[dict[str, Any]]] | None = None,
        upgrade: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    ) -> None:
        """``reload`` asks the supervisor to read the configuration again and hand it to
        every worker (``POST /reload``); ``upgrade`` asks it for a live hand-off (``POST
        /upgrade``)."""
        self._paths = {n: socket_path(directory, n) for n in range(1, workers + 1)}
        self._ask = ask
        self._reload = reload
        self._upgrade = upgrade

    async def _gather(self, target: str, method: str = "GET") -> dict[int, tuple[int, bytes]]:
        """Ask every worker at once; the ones that fail are left out (and logged)."""
        answers: dict[int, tuple[int, bytes]] = {}

        async def one(worker: int, path: str) -> None:
            try:
                answers[worker] = await self._ask(path, method, target)
            except (OSError, trio.TooSlowError, h11.ProtocolError) as exc:
                log.warning(
                    "a worker did not answer the admin listener; left out of the figures",
                    extra=fields(worker=worker, path=target, error=str(exc) or type(exc).__name__),
                )

        async with trio.open_nursery() as nursery:
            for worker, path in self._paths.items():
                nursery.start_soon(one, worker, path)
        return answers

    async def healthy(self) -> bool:
        answers = await self._gather("/healthz")
        return len(answers) == len(self._paths) and all(s == 200 for s, _ in answers.values())

    async def stats(self) -> dict[str, Any]:
        documents: Mapping[int, dict[str, Any]] = {
            worker: json.loads(body)
            for worker, (status, body) in (await self._gather("/stats.json")).items()
            if status == 200
        }
        merged = merge_stats(documents)
        merged["healthy"] = merged["healthy"] and len(documents) == len(self._paths)
        return merged

    async def metrics(self) -> tuple[bytes, str]:
        answers = await self._gather("/metrics")
        texts = {w: body.decode() for w, (status, body) in answers.items() if status == 200}
        return merge_metrics(texts), CONTENT_TYPE

    async def upgrade(self) -> dict[str, Any]:
        if self._upgrade is None:
            raise ReloadRefused(409, "this worker has no link to its supervisor")
        return await self._upgrade()

    async def reload_config(self) -> dict[str, Any]:
        if self._reload is None:
            raise ReloadRefused(409, "this worker has no link to its supervisor")
        return await self._reload()

    async def close_tunnel(self, tunnel_id: str) -> bool:
        where = split_tunnel_id(tunnel_id)
        if where is None or where[0] not in self._paths:
            return False
        worker, local = where
        try:
            status, _ = await self._ask(self._paths[worker], "POST", f"/tunnels/{local}/close")
        except (OSError, trio.TooSlowError, h11.ProtocolError):
            return False
        return status == 200

    async def drain_backend(self, route: str, backend: str) -> dict[str, Any] | None:
        return await self._change_backend(route, backend, "drain")

    async def enable_backend(self, route: str, backend: str) -> dict[str, Any] | None:
        return await self._change_backend(route, backend, "enable")

    async def _change_backend(self, route: str, backend: str, action: str) -> dict[str, Any] | None:
        """Drain or enable the backend in every worker: ``open_tunnels`` is the sum of the
        workers', ``state`` the first worker's. None (404) only when every worker says it has
        no such backend; a worker that does not answer makes it an error (500), since the
        operator would otherwise believe a backend changed everywhere when it did not."""
        quoted = "/".join(urllib.parse.quote(name, safe="") for name in (route, backend))
        answers = await self._gather(f"/backends/{quoted}/{action}", "POST")
        changed = [
            json.loads(body) for _, (status, body) in sorted(answers.items()) if status == 200
        ]
        if len(answers) == len(self._paths) and all(s == 404 for s, _ in answers.values()):
            return None
        if len(changed) != len(self._paths):
            missing = len(self._paths) - len(changed)
            raise RuntimeError(
                f"{missing} of {len(self._paths)} workers did not {action} {route}/{backend}"
            )
        return {
            "route": route,
            "backend": backend,
            "state": changed[0]["state"],
            "open_tunnels": sum(int(answer["open_tunnels"]) for answer in changed),
        }
