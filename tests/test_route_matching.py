"""``match_route``: exact host beats wildcard, a longer wildcard beats a shorter one, any host
comes last, and the first route wins among equals; the path prefix must always match."""

from __future__ import annotations

import pytest

from tunnel.config import BackendConfig, Config, RouteConfig
from tunnel.policy.routing import RouteTable, match_route

BACKEND = (BackendConfig("b", "127.0.0.1", 9000),)


def route(name: str, *hosts: str, prefix: str = "/") -> RouteConfig:
    return RouteConfig(name, BACKEND, hosts=hosts, path_prefix=prefix)


ROUTES = (
    route("any-ws", prefix="/ws/"),
    route("deep-wild", "*.eu.example.org"),
    route("wild", "*.example.org"),
    route("exact", "chat.example.org", "Other.Example.com"),
    route("exact-api", "chat.example.org", prefix="/api/"),
    route("wild-2", "*.example.org", "x.test"),
    route("wild-com", "*.com"),
    route("any"),
)


@pytest.mark.parametrize(
    ("hostname", "path", "expected"),
    [
        # an exact name beats every wildcard and any-host route, wherever it is in the list
        ("chat.example.org", "/", "exact"),
        ("chat.example.org", "/ws/x", "exact"),
        # equal rank: the first route in the list wins, even when a later one's prefix is longer
        ("chat.example.org", "/api/v1", "exact"),
        # a wildcard matches any depth below its name
        ("a.example.org", "/", "wild"),
        ("deep.sub.example.org", "/", "wild"),
        ("x.y.z.example.org", "/ws/", "wild"),
        # the longest wildcard wins, at any depth below it
        ("a.eu.example.org", "/", "deep-wild"),
        ("b.a.eu.example.org", "/", "deep-wild"),
        # ... but not its own name: that falls to the shorter wildcard
        ("eu.example.org", "/", "wild"),
        # the apex is not matched by its wildcard
        ("example.org", "/ws/", "any-ws"),
        ("example.org", "/", "any"),
        # an exact name in a route is exact, its wildcard sibling elsewhere loses
        ("x.test", "/", "wild-2"),
        ("a.x.test", "/", "any"),
        # case is ignored, in the configuration and in the request
        ("CHAT.Example.ORG", "/", "exact"),
        ("other.example.com", "/", "exact"),
        ("A.EU.Example.Org", "/", "deep-wild"),
        # a one-label wildcard
        ("a.com", "/", "wild-com"),
        ("other.example.com", "/ws/", "exact"),
        ("b.example.com", "/", "wild-com"),
        # a trailing dot (fully qualified) is the same name
        ("chat.example.org.", "/", "exact"),
        # no host route: any-host routes in order
        ("unknown.test", "/ws/a", "any-ws"),
        ("unknown.test", "/", "any"),
        ("127.0.0.1", "/", "any"),
        ("::1", "/ws/", "any-ws"),
        # a name that only ends like a wildcard's name is not below it
        ("badexample.org", "/", "any"),
    ],
)
def test_host_rank_then_order(hostname: str, path: str, expected: str) -> None:
    found = match_route(ROUTES, hostname, path)
    assert found is not None
    assert found.name == expected
    assert RouteTable.build(ROUTES).match(hostname, path) is found
    assert match_route(list(ROUTES), hostname, path) is found


PREFIXED = (
    route("exact-chat", "chat.example.org", prefix="/chat/"),
    route("wild-feed", "*.example.org", prefix="/feed/"),
    route("wild-all", "*.example.org", prefix="/"),
    route("exact-only", "only.example.org", prefix="/only/"),
)


@pytest.mark.parametrize(
    ("hostname", "path", "expected"),
    [
        ("chat.example.org", "/chat/room", "exact-chat"),
        # the exact route's prefix does not match: the wildcards take part, first wins
        ("chat.example.org", "/feed/1", "wild-feed"),
        ("chat.example.org", "/other", "wild-all"),
        ("a.example.org", "/feed/", "wild-feed"),
        ("a.example.org", "/chat/room", "wild-all"),
        # the path is compared case-sensitively, as a prefix of the whole path
        ("a.example.org", "/FEED/", "wild-all"),
        ("only.example.org", "/only/x", "exact-only"),
        ("only.example.org", "/x", "wild-all"),
        # nothing matches: no route
        ("example.org", "/", None),
        ("other.test", "/chat/room", None),
    ],
)
def test_the_path_prefix_must_match(hostname: str, path: str, expected: str | None) -> None:
    found = match_route(PREFIXED, hostname, path)
    assert (found.name if found else None) == expected


def test_first_of_equal_wildcards_wins() -> None:
    routes = (route("one", "*.example.org"), route("two", "*.example.org", "*.b.example.org"))
    assert _name(match_route(routes, "a.example.org", "/")) == "one"
    assert _name(match_route(routes, "x.b.example.org", "/")) == "two"
    assert _name(match_route(routes[::-1], "a.example.org", "/")) == "two"


def test_first_of_equal_exact_names_wins() -> None:
    routes = (route("one", "h.test"), route("two", "h.test"), route("any"))
    assert _name(match_route(routes, "h.test", "/")) == "one"
    assert _name(match_route(routes[::-1], "h.test", "/")) == "two"


def test_no_routes() -> None:
    assert match_route((), "a.test", "/") is None


def test_routes_read_from_a_file_match() -> None:
    config = Config.from_toml(
        '[[listeners]]\nlisten = "127.0.0.1:8080"\n'
        '[[routes]]\nname = "wild"\nhosts = ["*.Example.org"]\nbackends = [{ url = "h:1" }]\n'
        '[[routes]]\nname = "exact"\nhosts = ["A.example.org"]\nbackends = [{ url = "h:1" }]\n'
    )
    assert _name(match_route(config.routes, "a.example.org", "/")) == "exact"
    assert _name(match_route(config.routes, "b.example.org", "/")) == "wild"


def test_a_new_routes_tuple_gets_a_new_table() -> None:
    """The table ``match_route`` keeps for a tuple is never used for another one."""
    for i in range(20):
        routes = (route(f"r{i}", f"h{i}.test"),)
        assert _name(match_route(routes, f"h{i}.test", "/")) == f"r{i}"
        assert match_route(routes, f"h{i + 1}.test", "/") is None


def _name(found: RouteConfig | None) -> str | None:
    return None if found is None else found.name
