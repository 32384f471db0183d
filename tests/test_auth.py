"""``policy.auth.authenticate``: where credentials are found, how bearer tokens are compared,
and the request forwarded without them (checked byte for byte)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_jwt import CLAIMS, NOW, SECRET, make_jwt
from tunnel.config.auth import RouteAuth, parse_tokens
from tunnel.core.handshake import UpgradeRequest, validate_request
from tunnel.core.rewrite import Forwarding, rewrite_request
from tunnel.errors import Unauthorized
from tunnel.policy.auth import (
    MAX_SUBPROTOCOL_TRIES,
    AuthRules,
    BearerTokens,
    Identity,
    authenticate,
)

TOKEN = "tok-0123456789abcdef"
OTHER = "tok-fedcba9876543210"
SUBJECT = "token:" + hashlib.sha256(TOKEN.encode()).hexdigest()[:16]
BASE = [
    (b"Host", b"example.com"),
    (b"Connection", b"Upgrade"),
    (b"Upgrade", b"websocket"),
]


@dataclass
class Tokens:
    """A token source that counts how often the tokens were compared against."""

    digests: tuple[bytes, ...]
    reads: int = field(default=0)

    @property
    def tokens(self) -> tuple[bytes, ...]:
        self.reads += 1
        return self.digests


def tokens(*values: str) -> Tokens:
    return Tokens(parse_tokens("\n".join(values).encode()))


def bearer(*token_from: str, source: Tokens | None = None) -> AuthRules:
    settings = RouteAuth(
        kind="bearer", tokens_file="t", token_from=token_from or ("header:Authorization",)
    )
    return AuthRules.build(settings, tokens=source or tokens(TOKEN, OTHER))


def jwt(*token_from: str) -> AuthRules:
    settings = RouteAuth(
        kind="jwt", secret_env="S", token_from=token_from or ("header:Authorization",)
    )
    return AuthRules.build(settings, key=SECRET)


def request(*headers: tuple[bytes, bytes], target: bytes = b"/ws") -> UpgradeRequest:
    return validate_request(h11.Request(method="GET", target=target, headers=[*BASE, *headers]))


def raw(upgrade: UpgradeRequest) -> list[tuple[bytes, bytes]]:
    """The header lines as they will be forwarded, name casing kept; also checks that the
    lower-case view matches them line for line."""
    lines = list(upgrade.request.headers.raw_items())
    assert upgrade.fields == [(name.lower(), value) for name, value in lines]
    assert upgrade.request.target == upgrade.target.encode("latin-1")
    return lines[len(BASE) :]


def accept(rules: AuthRules, upgrade: UpgradeRequest) -> tuple[UpgradeRequest, Identity]:
    result, identity = authenticate(upgrade, rules, NOW)
    assert list(result.request.headers.raw_items())[: len(BASE)] == BASE
    return result, identity


def refuse(rules: AuthRules, upgrade: UpgradeRequest, error: str = "invalid_token") -> str:
    with pytest.raises(Unauthorized) as caught:
        authenticate(upgrade, rules, NOW)
    assert caught.value.error == error
    assert caught.value.status == 401
    for secret in (TOKEN, OTHER):
        assert secret not in caught.value.message
    return caught.value.message


def test_bearer_token_in_authorization_accepted_and_removed() -> None:
    upgrade = request(
        (b"X-Before", b"1"), (b"Authorization", b"Bearer " + TOKEN.encode()), (b"x-After", b"2")
    )
    result, identity = accept(bearer(), upgrade)
    assert identity == Identity(SUBJECT, None)
    assert raw(result) == [(b"X-Before", b"1"), (b"x-After", b"2")]
    assert result.target == "/ws"


@pytest.mark.parametrize("scheme", [b"Bearer", b"bearer", b"BEARER", b"bEaReR"])
def test_bearer_scheme_is_case_insensitive(scheme: bytes) -> None:
    upgrade = request((b"authorization", scheme + b"  " + TOKEN.encode()))
    assert accept(bearer(), upgrade)[1].subject == SUBJECT


def test_each_token_of_the_file_is_its_own_subject() -> None:
    upgrade = request((b"Authorization", b"Bearer " + OTHER.encode()))
    assert accept(bearer(), upgrade)[1].subject == (
        "token:" + hashlib.sha256(OTHER.encode()).hexdigest()[:16]
    )


@pytest.mark.parametrize(
    "near",
    [
        TOKEN[:-1],
        TOKEN + "0",
        TOKEN.upper(),
        TOKEN[:-1] + "e",
        " " + TOKEN + "x",
        "x" * 20,
        "tok-0123456789abcdef\t0",
    ],
)
def test_wrong_and_near_miss_bearer_tokens_refused(near: str) -> None:
    upgrade = request((b"Authorization", b"Bearer " + near.encode()))
    message = refuse(bearer(), upgrade)
    assert message.endswith("is not in the tokens file")
    assert near.strip() not in message


def test_the_current_tokens_are_read_at_each_check() -> None:
    source = tokens(TOKEN, OTHER, "third-token-0123456789")
    rules = bearer(source=source)
    assert isinstance(rules.verifier, BearerTokens)
    accept(rules, request((b"Authorization", b"Bearer " + TOKEN.encode())))
    refuse(rules, request((b"Authorization", b"Bearer " + b"y" * 20)))
    assert source.reads == 2


def test_an_oversized_bearer_token_is_refused_unhashed() -> None:
    upgrade = request((b"Authorization", b"Bearer " + b"x" * 9000))
    assert refuse(bearer(), upgrade) == "token of 9000 bytes is longer than 8192"


def test_rules_need_what_their_kind_checks_against() -> None:
    with pytest.raises(ValueError, match="needs its tokens"):
        AuthRules.build(RouteAuth(kind="bearer", tokens_file="t"))
    with pytest.raises(ValueError, match="needs its key"):
        AuthRules.build(RouteAuth(kind="jwt", secret_env="S"))
    with pytest.raises(ValueError, match="checks no credential"):
        AuthRules.build(RouteAuth())
    rules = AuthRules.build(
        RouteAuth(kind="jwt", secret_env="S", identity_header="X_Who"), key=SECRET
    )
    assert rules.identity_header == b"x-who"


def test_no_credential_is_a_challenge_without_error() -> None:
    message = refuse(bearer("header:Authorization", "query:access_token"), request(), "")
    assert message == "no credential sent (looked in Authorization (Bearer), query access_token)"


def test_another_scheme_is_not_a_credential_and_stays() -> None:
    basic = (b"Authorization", b"Basic dXNlcjpwYXNz")
    message = refuse(bearer(), request(basic), "invalid_request")
    assert message == "Authorization uses the 'Basic' scheme, not Bearer"
    rules = bearer("header:Authorization", "query:access_token")
    target = f"/ws?access_token={TOKEN}".encode()
    result, identity = accept(rules, request(basic, target=target))
    assert identity.subject == SUBJECT
    assert raw(result) == [basic]
    assert result.target == "/ws"


@pytest.mark.parametrize(
    "value",
    [
        b"tok-0123456789abcdef-and-more",
        b"Bearer:tok-0123456789abcdef-and-more",
        b"Bearer\ttok-0123456789abcdef-and-more",
    ],
)
def test_a_token_without_the_scheme_is_not_shown(value: bytes) -> None:
    message = refuse(bearer(), request((b"Authorization", value)), "invalid_request")
    assert message == "Authorization is not 'Bearer TOKEN'"


@pytest.mark.parametrize(
    "lines",
    [
        [b"Bearer " + TOKEN.encode(), b"Bearer " + TOKEN.encode()],
        [b"Bearer " + TOKEN.encode(), b"Basic eA=="],
    ],
)
def test_two_authorization_headers_refused(lines: list[bytes]) -> None:
    upgrade = request(*[(b"Authorization", line) for line in lines])
    assert "2 Authorization (Bearer) headers" in refuse(bearer(), upgrade, "invalid_request")


@pytest.mark.parametrize("value", [b"Bearer", b"bearer"])
def test_empty_bearer_refused(value: bytes) -> None:
    assert "is empty" in refuse(bearer(), request((b"Authorization", value)), "invalid_request")


def test_another_header_gives_its_whole_value() -> None:
    rules = bearer("header:X-Api-Key")
    upgrade = request((b"X-API-KEY", TOKEN.encode()), (b"X-Other", b"k"))
    result, identity = accept(rules, upgrade)
    assert identity.subject == SUBJECT
    assert raw(result) == [(b"X-Other", b"k")]
    assert "2 header x-api-key headers" in refuse(
        rules, request((b"X-Api-Key", b"a"), (b"x-api-key", b"b")), "invalid_request"
    )


@pytest.mark.parametrize(
    ("target", "forwarded"),
    [
        (f"/ws?access_token={TOKEN}", "/ws"),
        (f"/ws?a=1&access_token={TOKEN}&b=%20x", "/ws?a=1&b=%20x"),
        (f"/ws?access_token={TOKEN}&b=2&&c", "/ws?b=2&&c"),
        (f"/ws?a=%2B+&access_token={TOKEN}", "/ws?a=%2B+"),
        ("/ws?access%5Ftoken=" + TOKEN.replace("-", "%2D"), "/ws"),
        (f"/a/b;p?x=&access_token={TOKEN}&access_token2=z", "/a/b;p?x=&access_token2=z"),
    ],
)
def test_query_parameter_removed_others_kept_byte_exact(target: str, forwarded: str) -> None:
    rules = bearer("query:access_token")
    result, identity = accept(rules, request((b"X-K", b"v"), target=target.encode()))
    assert identity.subject == SUBJECT
    assert result.target == forwarded
    assert raw(result) == [(b"X-K", b"v")]


def test_query_plus_is_a_space() -> None:
    spaced = "tok 0123456789abcdef"
    rules = bearer("query:t", source=tokens("tok+0123456789abcdef", "tok%0123456789abcdef"))
    refuse(rules, request(target=b"/ws?t=tok+0123456789abcdef"))
    accept(rules, request(target=b"/ws?t=tok%2B0123456789abcdef"))
    assert spaced not in refuse(rules, request(target=b"/ws?t=tok%200123456789abcdef"))


def test_two_query_parameters_refused() -> None:
    target = f"/ws?access_token={TOKEN}&access_token={TOKEN}".encode()
    message = refuse(bearer("query:access_token"), request(target=target), "invalid_request")
    assert message == "2 credentials in query access_token; send one"


@pytest.mark.parametrize(
    ("cookies", "forwarded"),
    [
        ([f"sid={TOKEN}"], []),
        ([f"a=1; sid={TOKEN}; b=2"], [b"a=1; b=2"]),
        ([f'a=1;sid="{TOKEN}"'], [b"a=1"]),
        (["a=1", f"sid={TOKEN}", "b=2"], [b"a=1", b"b=2"]),
        ([f"SID=x; sid={TOKEN}"], [b"SID=x"]),
    ],
)
def test_cookie_removed_others_kept(cookies: list[str], forwarded: list[bytes]) -> None:
    rules = bearer("cookie:sid")
    upgrade = request((b"X-K", b"v"), *[(b"Cookie", c.encode()) for c in cookies])
    result, identity = accept(rules, upgrade)
    assert identity.subject == SUBJECT
    assert raw(result) == [(b"X-K", b"v"), *[(b"Cookie", c) for c in forwarded]]


def test_two_cookies_of_the_name_refused() -> None:
    upgrade = request((b"Cookie", f"sid={TOKEN}".encode()), (b"Cookie", b"sid=other"))
    assert "2 credentials in cookie sid" in refuse(bearer("cookie:sid"), upgrade, "invalid_request")


@pytest.mark.parametrize(
    ("lines", "forwarded"),
    [
        ([f"chat, {TOKEN}"], [b"chat"]),
        ([f"{TOKEN}"], []),
        ([f"chat,{TOKEN} ,v2.chat"], [b"chat, v2.chat"]),
        (["chat", f"{TOKEN}"], [b"chat"]),
        ([f"{TOKEN}, chat", "superchat"], [b"chat", b"superchat"]),
    ],
)
def test_subprotocol_entry_removed_real_ones_kept(lines: list[str], forwarded: list[bytes]) -> None:
    upgrade = request(*[(b"Sec-WebSocket-Protocol", line.encode()) for line in lines])
    result, identity = accept(bearer("subprotocol"), upgrade)
    assert identity.subject == SUBJECT
    assert raw(result) == [(b"Sec-WebSocket-Protocol", line) for line in forwarded]


def test_a_jwt_as_a_subprotocol() -> None:
    token = make_jwt(CLAIMS)
    upgrade = request((b"Sec-WebSocket-Protocol", b"chat.v2, " + token))
    result, identity = accept(jwt("subprotocol"), upgrade)
    assert identity == Identity("alice", CLAIMS["exp"])
    assert raw(result) == [(b"Sec-WebSocket-Protocol", b"chat.v2")]


def test_subprotocols_that_are_not_credentials_are_refused() -> None:
    upgrade = request((b"Sec-WebSocket-Protocol", b"chat, a.b.c"))
    message = refuse(jwt("subprotocol"), upgrade)
    assert message.startswith("no Sec-WebSocket-Protocol entry verifies: ")
    assert refuse(jwt("subprotocol"), request((b"Sec-WebSocket-Protocol", b"chat")), "") == (
        "no credential sent (looked in Sec-WebSocket-Protocol)"
    )


def test_subprotocol_entries_tried_are_capped() -> None:
    source = tokens(TOKEN)
    wrong = ", ".join(f"wrong-token-{i:08}" for i in range(MAX_SUBPROTOCOL_TRIES))
    upgrade = request((b"Sec-WebSocket-Protocol", f"{wrong}, {TOKEN}".encode()))
    refuse(bearer("subprotocol", source=source), upgrade)
    assert source.reads == MAX_SUBPROTOCOL_TRIES
    flood = ", ".join(f"wrong-token-flood-{i:06}" for i in range(1000))
    refuse(
        bearer("subprotocol", source=source), request((b"Sec-WebSocket-Protocol", flood.encode()))
    )
    assert source.reads == 2 * MAX_SUBPROTOCOL_TRIES


def test_two_subprotocol_credentials_refused() -> None:
    upgrade = request((b"Sec-WebSocket-Protocol", f"{TOKEN}, {OTHER}".encode()))
    assert "several" in refuse(bearer("subprotocol"), upgrade, "invalid_request")


def test_the_first_source_with_a_credential_decides_and_all_are_removed() -> None:
    rules = bearer("query:t", "header:Authorization", "cookie:c")
    upgrade = request(
        (b"Authorization", f"Bearer {OTHER}".encode()),
        (b"Cookie", b"c=whatever; d=1"),
        target=f"/ws?t={TOKEN}".encode(),
    )
    result, identity = accept(rules, upgrade)
    assert identity.subject == SUBJECT
    assert raw(result) == [(b"Cookie", b"d=1")]
    assert result.target == "/ws"
    wrong_first = request(
        (b"Authorization", f"Bearer {TOKEN}".encode()), target=b"/ws?t=wrong-wrong-wrong"
    )
    refuse(rules, wrong_first)


def test_a_verified_subprotocol_first_skips_later_sources_but_removes_them() -> None:
    source = tokens(TOKEN, OTHER)
    rules = bearer("subprotocol", "header:Authorization", source=source)
    upgrade = request(
        (b"Sec-WebSocket-Protocol", f"chat, {TOKEN}".encode()),
        (b"Authorization", f"Bearer {OTHER}".encode()),
    )
    result, identity = accept(rules, upgrade)
    assert identity.subject == SUBJECT
    assert raw(result) == [(b"Sec-WebSocket-Protocol", b"chat")]
    assert source.reads == 1


@pytest.mark.parametrize("name", [b"X-Auth-Subject", b"x-auth-subject", b"X_AUTH_SUBJECT"])
def test_client_sent_identity_header_removed(name: bytes) -> None:
    upgrade = request((name, b"admin"), (b"Authorization", f"Bearer {TOKEN}".encode()))
    result, _ = accept(bearer(), upgrade)
    assert raw(result) == []


def test_jwt_from_the_authorization_header() -> None:
    upgrade = request((b"Authorization", b"Bearer " + make_jwt(CLAIMS)), (b"X-K", b"v"))
    result, identity = accept(jwt(), upgrade)
    assert identity == Identity("alice", CLAIMS["exp"])
    assert raw(result) == [(b"X-K", b"v")]
    expired = make_jwt({**CLAIMS, "exp": NOW - 3600})
    assert "token expired at" in refuse(jwt(), request((b"Authorization", b"Bearer " + expired)))


def test_the_backend_receives_no_token() -> None:
    """What ``rewrite_request`` writes for the backend from the returned request."""
    rules = bearer("header:Authorization", "query:access_token", "cookie:sid", "subprotocol")
    upgrade = request(
        (b"Authorization", f"Bearer {TOKEN}".encode()),
        (b"Cookie", f"sid={OTHER}; theme=dark".encode()),
        (b"Sec-WebSocket-Protocol", b"chat"),
        (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
        (b"Sec-WebSocket-Version", b"13"),
        target=f"/ws?room=1&access_token={OTHER}".encode(),
    )
    result, identity = accept(rules, upgrade)
    added = ((b"X-Auth-Subject", identity.subject.encode()),)
    sent = rewrite_request(result, "websocket", Forwarding("127.0.0.1", added=added)).to_bytes()
    assert TOKEN.encode() not in sent
    assert OTHER.encode() not in sent
    assert sent.startswith(b"GET /ws?room=1 HTTP/1.1\r\n")
    assert b"\r\nCookie: theme=dark\r\n" in sent
    assert b"\r\nSec-WebSocket-Protocol: chat\r\n" in sent
    assert f"\r\nX-Auth-Subject: {SUBJECT}\r\n".encode() in sent


_VALUE = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=80
).map(lambda text: text.encode("latin-1"))
_QUERY = st.text(st.sampled_from("abt=&%+2Fx-_.~;,"), max_size=40).map(str.encode)


@settings(max_examples=300, deadline=None)
@given(authorization=_VALUE, cookie=_VALUE, protocol=_VALUE, query=_QUERY, key=_VALUE)
def test_arbitrary_credentials_only_raise_unauthorized(
    authorization: bytes, cookie: bytes, protocol: bytes, query: bytes, key: bytes
) -> None:
    headers: list[Any] = [
        (b"Authorization", authorization),
        (b"Cookie", cookie),
        (b"Sec-WebSocket-Protocol", protocol),
        (b"X-Key", key),
    ]
    try:
        upgrade = request(*headers, target=b"/ws?" + query)
    except (h11.LocalProtocolError, Unauthorized):  # not a head h11 would send
        return
    everything = ("header:Authorization", "header:X-Key", "query:t", "cookie:t", "subprotocol")
    for rules in (bearer(*everything), jwt(*everything)):
        with pytest.raises(Unauthorized):
            authenticate(upgrade, rules, NOW)
