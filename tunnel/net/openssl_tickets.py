"""The ctypes layer under ``tickets``: OpenSSL's ticket key callback on an ``ssl.SSLContext``.

What it relies on, each checked before use (any mismatch: ``install`` returns False with the
reason, and OpenSSL's own keys stay):

- the ``libssl`` and ``libcrypto`` that ``_ssl`` loaded, found in ``/proc/self/maps`` (the same
  mapped files, so ``dlopen`` hands back the same library), with ``OpenSSL_version_num()`` equal
  to ``ssl.OPENSSL_VERSION_NUMBER`` and OpenSSL 3 (``SSL_CTX_set_tlsext_ticket_key_evp_cb``,
  ``EVP_MAC_CTX_set_params``);
- CPython's ``PySSLContext`` layout: ``PyObject_HEAD`` then ``SSL_CTX *ctx``. The pointer read
  there must give back the context's options and verify mode through ``SSL_CTX_get_options`` and
  ``SSL_CTX_get_verify_mode`` before anything is written through it.

The callbacks are module globals, one per rotation, never freed: OpenSSL keeps a bare function
pointer, and an ``SSL`` may outlive the Python context that made it.
"""

from __future__ import annotations

import ctypes
import logging
import ssl
import sys
from collections.abc import Callable
from typing import Any

from tunnel.logs import LOGGER_NAME
from tunnel.net.tickets import NAME_SIZE, KeyRing, TicketKey

log = logging.getLogger(LOGGER_NAME)

_IV_SIZE = 16
_RENEW = 2
"""What an accepted ticket gets: "renew", so a resumed client receives a fresh ticket under the
current key, as OpenSSL does with its own keys (TLS 1.3 clients use a ticket once, RFC 8446
C.4). Answering 1 sends none: a client then offers the same ticket again and again, and the
measured CPU per resumed upgrade rose from about 1.7 ms to 2.8 ms (a Python client, 1,000
upgrades a run), more than a full handshake."""

_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_void_p,  # SSL *
    ctypes.c_void_p,  # unsigned char key_name[16]
    ctypes.c_void_p,  # unsigned char *iv
    ctypes.c_void_p,  # EVP_CIPHER_CTX *
    ctypes.c_void_p,  # EVP_MAC_CTX *
    ctypes.c_int,  # enc
)


class _Param(ctypes.Structure):
    """OpenSSL 3's ``OSSL_PARAM``."""

    _fields_ = [
        ("key", ctypes.c_char_p),
        ("data_type", ctypes.c_uint),
        ("data", ctypes.c_void_p),
        ("data_size", ctypes.c_size_t),
        ("return_size", ctypes.c_size_t),
    ]


class _OpenSSL:
    """The functions used, bound with their C signatures."""

    def __init__(self, libssl: ctypes.CDLL, libcrypto: ctypes.CDLL) -> None:
        p, i, lng = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
        self.get_options = _bind(libssl, "SSL_CTX_get_options", ctypes.c_uint64, p)
        self.get_verify_mode = _bind(libssl, "SSL_CTX_get_verify_mode", i, p)
        self.set_timeout = _bind(libssl, "SSL_CTX_set_timeout", lng, p, lng)
        self.set_ticket_cb = _bind(libssl, "SSL_CTX_set_tlsext_ticket_key_evp_cb", i, p, _CALLBACK)
        self.rand_bytes = _bind(libcrypto, "RAND_bytes", i, p, i)
        self.aes_256_cbc = _bind(libcrypto, "EVP_aes_256_cbc", p)()
        self.encrypt_init = _bind(libcrypto, "EVP_EncryptInit_ex", i, p, p, p, p, p)
        self.decrypt_init = _bind(libcrypto, "EVP_DecryptInit_ex", i, p, p, p, p, p)
        self.mac_set_params = _bind(libcrypto, "EVP_MAC_CTX_set_params", i, p, p)
        self.utf8_param = _bind(
            libcrypto,
            "OSSL_PARAM_construct_utf8_string",
            _Param,
            ctypes.c_char_p,
            p,
            ctypes.c_size_t,
        )
        self.octet_param = _bind(
            libcrypto,
            "OSSL_PARAM_construct_octet_string",
            _Param,
            ctypes.c_char_p,
            p,
            ctypes.c_size_t,
        )
        self.end_param = _bind(libcrypto, "OSSL_PARAM_construct_end", _Param)


def _bind(lib: ctypes.CDLL, name: str, restype: Any, *argtypes: Any) -> Any:
    function = getattr(lib, name)  # AttributeError names a missing symbol
    function.restype = restype
    function.argtypes = argtypes
    return function


class _Sealed:
    """A key as OpenSSL takes it: C buffers and the HMAC's parameters, kept alive together."""

    __slots__ = ("_keep", "aes", "key", "name", "params")

    def __init__(self, ossl: _OpenSSL, key: TicketKey) -> None:
        self.key = key
        self.name = key.name
        self.aes = ctypes.create_string_buffer(key.aes, len(key.aes))
        digest = ctypes.create_string_buffer(b"SHA256")
        hmac = ctypes.create_string_buffer(key.hmac, len(key.hmac))
        params = (_Param * 3)(
            ossl.utf8_param(b"digest", digest, 0),
            ossl.octet_param(b"key", hmac, len(key.hmac)),
            ossl.end_param(),
        )
        self.params = params
        self._keep = (digest, hmac)


_ossl: _OpenSSL | None = None
_failure: str | None = None
_callbacks: dict[float, Any] = {}
"""One C callback per rotation, alive for the process's lifetime."""


def _load() -> _OpenSSL | None:
    """The OpenSSL that ``_ssl`` uses, once; None (and ``_failure``) when it cannot be had."""
    global _ossl, _failure
    if _ossl is not None or _failure is not None:
        return _ossl
    try:
        if not sys.platform.startswith("linux"):
            raise OSError(f"finding _ssl's OpenSSL is done on Linux only, not {sys.platform}")
        paths: dict[str, str] = {}
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                path = line.rstrip("\n").partition("/")[2]
                for lib in ("libssl.so", "libcrypto.so"):
                    if lib in path:
                        paths.setdefault(lib, "/" + path)
        if len(paths) != 2:
            raise OSError("_ssl's libssl/libcrypto are not among the mapped files")
        libssl, libcrypto = ctypes.CDLL(paths["libssl.so"]), ctypes.CDLL(paths["libcrypto.so"])
        version = _bind(libcrypto, "OpenSSL_version_num", ctypes.c_ulong)()
        if version != ssl.OPENSSL_VERSION_NUMBER:
            raise OSError(
                f"{paths['libcrypto.so']} is version {version:#x}, _ssl was built against "
                f"{ssl.OPENSSL_VERSION_NUMBER:#x}"
            )
        if version < 0x30000000:
            raise OSError(f"OpenSSL 3 is needed, this is {ssl.OPENSSL_VERSION}")
        _ossl = _OpenSSL(libssl, libcrypto)
    except (OSError, AttributeError, ValueError) as exc:
        _failure = str(exc)
    return _ossl


def _ctx_pointer(ossl: _OpenSSL, context: ssl.SSLContext) -> int:
    """The ``SSL_CTX *`` behind ``context``, checked against what the context says of itself."""
    pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    if not pointer:
        raise ValueError("the context's SSL_CTX pointer is not where CPython 3 keeps it")
    if ossl.get_options(pointer) != int(context.options) or ossl.get_verify_mode(pointer) != int(
        context.verify_mode
    ):
        raise ValueError("the context's SSL_CTX pointer does not match the context's settings")
    return pointer


def install(context: ssl.SSLContext, ring: KeyRing, warn: Callable[[str], None]) -> bool:
    """Seal and open ``context``'s tickets with ``ring``'s keys; False (after ``warn``) when
    OpenSSL cannot be reached safely."""
    ossl = _load()
    if ossl is None:
        warn(_failure or "OpenSSL is out of reach")
        return False
    try:
        pointer = _ctx_pointer(ossl, context)
    except ValueError as exc:
        warn(str(exc))
        return False
    callback = _callbacks.get(ring.rotation)
    if callback is None:
        callback = _callbacks[ring.rotation] = _CALLBACK(_ticket_callback(ossl, ring))
    ossl.set_timeout(pointer, max(1, int(ring.rotation)))
    if ossl.set_ticket_cb(pointer, callback) != 1:
        warn("SSL_CTX_set_tlsext_ticket_key_evp_cb failed")
        return False
    return True


def _ticket_callback(
    ossl: _OpenSSL, ring: KeyRing
) -> Callable[[Any, Any, Any, Any, Any, int], int]:
    """OpenSSL's ticket key callback (``SSL_CTX_set_tlsext_ticket_key_evp_cb``): on ``enc``,
    name the current key and set up AES and HMAC with it; otherwise find the ticket's key by
    name (0: unknown or too old, a full handshake; else ``_RENEW``)."""
    sealed: dict[bytes, _Sealed] = {}

    def prepared(key: TicketKey) -> _Sealed:
        found = sealed.get(key.name)
        if found is None:
            if len(sealed) > 8:
                sealed.clear()
            found = sealed[key.name] = _Sealed(ossl, key)
        return found

    def callback(_ssl: Any, name: Any, iv: Any, cipher: Any, mac: Any, enc: int) -> int:
        try:
            if enc:
                key = prepared(ring.sealing())
                ctypes.memmove(name, key.name, NAME_SIZE)
                if ossl.rand_bytes(iv, _IV_SIZE) != 1:
                    return -1
                if ossl.encrypt_init(cipher, ossl.aes_256_cbc, None, key.aes, iv) != 1:
                    return -1
                return 1 if ossl.mac_set_params(mac, key.params) == 1 else -1
            found = ring.opening(ctypes.string_at(name, NAME_SIZE))
            if found is None:
                return 0
            key = prepared(found)
            if ossl.decrypt_init(cipher, ossl.aes_256_cbc, None, key.aes, iv) != 1:
                return 0
            if ossl.mac_set_params(mac, key.params) != 1:
                return 0
            return _RENEW
        except Exception:  # an exception cannot cross into OpenSSL: no ticket, full handshake
            log.exception("TLS session ticket callback failed")
            return 0 if not enc else -1

    return callback
