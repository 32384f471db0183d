"""The running generation seen from outside: exact counts per backend, bytes that move while a
tunnel is open, metrics a Prometheus parser reads, and closing one tunnel by its id.

Real loopback sockets throughout: a raw echo backend, raw clients, the tunnel from ``serve``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from rawhttp import LOOPBACK, read_to_eof, status_of, upgrade_request
from test_e2e import echo_after_upgrade, open_raw_tunnel, raw_exchange, start_raw_backend

from tunnel import Config, Control, serve
from tunnel.core.wsframes import close_frame
from tunnel.logs import LOGGER_NAME
from tunnel.reasons import CloseReason
from tunnel.server import Generation

if TYPE_CHECKING:
    from tunnel.stats import ServerStatistics

WAIT_SECONDS = 20.0


async def start(nursery: trio.Nursery, backends: list[str]) -> tuple[Generation, int]:
    config = Config.from_mapping(
        {
            "listeners": [{"listen": f"{LOOPBACK}:0"}],
            "routes": [
                {
                    "name": "echo",
                    "hosts": [LOOPBACK],
                    "backends": [{"name": f"b{i}", "url": url} for i, url in enumerate(backends)],
                }
            ],
        }
    )
    control = Control()
    listeners = await nursery.start(partial(serve, config, control=control))
    assert control.generation is not None
    return control.generation, listeners[0].socket.getsockname()[1]


async def samples(generation: Generation) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``/metrics`` as Prometheus' own parser reads it."""
    body, content_type = await generation.metrics()
    assert content_type.startswith("text/plain; version=0.0.4")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def backend_of(snapshot: ServerStatistics, name: str) -> tuple[int, int, int]:
    [backend] = [b for route in snapshot.routes for b in route.backends if b.name == name]
    return backend.open_tunnels, backend.tunnels_total, backend.connect_failures


async def wait_for(condition: Callable[[], Awaitable[bool]]) -> None:
    while not await condition():
        await trio.sleep(0.005)


async def open_count_is(generation: Generation, count: int) -> bool:
    return len((await generation.stats())["tunnels"]) == count


Labels = tuple[tuple[str, str], ...]
BYTES_UP = ("tunnel_bytes_total", (("backend", "b0"), ("direction", "up"), ("route", "echo")))
BYTES_DOWN = ("tunnel_bytes_total", (("backend", "b0"), ("direction", "down"), ("route", "echo")))
OPEN = ("tunnel_open_tunnels", (("backend", "b0"), ("route", "echo")))


async def test_bytes_move_in_metrics_and_stats_while_the_tunnel_is_open(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(WAIT_SECONDS):
        generation, port = await start(
            nursery, [await start_raw_backend(nursery, echo_after_upgrade)]
        )
        client, _ = await open_raw_tunnel(port)
        await client.send_all(b"x" * 1000)

        async def bytes_at_least(key: tuple[str, Labels], count: int) -> bool:
            return (await samples(generation))[key] >= count

        await wait_for(partial(bytes_at_least, BYTES_DOWN, 1001))
        first = await samples(generation)
        await client.send_all(b"y" * 5000)
        await wait_for(partial(bytes_at_least, BYTES_UP, 6000))
        second = await samples(generation)
        document = await generation.stats()

    assert first[OPEN] == second[OPEN] == 1
    assert second[BYTES_UP] - first[BYTES_UP] == 5000, "counted while the tunnel is still open"
    assert second[("tunnel_upgrades_total", (("route", "echo"), ("status", "101")))] == 1
    assert second[("tunnel_handshake_seconds_count", ())] == 1
    assert second[("tunnel_backend_up", (("backend", "b0"), ("route", "echo")))] == 1
    assert any(name.startswith("process_") for name, _ in second), "process metrics too"
    [tunnel] = document["tunnels"]
    assert (tunnel["route"], tunnel["backend"], tunnel["bytes_up"]) == ("echo", "b0", 6000)
    assert tunnel["client"] == f"{LOOPBACK}:{client.socket.getsockname()[1]}"
    assert document["routes"][0]["backends"][0]["open_tunnels"] == 1
    await client.aclose()


async def test_closing_a_tunnel_by_id_ends_it_with_reason_admin(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    with trio.fail_after(WAIT_SECONDS):
        generation, port = await start(
            nursery, [await start_raw_backend(nursery, echo_after_upgrade)]
        )
        kept, _ = await open_raw_tunnel(port)
        closed, rest = await open_raw_tunnel(port)
        await wait_for(lambda: open_count_is(generation, 2))
        ids = [t["id"] for t in (await generation.stats())["tunnels"]]
        assert not await generation.close_tunnel("no-such-tunnel")
        assert await generation.close_tunnel(ids[1])
        # A WebSocket tunnel: a Close frame (1001) first, then, with no reply, the TCP close.
        assert await read_to_eof(closed, rest) == close_frame("admin")
        await kept.send_all(b"still here")
        echoed = await kept.receive_some(100)
        await wait_for(lambda: open_count_is(generation, 1))
        metrics = await samples(generation)
        remaining = [t["id"] for t in (await generation.stats())["tunnels"]]
        closed_again = await generation.close_tunnel(ids[1])

    assert echoed == b"still here"
    assert remaining == [ids[0]]
    assert metrics[("tunnel_closed_total", (("reason", "admin"), ("route", "echo")))] == 1
    assert metrics[OPEN] == 1
    assert not closed_again, "an id is not reused"
    [line] = [r for r in caplog.records if r.getMessage() == "tunnel closed"]
    assert line.fields["reason"] == CloseReason.ADMIN  # type: ignore[attr-defined]
    await kept.aclose()


async def test_counts_per_backend_are_exact_with_failover_and_refusals(
    nursery: trio.Nursery, dead_port: int
) -> None:
    with trio.fail_after(WAIT_SECONDS):
        backend = await start_raw_backend(nursery, echo_after_upgrade)
        generation, port = await start(nursery, [f"ws://{LOOPBACK}:{dead_port}", backend])
        clients = [(await open_raw_tunnel(port))[0] for _ in range(3)]
        not_found = await raw_exchange(port, upgrade_request(f"other.example:{port}"))
        snapshot = generation.statistics()
        for client in clients:
            await client.aclose()
        await wait_for(lambda: open_count_is(generation, 0))
        metrics = await samples(generation)

    assert status_of(not_found) == 404
    assert backend_of(snapshot, "b1") == (3, 3, 0)
    dead_open, dead_total, dead_failures = backend_of(snapshot, "b0")
    assert (dead_open, dead_total) == (0, 0)
    assert dead_failures >= 1, "round robin tried the dead backend first at least once"
    assert metrics[("tunnel_upgrades_total", (("route", ""), ("status", "404")))] == 1
    assert metrics[("tunnel_upgrades_total", (("route", "echo"), ("status", "101")))] == 3
    assert metrics[("tunnel_tunnels_total", (("backend", "b1"), ("route", "echo")))] == 3
    assert metrics[("tunnel_closed_total", (("reason", "client_eof"), ("route", "echo")))] == 3
    assert metrics[("tunnel_open_tunnels", (("backend", "b1"), ("route", "echo")))] == 0


async def test_a_reload_that_shortens_idle_timeout_applies_to_open_tunnels_at_once(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """The new idle_timeout is not left waiting behind the old (hour-long) deadline."""
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    backend = await start_raw_backend(nursery, echo_after_upgrade)
    mapping = {
        "listeners": [{"listen": f"{LOOPBACK}:0"}],
        "routes": [{"name": "echo", "backends": [{"name": "b0", "url": backend}]}],
    }
    control = Control()
    listeners = await nursery.start(partial(serve, Config.from_mapping(mapping), control=control))
    port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(WAIT_SECONDS):
        client, rest = await open_raw_tunnel(port)
        assert control.generation is not None
        generation = control.generation
        await wait_for(lambda: open_count_is(generation, 1))
        outcome = await control.reload(
            Config.from_mapping({**mapping, "server": {"idle_timeout": "1s"}})
        )
        started = trio.current_time()
        received = await read_to_eof(client, rest)
        waited = trio.current_time() - started

    assert outcome.draining == 0, "route and backend unchanged: the tunnel is kept"
    assert received == close_frame("idle_timeout")
    assert waited < 5, "closed about a second after the reload, not an hour later"
    [line] = [r for r in caplog.records if r.getMessage() == "tunnel closed"]
    assert line.fields["reason"] == CloseReason.IDLE_TIMEOUT  # type: ignore[attr-defined]
