"""The client's upgrade request: build a valid one, break one thing, check status and message.

Every case runs the whole pure pipeline the handler runs (``RequestHead`` → ``validate_request`` →
``choose_upgrade`` → ``check_websocket``), so the status is the one a client would see.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

import pytest

from tunnel.core.handshake import (
    UpgradeRequest,
    check_websocket,
    choose_upgrade,
    validate_request,
)
from tunnel.core.session import RequestHead
from tunnel.errors import HandshakeError, MethodNotAllowed, TunnelError, UpgradeRequired

KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 §1.3
VALID_HEADERS: tuple[tuple[str, str], ...] = (
    ("Host", "chat.example.com"),
    ("Connection", "Upgrade"),
    ("Upgrade", "websocket"),
    ("Sec-WebSocket-Key", KEY),
    ("Sec-WebSocket-Version", "13"),
)
DROP = object()


def build(
    line: str = "GET /chat?room=1 HTTP/1.1",
    *,
    change: dict[str, object] | None = None,
    add: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
) -> bytes:
    """A valid upgrade request head with one thing broken: ``change`` replaces (or, with
    ``DROP``, removes) a header of ``VALID_HEADERS``; ``add`` appends headers."""
    change = change or {}
    lines = [line]
    for name, value in VALID_HEADERS:
        new = change.get(name, value)
        if new is not DROP:
            lines.append(f"{name}: {new}")
    lines += [f"{name}: {value}" for name, value in add]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def handshake(
    data: bytes, allowed: Sequence[str] = ("websocket",)
) -> tuple[UpgradeRequest, str, str | None]:
    head = RequestHead(32 * 1024)
    request = head.feed(data)
    assert request is not None, "the request head should be complete"
    upgrade = validate_request(request)
    token = choose_upgrade(upgrade, allowed)
    key = check_websocket(request) if token == "websocket" else None
    return upgrade, token, key


def b64(n: int) -> str:
    return base64.b64encode(bytes(range(n))).decode("ascii")


def test_valid_request_passes() -> None:
    upgrade, token, key = handshake(build())
    assert token == "websocket"
    assert key == KEY
    assert upgrade.host == "chat.example.com"
    assert upgrade.hostname == "chat.example.com"
    assert upgrade.target == "/chat?room=1"
    assert upgrade.path == "/chat"
    assert upgrade.offered == ("websocket",)


ACCEPTED = [
    pytest.param({}, [], id="as-built"),
    pytest.param({"Connection": "keep-alive, Upgrade"}, [], id="connection-list"),
    pytest.param({"Connection": "UPGRADE"}, [], id="connection-upper-case"),
    pytest.param({"Connection": "keep-alive,upgrade"}, [], id="connection-no-space"),
    pytest.param({"Upgrade": "WebSocket"}, [], id="upgrade-mixed-case"),
    pytest.param({"Upgrade": "h2c, websocket"}, [], id="upgrade-second-offer-allowed"),
    pytest.param({"Sec-WebSocket-Key": f" {KEY} "}, [], id="key-with-spaces"),
    pytest.param({}, [("Content-Length", "0")], id="content-length-zero"),
    pytest.param({"Host": "Chat.Example.COM:8080"}, [], id="host-with-port-and-case"),
]


@pytest.mark.parametrize(("change", "add"), ACCEPTED)
def test_variants_that_are_accepted(change: dict[str, object], add: list[tuple[str, str]]) -> None:
    upgrade, token, key = handshake(build(change=change, add=add))
    assert token == "websocket"
    assert key == KEY
    assert upgrade.hostname == "chat.example.com"


REFUSED = [
    # (id, request bytes, error class, status, message substring, required response headers)
    (
        "method-post",
        build("POST /chat HTTP/1.1"),
        MethodNotAllowed,
        405,
        "method POST cannot open a tunnel; use GET",
        [("Allow", "GET")],
    ),
    (
        "method-head",
        build("HEAD /chat HTTP/1.1"),
        MethodNotAllowed,
        405,
        "method HEAD",
        [("Allow", "GET")],
    ),
    (
        "method-lower-case-get",
        build("get /chat HTTP/1.1"),
        MethodNotAllowed,
        405,
        "method get",
        [("Allow", "GET")],
    ),
    ("http-1.0", build("GET /chat HTTP/1.0"), HandshakeError, 400, "HTTP/1.0 cannot upgrade", []),
    ("http-2.0", build("GET /chat HTTP/2.0"), HandshakeError, 400, "HTTP/2.0 cannot upgrade", []),
    (
        "no-connection",
        build(change={"Connection": DROP}),
        UpgradeRequired,
        426,
        "only accepts WebSocket upgrades",
        [("Upgrade", "websocket")],
    ),
    (
        "connection-keep-alive-only",
        build(change={"Connection": "keep-alive"}),
        UpgradeRequired,
        426,
        "only accepts WebSocket upgrades",
        [("Upgrade", "websocket")],
    ),
    (
        "connection-upgrade-as-substring",
        build(change={"Connection": "upgraded"}),
        UpgradeRequired,
        426,
        "only accepts WebSocket upgrades",
        [("Upgrade", "websocket")],
    ),
    (
        "no-upgrade-header",
        build(change={"Upgrade": DROP}),
        UpgradeRequired,
        426,
        "only accepts WebSocket upgrades",
        [("Upgrade", "websocket")],
    ),
    (
        "plain-get",
        b"GET / HTTP/1.1\r\nHost: chat.example.com\r\n\r\n",
        UpgradeRequired,
        426,
        "only accepts WebSocket upgrades",
        [("Upgrade", "websocket")],
    ),
    (
        "upgrade-not-allowed",
        build(change={"Upgrade": "h2c"}),
        UpgradeRequired,
        426,
        "Upgrade h2c is not allowed here; allowed: websocket",
        [("Upgrade", "websocket")],
    ),
    (
        "key-missing",
        build(change={"Sec-WebSocket-Key": DROP}),
        HandshakeError,
        400,
        "Sec-WebSocket-Key is missing",
        [],
    ),
    (
        "key-twice",
        build(add=[("Sec-WebSocket-Key", KEY)]),
        HandshakeError,
        400,
        "Sec-WebSocket-Key is sent more than once",
        [],
    ),
    (
        "key-not-base64",
        build(change={"Sec-WebSocket-Key": "not base64 at all!!"}),
        HandshakeError,
        400,
        "Sec-WebSocket-Key is not the base64 of 16 bytes",
        [],
    ),
    (
        "key-15-bytes",
        build(change={"Sec-WebSocket-Key": b64(15)}),
        HandshakeError,
        400,
        "not the base64 of 16 bytes",
        [],
    ),
    (
        "key-17-bytes",
        build(change={"Sec-WebSocket-Key": b64(17)}),
        HandshakeError,
        400,
        "not the base64 of 16 bytes",
        [],
    ),
    (
        "key-unpadded",
        build(change={"Sec-WebSocket-Key": KEY.rstrip("=")}),
        HandshakeError,
        400,
        "not the base64 of 16 bytes",
        [],
    ),
    (
        "key-empty",
        build(change={"Sec-WebSocket-Key": ""}),
        HandshakeError,
        400,
        "not the base64 of 16 bytes",
        [],
    ),
    (
        "version-8",
        build(change={"Sec-WebSocket-Version": "8"}),
        UpgradeRequired,
        426,
        "Sec-WebSocket-Version 8 is not supported; use 13",
        [("Sec-WebSocket-Version", "13")],
    ),
    (
        "version-missing",
        build(change={"Sec-WebSocket-Version": DROP}),
        UpgradeRequired,
        426,
        "Sec-WebSocket-Version none is not supported",
        [("Sec-WebSocket-Version", "13")],
    ),
    (
        "version-list",
        build(change={"Sec-WebSocket-Version": "13, 8"}),
        UpgradeRequired,
        426,
        "Sec-WebSocket-Version 13, 8 is not supported",
        [("Sec-WebSocket-Version", "13")],
    ),
    (
        "body-content-length",
        build(add=[("Content-Length", "5")], body=b"hello"),
        HandshakeError,
        400,
        "must not have a body (Content-Length > 0)",
        [],
    ),
    (
        "body-transfer-encoding",
        build(add=[("Transfer-Encoding", "chunked")], body=b"0\r\n\r\n"),
        HandshakeError,
        400,
        "must not have a body (Transfer-Encoding sent)",
        [],
    ),
    (
        "host-missing",
        build(change={"Host": DROP}),
        HandshakeError,
        400,
        "Host",
        [],
    ),
    (
        "host-twice",
        build(add=[("Host", "other.example.com")]),
        HandshakeError,
        400,
        "Host",
        [],
    ),
    (
        "absolute-form-other-host",
        build("GET ws://evil.example.com/chat HTTP/1.1"),
        HandshakeError,
        400,
        "absolute request target names host 'evil.example.com' but Host is 'chat.example.com'",
        [],
    ),
    (
        "absolute-form-other-port",
        build("GET ws://chat.example.com:8080/chat HTTP/1.1"),
        HandshakeError,
        400,
        "absolute request target names host 'chat.example.com:8080'",
        [],
    ),
    (
        "absolute-form-https-default-port-is-not-80",
        build("GET wss://chat.example.com:80/chat HTTP/1.1"),
        HandshakeError,
        400,
        "absolute request target names host 'chat.example.com:80'",
        [],
    ),
    (
        "absolute-form-broken-url",
        build("GET http://[::1/chat HTTP/1.1"),
        HandshakeError,
        400,
        "is not a valid URL",
        [],
    ),
    (
        "authority-form",
        build("GET chat.example.com:443 HTTP/1.1"),
        HandshakeError,
        400,
        "is neither a path nor an absolute URL",
        [],
    ),
    (
        "asterisk-form",
        build("GET * HTTP/1.1"),
        HandshakeError,
        400,
        "is neither a path nor an absolute URL",
        [],
    ),
]


@pytest.mark.parametrize(
    ("data", "kind", "status", "message", "response_headers"),
    [pytest.param(*case[1:], id=case[0]) for case in REFUSED],
)
def test_refusals(
    data: bytes,
    kind: type[TunnelError],
    status: int,
    message: str,
    response_headers: list[tuple[str, str]],
) -> None:
    with pytest.raises(kind) as caught:
        handshake(data)
    assert caught.value.status == status
    assert message in caught.value.message
    for header in response_headers:
        assert header in caught.value.headers


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("http://chat.example.com/chat?room=1", "/chat?room=1"),
        ("ws://chat.example.com/chat", "/chat"),
        ("wss://CHAT.example.com", "/"),
        ("https://chat.example.com?x=1", "/?x=1"),
        ("ws://chat.example.com:80/chat", "/chat"),
        ("http://chat.example.com:80/", "/"),
    ],
)
def test_absolute_form_for_the_same_host_becomes_origin_form(target: str, expected: str) -> None:
    upgrade, _, _ = handshake(build(f"GET {target} HTTP/1.1"))
    assert upgrade.target == expected


def test_choose_upgrade_takes_the_first_offer_the_route_allows() -> None:
    data = build(change={"Upgrade": "mqtt, websocket"})
    _, token, key = handshake(data, allowed=("websocket", "mqtt"))
    assert token == "mqtt"
    assert key is None, "a non-websocket upgrade needs no Sec-WebSocket-Key"


def test_non_websocket_upgrade_skips_websocket_headers() -> None:
    data = build(change={"Upgrade": "mqtt", "Sec-WebSocket-Key": DROP})
    _, token, key = handshake(data, allowed=("mqtt",))
    assert (token, key) == ("mqtt", None)


def test_refused_upgrade_names_every_allowed_token() -> None:
    with pytest.raises(UpgradeRequired) as caught:
        handshake(build(change={"Upgrade": "h2c"}), allowed=("websocket", "mqtt"))
    assert caught.value.status == 426
    assert "allowed: websocket, mqtt" in caught.value.message
    assert ("Upgrade", "websocket, mqtt") in caught.value.headers


def test_ipv6_host_is_split_for_routing() -> None:
    upgrade, _, _ = handshake(build(change={"Host": "[::1]:8080"}))
    assert upgrade.host == "[::1]:8080"
    assert upgrade.hostname == "::1"


# --- Host syntax: only a host name or an IP literal, with an optional valid port ---------------


@pytest.mark.parametrize(
    "host",
    [
        "a@b",
        "a:b:c",
        "[::1",
        "a b",
        "a/b?c#d",
        "host:99999",
        "host:0",
        "host:",
        "",
        ":80",
        "[fe80::1%25eth0]",
        "[::1]x",
        "[1.2.3.4]",
        "a%2eb",
        "a\\b",
        "a..b",
        ".a",
        "host:+80",
        "host:8O",
        "a" * 254,
        "exa mple.com:80",
        "a,b",
        "a;b",
        "[::1]:99999",
    ],
)
def test_malformed_host_is_400(host: str) -> None:
    with pytest.raises(HandshakeError) as caught:
        handshake(build(change={"Host": host}))
    assert caught.value.status == 400
    assert "Host" in caught.value.message


@pytest.mark.parametrize(
    ("host", "hostname"),
    [
        ("chat.example.com", "chat.example.com"),
        ("Chat.Example.COM:8443", "chat.example.com"),
        ("chat.example.com.", "chat.example.com"),
        ("chat.example.com.:443", "chat.example.com"),
        ("127.0.0.1:8080", "127.0.0.1"),
        ("[2001:DB8::1]:443", "2001:db8::1"),
        ("[::1]", "::1"),
        ("internal_host", "internal_host"),
        ("localhost:1", "localhost"),
        ("a" * 63 + "." + "b" * 63, "a" * 63 + "." + "b" * 63),
    ],
)
def test_valid_hosts_are_routed_by_name(host: str, hostname: str) -> None:
    upgrade, _, _ = handshake(build(change={"Host": host}))
    assert upgrade.hostname == hostname
    assert upgrade.host == host, "the Host value is forwarded as the client sent it"


def test_absolute_form_with_credentials_is_400() -> None:
    with pytest.raises(HandshakeError):
        handshake(build("GET ws://user@chat.example.com/chat HTTP/1.1"))


# --- Dot segments are refused, not resolved ---------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "/ws/../admin",
        "/ws/./x",
        "/ws/..",
        "/..",
        "/ws/%2e%2e/admin",
        "/ws/%2E%2e/admin",
        "/ws/.%2e/admin",
        "/ws/%2e/admin",
        "/ws/..%2fadmin",
        "/ws/..%2Fadmin",
        "/ws/..%5cadmin",
        "/ws/..\\admin",
        "/ws/..;/admin",
        "/ws/..;jsessionid=1/admin",
        "/public/../ws/x",
        "/ws/../admin?x=1",
        "ws://chat.example.com/ws/../admin",
    ],
)
def test_dot_segments_are_400(target: str) -> None:
    with pytest.raises(HandshakeError) as caught:
        handshake(build(f"GET {target} HTTP/1.1"))
    assert caught.value.status == 400
    assert "segment; send the path with dot segments resolved" in caught.value.message


@pytest.mark.parametrize(
    "target",
    [
        "/ws/...",
        "/ws/.well-known/x",
        "/ws/a..b",
        "/ws/x.",
        "/ws/%2e%2e%2e",
        "/ws/file.tar.gz",
        "/ws/a%2fb",
        "/ws/x?path=../../etc",
        "/ws/?q=%2e%2e",
    ],
)
def test_dots_that_are_not_dot_segments_pass(target: str) -> None:
    upgrade, _, _ = handshake(build(f"GET {target} HTTP/1.1"))
    assert upgrade.target == target


# --- Control characters in header values ------------------------------------------------------


@pytest.mark.parametrize("control", ["\x01", "\x7f", "\x1b", "\x08", "\x1f"])
def test_control_characters_in_values_are_400(control: str) -> None:
    with pytest.raises(HandshakeError) as caught:
        handshake(build(add=[("X-Trace", f"a{control}b")]))
    assert caught.value.status == 400
    assert caught.value.message == "header x-trace has a control character in its value"


def test_tab_and_obs_text_in_values_pass() -> None:
    upgrade, _, _ = handshake(build(add=[("X-Note", "a\tb \xe9")]))
    assert (b"x-note", b"a\tb \xe9") in upgrade.fields
