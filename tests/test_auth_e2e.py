"""Auth before the upgrade, over real loopback sockets: the backend sees only requests that
passed, without the credential and with the verified subject; a failure is a 401 with a
Bearer challenge; the token is in no log line; ``close_on_expiry`` ends the tunnel with a
Close 1008 when the JWT expires."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import struct
import time
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from rawhttp import (
    KEY,
    LOOPBACK,
    read_exactly,
    read_head,
    read_to_eof,
    serve_loopback,
    status_of,
    switching,
)

from tunnel import Config, serve
from tunnel.core.wsframes import close_frame
from tunnel.logs import TextFormatter

SECRET = "s3cret-for-the-tests-only-0123456789"
TOKEN = "tok-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
OTHER_TOKEN = "tok-BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB"


def logged(caplog: pytest.LogCaptureFixture) -> str:
    """Every captured line as the operator reads it, fields included."""
    formatter = TextFormatter()
    return "\n".join(formatter.format(record) for record in caplog.records)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def jwt(claims: dict[str, object], alg: str = "HS256", key: object = SECRET) -> str:
    header = b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    payload = b64(json.dumps(claims).encode())
    signing = f"{header}.{payload}".encode("ascii")
    if alg == "HS256":
        assert isinstance(key, str)
        signature = hmac.new(key.encode(), signing, hashlib.sha256).digest()
    elif alg == "RS256":
        assert isinstance(key, rsa.RSAPrivateKey)
        signature = key.sign(signing, padding.PKCS1v15(), hashes.SHA256())
    elif alg == "ES256":
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        r, s = decode_dss_signature(key.sign(signing, ec.ECDSA(hashes.SHA256())))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    else:
        signature = b""
    return f"{header}.{payload}.{b64(signature)}"


class Recorder:
    """A raw WebSocket backend that records every request head it receives, answers 101,
    then echoes bytes until the client closes."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []

    async def __call__(self, stream: trio.SocketStream) -> None:
        try:
            head, rest = await read_head(stream)
        except (EOFError, trio.BrokenResourceError):
            return
        self.heads.append(head)
        key = _field(head, b"sec-websocket-key")
        protocols = _field(head, b"sec-websocket-protocol")
        reply = switching(key.decode())
        if protocols:
            chosen = protocols.split(b",")[0].strip()
            reply = reply[:-2] + b"Sec-WebSocket-Protocol: " + chosen + b"\r\n\r\n"
        try:
            await stream.send_all(reply)
            if rest:
                await stream.send_all(rest)
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


def _field(head: bytes, name: bytes) -> bytes:
    found = b""
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            found = value.strip() if not found else found + b", " + value.strip()
    return found


def config_for(backend_port: int, auth: str, tmp_path: Path) -> Config:
    return Config.from_toml(
        f"""
[server]
close_grace = "1s"
[[listeners]]
listen = "{LOOPBACK}:0"
[[routes]]
name = "api"
backends = [{{ url = "ws://{LOOPBACK}:{backend_port}" }}]
[routes.auth]
{auth}
""",
        base=tmp_path,
    )


async def start(nursery: trio.Nursery, config: Config) -> int:
    listeners: list[trio.SocketListener] = await nursery.start(serve, config)
    port: int = listeners[0].socket.getsockname()[1]
    return port


def request(path: str = "/", *extra: str) -> bytes:
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: api.example",
        "Connection: Upgrade",
        "Upgrade: websocket",
        f"Sec-WebSocket-Key: {KEY}",
        "Sec-WebSocket-Version: 13",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def exchange(port: int, data: bytes) -> tuple[bytes, trio.SocketStream]:
    stream = await trio.open_tcp_stream(LOOPBACK, port)
    await stream.send_all(data)
    with trio.fail_after(10):
        head, _ = await read_head(stream)
    return head, stream


async def refused(port: int, data: bytes) -> bytes:
    stream = await trio.open_tcp_stream(LOOPBACK, port)
    async with stream:
        await stream.send_all(data)
        with trio.fail_after(10):
            return await read_to_eof(stream)


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"# clients\n{TOKEN}\n\n{OTHER_TOKEN}\n")
    return path


async def test_bearer_header_passes_and_the_backend_never_sees_the_token(
    nursery: trio.Nursery, tokens_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="tunnel")
    recorder = Recorder()
    backend = await serve_loopback(nursery, recorder)
    port = await start(
        nursery, config_for(backend, f'kind = "bearer"\ntokens_file = "{tokens_file}"', tmp_path)
    )
    head, stream = await exchange(
        port,
        request(
            "/", f"Authorization: Bearer {TOKEN}", "X-Auth-Subject: admin", "X_Auth_Subject: root"
        ),
    )
    await stream.aclose()
    assert status_of(head) == 101
    (sent,) = recorder.heads
    assert TOKEN.encode() not in sent
    assert b"authorization" not in sent.lower()
    subject = "token:" + hashlib.sha256(TOKEN.encode()).hexdigest()[:16]
    assert _field(sent, b"x-auth-subject") == subject.encode()
    assert b"admin" not in sent
    assert b"root" not in sent
    assert TOKEN not in logged(caplog)


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        ((), None),
        ((f"Authorization: Bearer {TOKEN}x",), "invalid_token"),
        (("Authorization: Bearer ",), "invalid_request"),
        (
            (f"Authorization: Bearer {TOKEN}", f"Authorization: Bearer {OTHER_TOKEN}"),
            "invalid_request",
        ),
    ],
)
async def test_failed_auth_is_401_with_a_bearer_challenge_and_no_backend_contact(
    nursery: trio.Nursery,
    tokens_file: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    extra: tuple[str, ...],
    error: str | None,
) -> None:
    recorder = Recorder()
    backend = await serve_loopback(nursery, recorder)
    port = await start(
        nursery, config_for(backend, f'kind = "bearer"\ntokens_file = "{tokens_file}"', tmp_path)
    )
    answer = await refused(port, request("/", *extra))
    assert status_of(answer) == 401
    challenge = _field(answer, b"www-authenticate")
    assert challenge.startswith(b"Bearer ")
    if error is None:
        assert b"error=" not in challenge
    else:
        assert f'error="{error}"'.encode() in challenge
    assert recorder.heads == []
    assert "rule=auth" in logged(caplog)
    assert TOKEN not in logged(caplog)
    assert OTHER_TOKEN not in logged(caplog)


async def test_query_token_is_dropped_and_other_parameters_kept(
    nursery: trio.Nursery, tokens_file: Path, tmp_path: Path
) -> None:
    recorder = Recorder()
    backend = await serve_loopback(nursery, recorder)
    auth = f'kind = "bearer"\ntokens_file = "{tokens_file}"\ntoken_from = ["query:access_token"]'
    port = await start(nursery, config_for(backend, auth, tmp_path))
    head, stream = await exchange(port, request(f"/chat?room=1&access_token={TOKEN}&x=%20y"))
    await stream.aclose()
    assert status_of(head) == 101
    (sent,) = recorder.heads
    assert sent.startswith(b"GET /chat?room=1&x=%20y HTTP/1.1\r\n")
    assert TOKEN.encode() not in sent


async def test_subprotocol_token_is_dropped_and_the_real_subprotocol_negotiated(
    nursery: trio.Nursery, tokens_file: Path, tmp_path: Path
) -> None:
    recorder = Recorder()
    backend = await serve_loopback(nursery, recorder)
    auth = (
        f'kind = "bearer"\ntokens_file = "{tokens_file}"\n'
        'token_from = ["header:Authorization", "subprotocol"]'
    )
    port = await start(nursery, config_for(backend, auth, tmp_path))
    head, stream = await exchange(port, request("/", f"Sec-WebSocket-Protocol: {TOKEN}, chat.v2"))
    await stream.aclose()
    assert status_of(head) == 101
    assert _field(head, b"sec-websocket-protocol") == b"chat.v2"
    (sent,) = recorder.heads
    assert _field(sent, b"sec-websocket-protocol") == b"chat.v2"
    assert TOKEN.encode() not in sent


async def test_cookie_token_is_dropped_and_other_cookies_kept(
    nursery: trio.Nursery, tokens_file: Path, tmp_path: Path
) -> None:
    recorder = Recorder()
    backend = await serve_loopback(nursery, recorder)
    auth = f'kind = "bearer"\ntokens_file = "{tokens_file}"\ntoken_from = ["cookie:session"]'
    port = await start(nursery, config_for(backend, auth, tmp_path))
    head, stream = await exchange(port, request("/", f"Cookie: theme=dark; session={TOKEN}; a=b"))
    await stream.aclose()
    assert status_of(head) == 101
    (sent,) = recorder.heads
    assert _field(sent, b"cookie") == b"theme=dark; a=b"


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def write_public(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


@pytest.mark.parametrize("alg", ["HS256", "RS256", "ES256"])
async def test_jwt_of_each_algorithm_passes_and_its_failures_are_401(
    nursery: trio.Nursery,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    alg: str,
) -> None:
    recorder = Recorder()
    backend = await serve_loopback(nursery, recorder)
    key: object = SECRET
    if alg == "HS256":
        monkeypatch.setenv("TUNNEL_TEST_SECRET", SECRET)
        auth = 'kind = "jwt"\nsecret_env = "TUNNEL_TEST_SECRET"'
    else:
        key = rsa_key() if alg == "RS256" else ec_key()
        assert isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
        write_public(key, tmp_path / "jwt.pem")
        auth = 'kind = "jwt"\npublic_key = "jwt.pem"'
    auth += '\nissuer = "https://issuer.example"\naudience = "chat"'
    port = await start(nursery, config_for(backend, auth, tmp_path))
    now = int(time.time())
    good = {"sub": "user-42", "iss": "https://issuer.example", "aud": "chat", "exp": now + 600}
    head, stream = await exchange(
        port, request("/", f"Authorization: Bearer {jwt(good, alg, key)}")
    )
    await stream.aclose()
    assert status_of(head) == 101
    assert _field(recorder.heads[0], b"x-auth-subject") == b"user-42"
    bad_claims = [
        {**good, "exp": now - 3600},
        {**good, "nbf": now + 3600},
        {**good, "aud": "other"},
        {**good, "iss": "https://evil.example"},
    ]
    tokens = [jwt(claims, alg, key) for claims in bad_claims]
    tokens.append(jwt(good, "none"))
    tokens.append(jwt(good, alg, key)[:-4] + "AAAA")
    for token in tokens:
        answer = await refused(port, request("/", f"Authorization: Bearer {token}"))
        assert status_of(answer) == 401, token
        assert b'error="invalid_token"' in _field(answer, b"www-authenticate")
        assert token not in logged(caplog)
    assert len(recorder.heads) == 1


async def test_hs256_signed_with_the_public_key_is_refused(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The classic algorithm confusion: the RSA public key's PEM used as an HMAC secret."""
    recorder = Recorder()
    backend = await serve_loopback(nursery, recorder)
    key = rsa_key()
    write_public(key, tmp_path / "jwt.pem")
    port = await start(
        nursery, config_for(backend, 'kind = "jwt"\npublic_key = "jwt.pem"', tmp_path)
    )
    forged = jwt(
        {"sub": "admin", "exp": int(time.time()) + 600},
        "HS256",
        (tmp_path / "jwt.pem").read_text(),
    )
    answer = await refused(port, request("/", f"Authorization: Bearer {forged}"))
    assert status_of(answer) == 401
    assert recorder.heads == []


async def read_frame(stream: trio.SocketStream) -> tuple[int, bytes]:
    """One unmasked frame from the tunnel: (opcode, payload)."""
    first = await read_exactly(stream, 2)
    length = first[1] & 0x7F
    extra = b""
    if length == 126:
        extra = await read_exactly(stream, 2)
        length = struct.unpack("!H", extra)[0]
    payload = await read_exactly(stream, length) if length else b""
    return first[0] & 0x0F, payload


async def test_close_on_expiry_ends_the_tunnel_with_close_1008(
    nursery: trio.Nursery,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tunnel")
    monkeypatch.setenv("TUNNEL_TEST_SECRET", SECRET)
    recorder = Recorder()
    backend = await serve_loopback(nursery, recorder)
    auth = 'kind = "jwt"\nsecret_env = "TUNNEL_TEST_SECRET"\nclose_on_expiry = true\nleeway = "0s"'
    port = await start(nursery, config_for(backend, auth, tmp_path))
    # Seconds-resolution exp: +3 leaves at least 2 s for the upgrade on a loaded machine.
    token = jwt({"sub": "short-lived", "exp": int(time.time()) + 3})
    head, stream = await exchange(port, request("/", f"Authorization: Bearer {token}"))
    assert status_of(head) == 101
    with trio.fail_after(15):
        opcode, payload = await read_frame(stream)
    assert opcode == 0x8
    assert struct.unpack("!H", payload[:2])[0] == 1008
    assert b"credential_expired" in payload
    await stream.send_all(close_frame("bye", b"\x01\x02\x03\x04", code=1000))
    with trio.fail_after(10):
        await read_to_eof(stream)
    await stream.aclose()
    with trio.fail_after(10):
        while "reason=credential_expired" not in logged(caplog):
            await trio.sleep(0.05)
    assert token not in logged(caplog)


async def test_without_close_on_expiry_the_tunnel_outlives_its_token(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TUNNEL_TEST_SECRET", SECRET)
    backend = await serve_loopback(nursery, Recorder())
    port = await start(
        nursery,
        config_for(
            backend, 'kind = "jwt"\nsecret_env = "TUNNEL_TEST_SECRET"\nleeway = "0s"', tmp_path
        ),
    )
    # Seconds-resolution exp: +3 leaves at least 2 s for the upgrade on a loaded machine.
    exp = int(time.time()) + 3
    token = jwt({"sub": "u", "exp": exp})
    head, stream = await exchange(port, request("/", f"Authorization: Bearer {token}"))
    assert status_of(head) == 101
    await trio.sleep(max(0.0, exp - time.time()) + 0.5)  # the token has now expired
    await stream.send_all(b"\x82\x80abcd")  # an empty masked binary frame, echoed raw
    with trio.fail_after(10):
        assert await read_exactly(stream, 6) == b"\x82\x80abcd"
    await stream.aclose()
