"""``[routes.auth]`` (``config.auth.RouteAuth``) read from TOML data, the files and variable it
names, and the tokens file kept current (``net.auth_files``)."""

from __future__ import annotations

import hashlib
import logging
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from tests.test_jwt import ec_key, rsa_key
from tunnel.config import Config
from tunnel.config.auth import RouteAuth, parse_tokens
from tunnel.config.kinds import Context
from tunnel.config.tables import dump_table, parse_table, render_table
from tunnel.errors import ConfigError
from tunnel.logs import LOGGER_NAME
from tunnel.net.auth_files import TokenFile, auth_rules, check_auth
from tunnel.policy.auth import BearerTokens, JwtVerifier

KEY = "routes[0].auth"
TOKEN_A = "token-a-0123456789abcdef"
TOKEN_B = "token-b-0123456789abcdef"
SECRET = "x" * 40


def parse(raw: dict[str, Any], base: Path | None = None) -> RouteAuth:
    auth: RouteAuth = parse_table(RouteAuth, raw, KEY, Context(base))
    return auth


def problem(raw: dict[str, Any], base: Path | None = None) -> tuple[str, str]:
    with pytest.raises(ConfigError) as caught:
        parse(raw, base)
    return caught.value.key, caught.value.problem


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def pem(public: Any) -> bytes:
    data: bytes = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens.txt"
    path.write_text(f"# clients\n\n  {TOKEN_A}  \n{TOKEN_B}\n{TOKEN_A}\n")
    return path


def test_off_by_default() -> None:
    assert parse({}) == RouteAuth()
    assert RouteAuth().kind == "none"
    assert RouteAuth().token_from == ("header:Authorization",)
    assert RouteAuth().identity_header == "X-Auth-Subject"
    assert RouteAuth().leeway == 30.0


def test_bearer_reads_its_file_relative_to_the_config(tokens_file: Path) -> None:
    auth = parse({"kind": "bearer", "tokens_file": "tokens.txt"}, tokens_file.parent)
    assert auth.tokens_file == str(tokens_file)
    rules = auth_rules(auth)
    assert isinstance(rules.verifier, BearerTokens)
    assert rules.verifier.source.tokens == (digest(TOKEN_A), digest(TOKEN_B))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "holds no token; write one token a line"),
        (b"# only a comment\n\n", "holds no token"),
        (b"token-long-enough-0001\nshort\n", "line 2: a token of 5 characters can be guessed"),
        (b"token with spaces inside\n", "line 1: a token cannot hold spaces"),
        (b"token-with-a-\x01control\n", "line 1: a token cannot hold spaces or control"),
    ],
)
def test_a_broken_tokens_file_refused(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / "t.txt").write_bytes(content)
    key, text = problem({"kind": "bearer", "tokens_file": "t.txt"}, tmp_path)
    assert key == f"{KEY}.tokens_file"
    assert message in text
    assert "short\n" not in text


def test_tokens_parsed_stripped_deduplicated_in_order() -> None:
    data = f"\r\n{TOKEN_B}\r\n\t{TOKEN_A}\n#{TOKEN_B}\n{TOKEN_B}".encode()
    assert parse_tokens(data) == (digest(TOKEN_B), digest(TOKEN_A))


def test_bearer_needs_a_readable_tokens_file(tmp_path: Path) -> None:
    assert problem({"kind": "bearer"}) == (
        f"{KEY}.tokens_file",
        'kind = "bearer" needs the file of accepted tokens; write tokens_file = "tokens.txt"',
    )
    _, text = problem({"kind": "bearer", "tokens_file": "nope.txt"}, tmp_path)
    assert text == f"cannot read {tmp_path / 'nope.txt'}: No such file or directory"


def test_jwt_secret_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNNEL_TEST_SECRET", SECRET)
    auth = parse({"kind": "jwt", "secret_env": "TUNNEL_TEST_SECRET"})
    rules = auth_rules(auth)
    assert isinstance(rules.verifier, JwtVerifier)
    assert (rules.verifier.alg, rules.verifier.key) == ("HS256", SECRET.encode())
    assert SECRET not in repr(auth)
    assert SECRET not in str(dump_table(auth))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, "environment variable TUNNEL_TEST_SECRET is not set; export the HS256 secret"),
        ("", "environment variable TUNNEL_TEST_SECRET is empty"),
        ("short-secret", "the secret in TUNNEL_TEST_SECRET is 12 bytes; HS256 needs at least 32"),
    ],
)
def test_jwt_secret_missing_or_weak_refused(
    monkeypatch: pytest.MonkeyPatch, value: str | None, message: str
) -> None:
    if value is None:
        monkeypatch.delenv("TUNNEL_TEST_SECRET", raising=False)
    else:
        monkeypatch.setenv("TUNNEL_TEST_SECRET", value)
    key, text = problem({"kind": "jwt", "secret_env": "TUNNEL_TEST_SECRET"})
    assert key == f"{KEY}.secret_env"
    assert text.startswith(message)
    if value:
        assert value not in text


def test_secret_env_must_be_a_variable_name() -> None:
    assert problem({"kind": "jwt", "secret_env": "MY-SECRET"})[1] == (
        "'MY-SECRET' is not an environment variable name"
    )


@pytest.mark.parametrize(("make", "alg"), [(rsa_key, "RS256"), (ec_key, "ES256")])
def test_jwt_public_keys(tmp_path: Path, make: Any, alg: str) -> None:
    (tmp_path / "key.pem").write_bytes(pem(make().public_key()))
    auth = parse({"kind": "jwt", "public_key": "key.pem", "issuer": "i", "audience": "a"}, tmp_path)
    verifier = auth_rules(auth).verifier
    assert isinstance(verifier, JwtVerifier)
    assert (verifier.alg, verifier.issuer, verifier.audience) == (alg, "i", "a")


def _certificate() -> bytes:
    key = ec_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (lambda: b"not a key", "is not a PEM public key (BEGIN PUBLIC KEY)"),
        (lambda: b"-----BEGIN PUBLIC KEY-----\nAAAA\n", "is not a PEM public key"),
        (_certificate, "extract its key with `openssl x509 -pubkey -noout`"),
    ],
)
def test_files_that_are_no_public_key_refused_at_load(
    tmp_path: Path, content: Any, message: str
) -> None:
    (tmp_path / "key.pem").write_bytes(content())
    key, text = problem({"kind": "jwt", "public_key": "key.pem"}, tmp_path)
    assert key == f"{KEY}.public_key"
    assert message in text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (lambda: pem(rsa.generate_private_key(65537, 1024).public_key()), "1024 bits is too weak"),
        (lambda: pem(ec.generate_private_key(ec.SECP384R1()).public_key()), "only RSA (RS256)"),
        (lambda: pem(ed25519.Ed25519PrivateKey.generate().public_key()), "only RSA (RS256)"),
        (
            lambda: b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
            "is not a PEM public key",
        ),
    ],
)
def test_unusable_public_keys_refused_when_loaded(
    tmp_path: Path, content: Any, message: str
) -> None:
    """Reading the configuration uses the standard library only; the key's kind is checked
    where it is loaded, at start, reload and ``tunnel check`` (``check_auth``)."""
    (tmp_path / "key.pem").write_bytes(content())
    auth = parse({"kind": "jwt", "public_key": "key.pem"}, tmp_path)
    with pytest.raises(ConfigError) as caught:
        auth_rules(auth, key="routes[3].auth")
    assert caught.value.key == "routes[3].auth.public_key"
    assert message in caught.value.problem
    config = Config.from_mapping(
        {
            "listeners": [{"listen": "127.0.0.1:0"}],
            "routes": [
                {"backends": [{"url": "ws://127.0.0.1:9"}]},
                {
                    "backends": [{"url": "ws://127.0.0.1:9"}],
                    "auth": {"kind": "jwt", "public_key": str(tmp_path / "key.pem")},
                },
            ],
        }
    )
    with pytest.raises(ConfigError) as caught:
        check_auth(config)
    assert caught.value.key == "routes[1].auth.public_key"


def test_check_auth_passes_good_routes(tokens_file: Path) -> None:
    route = {"backends": [{"url": "ws://127.0.0.1:9"}]}
    auth = {"kind": "bearer", "tokens_file": str(tokens_file)}
    config = Config.from_mapping(
        {"listeners": [{"listen": "127.0.0.1:0"}], "routes": [route, {**route, "auth": auth}]}
    )
    check_auth(config)


def test_a_missing_public_key_file_refused(tmp_path: Path) -> None:
    text = problem({"kind": "jwt", "public_key": "gone.pem"}, tmp_path)[1]
    assert text.startswith("cannot read ")


@pytest.mark.parametrize("extra", [{}, {"secret_env": "S", "public_key": "k.pem"}])
def test_jwt_needs_exactly_one_key(extra: dict[str, str]) -> None:
    assert problem({"kind": "jwt", **extra}) == (
        KEY,
        'kind = "jwt" needs exactly one of secret_env (HS256) and public_key (RS256, ES256)',
    )


@pytest.mark.parametrize(
    ("raw", "key", "message"),
    [
        ({"issuer": "i"}, "issuer", 'applies to kind = "jwt", and this route has kind = "none"'),
        ({"token_from": ["subprotocol"]}, "token_from", 'kind = "bearer" or "jwt"'),
        ({"kind": "bearer", "tokens_file": "t", "secret_env": "S"}, "secret_env", '"bearer"'),
        ({"kind": "bearer", "tokens_file": "t", "leeway": "1s"}, "leeway", "remove it or set"),
        ({"kind": "jwt", "secret_env": "S", "tokens_file": "t"}, "tokens_file", '"bearer"'),
        ({"close_on_expiry": True}, "close_on_expiry", 'set kind = "jwt"'),
    ],
)
def test_keys_of_another_kind_refused(raw: dict[str, Any], key: str, message: str) -> None:
    where, text = problem(raw)
    assert where == f"{KEY}.{key}"
    assert message in text


@pytest.mark.parametrize(
    ("token_from", "message"),
    [
        ([], "must name at least one place to read a token"),
        (["header"], "is not header:NAME, query:NAME, cookie:NAME or subprotocol"),
        (["query:a b"], "is not header:NAME"),
        (["path:x"], "is not header:NAME"),
        (["Subprotocol"], "is not header:NAME"),
        (["header:Cookie"], 'to read a cookie, write "cookie:NAME"'),
        (["header:sec-websocket-protocol"], 'write "subprotocol"'),
        (["header:Host"], "the upgrade needs this header"),
        (["header:Sec-WebSocket-Key"], "the upgrade needs this header"),
        (["subprotocol", "subprotocol"], "names one place twice"),
        (["header:X-Auth-Subject"], "is also in token_from"),
    ],
)
def test_token_from_checked(
    monkeypatch: pytest.MonkeyPatch, token_from: list[str], message: str
) -> None:
    monkeypatch.setenv("S", SECRET)
    text = problem({"kind": "jwt", "secret_env": "S", "token_from": token_from})[1]
    assert message in text


def test_every_kind_of_source_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("S", SECRET)
    sources = [
        "header:Authorization",
        "header:X-Api-Key",
        "query:access_token",
        "cookie:t",
        "subprotocol",
    ]
    auth = parse({"kind": "jwt", "secret_env": "S", "token_from": sources})
    assert auth.token_from == tuple(sources)
    assert [str(s) for s in auth_rules(auth).sources] == [
        "Authorization (Bearer)",
        "header x-api-key",
        "query access_token",
        "cookie t",
        "Sec-WebSocket-Protocol",
    ]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("X Auth", "is not a header name"),
        ("", "is not a header name"),
        ("Host", "a header the upgrade or the tunnel sets"),
        ("X-Forwarded-For", "a header the upgrade or the tunnel sets"),
        ("Sec-Anything", "a header the upgrade or the tunnel sets"),
    ],
)
def test_identity_header_checked(name: str, message: str) -> None:
    where, text = problem({"identity_header": name})
    assert where == f"{KEY}.identity_header"
    assert message in text


def test_leeway_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("S", SECRET)
    jwt = {"kind": "jwt", "secret_env": "S"}
    assert parse({**jwt, "leeway": "0s"}).leeway == 0
    assert parse({**jwt, "leeway": "5m"}).leeway == 300
    assert problem({**jwt, "leeway": "6m"}) == (
        f"{KEY}.leeway",
        "must be at most 5m: an expired token is accepted for this long",
    )


def test_written_back_as_it_was_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("S", SECRET)
    (tmp_path / "k.pem").write_bytes(pem(ec_key().public_key()))
    raw = {
        "kind": "jwt",
        "public_key": str(tmp_path / "k.pem"),
        "token_from": ["query:t", "subprotocol"],
        "issuer": "https://id",
        "audience": "api",
        "leeway": "10s",
        "identity_header": "X-User",
        "close_on_expiry": True,
    }
    auth = parse(raw)
    assert parse(dump_table(auth)) == auth
    lines = render_table(auth, "routes.auth")
    assert 'kind = "jwt"' in lines
    assert 'leeway = "10s"' in lines


# The tokens file while the server runs.


def write(path: Path, content: str, mtime: int) -> None:
    """Write ``content`` with a distinct mtime: the check compares stamps, and two writes in
    one clock tick of the file system could share one."""
    path.write_text(content)
    os.utime(path, ns=(mtime, mtime))


def records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER_NAME and r.levelno == level]


def test_reload_takes_a_changed_file_and_keeps_the_old_set_when_broken(
    tokens_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOGGER_NAME)
    tokens = TokenFile.load(str(tokens_file))
    assert tokens.tokens == (digest(TOKEN_A), digest(TOKEN_B))
    assert tokens.reload() is False
    write(tokens_file, f"{TOKEN_B}\n", 1_000_000_000)
    assert tokens.reload() is True
    assert tokens.tokens == (digest(TOKEN_B),)
    [info] = records(caplog, logging.INFO)
    assert info.getMessage() == "tokens file reloaded; new upgrades are checked against it"
    assert info.__dict__["fields"] == {"file": str(tokens_file), "tokens": 1}
    write(tokens_file, "short\n", 2_000_000_000)
    assert tokens.reload() is False
    assert tokens.reload() is False
    assert tokens.tokens == (digest(TOKEN_B),)
    [error] = records(caplog, logging.ERROR)
    assert error.getMessage() == "tokens file not reloaded; the previous tokens stay in use"
    assert error.__dict__["fields"]["file"] == str(tokens_file)
    assert "line 1: a token of 5 characters" in error.__dict__["fields"]["error"]
    assert "fix the file" in error.__dict__["fields"]["error"]
    write(tokens_file, f"{TOKEN_A}\n", 3_000_000_000)
    assert tokens.reload() is True
    assert tokens.tokens == (digest(TOKEN_A),)
    for record in caplog.records:
        assert TOKEN_A not in record.getMessage() + str(record.__dict__.get("fields"))


def test_a_file_removed_or_renamed_over(
    tokens_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tokens = TokenFile.load(str(tokens_file))
    tokens_file.unlink()
    assert tokens.reload() is False
    assert tokens.reload() is False
    [error] = records(caplog, logging.ERROR)
    assert "cannot read the file: No such file or directory" in error.__dict__["fields"]["error"]
    assert tokens.tokens == (digest(TOKEN_A), digest(TOKEN_B))
    replacement = tokens_file.with_suffix(".new")
    replacement.write_text(f"{TOKEN_B}\n")
    replacement.rename(tokens_file)
    assert tokens.reload() is True
    assert tokens.tokens == (digest(TOKEN_B),)


def test_load_refuses_a_broken_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        TokenFile.load(str(tmp_path / "none"), "routes[1].auth.tokens_file")
    (tmp_path / "empty").write_text("")
    with pytest.raises(ConfigError, match="holds no token") as caught:
        TokenFile.load(str(tmp_path / "empty"), "routes[1].auth.tokens_file")
    assert caught.value.key == "routes[1].auth.tokens_file"


async def test_watch_reloads_within_the_interval(
    tokens_file: Path, mock_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # Jump only when every task has waited 10 ms of real time, so that the watcher's read in a
    # thread is done before the next interval passes.
    mock_clock.autojump_threshold = 0.01
    interval = 5.0
    tokens = TokenFile.load(str(tokens_file))
    async with trio.open_nursery() as nursery:
        await nursery.start(tokens.watch, interval)
        changed_at = trio.current_time()
        write(tokens_file, f"{TOKEN_B}\n", 1_000_000_000)
        with trio.fail_after(20 * interval):
            while tokens.tokens != (digest(TOKEN_B),):
                await trio.sleep(interval / 10)
        assert trio.current_time() - changed_at <= 2 * interval
        write(tokens_file, "# emptied by mistake\n", 2_000_000_000)
        with trio.fail_after(20 * interval):
            while not records(caplog, logging.ERROR):
                await trio.sleep(interval / 10)
        await trio.sleep(3 * interval)
        assert len(records(caplog, logging.ERROR)) == 1
        assert tokens.tokens == (digest(TOKEN_B),)
        nursery.cancel_scope.cancel()


async def test_watch_off_with_a_zero_interval(
    tokens_file: Path, autojump_clock: trio.testing.MockClock
) -> None:
    tokens = TokenFile.load(str(tokens_file))
    async with trio.open_nursery() as nursery:
        await nursery.start(tokens.watch, 0)
        write(tokens_file, f"{TOKEN_B}\n", 1_000_000_000)
        await trio.sleep(3600)
        assert tokens.tokens == (digest(TOKEN_A), digest(TOKEN_B))
        nursery.cancel_scope.cancel()


def test_auth_rules_takes_a_loaded_tokens_file(tokens_file: Path) -> None:
    loaded = TokenFile.load(str(tokens_file))
    rules = auth_rules(RouteAuth(kind="bearer", tokens_file="elsewhere"), loaded)
    assert isinstance(rules.verifier, BearerTokens)
    assert rules.verifier.source is loaded
    with pytest.raises(ConfigError, match="public_key: cannot read"):
        auth_rules(RouteAuth(kind="jwt", public_key=str(tokens_file.parent / "none.pem")))
