"""The backend's reply and the proxy's own answers.

A 101 must match the request or it is a 502; any other reply reaches the client byte for byte;
the proxy's refusals are valid HTTP responses that say what went wrong.
"""

from __future__ import annotations

from collections.abc import Callable

import h11
import pytest

from tunnel.core.response import error_response, websocket_accept
from tunnel.core.session import BackendReply, ReplyProgress
from tunnel.errors import (
    BackendError,
    BackendTimeout,
    BackendUnreachable,
    BadBackendResponse,
    HandshakeError,
    HeadersTooLarge,
    MethodNotAllowed,
    NoHealthyBackend,
    NoRoute,
    Overloaded,
    RequestTimeout,
    TunnelError,
    UpgradeRequired,
    UriTooLong,
)

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455 §1.3
LIMIT = 64 * 1024


def test_websocket_accept_matches_rfc_6455_example() -> None:
    assert websocket_accept(KEY) == ACCEPT


def new_reply(token: str = "websocket", key: str | None = KEY) -> BackendReply:
    request = h11.Request(
        method="GET",
        target="/chat",
        headers=[
            ("Host", "chat.example.com"),
            ("Connection", "Upgrade"),
            ("Upgrade", token),
            ("Sec-WebSocket-Key", KEY),
            ("Sec-WebSocket-Version", "13"),
        ],
    )
    return BackendReply(request, token, key, LIMIT)


def switch(*lines: str) -> bytes:
    return ("HTTP/1.1 101 Switching Protocols\r\n" + "".join(f"{x}\r\n" for x in lines)).encode(
        "latin-1"
    ) + b"\r\n"


UPGRADE = "Upgrade: websocket"
CONNECTION = "Connection: Upgrade"
ACCEPT_LINE = f"Sec-WebSocket-Accept: {ACCEPT}"


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(switch(UPGRADE, CONNECTION, ACCEPT_LINE), id="as-rfc"),
        pytest.param(
            switch("upgrade: WebSocket", "connection: keep-alive, upgrade", ACCEPT_LINE),
            id="case-and-lists",
        ),
        pytest.param(
            switch(
                UPGRADE,
                CONNECTION,
                ACCEPT_LINE,
                "Sec-WebSocket-Protocol: chat",
                "Sec-WebSocket-Extensions: permessage-deflate",
            ),
            id="subprotocol-and-extension",
        ),
    ],
)
def test_valid_101_switches(reply: bytes) -> None:
    progress = new_reply().feed(reply + b"\x81\x02hi")
    assert progress.switched
    assert progress.status == 101
    assert progress.forward == reply
    assert progress.leftover == b"\x81\x02hi"


def test_101_for_a_non_websocket_upgrade_needs_no_accept() -> None:
    reply = switch("Upgrade: mqtt", CONNECTION)
    progress = new_reply("mqtt", None).feed(reply)
    assert progress.switched
    assert progress.forward == reply


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        pytest.param(
            switch("Upgrade: h2c", CONNECTION, ACCEPT_LINE),
            "backend switched to Upgrade h2c, not websocket",
            id="wrong-upgrade",
        ),
        pytest.param(
            switch(CONNECTION, ACCEPT_LINE),
            "backend switched to Upgrade none, not websocket",
            id="no-upgrade",
        ),
        pytest.param(
            switch("Upgrade: websocket, h2c", CONNECTION, ACCEPT_LINE),
            "backend switched to Upgrade websocket, h2c",
            id="two-upgrades",
        ),
        pytest.param(
            switch(UPGRADE, ACCEPT_LINE),
            "backend's 101 lacks Connection: Upgrade",
            id="no-connection",
        ),
        pytest.param(
            switch(UPGRADE, "Connection: keep-alive", ACCEPT_LINE),
            "backend's 101 lacks Connection: Upgrade",
            id="connection-without-upgrade",
        ),
        pytest.param(
            switch(UPGRADE, CONNECTION),
            "Sec-WebSocket-Accept does not match the key",
            id="no-accept",
        ),
        pytest.param(
            switch(UPGRADE, CONNECTION, f"Sec-WebSocket-Accept: {websocket_accept('x' * 24)}"),
            "Sec-WebSocket-Accept does not match the key",
            id="wrong-accept",
        ),
        pytest.param(
            switch(UPGRADE, CONNECTION, ACCEPT_LINE, ACCEPT_LINE),
            "Sec-WebSocket-Accept does not match the key",
            id="two-accepts",
        ),
        pytest.param(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade websocket\r\n\r\n",
            "backend sent a malformed reply",
            id="malformed-header",
        ),
        pytest.param(
            b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "backend sent a malformed reply", id="not-http"
        ),
    ],
)
def test_bad_101_is_502(reply: bytes, message: str) -> None:
    with pytest.raises(BadBackendResponse) as caught:
        new_reply().feed(reply)
    assert caught.value.status == 502
    assert message in caught.value.message


# --- non-101 replies are relayed verbatim ----------------------------------------------------

REFUSALS = [
    # (id, bytes up to the end of the message, status, needs EOF to end)
    (
        "403-with-body",
        b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: 9\r\n\r\nforbidden",
        403,
        False,
    ),
    ("404-empty", b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", 404, False),
    (
        "200-chunked",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Odd-CASE: kept\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
        200,
        False,
    ),
    (
        "200-until-close",
        b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n<p>not a websocket server</p>\n",
        200,
        True,
    ),
    (
        "http-1.0-until-close",
        b"HTTP/1.0 400 Bad Request\r\n\r\nno",
        400,
        True,
    ),
    ("204-no-body", b"HTTP/1.1 204 No Content\r\nX-Why: because\r\n\r\n", 204, False),
    (
        "304-with-length",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 100\r\n\r\n",
        304,
        False,
    ),
]


def feed_all(
    reply: BackendReply, pieces: list[bytes]
) -> tuple[bytes, ReplyProgress, list[ReplyProgress]]:
    forwarded = b""
    seen = []
    for piece in pieces:
        progress = reply.feed(piece)
        seen.append(progress)
        forwarded += progress.forward
        if progress.complete:
            break
    return forwarded, progress, seen


def one_read(data: bytes) -> list[bytes]:
    return [data]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


SPLITS = pytest.mark.parametrize("split", [one_read, bytewise], ids=["one-read", "byte-by-byte"])


@SPLITS
@pytest.mark.parametrize(
    ("message", "status", "until_close"),
    [pytest.param(*case[1:], id=case[0]) for case in REFUSALS],
)
def test_refusal_is_forwarded_byte_for_byte(
    message: bytes, status: int, until_close: bool, split: Callable[[bytes], list[bytes]]
) -> None:
    after = b"" if until_close else b"GARBAGE THAT FOLLOWS THE MESSAGE"
    pieces = [*split(message + after), b""] if until_close else split(message + after)
    forwarded, last, seen = feed_all(new_reply(), pieces)
    assert forwarded == message
    assert last.complete
    assert last.status == status
    assert not any(p.switched for p in seen)


def test_refusal_status_is_known_before_the_body() -> None:
    reply = new_reply()
    progress = reply.feed(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 4\r\n\r\nno")
    assert progress.status == 403
    assert not progress.complete
    assert progress.forward == b"HTTP/1.1 403 Forbidden\r\nContent-Length: 4\r\n\r\nno"
    progress = reply.feed(b"pe")
    assert progress.forward == b"pe"
    assert progress.complete


@SPLITS
def test_interim_responses_are_dropped(split: Callable[[bytes], list[bytes]]) -> None:
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
    final = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno"
    forwarded, last, _ = feed_all(new_reply(), split(interim + final))
    assert forwarded == final
    assert last.status == 403
    assert last.complete


def test_interim_response_before_a_101_is_dropped() -> None:
    reply_101 = switch(UPGRADE, CONNECTION, ACCEPT_LINE)
    progress = new_reply().feed(b"HTTP/1.1 100 Continue\r\n\r\n" + reply_101 + b"x")
    assert progress.switched
    assert progress.forward == reply_101
    assert progress.leftover == b"x"


# --- the proxy's own answers -----------------------------------------------------------------

ERRORS = [
    pytest.param(MethodNotAllowed("POST"), [("Allow", "GET")], id="405"),
    pytest.param(
        UpgradeRequired("use websocket", headers=[("Upgrade", "websocket")]),
        [("Upgrade", "websocket")],
        id="426",
    ),
    pytest.param(HeadersTooLarge(32768), [], id="431"),
    pytest.param(UriTooLong(32768), [], id="414"),
    pytest.param(HandshakeError("Sec-WebSocket-Key is missing"), [], id="400"),
    pytest.param(RequestTimeout("the request head did not arrive"), [], id="408"),
    pytest.param(NoRoute("no route for host 'caf\u00e9.example' \U0001f600"), [], id="404-utf8"),
    pytest.param(Overloaded(10, retry_after_seconds=7), [("Retry-After", "7")], id="503-overload"),
    pytest.param(NoHealthyBackend("every backend is down"), [], id="503-backend"),
    pytest.param(BackendUnreachable("backend a refused the connection"), [], id="502"),
    pytest.param(BackendTimeout("backend a did not answer"), [], id="504"),
    pytest.param(BadBackendResponse("backend's 101 lacks Connection: Upgrade"), [], id="502-bad"),
]


def parse_response(data: bytes) -> tuple[h11.Response, bytes]:
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "a")]))
    client.send(h11.EndOfMessage())
    client.receive_data(data)
    response = client.next_event()
    assert isinstance(response, h11.Response)
    body = b""
    while True:
        event = client.next_event()
        if isinstance(event, h11.EndOfMessage):
            break
        assert isinstance(event, h11.Data)
        body += event.data
    client.receive_data(b"")
    assert client.next_event() == h11.ConnectionClosed()
    return response, body


@pytest.mark.parametrize(("error", "extra"), ERRORS)
def test_error_response_is_valid_http(error: TunnelError, extra: list[tuple[str, str]]) -> None:
    response, body = parse_response(error_response(error))
    assert response.status_code == error.status
    assert response.reason.decode() == error.reason
    headers = [(k.decode(), v.decode()) for k, v in response.headers]
    assert ("content-length", str(len(body))) in headers
    assert ("connection", "close") in headers
    assert ("content-type", "text/plain; charset=utf-8") in headers
    for name, value in extra:
        assert (name.lower(), value) in headers
    text = body.decode("utf-8")
    assert text == f"{error.status} {error.reason}: {error.public}\n"


@pytest.mark.parametrize(
    "error",
    [
        BackendUnreachable("backend a (127.0.0.1:9010) refused or unreachable: Connection refused"),
        BackendTimeout("backend a (10.0.0.5:80) did not accept the connection within 5s"),
        BadBackendResponse("backend a (10.0.0.5:80) sent a malformed reply: illegal status line"),
        NoHealthyBackend("every backend of route chat (10.0.0.5:80, 10.0.0.6:80) is down"),
    ],
    ids=["502", "504", "502-bad", "503"],
)
def test_backend_errors_keep_the_backend_out_of_the_body(error: BackendError) -> None:
    """The log names the backend and the socket error; a public client learns neither."""
    _, body = parse_response(error_response(error))
    text = body.decode()
    assert text.startswith(f"{error.status} {error.reason}: the service behind this address")
    for secret in ("backend", "127.0.0.1", "10.0.0.5", "9010", "refused", "chat", "malformed"):
        assert secret not in text
    assert error.message in str(error)


def test_non_backend_errors_say_the_whole_problem_to_the_client() -> None:
    error = HandshakeError("Sec-WebSocket-Key is missing")
    assert error.public == error.message


def test_error_response_body_names_the_problem() -> None:
    _, body = parse_response(error_response(HeadersTooLarge(1024)))
    assert b"431 Request Header Fields Too Large" in body
    assert b"max_header_bytes (1024 bytes)" in body
