"""Sticky cookies: signed values, Cookie header parsing and Set-Cookie strings."""

from __future__ import annotations

import base64
import re

import pytest

from tunnel.policy.sticky import cookie_values, set_cookie, sign, strip_cookie, verify

SECRET = b"s3cret-of-the-fleet"
COOKIE_SAFE = re.compile(r"[A-Za-z0-9_.-]+")


@pytest.mark.parametrize("backend", ["a", "app-1", "b" * 200, "bäckend", "名前", "x.y"])
@pytest.mark.parametrize("route", ["chat", "", "r\0"])
def test_round_trip(route: str, backend: str) -> None:
    value = sign(route, backend, SECRET)
    assert COOKIE_SAFE.fullmatch(value)
    assert "=" not in value
    assert verify(value, route, SECRET) == backend


def test_value_layout() -> None:
    value = sign("chat", "app-1", SECRET)
    name_part, tag_part = value.split(".")
    assert name_part == "YXBwLTE"
    assert len(tag_part) == 22
    assert sign("chat", "app-1", SECRET) == value  # deterministic: every worker agrees


def test_known_answer() -> None:
    import hashlib
    import hmac

    tag = hmac.new(SECRET, b"chat\0app-1", hashlib.sha256).digest()[:16]
    expected = "YXBwLTE." + base64.urlsafe_b64encode(tag).decode().rstrip("=")
    assert sign("chat", "app-1", SECRET) == expected


GOOD = sign("chat", "app-1", SECRET)
NAME, TAG = GOOD.split(".")
OTHER_NAME = base64.urlsafe_b64encode(b"app-2").decode().rstrip("=")


@pytest.mark.parametrize(
    "value",
    [
        sign("chat", "app-1", b"another secret"),
        sign("other-route", "app-1", SECRET),
        f"{OTHER_NAME}.{TAG}",
        GOOD[:-1],
        GOOD[:-2],
        GOOD + "A",
        GOOD + "=",
        NAME + "=." + TAG,
        NAME + "." + TAG + "==",
        " " + GOOD,
        GOOD + " ",
        f'"{GOOD}"',
        GOOD.replace(".", ".."),
        GOOD + ".",
        "." + TAG,
        NAME + ".",
        NAME,
        TAG,
        "",
        ".",
        "..",
        "é" + GOOD,
        NAME + ".é" + TAG[1:],
        "YXBwLTE.aaaaaaaaaaaaaaaaaaaaaa",
        "A" * 100_000 + "." + TAG,
        "A" * 5 + "." + TAG,  # not valid base64 length
        "/+/+." + TAG,  # standard alphabet, not url-safe
        "_w." + TAG,  # b"\xff": not UTF-8
        "YXBwLTF." + TAG,  # non-canonical trailing bits decode to app-1 too
        NAME + "." + TAG[:-1] + ("B" if TAG[-1] == "A" else "A"),  # last char, changed bits
        "\0" * 30,
        GOOD.upper(),
    ],
)
def test_forgeries_and_garbage_are_refused(value: str) -> None:
    assert verify(value, "chat", SECRET) is None


def test_tag_char_with_unused_bits_is_refused() -> None:
    # The 22nd character holds 2 real bits and 4 padding bits; other padding bits are refused.
    last = TAG[-1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for char in alphabet:
        value = f"{NAME}.{TAG[:-1]}{char}"
        assert (verify(value, "chat", SECRET) is not None) == (char == last)


def test_empty_secret_never_verifies() -> None:
    assert verify(GOOD, "chat", b"") is None
    with pytest.raises(ValueError, match="secret"):
        sign("chat", "app-1", b"")
    with pytest.raises(ValueError, match="backend"):
        sign("chat", "", SECRET)


# --- Cookie headers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([b"sid=abc"], ["abc"]),
        ([b"a=1; sid=abc; b=2"], ["abc"]),
        ([b"a=1;sid=abc;b=2"], ["abc"]),
        ([b"  sid = abc  ;"], ["abc"]),
        ([b"\tsid=abc\t"], ["abc"]),
        ([b'sid="abc"'], ["abc"]),
        ([b'sid=""'], [""]),
        ([b'sid="'], ['"']),
        ([b"sid="], [""]),
        ([b"sid=a=b"], ["a=b"]),
        ([b"sid=1; sid=2"], ["1", "2"]),
        ([b"sid=1", b"x=y", b"sid=2; sid=3"], ["1", "2", "3"]),
        ([b"SID=1; Sid=2"], []),
        ([b"sidx=1; xsid=2; sid"], []),
        ([b"=abc; ;; sid"], []),
        ([b""], []),
        ([], []),
        ([b"sid=caf\xe9"], ["caf\xe9"]),
    ],
)
def test_cookie_values(headers: list[bytes], expected: list[str]) -> None:
    assert cookie_values(headers, "sid") == expected


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b"sid=abc", None),
        (b"sid=abc; sid=def", None),
        (b" ; sid=abc ;", None),
        (b"", None),
        (b"a=1; sid=abc; b=2", b"a=1; b=2"),
        (b"a=1;sid=abc;b=2", b"a=1; b=2"),
        (b"a=1; b=2", b"a=1; b=2"),
        (b'a="x y"; sid=abc', b'a="x y"'),
        (b"sid=abc; SID=keep", b"SID=keep"),
        (b"sidx=1; sid=2; xsid=3", b"sidx=1; xsid=3"),
        (b"a=1; junk; sid=2", b"a=1"),
    ],
)
def test_strip_cookie(header: bytes, expected: bytes | None) -> None:
    assert strip_cookie(header, "sid") == expected


# --- Set-Cookie ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("secure", "max_age", "expected"),
    [
        (False, 0, b"sid=v.t; Path=/; HttpOnly; SameSite=Lax"),
        (True, 0, b"sid=v.t; Path=/; HttpOnly; SameSite=Lax; Secure"),
        (False, 3600, b"sid=v.t; Path=/; HttpOnly; SameSite=Lax; Max-Age=3600"),
        (True, 86400.0, b"sid=v.t; Path=/; HttpOnly; SameSite=Lax; Secure; Max-Age=86400"),
        (False, 0.2, b"sid=v.t; Path=/; HttpOnly; SameSite=Lax; Max-Age=1"),
        (False, 59.5, b"sid=v.t; Path=/; HttpOnly; SameSite=Lax; Max-Age=60"),
        (False, -5, b"sid=v.t; Path=/; HttpOnly; SameSite=Lax"),
        (False, float("inf"), b"sid=v.t; Path=/; HttpOnly; SameSite=Lax"),
    ],
)
def test_set_cookie(secure: bool, max_age: float, expected: bytes) -> None:
    assert set_cookie("sid", "v.t", secure=secure, max_age=max_age) == expected


def test_set_cookie_with_a_signed_value() -> None:
    value = sign("chat", "app-1", SECRET)
    header = set_cookie("tunnel_sticky", value, secure=True, max_age=0)
    assert header.startswith(b"tunnel_sticky=" + value.encode() + b"; Path=/")
    assert cookie_values([b"x=1; " + header.split(b";")[0]], "tunnel_sticky") == [value]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("", "v"),
        ("a b", "v"),
        ("a;b", "v"),
        ("a=b", "v"),
        ("sid", "a;b"),
        ("sid", "a b"),
        ("sid", 'a"b'),
        ("sid", "a,b"),
        ("sid", "a\\b"),
        ("sid", "é"),
        ("é", "v"),
    ],
)
def test_set_cookie_refuses_unsafe_text(name: str, value: str) -> None:
    with pytest.raises(ValueError, match="cannot write cookie"):
        set_cookie(name, value, secure=False, max_age=0)
