"""Routing and balancing: pure decisions over the configured routes and backends."""

from __future__ import annotations

import pytest

from tunnel.config import BackendConfig, Config, RouteConfig
from tunnel.policy.routing import match_route

BACKEND = (BackendConfig("b", "127.0.0.1", 9000),)
CHAT = RouteConfig("chat", BACKEND, hosts=("chat.example.com",), path_prefix="/ws/")
CHAT_ANY_PATH = RouteConfig("chat-any", BACKEND, hosts=("chat.example.com", "chat.example.org"))
API = RouteConfig("api", BACKEND, path_prefix="/api/")
FALLBACK = RouteConfig("fallback", BACKEND)
ROUTES = (CHAT, CHAT_ANY_PATH, API, FALLBACK)


@pytest.mark.parametrize(
    ("hostname", "path", "expected"),
    [
        ("chat.example.com", "/ws/room", "chat"),
        ("chat.example.com", "/ws/", "chat"),
        ("chat.example.com", "/ws", "chat-any"),
        ("chat.example.com", "/other", "chat-any"),
        ("chat.example.org", "/ws/room", "chat-any"),
        ("chat.example.com", "/api/x", "chat-any"),
        ("other.example.com", "/api/x", "api"),
        ("other.example.com", "/ws/room", "fallback"),
        ("example.com", "/", "fallback"),
        ("sub.chat.example.com", "/ws/room", "fallback"),
    ],
)
def test_first_matching_route_wins(hostname: str, path: str, expected: str) -> None:
    route = match_route(ROUTES, hostname, path)
    assert route is not None
    assert route.name == expected


def test_no_route_matches() -> None:
    assert match_route((CHAT, API), "other.example.com", "/ws/room") is None
    assert match_route((), "chat.example.com", "/") is None


def test_hosts_match_the_lower_cased_hostname() -> None:
    # validate_request lower-cases the hostname and config lower-cases hosts.
    config = Config.from_toml(
        '[[listeners]]\nlisten = ":8080"\n[[routes]]\nname = "r"\nhosts = ["Chat.Example.COM"]\n'
        'backends = [{ url = "127.0.0.1:9000" }]\n'
    )
    route = match_route(config.routes, "chat.example.com", "/")
    assert route is not None
    assert route.name == "r"


def test_an_exact_host_beats_an_earlier_any_host_route() -> None:
    assert match_route((FALLBACK, CHAT), "chat.example.com", "/ws/room") is CHAT
