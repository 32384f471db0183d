"""Auth before the upgrade (``[routes.auth]``): find the client's credential, verify it, and
give back the request without it, so the backend never sees a token.

Pure: the time comes in as ``now`` (unix seconds), keys and token digests come in built
(``tunnel.net.auth_files`` reads the files and the environment). Every refusal is an
``Unauthorized`` whose message says what failed for the log and never holds the token.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote_to_bytes

import h11
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from tunnel.config.auth import MIN_TOKEN_CHARS
from tunnel.core.handshake import UpgradeRequest
from tunnel.core.hashkey import cookie_pairs
from tunnel.errors import Unauthorized

if TYPE_CHECKING:
    from tunnel.config.auth import RouteAuth

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey
MAX_TOKEN = 8 * 1024
"""Longer credentials are refused unread: no honest JWT is this large."""
MAX_SUBPROTOCOL_TRIES = 4
"""Plausible ``Sec-WebSocket-Protocol`` entries verified at most per request, so a head full of
entries cannot buy thousands of signature checks."""
MAX_SUBJECT = 256
SUBJECT_PREFIX = "token:"

_B64URL = re.compile(rb"[A-Za-z0-9_-]*")
_SUBJECT = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")
"""A subject is sent in a header: printable ASCII, no space at either end."""
_AUTHORIZATION = b"authorization"
_COOKIE = b"cookie"
_SUBPROTOCOL = b"sec-websocket-protocol"


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a verified credential names: ``subject`` goes to the backend in
    ``identity_header``; ``expires_at`` (unix time) ends the tunnel with ``close_on_expiry``."""

    subject: str
    expires_at: float | None = None


class TokenSource(Protocol):
    """The current bearer tokens as SHA-256 digests (``tunnel.net.auth_files.TokenFile``),
    read at each check so that a reloaded file applies to the next upgrade."""

    @property
    def tokens(self) -> Sequence[bytes]: ...


@dataclass(frozen=True, slots=True)
class BearerTokens:
    """``kind = "bearer"``: a token is accepted when its SHA-256 digest is one of the file's.

    The digest of the presented token is compared with ``hmac.compare_digest`` against every
    stored digest, with no early exit, so the time taken depends on the number of tokens only,
    never on how much of a stored digest a guess matches. A ``dict`` keyed by digest would be
    faster but is not constant-time: the probe sequence depends on the stored digests' hashes
    and the final comparison stops at the first differing byte, so timing could leak a prefix
    of a stored digest, and a digest lets a weak token be brute-forced offline. The cost is
    about 0.25 µs a token (250 µs an upgrade for a file of 1,000 tokens; JWTs suit more
    clients: 60-350 µs whatever their number).
    """

    source: TokenSource

    def plausible(self, token: bytes) -> bool:
        return MIN_TOKEN_CHARS <= len(token) <= MAX_TOKEN

    def verify(self, token: bytes, now: float) -> Identity:
        if len(token) > MAX_TOKEN:
            raise Unauthorized(f"token of {len(token)} bytes is longer than {MAX_TOKEN}")
        digest = hashlib.sha256(token).digest()
        found = False
        for known in self.source.tokens:
            found |= hmac.compare_digest(known, digest)
        if not found:
            raise Unauthorized(
                f"token {SUBJECT_PREFIX}{digest.hex()[:16]} is not in the tokens file"
            )
        return Identity(SUBJECT_PREFIX + digest.hex()[:16])


@dataclass(frozen=True, slots=True)
class JwtVerifier:
    """``kind = "jwt"``: a compact JWS whose ``alg`` is the one ``key`` allows: HS256 for a
    secret, RS256 for an RSA key, ES256 for a P-256 key. ``none``, any other algorithm (HS256
    offered to a public key is the classic confusion attack: the public key would be used as
    an HMAC secret), a ``crit`` header, duplicate JSON members and non-canonical base64 are
    refused.

    Claims: ``sub`` is required (a string of printable ASCII, at most 256 characters: it is the
    identity, sent in a header); ``exp`` is optional but enforced when present (a token without
    it lives until the key changes); ``nbf`` and ``iat`` (not in the future) when present;
    ``iss`` equal to ``issuer`` and ``aud`` (a string or a list) holding ``audience`` when those
    are configured. ``exp``, ``nbf`` and ``iat`` are forgiven ``leeway`` seconds of clock skew.

    Not checked: ``typ``, ``kid``, ``jti`` (no replay cache), and the header's ``jku``, ``jwk``
    and ``x5u``, which are never followed: the key is the configured one only.
    """

    alg: str
    key: bytes | PublicKey
    issuer: str = ""
    audience: str = ""
    leeway: float = 0.0

    @classmethod
    def for_key(
        cls, key: bytes | PublicKey, *, issuer: str = "", audience: str = "", leeway: float = 0.0
    ) -> JwtVerifier:
        """A verifier for an HS256 secret (bytes), an RSA or an EC P-256 public key.

        Raises:
            ValueError: another kind of key, or an empty secret.
        """
        if isinstance(key, bytes):
            if not key:
                raise ValueError("an HS256 secret cannot be empty")
            alg = "HS256"
        elif isinstance(key, rsa.RSAPublicKey):
            alg = "RS256"
        elif isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
            alg = "ES256"
        else:
            raise ValueError("JWTs are verified with an HS256 secret, an RSA or a P-256 key")
        return cls(alg, key, issuer, audience, leeway)

    def plausible(self, token: bytes) -> bool:
        return token.count(b".") == 2 and len(token) <= MAX_TOKEN

    def verify(self, token: bytes, now: float) -> Identity:
        if len(token) > MAX_TOKEN:
            raise Unauthorized(f"JWT of {len(token)} bytes is longer than {MAX_TOKEN}")
        parts = token.split(b".")
        if len(parts) != 3:
            raise Unauthorized("not a JWT: a compact JWS has three parts separated by dots")
        header = _json_object(_b64decode(parts[0], "header"), "header")
        alg = header.get("alg")
        if alg != self.alg:
            raise Unauthorized(
                f"JWT alg {_shown(alg)} is not accepted; this route takes {self.alg}"
            )
        if "crit" in header:
            raise Unauthorized("JWT header has crit: no extension is understood here")
        signature = _b64decode(parts[2], "signature")
        if not self._signed(parts[0] + b"." + parts[1], signature):
            raise Unauthorized("JWT signature does not verify")
        claims = _json_object(_b64decode(parts[1], "payload"), "payload")
        return self._identity(claims, now)

    def _signed(self, message: bytes, signature: bytes) -> bool:
        key = self.key
        try:
            if isinstance(key, bytes):
                expected = hmac.new(key, message, hashlib.sha256).digest()
                return hmac.compare_digest(expected, signature)
            if isinstance(key, rsa.RSAPublicKey):
                key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
                return True
            if len(signature) != 64:
                return False
            r = int.from_bytes(signature[:32], "big")
            s = int.from_bytes(signature[32:], "big")
            key.verify(encode_dss_signature(r, s), message, ec.ECDSA(hashes.SHA256()))
            return True
        except (InvalidSignature, ValueError):
            return False

    def _identity(self, claims: dict[str, Any], now: float) -> Identity:
        leeway = self.leeway
        exp = _time_claim(claims, "exp")
        if exp is not None and now >= exp + leeway:
            raise Unauthorized(f"token expired at {_when(exp)}")
        nbf = _time_claim(claims, "nbf")
        if nbf is not None and now + leeway < nbf:
            raise Unauthorized(f"token not valid before {_when(nbf)}")
        iat = _time_claim(claims, "iat")
        if iat is not None and now + leeway < iat:
            raise Unauthorized(f"token issued in the future, at {_when(iat)}")
        if self.issuer and claims.get("iss") != self.issuer:
            if "iss" not in claims:
                raise Unauthorized(f"token has no iss; issuer {self.issuer!r} is required")
            raise Unauthorized(f"issuer {_shown(claims['iss'])} not accepted")
        if self.audience:
            _check_audience(claims, self.audience)
        subject = claims.get("sub")
        if subject is None:
            raise Unauthorized("token has no sub: the identity is required")
        if not isinstance(subject, str) or len(subject) > MAX_SUBJECT:
            raise Unauthorized(f"sub must be a string of at most {MAX_SUBJECT} characters")
        if not _SUBJECT.fullmatch(subject):
            raise Unauthorized(
                f"sub {_shown(subject)} cannot be sent in a header: printable ASCII only"
            )
        return Identity(subject, exp)


def _check_audience(claims: dict[str, Any], audience: str) -> None:
    aud = claims.get("aud")
    if aud is None:
        raise Unauthorized(f"token has no aud; audience {audience!r} is required")
    if isinstance(aud, str):
        accepted = aud == audience
    elif isinstance(aud, list) and all(isinstance(item, str) for item in aud):
        accepted = audience in aud
    else:
        raise Unauthorized("aud must be a string or a list of strings")
    if not accepted:
        raise Unauthorized(f"audience {_shown(aud)} not accepted")


def _time_claim(claims: dict[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise Unauthorized(f"{name} must be a number of seconds since 1970")
    return float(value)


def _when(seconds: float) -> str:
    """``2026-12-04T03:10:00Z``, or the number when no date has it."""
    try:
        return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return f"{seconds:g}"


def _shown(value: object) -> str:
    """A claim value for a log message: quoted with escapes, cut short."""
    text = repr(value)
    return text if len(text) <= 64 else text[:61] + "..."


def _b64decode(part: bytes, what: str) -> bytes:
    """base64url without padding, in its one canonical spelling."""
    if not _B64URL.fullmatch(part) or len(part) % 4 == 1:
        raise Unauthorized(f"JWT {what} is not base64url")
    raw = base64.urlsafe_b64decode(part + b"=" * (-len(part) % 4))  # cannot fail now
    if base64.urlsafe_b64encode(raw).rstrip(b"=") != part:
        raise Unauthorized(f"JWT {what} is not canonical base64url")
    return raw


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    members = dict(pairs)
    if len(members) != len(pairs):
        raise ValueError("duplicate member")
    return members


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(raw, object_pairs_hook=_unique_members, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise Unauthorized(f"JWT {what} is not a JSON object without duplicates") from exc
    if not isinstance(value, dict):
        raise Unauthorized(f"JWT {what} is not a JSON object")
    return value


Verifier = BearerTokens | JwtVerifier


@dataclass(frozen=True, slots=True)
class Source:
    """One ``token_from`` entry: ``kind`` is ``authorization``, ``header``, ``query``,
    ``cookie`` or ``subprotocol``; ``name`` the header (lower case), parameter or cookie."""

    kind: str
    name: str = ""

    @classmethod
    def parse(cls, entry: str) -> Source:
        kind, _, name = entry.partition(":")
        if kind == "header":
            lower = name.lower()
            return cls("authorization" if lower == "authorization" else "header", lower)
        return cls(kind, name)

    def __str__(self) -> str:
        if self.kind == "authorization":
            return "Authorization (Bearer)"
        return f"{self.kind} {self.name}" if self.name else "Sec-WebSocket-Protocol"


@dataclass(frozen=True, slots=True)
class AuthRules:
    """A route's auth compiled: where tokens are looked for, how they are verified, and the
    header that will carry the identity (lower case, ``-`` spelling)."""

    verifier: Verifier
    sources: tuple[Source, ...]
    identity_header: bytes

    @classmethod
    def build(
        cls,
        settings: RouteAuth,
        *,
        tokens: TokenSource | None = None,
        key: bytes | PublicKey | None = None,
    ) -> AuthRules:
        """``settings`` with what its files and variable hold: the bearer ``tokens``, or the
        JWT ``key`` (the HS256 secret, or the public key).

        Raises:
            ValueError: what the kind needs was not given.
        """
        verifier: Verifier
        if settings.kind == "bearer":
            if tokens is None:
                raise ValueError('kind = "bearer" needs its tokens')
            verifier = BearerTokens(tokens)
        elif settings.kind == "jwt":
            if key is None:
                raise ValueError('kind = "jwt" needs its key')
            verifier = JwtVerifier.for_key(
                key, issuer=settings.issuer, audience=settings.audience, leeway=settings.leeway
            )
        else:
            raise ValueError(f"kind = {settings.kind!r} checks no credential")
        sources = tuple(Source.parse(entry) for entry in settings.token_from)
        header = settings.identity_header.lower().replace("_", "-").encode("ascii")
        return cls(verifier, sources, header)


@dataclass(slots=True)
class _Found:
    """The credentials of one request and the edits that take them out."""

    drop: set[int] = dataclasses.field(default_factory=set)
    """Indexes of header lines removed."""
    replace: dict[int, bytes] = dataclasses.field(default_factory=dict)
    """Header lines whose value changes (index → new value)."""
    target: str | None = None


def authenticate(
    request: UpgradeRequest, rules: AuthRules, now: float
) -> tuple[UpgradeRequest, Identity]:
    """Verify the request's credential at unix time ``now`` and return the request to forward,
    without any credential from ``rules.sources`` and without client-sent copies of the
    identity header (any case, ``_`` for ``-`` too), with the verified identity.

    Sources are tried in order; the first one holding a credential decides, and credentials in
    later header, query and cookie sources are removed too. ``Authorization`` must use the
    ``Bearer`` scheme (any case; another scheme is not a credential and stays); another header
    gives its whole value; ``query:NAME`` its percent-decoded value (``+`` is a space; the
    other parameters keep their bytes and order); ``cookie:NAME`` its value (the other cookies
    are kept, joined by ``"; "``); ``subprotocol`` the one entry of ``Sec-WebSocket-Protocol``
    that verifies (the first 4 plausible entries are tried; the other entries stay, and the
    header goes when none is left).

    Raises:
        Unauthorized: 401; ``error=""`` when no credential was sent, ``invalid_request`` for a
            credential sent twice in one source, an empty one or a malformed Authorization,
            ``invalid_token`` for one that does not verify.

    Not checked: anything about the route or the subject beyond the credential (limits per
    identity are the caller's).
    """
    raw = list(request.request.headers.raw_items())
    fields = request.fields
    found = _Found()
    credential: tuple[Source, bytes] | None = None
    identity: Identity | None = None
    malformed = ""
    refused: Unauthorized | None = None
    for source in rules.sources:
        if source.kind == "subprotocol":
            if credential is None and identity is None:
                identity, refused = _subprotocol(fields, rules.verifier, now, found, refused)
            continue
        tokens, problem = _take(source, fields, request.target, found)
        malformed = malformed or problem
        if len(tokens) > 1:
            raise Unauthorized(
                f"{len(tokens)} credentials in {source}; send one", error="invalid_request"
            )
        if tokens and credential is None and identity is None:
            credential = (source, tokens[0])
    if credential is not None:
        source, token = credential
        if not token:
            raise Unauthorized(f"the credential in {source} is empty", error="invalid_request")
        identity = rules.verifier.verify(token, now)
    if identity is None:
        if refused is not None:
            raise refused
        if malformed:
            raise Unauthorized(malformed, error="invalid_request")
        looked = ", ".join(str(source) for source in rules.sources)
        raise Unauthorized(f"no credential sent (looked in {looked})", error="")
    for i, (name, _) in enumerate(fields):
        if name.replace(b"_", b"-") == rules.identity_header:
            found.drop.add(i)
    return _without(request, raw, found), identity


def _take(
    source: Source, fields: list[tuple[bytes, bytes]], target: str, found: _Found
) -> tuple[list[bytes], str]:
    """The credentials ``source`` holds (their removal noted in ``found``), and why a header
    that looked like one is not."""
    tokens: list[bytes] = []
    if source.kind == "query":
        current = target if found.target is None else found.target
        values, found.target = _query_take(current, source.name)
        return values, ""
    if source.kind == "cookie":
        wanted = source.name.encode("latin-1")
        for i, (name, value) in enumerate(fields):
            if name != _COOKIE:
                continue
            value = found.replace.get(i, value)
            pairs = cookie_pairs(value)
            mine = [cookie for key, cookie, _ in pairs if key == wanted]
            if mine:
                tokens += mine
                kept = b"; ".join(piece for key, _, piece in pairs if key != wanted)
                if kept:
                    found.replace[i] = kept
                else:
                    found.drop.add(i)
        return tokens, ""
    problem = ""
    wanted = source.name.encode("latin-1")
    lines = 0
    for i, (name, value) in enumerate(fields):
        if name != wanted:
            continue
        lines += 1
        value = value.strip(b" \t")
        if source.kind == "authorization":
            scheme, _, value = value.partition(b" ")
            if scheme.lower() != b"bearer":
                problem = _not_bearer(scheme)
                continue
            value = value.strip(b" ")
        tokens.append(value)
        found.drop.add(i)
    if lines > 1:
        raise Unauthorized(f"{lines} {source} headers; send one", error="invalid_request")
    return tokens, problem


_SCHEMES = frozenset(
    {b"basic", b"digest", b"negotiate", b"ntlm", b"hoba", b"mutual", b"vapid", b"dpop", b"token"}
    | {b"scram-sha-1", b"scram-sha-256", b"aws4-hmac-sha256", b"bot", b"jwt"}
)
"""Schemes named in a log message; anything else might be a token sent without a scheme."""


def _not_bearer(scheme: bytes) -> str:
    if scheme.lower() in _SCHEMES:
        return f"Authorization uses the {scheme.decode('ascii')!r} scheme, not Bearer"
    return "Authorization is not 'Bearer TOKEN'"


def _query_take(target: str, name: str) -> tuple[list[bytes], str | None]:
    """The decoded values of query parameter ``name``, and ``target`` without them (None when
    there were none)."""
    path, mark, query = target.partition("?")
    if not mark:
        return [], None
    wanted = name.encode("utf-8")
    values: list[bytes] = []
    kept: list[str] = []
    for piece in query.split("&"):
        key, _, value = piece.partition("=")
        if _unquote(key) == wanted:
            values.append(_unquote(value))
        else:
            kept.append(piece)
    if not values:
        return [], None
    return values, f"{path}?{'&'.join(kept)}" if kept else path


def _unquote(text: str) -> bytes:
    return unquote_to_bytes(text.encode("latin-1").replace(b"+", b" "))


def _subprotocol(
    fields: list[tuple[bytes, bytes]],
    verifier: Verifier,
    now: float,
    found: _Found,
    refused: Unauthorized | None,
) -> tuple[Identity | None, Unauthorized | None]:
    """The identity of the one ``Sec-WebSocket-Protocol`` entry that verifies, its removal
    noted; else None and why the last plausible entry failed."""
    tried = 0
    hits: list[tuple[int, bytes, Identity]] = []
    for i, (name, value) in enumerate(fields):
        if name != _SUBPROTOCOL or tried >= MAX_SUBPROTOCOL_TRIES:
            continue
        for entry in value.split(b","):
            entry = entry.strip(b" \t")
            if not verifier.plausible(entry) or tried >= MAX_SUBPROTOCOL_TRIES:
                continue
            tried += 1
            try:
                hits.append((i, entry, verifier.verify(entry, now)))
            except Unauthorized as error:
                refused = Unauthorized(f"no Sec-WebSocket-Protocol entry verifies: {error}")
    if len(hits) > 1:
        raise Unauthorized(
            "several Sec-WebSocket-Protocol entries are credentials; send one",
            error="invalid_request",
        )
    if not hits:
        return None, refused
    i, token, identity = hits[0]
    entries = [entry.strip(b" \t") for entry in fields[i][1].split(b",")]
    kept = [entry for entry in entries if entry and entry != token]
    if kept:
        found.replace[i] = b", ".join(kept)
    else:
        found.drop.add(i)
    return identity, None


def _without(
    request: UpgradeRequest, raw: list[tuple[bytes, bytes]], found: _Found
) -> UpgradeRequest:
    """``request`` with ``found``'s edits, header casing kept."""
    headers = [
        (name, found.replace.get(i, value))
        for i, (name, value) in enumerate(raw)
        if i not in found.drop
    ]
    target = request.target if found.target is None else found.target
    old = request.request
    # Every name and value is one h11 accepted, or pieces of one joined by "; " or ", ", so
    # h11 need not check them again (``_parsed``, as ``core.session`` does).
    rebuilt = h11.Request(
        method=old.method,
        target=target.encode("latin-1"),
        headers=headers,
        http_version=old.http_version,
        _parsed=True,
    )
    fields = [(name.lower(), value) for name, value in headers]
    return dataclasses.replace(request, request=rebuilt, target=target, fields=fields)


__all__ = [
    "AuthRules",
    "BearerTokens",
    "Identity",
    "JwtVerifier",
    "Source",
    "TokenSource",
    "authenticate",
]
