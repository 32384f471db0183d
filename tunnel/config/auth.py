"""``[routes.auth]``: the credential a client must show before its upgrade reaches a backend,
and the files and variables that hold what credentials are checked against.

The table keeps names (of files, of an environment variable), never secrets, so ``to_toml`` and
``tunnel check`` can print it; the files and the variable are read and checked when the
configuration is loaded, so a missing key file stops a start or a reload, not the first client.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from tunnel.config.kinds import Choice, Duration, FilePath, Flag, Text, TextList, setting
from tunnel.config.units import MINUTES, SECONDS, format_duration
from tunnel.errors import ConfigError

AUTH_KINDS = ("none", "bearer", "jwt")
MIN_SECRET_BYTES = 32
"""HS256 keys as long as the hash at least (RFC 7518 §3.2)."""
MIN_TOKEN_CHARS = 16
"""Shorter bearer tokens can be guessed over the network."""
MAX_LEEWAY = 5 * MINUTES
DEFAULT_TOKEN_FROM = ("header:Authorization",)

_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
HEADER_NAME = re.compile(_TOKEN)
TOKEN_SOURCE = re.compile(rf"subprotocol|(?:header|query|cookie):{_TOKEN}")
_UNUSABLE_HEADERS = frozenset(
    {
        "host",
        "connection",
        "upgrade",
        "content-length",
        "transfer-encoding",
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
    }
)
"""Headers the upgrade itself needs: they can neither carry a token nor the identity."""
_SET_BY_TUNNEL = frozenset(
    {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-real-ip", "forwarded"}
)
_TOKEN_BYTES = re.compile(rb"[\x21-\x7e\x80-\xff]+")
"""A token is printable and holds no space: it is sent in a header or a query parameter."""


def _source_problem(entry: str) -> str:
    """Why ``entry`` cannot be in ``token_from`` ("" when it can)."""
    if not TOKEN_SOURCE.fullmatch(entry):
        return (
            f"{entry!r} is not header:NAME, query:NAME, cookie:NAME or subprotocol (NAME a "
            "token: letters, digits, !#$%&'*+-.^_`|~)"
        )
    kind, _, name = entry.partition(":")
    if kind != "header":
        return ""
    lower = name.lower()
    if lower == "cookie":
        return f'{entry!r}: to read a cookie, write "cookie:NAME"'
    if lower == "sec-websocket-protocol":
        return f'{entry!r}: to read a subprotocol entry, write "subprotocol"'
    if lower in _UNUSABLE_HEADERS:
        return f"{entry!r}: the upgrade needs this header; it cannot carry a token"
    return ""


def _identity_problem(name: str) -> str:
    lower = name.lower()
    if lower in _UNUSABLE_HEADERS or lower in _SET_BY_TUNNEL or lower.startswith("sec-"):
        return f"{name!r} is a header the upgrade or the tunnel sets; choose another name"
    return ""


@dataclass(frozen=True, slots=True)
class RouteAuth:
    """Who may open a tunnel on the route (``[routes.auth]``), checked after access rules and
    before any backend is contacted; a refusal is a 401 with a ``WWW-Authenticate: Bearer``
    challenge (RFC 6750). nginx does this with ``auth_request`` to a separate service, or
    ``auth_jwt`` (NGINX Plus); Envoy with the ``jwt_authn`` filter; HAProxy with
    ``http-request deny unless { req.hdr(authorization) -m str -f tokens.lst }`` or its
    ``jwt_verify`` converter."""

    kind: str = setting(
        "none",
        Choice(AUTH_KINDS),
        '`"none"`: no credential asked; `"bearer"`: one of the tokens in `tokens_file`; '
        '`"jwt"`: a JSON Web Token signed with the `secret_env` secret (HS256) or the '
        "`public_key`'s private key (RS256, ES256).",
    )
    tokens_file: str = setting(
        "",
        FilePath(),
        'With `kind = "bearer"`: the accepted tokens, one a line (blank lines and `#` comments '
        "skipped, at least 16 characters each); compared as SHA-256 digests in constant time, "
        "read again within `cert_check_interval` of a change. A broken file keeps the previous "
        "tokens and logs an error (HAProxy `-f tokens.lst`).",
    )
    token_from: tuple[str, ...] = setting(
        DEFAULT_TOKEN_FROM,
        TextList(check=_source_problem, least="must name at least one place to read a token"),
        "Where the token is read, tried in order: `header:Authorization` (`Bearer TOKEN`), "
        "another `header:NAME` (its whole value), `query:NAME`, `cookie:NAME`, or "
        "`subprotocol` (an entry of `Sec-WebSocket-Protocol` that is a valid credential, for "
        "browsers, which cannot set headers on a WebSocket). The first place holding a "
        "credential decides; two credentials in one place are refused. The token is removed "
        "from what the backend receives (Envoy `jwt_authn` `from_headers`/`from_params`/"
        "`from_cookies`, `forward: false`).",
    )
    secret_env: str = setting(
        "",
        Text(re.compile(r"[A-Za-z_][A-Za-z0-9_]*"), "is not an environment variable name"),
        'With `kind = "jwt"`: the name of the environment variable holding the HS256 secret '
        "(at least 32 bytes); the secret itself is never written in the file. Exclusive with "
        "`public_key`.",
    )
    public_key: str = setting(
        "",
        FilePath(),
        'With `kind = "jwt"`: a PEM public key (`BEGIN PUBLIC KEY`): RSA of 2048 bits or more '
        "verifies RS256, EC P-256 verifies ES256; no other algorithm is accepted, `none` "
        "never (Envoy `jwt_authn` `local_jwks`, nginx `auth_jwt_key_file`).",
    )
    issuer: str = setting(
        "",
        Text(),
        'With `kind = "jwt"`: the `iss` claim required; `""` = not checked (Envoy `issuer`).',
    )
    audience: str = setting(
        "",
        Text(),
        'With `kind = "jwt"`: a value the `aud` claim (a string or a list) must hold; `""` = '
        "not checked (Envoy `audiences`).",
    )
    leeway: float = setting(
        30 * SECONDS,
        Duration(allow_zero=True),
        'With `kind = "jwt"`: clock difference forgiven when checking `exp`, `nbf` and `iat`, '
        'at most "5m" (Envoy `clock_skew_seconds`, 60 s there; 30 s here, since a token '
        "outlives its `exp` by this much).",
    )
    identity_header: str = setting(
        "X-Auth-Subject",
        Text(HEADER_NAME, "is not a header name", empty=False),
        "Header that tells the backend who the client is: the JWT's `sub`, or `token:` and the "
        "first 16 hex digits of a bearer token's SHA-256 (never the token). Every copy the "
        "client sent is removed, in either spelling (`X_Auth_Subject` too).",
    )
    close_on_expiry: bool = setting(
        False,
        Flag(),
        'With `kind = "jwt"`: `true` closes a tunnel when the `exp` of the token that opened '
        "it passes (Close 1008 to the client, reason `credential_expired`); a token without "
        "`exp` keeps its tunnel open.",
    )

    @classmethod
    def from_keys(cls, values: dict[str, Any], key: str) -> RouteAuth:
        """The keys that belong to one kind only, and the files and variable they name, which
        are read now: ``bearer`` needs ``tokens_file``, ``jwt`` exactly one of ``secret_env``
        and ``public_key``."""
        auth = cls(**values)
        problem = _identity_problem(auth.identity_header)
        if problem:
            raise ConfigError(f"{key}.identity_header", problem)
        _refuse_foreign_keys(auth, key)
        if len(set(auth.token_from)) != len(auth.token_from):
            raise ConfigError(f"{key}.token_from", "names one place twice")
        header = f"header:{auth.identity_header}".lower()
        if any(source.lower() == header for source in auth.token_from):
            raise ConfigError(
                f"{key}.identity_header",
                "is also in token_from; the client would choose its own identity",
            )
        if auth.leeway > MAX_LEEWAY:
            raise ConfigError(
                f"{key}.leeway",
                f"must be at most {format_duration(MAX_LEEWAY)}: an expired token is accepted "
                "for this long",
            )
        if auth.kind == "bearer":
            if not auth.tokens_file:
                raise ConfigError(
                    f"{key}.tokens_file",
                    'kind = "bearer" needs the file of accepted tokens; write tokens_file = '
                    '"tokens.txt"',
                )
            read_tokens_file(auth.tokens_file, f"{key}.tokens_file")
        if auth.kind == "jwt":
            if bool(auth.secret_env) == bool(auth.public_key):
                raise ConfigError(
                    key,
                    'kind = "jwt" needs exactly one of secret_env (HS256) and public_key '
                    "(RS256, ES256)",
                )
            if auth.secret_env:
                read_secret(auth.secret_env, f"{key}.secret_env")
            else:
                read_pem(auth.public_key, f"{key}.public_key")
        return auth


_KIND_OF = {
    "tokens_file": ("bearer",),
    "secret_env": ("jwt",),
    "public_key": ("jwt",),
    "issuer": ("jwt",),
    "audience": ("jwt",),
    "leeway": ("jwt",),
    "close_on_expiry": ("jwt",),
    "token_from": ("bearer", "jwt"),
    "identity_header": ("bearer", "jwt"),
}


def _refuse_foreign_keys(auth: RouteAuth, key: str) -> None:
    """A key written for another kind does nothing, so it is refused rather than ignored."""
    for f in fields(RouteAuth):
        kinds = _KIND_OF.get(f.name)
        if kinds is None or auth.kind in kinds or getattr(auth, f.name) == f.default:
            continue
        wanted = " or ".join(f'"{kind}"' for kind in kinds)
        raise ConfigError(
            f"{key}.{f.name}",
            f'applies to kind = {wanted}, and this route has kind = "{auth.kind}"; remove it '
            f"or set kind = {wanted}",
        )


def read_secret(name: str, key: str, environ: Mapping[str, str] | None = None) -> bytes:
    """The HS256 secret held by environment variable ``name`` (UTF-8). The error names the
    variable, never its value.

    Raises:
        ConfigError: the variable is unset, empty, or shorter than 32 bytes.
    """
    variables = os.environ if environ is None else environ
    value = variables.get(name, "")
    if not value:
        state = "empty" if name in variables else "not set"
        raise ConfigError(
            key, f"environment variable {name} is {state}; export the HS256 secret in it"
        )
    secret = value.encode("utf-8", "surrogateescape")
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(
            key,
            f"the secret in {name} is {len(secret)} bytes; HS256 needs at least "
            f"{MIN_SECRET_BYTES} (RFC 7518 §3.2), e.g. from `openssl rand -base64 48`",
        )
    return secret


PEM_PUBLIC_KEY = re.compile(
    rb"-----BEGIN (RSA )?PUBLIC KEY-----\r?\n[A-Za-z0-9+/=\r\n]+-----END \1?PUBLIC KEY-----"
)


def read_pem(path: str, key: str) -> bytes:
    """The contents of ``path``, a PEM public key by its look (``BEGIN PUBLIC KEY``); what
    kind of key it holds is checked where it is loaded (``net.auth_files.read_public_key``),
    since configuration reading uses the standard library only.

    Raises:
        ConfigError: the file cannot be read or holds no PEM public key.
    """
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from exc
    if not PEM_PUBLIC_KEY.search(data):
        hint = " (a certificate; extract its key with `openssl x509 -pubkey -noout`)"
        raise ConfigError(
            key,
            f"{path} is not a PEM public key (BEGIN PUBLIC KEY)"
            + (hint if b"CERTIFICATE" in data else ""),
        )
    return data


def parse_tokens(data: bytes) -> tuple[bytes, ...]:
    """The SHA-256 digests of the tokens in a tokens file, in file order, each once: one token
    a line, surrounding whitespace stripped, blank lines and ``#`` comments skipped. Messages
    name lines, never a token.

    Raises:
        ValueError: no token, or a line whose token is shorter than 16 characters or holds a
            space or a control character.
    """
    digests: dict[bytes, None] = {}
    for number, line in enumerate(data.splitlines(), 1):
        token = line.strip()
        if not token or token.startswith(b"#"):
            continue
        if not _TOKEN_BYTES.fullmatch(token):
            raise ValueError(f"line {number}: a token cannot hold spaces or control characters")
        if len(token) < MIN_TOKEN_CHARS:
            raise ValueError(
                f"line {number}: a token of {len(token)} characters can be guessed; use at "
                f"least {MIN_TOKEN_CHARS} (`openssl rand -hex 32` makes one)"
            )
        digests[hashlib.sha256(token).digest()] = None
    if not digests:
        raise ValueError("holds no token; write one token a line")
    return tuple(digests)


def read_tokens_file(path: str, key: str) -> tuple[bytes, ...]:
    """``parse_tokens`` of the file ``path``.

    Raises:
        ConfigError: the file cannot be read, or ``parse_tokens`` refuses it.
    """
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from exc
    try:
        return parse_tokens(data)
    except ValueError as exc:
        raise ConfigError(key, f"{path}: {exc}") from exc
