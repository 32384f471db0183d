"""JWT verification (``policy.auth.JwtVerifier``): tokens signed here with each algorithm, then
broken one way at a time; every refusal is an ``Unauthorized`` that never holds the token."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel.errors import Unauthorized
from tunnel.policy.auth import MAX_TOKEN, Identity, JwtVerifier

NOW = 1_800_000_000.0
SECRET = b"s" * 40
Signer = bytes | rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@functools.cache
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@functools.cache
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def signature(alg: str, key: Signer, message: bytes) -> bytes:
    if alg == "HS256":
        assert isinstance(key, bytes)
        return hmac.new(key, message, hashlib.sha256).digest()
    if alg == "RS256":
        assert isinstance(key, rsa.RSAPrivateKey)
        return key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    if alg == "ES256":
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        r, s = decode_dss_signature(key.sign(message, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return b""


def make_jwt(
    claims: dict[str, Any],
    key: Signer = SECRET,
    alg: str = "HS256",
    header: dict[str, Any] | None = None,
) -> bytes:
    head = b64(json.dumps({"alg": alg, "typ": "JWT", **(header or {})}).encode())
    body = b64(json.dumps(claims).encode())
    message = head + b"." + body
    return message + b"." + b64(signature(alg, key, message))


CLAIMS: dict[str, Any] = {"sub": "alice", "exp": NOW + 3600, "iat": NOW - 10}


def hs256(**options: Any) -> JwtVerifier:
    return JwtVerifier.for_key(SECRET, **options)


def rs256(**options: Any) -> JwtVerifier:
    return JwtVerifier.for_key(rsa_key().public_key(), **options)


def es256(**options: Any) -> JwtVerifier:
    return JwtVerifier.for_key(ec_key().public_key(), **options)


def refused(verifier: JwtVerifier, token: bytes, now: float = NOW) -> str:
    """The log message of the refusal, checked to be a 401 without the token."""
    with pytest.raises(Unauthorized) as caught:
        verifier.verify(token, now)
    error = caught.value
    assert error.status == 401
    assert error.error == "invalid_token"
    for part in token.split(b"."):
        if len(part) >= 8:
            assert part.decode("latin-1") not in str(error)
    return error.message


@pytest.mark.parametrize(
    ("verifier", "key", "alg"),
    [(hs256, SECRET, "HS256"), (rs256, rsa_key, "RS256"), (es256, ec_key, "ES256")],
)
def test_each_algorithm_verifies(verifier: Any, key: Any, alg: str) -> None:
    signer = key if isinstance(key, bytes) else key()
    assert verifier().alg == alg
    token = make_jwt(CLAIMS, signer, alg)
    assert verifier().verify(token, NOW) == Identity("alice", NOW + 3600)


def test_for_key_refuses_other_keys() -> None:
    with pytest.raises(ValueError, match="empty"):
        JwtVerifier.for_key(b"")
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    with pytest.raises(ValueError, match="P-256"):
        JwtVerifier.for_key(p384)


def test_a_token_without_exp_has_no_expiry() -> None:
    token = make_jwt({"sub": "bob"})
    assert hs256().verify(token, NOW) == Identity("bob", None)


def test_expired_refused_with_the_time_leeway_forgiven() -> None:
    token = make_jwt({"sub": "a", "exp": 1_796_353_800})  # 2026-12-04T03:10:00Z
    error = refused(hs256(), token, 1_796_353_800)
    assert str(error) == "token expired at 2026-12-04T03:10:00Z"
    assert hs256(leeway=30).verify(token, 1_796_353_829).subject == "a"
    refused(hs256(leeway=30), token, 1_796_353_830)


def test_not_yet_valid_refused_with_the_time_leeway_forgiven() -> None:
    token = make_jwt({"sub": "a", "nbf": NOW + 60})
    assert "not valid before" in str(refused(hs256(), token))
    assert "not valid before" in str(refused(hs256(leeway=59), token))
    assert hs256(leeway=60).verify(token, NOW).subject == "a"
    assert hs256().verify(token, NOW + 60).subject == "a"


def test_issued_in_the_future_refused() -> None:
    token = make_jwt({"sub": "a", "iat": NOW + 120})
    assert "issued in the future" in str(refused(hs256(leeway=30), token))
    assert hs256(leeway=120).verify(token, NOW).subject == "a"


@pytest.mark.parametrize(
    ("claim", "value"),
    [("exp", "soon"), ("exp", True), ("nbf", [1]), ("iat", {"t": 1})],
)
def test_time_claims_must_be_numbers(claim: str, value: Any) -> None:
    token = make_jwt({"sub": "a", claim: value})
    assert f"{claim} must be a number" in str(refused(hs256(), token))


def test_an_infinite_exp_refused() -> None:
    token = _signed_raw(b'{"alg":"HS256"}', b'{"sub":"a","exp":1e400}')
    assert "exp must be a number" in refused(hs256(), token)


def test_a_far_future_exp_is_shown_as_a_number() -> None:
    token = make_jwt({"sub": "a", "exp": -1e18})
    assert "token expired at -1e+18" in str(refused(hs256(), token))


def test_issuer_checked_when_configured() -> None:
    verifier = hs256(issuer="https://id.example.com")
    good = make_jwt({**CLAIMS, "iss": "https://id.example.com"})
    assert verifier.verify(good, NOW).subject == "alice"
    error = refused(verifier, make_jwt({**CLAIMS, "iss": "https://evil.example"}))
    assert str(error) == "issuer 'https://evil.example' not accepted"
    assert "has no iss" in str(refused(verifier, make_jwt(CLAIMS)))
    assert hs256().verify(make_jwt({**CLAIMS, "iss": "anyone"}), NOW).subject == "alice"


@pytest.mark.parametrize("aud", ["api", ["web", "api"]])
def test_audience_accepted_as_string_or_list(aud: Any) -> None:
    assert hs256(audience="api").verify(make_jwt({**CLAIMS, "aud": aud}), NOW).subject == "alice"


@pytest.mark.parametrize(
    ("aud", "message"),
    [
        ("x", "audience 'x' not accepted"),
        (["x", "y"], "audience ['x', 'y'] not accepted"),
        (None, "token has no aud; audience 'api' is required"),
        ([1], "aud must be a string or a list of strings"),
        (7, "aud must be a string or a list of strings"),
    ],
)
def test_wrong_audience_refused(aud: Any, message: str) -> None:
    claims = {**CLAIMS, "aud": aud} if aud is not None else CLAIMS
    assert str(refused(hs256(audience="api"), make_jwt(claims))) == message


def test_alg_none_refused() -> None:
    for verifier in (hs256(), rs256(), es256()):
        token = make_jwt(CLAIMS, alg="none")
        assert token.endswith(b".")
        assert "alg 'none' is not accepted" in str(refused(verifier, token))
    unsigned = make_jwt(CLAIMS, alg="none", header={"alg": "None"})
    refused(hs256(), unsigned)


def test_hs256_signed_with_the_public_key_refused() -> None:
    """The algorithm confusion attack: an attacker signs HS256 with the RSA public key's PEM,
    hoping the verifier uses the key it has as an HMAC secret."""
    public = rsa_key().public_key()
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    forged = make_jwt(CLAIMS, pem, "HS256")
    error = refused(JwtVerifier.for_key(public), forged)
    assert str(error) == "JWT alg 'HS256' is not accepted; this route takes RS256"
    ec_pem = (
        ec_key()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    refused(es256(), make_jwt(CLAIMS, ec_pem, "HS256"))


@pytest.mark.parametrize(
    ("verifier", "alg", "key"),
    [
        (hs256, "RS256", rsa_key),
        (rs256, "ES256", ec_key),
        (es256, "RS256", rsa_key),
        (rs256, "PS256", rsa_key),
        (hs256, "HS512", None),
        (hs256, "hs256", None),
    ],
)
def test_another_algorithm_refused(verifier: Any, alg: str, key: Any) -> None:
    token = make_jwt(CLAIMS, key() if key else SECRET, alg)
    assert f"alg {alg!r} is not accepted" in str(refused(verifier(), token))


@pytest.mark.parametrize(
    ("verifier", "alg", "other"),
    [
        (hs256, "HS256", lambda: b"t" * 40),
        (rs256, "RS256", lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        (es256, "ES256", lambda: ec.generate_private_key(ec.SECP256R1())),
    ],
)
def test_signed_with_another_key_refused(verifier: Any, alg: str, other: Any) -> None:
    error = refused(verifier(), make_jwt(CLAIMS, other(), alg))
    assert str(error) == "JWT signature does not verify"


@pytest.mark.parametrize(
    ("verifier", "key", "alg"),
    [(hs256, SECRET, "HS256"), (rs256, rsa_key, "RS256"), (es256, ec_key, "ES256")],
)
def test_tampered_payload_refused(verifier: Any, key: Any, alg: str) -> None:
    head, _, sig = make_jwt(CLAIMS, key if isinstance(key, bytes) else key(), alg).split(b".")
    body = b64(json.dumps({**CLAIMS, "sub": "admin"}).encode())
    error = refused(verifier(), head + b"." + body + b"." + sig)
    assert str(error) == "JWT signature does not verify"


def test_es256_signature_in_der_refused() -> None:
    message = make_jwt(CLAIMS, ec_key(), "ES256").rpartition(b".")[0]
    der = ec_key().sign(message, ec.ECDSA(hashes.SHA256()))
    refused(es256(), message + b"." + b64(der))
    refused(es256(), message + b"." + b64(bytes(64)))


@pytest.mark.parametrize(
    ("claims", "message"),
    [
        ({"exp": NOW + 60}, "token has no sub: the identity is required"),
        ({"sub": 42}, "sub must be a string of at most 256 characters"),
        ({"sub": "x" * 257}, "sub must be a string of at most 256 characters"),
        ({"sub": ""}, "sub '' cannot be sent in a header: printable ASCII only"),
        ({"sub": "a\r\nX-Admin: 1"}, "sub 'a\\r\\nX-Admin: 1' cannot be sent in a header"),
        ({"sub": " alice"}, "cannot be sent in a header"),
        ({"sub": "zoë"}, "cannot be sent in a header"),
    ],
)
def test_subject_required_and_safe_for_a_header(claims: dict[str, Any], message: str) -> None:
    assert message in str(refused(hs256(), make_jwt(claims)))


def test_crit_header_refused() -> None:
    token = make_jwt(CLAIMS, header={"crit": ["b64"], "b64": False})
    assert "crit" in str(refused(hs256(), token))


def _signed_raw(head: bytes, body: bytes) -> bytes:
    message = b64(head) + b"." + b64(body)
    return message + b"." + b64(signature("HS256", SECRET, message))


@pytest.mark.parametrize(
    ("head", "body", "message"),
    [
        (b'{"alg":"HS256","alg":"none"}', b'{"sub":"a"}', "header is not a JSON object"),
        (b'{"alg":"HS256"}', b'{"sub":"a","sub":"admin"}', "payload is not a JSON object"),
        (b'{"alg":"HS256"}', b'{"sub":"a","exp":NaN}', "payload is not a JSON object"),
        (b'{"alg":"HS256"}', b"[" * 3000 + b"]" * 3000, "payload is not a JSON object"),
        (b'{"alg":"HS256"}', b'["sub"]', "payload is not a JSON object"),
        (b'{"alg":"HS256"}', b"\xff\xfe", "payload is not a JSON object"),
        (b'"HS256"', b'{"sub":"a"}', "header is not a JSON object"),
    ],
)
def test_malformed_json_refused(head: bytes, body: bytes, message: str) -> None:
    assert message in str(refused(hs256(), _signed_raw(head, body)))


def test_malformed_compact_form_refused() -> None:
    good = make_jwt(CLAIMS)
    head, body, sig = good.split(b".")
    for token, message in [
        (head + b"." + body, "three parts"),
        (good + b".x", "three parts"),
        (b"a+b/." + body + b"." + sig, "header is not base64url"),
        (head + b"=." + body + b"." + sig, "header is not base64url"),
        (head + b"." + body + b"." + sig + b"AB", "signature is not base64url"),
        (head[:-1] + b"Z." + body + b"." + sig, "not"),
    ]:
        assert message in str(refused(hs256(), token))


def test_non_canonical_base64_refused() -> None:
    good = make_jwt(CLAIMS)
    head, body, sig = good.split(b".")
    last = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".index(sig[-1:])
    twin = sig[:-1] + bytes(
        [b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"[last ^ 1]]
    )
    assert base64.urlsafe_b64decode(twin + b"=") == base64.urlsafe_b64decode(sig + b"=")
    error = refused(hs256(), head + b"." + body + b"." + twin)
    assert "signature is not canonical base64url" in str(error)


def test_oversized_token_refused_unread() -> None:
    token = make_jwt({"sub": "a", "pad": "x" * MAX_TOKEN})
    assert "longer than" in str(refused(hs256(), token))
    assert not hs256().plausible(token)
    assert hs256().plausible(make_jwt(CLAIMS))
    assert not hs256().plausible(b"chat.v2")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_arbitrary_bytes_only_raise_unauthorized(token: bytes) -> None:
    for verifier in (hs256(), es256()):
        with pytest.raises(Unauthorized):
            verifier.verify(token, NOW)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["alg", "crit", "typ", "kid"]),
        st.none() | st.booleans() | st.integers() | st.text(max_size=8) | st.lists(st.integers()),
    ),
    st.dictionaries(
        st.sampled_from(["sub", "exp", "nbf", "iat", "iss", "aud"]),
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats()
        | st.text(max_size=8)
        | st.lists(st.text(max_size=4)),
    ),
)
def test_arbitrary_signed_claims_verify_or_raise_unauthorized(
    header: dict[str, Any], claims: dict[str, Any]
) -> None:
    head = json.dumps({"alg": "HS256", **header}).encode()
    token = _signed_raw(head, json.dumps(claims).encode())
    verifier = hs256(issuer="i", audience="a", leeway=5)
    try:
        identity = verifier.verify(token, NOW)
    except Unauthorized:
        return
    assert identity.subject == claims["sub"]
