"""Sticky-session cookies that every worker and every proxy of a fleet honours with no shared state.

The value names the backend and carries an HMAC-SHA256 tag over the route and backend names, so
only holders of the route's secret can make one, a cookie of one route is worthless on another,
and a backend name cannot be edited::

    base64url(backend) "." base64url(HMAC-SHA256(secret, route "\\0" backend)[:16])

(base64url without padding: letters, digits, ``-`` and ``_`` only, all cookie-safe.)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import re

from tunnel.core.hashkey import cookie_pairs, cookie_values

__all__ = ["cookie_values", "set_cookie", "sign", "strip_cookie", "verify"]

TAG_BYTES = 16
TAG_CHARS = 22  # base64url of 16 bytes, unpadded
MAX_VALUE = 1024
"""Longer cookie values are refused without decoding them."""

_B64URL = re.compile(r"[A-Za-z0-9_-]+")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token, a cookie name
_COOKIE_OCTETS = re.compile(r"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*")  # RFC 6265


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _tag(route: str, backend: str, secret: bytes) -> bytes:
    message = (route + "\0" + backend).encode("utf-8")
    return hmac.new(secret, message, hashlib.sha256).digest()[:TAG_BYTES]


def sign(route: str, backend: str, secret: bytes) -> str:
    """The cookie value that sends this route's clients back to ``backend``.

    Raises:
        ValueError: an empty backend name or secret.
    """
    if not backend or not secret:
        raise ValueError("a sticky cookie needs a backend name and a secret")
    return _b64(backend.encode("utf-8")) + "." + _b64(_tag(route, backend, secret))


def verify(value: str, route: str, secret: bytes) -> str | None:
    """The backend a cookie value names when its tag is valid for ``route``, else None.

    Only the exact form ``sign`` writes is accepted (no padding, no spaces, one dot, a
    canonical encoding); anything else, however malformed, gives None and never raises.
    Whether the backend still exists is the caller's question.
    """
    if not secret or len(value) > MAX_VALUE:
        return None
    name_part, dot, tag_part = value.partition(".")
    if not dot or len(tag_part) != TAG_CHARS:
        return None
    if not _B64URL.fullmatch(name_part) or not _B64URL.fullmatch(tag_part):
        return None
    try:
        raw = base64.urlsafe_b64decode(name_part + "=" * (-len(name_part) % 4))
        tag = base64.urlsafe_b64decode(tag_part + "==")
        backend = raw.decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    if _b64(raw) != name_part or _b64(tag) != tag_part:  # non-canonical trailing bits
        return None
    if not hmac.compare_digest(tag, _tag(route, backend, secret)):
        return None
    return backend


def strip_cookie(cookie_header: bytes, name: str) -> bytes | None:
    """One Cookie header without cookie ``name`` (every copy), or None when nothing is left.

    The other pairs keep their bytes and order and are joined with ``"; "``.
    """
    wanted = name.encode("latin-1", "replace")
    kept = [piece for key, _, piece in cookie_pairs(cookie_header) if key != wanted]
    return b"; ".join(kept) or None


def set_cookie(name: str, value: str, *, secure: bool, max_age: float) -> bytes:
    """A ``Set-Cookie`` value.

    ``name=value; Path=/; HttpOnly; SameSite=Lax``, then ``; Secure`` and ``; Max-Age=N``.

    ``Max-Age`` is whole seconds rounded up, and only written for a finite ``max_age > 0``
    (otherwise the cookie lasts for the browser session).

    Raises:
        ValueError: a name that is not a token or a value with characters a cookie cannot hold.
    """
    if not _TOKEN.fullmatch(name) or not _COOKIE_OCTETS.fullmatch(value):
        raise ValueError(f"cannot write cookie {name!r}={value!r}")
    text = f"{name}={value}; Path=/; HttpOnly; SameSite=Lax"
    if secure:
        text += "; Secure"
    if 0 < max_age < math.inf:
        text += f"; Max-Age={math.ceil(max_age)}"
    return text.encode("ascii")
