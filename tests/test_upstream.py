"""A route's upstream as the handler and the health checker drive it: which backends are
offered, when one is marked down or up, drains, sticky preference and the 503s.

Pure calls on trio-free objects with the time given; the sockets are in the e2e tests."""

from __future__ import annotations

from typing import Any

import pytest

from tunnel.config import Config, RouteConfig
from tunnel.errors import NoHealthyBackend
from tunnel.net.upstream import DOWN, DRAINING, UP, TunnelRecord, Upstream
from tunnel.reasons import CloseReason


def route(**keys: Any) -> RouteConfig:
    backends = keys.pop(
        "backends", [{"name": n, "url": f"ws://127.0.0.1:{9000 + i}"} for i, n in enumerate("abc")]
    )
    config = Config.from_mapping(
        {
            "listeners": [{"listen": "127.0.0.1:0"}],
            "routes": [{"name": "r", "backends": backends, **keys}],
        }
    )
    return config.routes[0]


def names(upstream: Upstream, now: float = 0.0, **options: Any) -> list[str]:
    return [backend.name for backend in upstream.candidates(now, **options)]


def states(upstream: Upstream) -> dict[str, str]:
    return {b.name: b.state for b in upstream.statistics(0.0).backends}


def backend(upstream: Upstream, name: str) -> Any:
    return next(b for b in upstream.route.backends if b.name == name)


def test_round_robin_offers_every_backend_starting_one_further_each_time() -> None:
    upstream = Upstream(route())
    firsts = [names(upstream)[0] for _ in range(6)]
    assert firsts == ["a", "b", "c", "a", "b", "c"]
    assert sorted(names(upstream)) == ["a", "b", "c"], "the rest is the failover order"


def test_passive_failures_mark_a_backend_down_and_it_is_retried_after_the_interval() -> None:
    upstream = Upstream(route(passive_failures=2, health={"interval": "10s"}))
    dead = backend(upstream, "a")
    upstream.connect_failed(dead, now=1.0)
    assert "a" in names(upstream, 1.0)
    upstream.connect_failed(dead, now=2.0)
    assert states(upstream)["a"] == DOWN
    assert "a" not in names(upstream, 3.0)
    assert "a" in names(upstream, 12.0), "offered again health.interval later"
    upstream.connect_failed(dead, now=12.5)  # the retry failed: another interval
    assert "a" not in names(upstream, 13.0)
    assert "a" in names(upstream, 23.0)
    upstream.connected(dead, now=23.0)
    assert states(upstream)["a"] == UP
    [snapshot] = [b for b in upstream.statistics(0.0).backends if b.name == "a"]
    assert (snapshot.went_down, snapshot.went_up, snapshot.connect_failures) == (1, 1, 3)


def test_passive_failures_zero_never_marks_down() -> None:
    upstream = Upstream(route(passive_failures=0))
    for now in range(10):
        upstream.connect_failed(backend(upstream, "a"), now=float(now))
    assert states(upstream)["a"] == UP


def test_a_success_between_failures_restarts_the_count() -> None:
    upstream = Upstream(route(passive_failures=2))
    dead = backend(upstream, "a")
    upstream.connect_failed(dead, now=1.0)
    upstream.connected(dead, now=1.5)
    upstream.connect_failed(dead, now=2.0)
    assert states(upstream)["a"] == UP


def test_checks_mark_down_after_fall_and_up_after_rise() -> None:
    upstream = Upstream(route(health={"kind": "tcp", "rise": 2, "fall": 3}))
    for _ in range(2):
        upstream.check_result("b", ok=False, detail="connection refused", now=1.0)
    assert states(upstream)["b"] == UP
    upstream.check_result("b", ok=False, detail="connection refused", now=1.0)
    assert states(upstream)["b"] == DOWN
    assert "b" not in names(upstream, 100.0), "with checks, only checks bring it back"
    upstream.check_result("b", ok=True, detail="", now=2.0)
    assert states(upstream)["b"] == DOWN
    upstream.check_result("b", ok=True, detail="", now=3.0)
    assert states(upstream)["b"] == UP
    assert "b" in names(upstream, 3.0)


def test_with_checks_a_backend_down_by_failed_connects_waits_for_the_checks() -> None:
    upstream = Upstream(route(passive_failures=1, health={"kind": "tcp", "rise": 2}))
    upstream.connect_failed(backend(upstream, "c"), now=1.0)
    assert states(upstream)["c"] == DOWN
    assert "c" not in names(upstream, 1000.0)
    upstream.check_result("c", ok=True, detail="", now=5.0)
    upstream.check_result("c", ok=True, detail="", now=7.0)
    assert states(upstream)["c"] == UP


def test_every_backend_down_is_a_503_naming_the_route() -> None:
    upstream = Upstream(route(health={"kind": "tcp", "fall": 1}))
    for name in "abc":
        upstream.check_result(name, ok=False, detail="timed out", now=1.0)
    with pytest.raises(NoHealthyBackend) as refused:
        upstream.candidates(1.0)
    assert refused.value.status == 503
    assert "route r" in refused.value.message
    assert not refused.value.headers


def test_every_backend_full_is_a_503_with_retry_after() -> None:
    upstream = Upstream(
        route(backends=[{"name": "a", "url": "ws://127.0.0.1:9000", "max_tunnels": 1}])
    )
    upstream.opened(TunnelRecord("1", "client", "r", "a", 0.0), backend(upstream, "a"))
    with pytest.raises(NoHealthyBackend) as refused:
        upstream.candidates(1.0)
    assert ("Retry-After", "5") in refused.value.headers
    assert "max_tunnels" in refused.value.message


def test_a_drained_backend_gets_no_new_tunnel_keeps_its_open_ones_and_can_be_enabled() -> None:
    upstream = Upstream(route())
    record = TunnelRecord("1", "client", "r", "a", 0.0)
    upstream.opened(record, backend(upstream, "a"))
    entry = upstream.set_draining("a", True)
    assert entry is not None
    assert entry.state == DRAINING
    assert all("a" not in names(upstream) for _ in range(6))
    assert upstream.statistics(0.0).backends[0].open_tunnels == 1
    assert upstream.set_draining("nope", True) is None
    upstream.set_draining("a", False)
    assert any(names(upstream)[0] == "a" for _ in range(3))


def test_on_down_close_closes_the_open_tunnels_of_the_backend_marked_down() -> None:
    closed: list[tuple[str, CloseReason]] = []
    upstream = Upstream(
        route(on_down="close", health={"kind": "tcp", "fall": 1}),
        close=lambda record, reason: closed.append((record.id, reason)),
    )
    for tunnel_id, name in (("1", "a"), ("2", "a"), ("3", "b")):
        upstream.opened(TunnelRecord(tunnel_id, "c", "r", name, 0.0), backend(upstream, name))
    upstream.check_result("a", ok=False, detail="refused", now=1.0)
    assert closed == [("1", CloseReason.BACKEND_DOWN), ("2", CloseReason.BACKEND_DOWN)]


def test_on_down_keep_leaves_them_open() -> None:
    closed: list[str] = []
    upstream = Upstream(
        route(health={"kind": "tcp", "fall": 1}), close=lambda record, _: closed.append(record.id)
    )
    upstream.opened(TunnelRecord("1", "c", "r", "a", 0.0), backend(upstream, "a"))
    upstream.check_result("a", ok=False, detail="refused", now=1.0)
    assert closed == []


def test_the_sticky_backend_goes_first_while_it_is_eligible() -> None:
    upstream = Upstream(route(health={"kind": "tcp", "fall": 1}))
    assert all(names(upstream, preferred="c")[0] == "c" for _ in range(5))
    upstream.check_result("c", ok=False, detail="refused", now=1.0)
    assert all(names(upstream, 1.0, preferred="c")[0] != "c" for _ in range(5))
    assert names(upstream, preferred="unknown")[0] in {"a", "b"}


def test_a_reload_keeps_health_and_drain_of_backends_that_stay() -> None:
    upstream = Upstream(route(health={"kind": "tcp", "fall": 1}))
    upstream.check_result("a", ok=False, detail="refused", now=1.0)
    upstream.set_draining("b", True)
    upstream.reconfigure(route(health={"kind": "tcp", "fall": 1}), None)
    assert states(upstream) == {"a": DOWN, "b": DRAINING, "c": UP}


def test_a_backend_enabled_after_a_drain_ramps_up_over_its_slow_start() -> None:
    upstream = Upstream(
        route(
            backends=[
                {"name": "a", "url": "ws://127.0.0.1:9000", "slow_start": "100s"},
                {"name": "b", "url": "ws://127.0.0.1:9001"},
            ]
        )
    )
    upstream.set_draining("a", True)
    upstream.set_draining("a", False, now=0.0)
    early = [names(upstream, 1.0)[0] for _ in range(200)].count("a")
    late = [names(upstream, 200.0)[0] for _ in range(200)].count("a")
    assert early < 10, "about 1% of the share right after enable"
    assert late == 100, "an equal share once the ramp is over"


def test_round_robin_spreads_evenly_over_the_backends_still_up() -> None:
    upstream = Upstream(
        route(
            backends=[
                {"name": n, "url": f"ws://127.0.0.1:{9000 + i}"} for i, n in enumerate("abcd")
            ],
            health={"kind": "tcp", "fall": 1},
        )
    )
    upstream.check_result("b", ok=False, detail="refused", now=1.0)
    firsts = [names(upstream, 1.0)[0] for _ in range(300)]
    assert {name: firsts.count(name) for name in "abcd"} == {"a": 100, "b": 0, "c": 100, "d": 100}
    weighted = Upstream(
        route(
            backends=[
                {"name": "a", "url": "ws://127.0.0.1:9000", "weight": 2},
                {"name": "b", "url": "ws://127.0.0.1:9001"},
            ]
        )
    )
    picks = "".join(names(weighted)[0] for _ in range(6))
    assert (picks.count("a"), picks.count("b")) == (4, 2)
    assert "bb" not in picks, "weights interleave"
