"""The request the backend receives: what is kept, dropped, replaced and added."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import h11
import pytest

from tunnel.core.handshake import UpgradeRequest, validate_request
from tunnel.core.rewrite import Forwarding, ForwardRequest, client_ip, rewrite_request
from tunnel.core.session import BackendReply, RequestHead

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
BASE: tuple[tuple[str, str], ...] = (
    ("Host", "Chat.Example.com:8443"),
    ("Connection", "keep-alive, Upgrade"),
    ("Upgrade", "WebSocket"),
    ("Sec-WebSocket-Key", KEY),
    ("Sec-WebSocket-Version", "13"),
)
UNTRUSTED = Forwarding(peer_ip="203.0.113.7")
TRUSTED_NETS = (ipaddress.ip_network("10.0.0.0/8"),)
TRUSTED = Forwarding(peer_ip="10.1.2.3", trusted_proxies=TRUSTED_NETS)


def upgrade_of(
    extra: Sequence[tuple[str, str]] = (),
    target: str = "/chat?room=1",
    base: Sequence[tuple[str, str]] = BASE,
) -> UpgradeRequest:
    lines = [f"GET {target} HTTP/1.1", *(f"{k}: {v}" for k, v in [*base, *extra])]
    request = RequestHead(32 * 1024).feed(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    assert request is not None
    return validate_request(request)


def rewrite(
    extra: Sequence[tuple[str, str]] = (),
    hop: Forwarding = UNTRUSTED,
    target: str = "/chat?room=1",
) -> ForwardRequest:
    return rewrite_request(upgrade_of(extra, target), "websocket", hop)


def raw(request: ForwardRequest) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.fields]


def get_all(request: h11.Request, name: str) -> list[str]:
    return [v for k, v in raw(request) if k.lower() == name.lower()]


def test_original_host_is_kept_as_sent() -> None:
    out = rewrite()
    assert get_all(out, "Host") == ["Chat.Example.com:8443"]
    assert raw(out)[0] == ("Host", "Chat.Example.com:8443")


def test_backend_host_replaces_host_when_set() -> None:
    out = rewrite(hop=Forwarding(peer_ip="203.0.113.7", backend_host="10.0.0.5:9000"))
    assert get_all(out, "Host") == ["10.0.0.5:9000"]
    assert get_all(out, "X-Forwarded-Host") == ["Chat.Example.com:8443"]


@pytest.mark.parametrize(
    "header",
    [
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
        ("Content-Length", "0"),
    ],
    ids=lambda h: h[0],
)
def test_hop_by_hop_headers_are_dropped(header: tuple[str, str]) -> None:
    out = rewrite([header])
    assert get_all(out, header[0]) == []


def test_headers_named_in_connection_are_dropped() -> None:
    base = [(k, "Upgrade, X-Hop-Secret, x-other") if k == "Connection" else (k, v) for k, v in BASE]
    upgrade = upgrade_of([("X-Hop-Secret", "s3cret"), ("X-Other", "o"), ("X-Kept", "k")], base=base)
    out = rewrite_request(upgrade, "websocket", UNTRUSTED)
    assert get_all(out, "X-Hop-Secret") == []
    assert get_all(out, "X-Other") == []
    assert get_all(out, "X-Kept") == ["k"]


def test_connection_and_upgrade_are_sent_once() -> None:
    out = rewrite([("Connection", "close")])
    assert get_all(out, "Connection") == ["Upgrade"]
    assert get_all(out, "Upgrade") == ["websocket"]


def test_chosen_token_is_the_upgrade_sent() -> None:
    base = [(k, "mqtt, websocket") if k == "Upgrade" else (k, v) for k, v in BASE]
    out = rewrite_request(upgrade_of(base=base), "mqtt", UNTRUSTED)
    assert get_all(out, "Upgrade") == ["mqtt"]


SPOOFED = [
    ("X-Forwarded-For", "6.6.6.6"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "spoofed.example"),
    ("X-Real-IP", "6.6.6.6"),
]


def test_untrusted_peer_replaces_forwarding_headers() -> None:
    out = rewrite(SPOOFED)
    assert get_all(out, "X-Forwarded-For") == ["203.0.113.7"]
    assert get_all(out, "X-Forwarded-Proto") == ["http"]
    assert get_all(out, "X-Forwarded-Host") == ["Chat.Example.com:8443"]
    assert get_all(out, "X-Real-IP") == ["203.0.113.7"]


def test_untrusted_peer_forwarded_header_is_dropped() -> None:
    out = rewrite([("Forwarded", "for=6.6.6.6;proto=https")])
    assert get_all(out, "Forwarded") == []


def test_trusted_peer_forwarded_header_is_kept() -> None:
    out = rewrite([("Forwarded", "for=6.6.6.6;proto=https")], hop=TRUSTED)
    assert get_all(out, "Forwarded") == ["for=6.6.6.6;proto=https"]


def test_untrusted_peer_over_tls_says_https() -> None:
    out = rewrite(SPOOFED, hop=Forwarding(peer_ip="203.0.113.7", scheme="https"))
    assert get_all(out, "X-Forwarded-Proto") == ["https"]


def test_trusted_peer_appends_to_forwarded_for() -> None:
    out = rewrite(SPOOFED, hop=TRUSTED)
    assert get_all(out, "X-Forwarded-For") == ["6.6.6.6, 10.1.2.3"]
    assert get_all(out, "X-Forwarded-Proto") == ["https"]
    assert get_all(out, "X-Forwarded-Host") == ["spoofed.example"]
    assert get_all(out, "X-Real-IP") == ["6.6.6.6"]


def test_trusted_peer_chain_of_several_headers_is_kept_in_order() -> None:
    extra = [("X-Forwarded-For", "1.1.1.1, 10.9.9.9"), ("X-Forwarded-For", "2.2.2.2")]
    out = rewrite(extra, hop=TRUSTED)
    assert get_all(out, "X-Forwarded-For") == ["1.1.1.1, 10.9.9.9, 2.2.2.2, 10.1.2.3"]
    assert get_all(out, "X-Real-IP") == ["2.2.2.2"], "the last untrusted address is the client"


def test_real_ip_skips_trusted_proxies_in_the_chain() -> None:
    out = rewrite([("X-Forwarded-For", "1.1.1.1, 10.9.9.9")], hop=TRUSTED)
    assert get_all(out, "X-Real-IP") == ["1.1.1.1"]


def test_trusted_peer_without_forwarding_headers_is_the_client() -> None:
    out = rewrite(hop=TRUSTED)
    assert get_all(out, "X-Forwarded-For") == ["10.1.2.3"]
    assert get_all(out, "X-Real-IP") == ["10.1.2.3"]
    assert get_all(out, "X-Forwarded-Host") == ["Chat.Example.com:8443"]


def test_ipv6_peer() -> None:
    out = rewrite(hop=Forwarding(peer_ip="2001:db8::1"))
    assert get_all(out, "X-Forwarded-For") == ["2001:db8::1"]


def test_websocket_headers_pass_untouched_with_their_casing() -> None:
    extra = [
        ("Sec-WebSocket-Protocol", "chat, superchat"),
        ("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits"),
        ("Origin", "https://chat.example.com"),
        ("X-Odd-CASE", "Value With  Spaces"),
        ("Cookie", "a=1; b=2"),
    ]
    out = rewrite(extra)
    headers = raw(out)
    for header in [*extra, ("Sec-WebSocket-Key", KEY), ("Sec-WebSocket-Version", "13")]:
        assert header in headers


def test_header_casing_survives_on_the_wire() -> None:
    out = rewrite([("Sec-WebSocket-Protocol", "chat"), ("X-Odd-CASE", "v")])
    wire = BackendReply(out, "websocket", KEY, 64 * 1024).request_bytes
    assert wire.startswith(b"GET /chat?room=1 HTTP/1.1\r\nHost: Chat.Example.com:8443\r\n")
    assert b"\r\nSec-WebSocket-Protocol: chat\r\n" in wire
    assert b"\r\nX-Odd-CASE: v\r\n" in wire
    assert b"\r\nSec-WebSocket-Key: " + KEY.encode() + b"\r\n" in wire
    assert b"\r\nConnection: Upgrade\r\n" in wire
    assert b"\r\nUpgrade: websocket\r\n" in wire
    assert wire.count(b"\r\nConnection:") == 1


def test_absolute_form_target_reaches_the_backend_in_origin_form() -> None:
    out = rewrite(target="http://Chat.Example.com:8443/chat?room=1")
    assert out.target == b"/chat?room=1"


@pytest.mark.parametrize(
    ("prefix", "backend_path", "target", "expected"),
    [
        ("/", "", "/chat?room=1", "/chat?room=1"),
        ("/ws/", "", "/ws/chat?room=1", "/ws/chat?room=1"),
        ("/ws/", "/socket/", "/ws/chat?room=1", "/socket/chat?room=1"),
        ("/ws/", "/socket/", "/ws/", "/socket/"),
        ("/ws/", "/socket/", "/ws/?x=1", "/socket/?x=1"),
        ("/ws/", "/", "/ws/chat", "/chat"),
        ("/ws", "/", "/ws?x=1", "/?x=1"),
        ("/ws", "/", "/ws/a/b", "/a/b"),
        ("/", "/app/", "/chat?x=a%20b", "/app/chat?x=a%20b"),
        ("/api/ws", "/v2", "/api/ws?token=t", "/v2?token=t"),
        ("/api/ws", "/v2", "/api/ws/room", "/v2/room"),
    ],
)
def test_backend_path_replaces_the_route_prefix(
    prefix: str, backend_path: str, target: str, expected: str
) -> None:
    hop = Forwarding(peer_ip="203.0.113.7", path_prefix=prefix, backend_path=backend_path)
    assert rewrite(hop=hop, target=target).target == expected.encode()


def test_rewritten_request_is_a_valid_h11_upgrade() -> None:
    out = rewrite(SPOOFED, hop=TRUSTED)
    assert out.method == b"GET"
    assert out.http_version == b"1.1"
    reply = BackendReply(out, "websocket", KEY, 64 * 1024)
    assert reply.request_bytes.endswith(b"\r\n\r\n")
    # What the tunnel writes is what h11 itself would write for the same request.
    conn = h11.Connection(h11.CLIENT)
    assert conn.send(out.to_h11()) == reply.request_bytes


# --- Look-alikes: underscores, identity headers, Connection-listed handshake headers ----------

UNDERSCORED = [
    ("X_Forwarded_For", "6.6.6.6"),
    ("x_real_ip", "6.6.6.6"),
    ("X_FORWARDED_PROTO", "https"),
    ("X_Forwarded_Host", "spoofed.example"),
    ("X-Forwarded_For", "6.6.6.6"),
    ("Sec_WebSocket_Key", "AAAAAAAAAAAAAAAAAAAAAA=="),
    ("Transfer_Encoding", "chunked"),
    ("X_Client_IP", "6.6.6.6"),
    ("True_Client_IP", "6.6.6.6"),
]

IDENTITY = [
    ("X-Forwarded-Port", "1"),
    ("X-Forwarded-Prefix", "/admin"),
    ("X-Forwarded-Ssl", "on"),
    ("X-Client-IP", "6.6.6.6"),
    ("True-Client-IP", "6.6.6.6"),
    ("CF-Connecting-IP", "6.6.6.6"),
    ("X-Original-URL", "/admin"),
    ("x-cluster-client-ip", "6.6.6.6"),
    ("Forwarded", "for=6.6.6.6"),
]


@pytest.mark.parametrize("hop", [UNTRUSTED, TRUSTED], ids=["untrusted", "trusted"])
@pytest.mark.parametrize("header", UNDERSCORED, ids=lambda h: h[0])
def test_underscore_spellings_of_headers_the_proxy_sets_or_checks_are_dropped(
    header: tuple[str, str], hop: Forwarding
) -> None:
    """A WSGI/CGI backend reads ``X_Real_IP`` as ``X-Real-IP`` and merges the two."""
    out = rewrite([header], hop=hop)
    assert [name for name, _ in raw(out) if "_" in name] == []
    assert get_all(out, "X-Real-IP") == [hop.peer_ip]
    assert get_all(out, "X-Forwarded-For") == [hop.peer_ip]


def test_underscores_in_other_header_names_pass() -> None:
    out = rewrite([("X_Request_Id", "abc"), ("My_Header", "v")])
    assert get_all(out, "X_Request_Id") == ["abc"]
    assert get_all(out, "My_Header") == ["v"]


@pytest.mark.parametrize("header", IDENTITY, ids=lambda h: h[0])
def test_headers_naming_the_client_are_dropped_from_untrusted_peers(
    header: tuple[str, str],
) -> None:
    assert get_all(rewrite([header]), header[0]) == []


@pytest.mark.parametrize("header", IDENTITY, ids=lambda h: h[0])
def test_headers_naming_the_client_are_kept_from_trusted_peers(header: tuple[str, str]) -> None:
    assert get_all(rewrite([header], hop=TRUSTED), header[0]) == [header[1]]


def test_client_subject_header_look_alikes_are_dropped() -> None:
    hop = Forwarding(peer_ip="203.0.113.7", added=((b"X-Client-Subject", b"CN=real"),))
    out = rewrite([("X_Client_Subject", "CN=forged"), ("x-client-subject", "CN=forged")], hop=hop)
    assert [(k, v) for k, v in raw(out) if "subject" in k.lower()] == [
        ("X-Client-Subject", "CN=real")
    ]


@pytest.mark.parametrize(
    "name",
    [
        "Sec-WebSocket-Key",
        "Sec-WebSocket-Version",
        "Sec-WebSocket-Protocol",
        "Sec-WebSocket-Extensions",
        "Origin",
        "Host",
    ],
)
def test_handshake_headers_listed_in_connection_still_reach_the_backend(name: str) -> None:
    extra = [
        ("Origin", "https://chat.example.com"),
        ("Sec-WebSocket-Protocol", "chat"),
        ("Sec-WebSocket-Extensions", "permessage-deflate"),
    ]
    base = [(k, f"Upgrade, {name.upper()}") if k == "Connection" else (k, v) for k, v in BASE]
    out = rewrite_request(upgrade_of(extra, base=base), "websocket", UNTRUSTED)
    assert len(get_all(out, name)) == 1
    assert get_all(out, "Sec-WebSocket-Key") == [KEY]


# --- Only valid addresses are taken from a trusted peer's forwarding headers ------------------


@pytest.mark.parametrize(
    ("chain", "forwarded_for", "real_ip"),
    [
        ("1.1.1.1", "1.1.1.1, 10.1.2.3", "1.1.1.1"),
        ("evil<script>", "10.1.2.3", "10.1.2.3"),
        ("unknown", "10.1.2.3", "10.1.2.3"),
        ("1.1.1.1, not-an-ip", "1.1.1.1, 10.1.2.3", "10.1.2.3"),
        ("not-an-ip, 1.1.1.1", "1.1.1.1, 10.1.2.3", "1.1.1.1"),
        ("1.1.1.1:5678", "1.1.1.1, 10.1.2.3", "1.1.1.1"),
        ("[2001:db8::1]:443", "2001:db8::1, 10.1.2.3", "2001:db8::1"),
        ("2001:DB8:0::1", "2001:db8::1, 10.1.2.3", "2001:db8::1"),
        ("fe80::1%eth0", "10.1.2.3", "10.1.2.3"),
        ("1.1.1.1, 10.9.9.9, garbage", "1.1.1.1, 10.9.9.9, 10.1.2.3", "10.1.2.3"),
        ("garbage, 10.9.9.9", "10.9.9.9, 10.1.2.3", "10.9.9.9"),
        ("01.1.1.1", "10.1.2.3", "10.1.2.3"),
    ],
)
def test_trusted_forwarded_for_keeps_only_addresses(
    chain: str, forwarded_for: str, real_ip: str
) -> None:
    out = rewrite([("X-Forwarded-For", chain)], hop=TRUSTED)
    assert get_all(out, "X-Forwarded-For") == [forwarded_for]
    assert get_all(out, "X-Real-IP") == [real_ip]


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        ("https", "https"),
        ("WSS", "wss"),
        ("http, https", "https"),
        ("javascript", "http"),
        ("https\u00e9", "http"),
        ("", "http"),
    ],
)
def test_trusted_forwarded_proto_is_a_known_scheme(sent: str, expected: str) -> None:
    out = rewrite([("X-Forwarded-Proto", sent)], hop=TRUSTED)
    assert get_all(out, "X-Forwarded-Proto") == [expected]


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        ("front.example:443", "front.example:443"),
        ("a b", "Chat.Example.com:8443"),
        ("evil@x", "Chat.Example.com:8443"),
        ("x.example, front.example", "front.example"),
    ],
)
def test_trusted_forwarded_host_is_a_valid_host(sent: str, expected: str) -> None:
    out = rewrite([("X-Forwarded-Host", sent)], hop=TRUSTED)
    assert get_all(out, "X-Forwarded-Host") == [expected]


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        ("203.0.113.9", [b"198.51.100.1"], "203.0.113.9"),  # untrusted peer: its own address
        ("10.0.0.2", [b"198.51.100.1"], "198.51.100.1"),  # trusted: the client it names
        ("10.0.0.2", [b"198.51.100.1, 10.0.0.7"], "198.51.100.1"),  # past trusted hops
        ("10.0.0.2", [], "10.0.0.2"),  # trusted but names nobody
        ("10.0.0.2", [b"unknown"], "10.0.0.2"),  # garbage: the nearest vouched-for hop
    ],
)
def test_client_ip_is_what_x_real_ip_names(
    peer: str, forwarded: list[bytes], expected: str
) -> None:
    fields = [(b"x-forwarded-for", value) for value in forwarded]
    assert client_ip(peer, fields, TRUSTED_NETS) == expected
