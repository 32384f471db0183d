"""TLS contexts: listeners (certificates by SNI, rotation, client certificates) and backends.

A listener's contexts are rebuilt from its files on SIGHUP and when the files' contents change;
a new handshake takes whatever is current, and an open tunnel keeps the session it made. A pair
that does not load leaves the previous one in use, and the log names the file.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio
from cryptography import x509

from tunnel.config import BackendTLS, Config, ListenerTLS
from tunnel.errors import ConfigError
from tunnel.logs import LOGGER_NAME, fields
from tunnel.net import tickets
from tunnel.net.tlsconn import WANT_READ, TLSConn

log = logging.getLogger(LOGGER_NAME)

TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
CIPHERS_TLS12 = "ECDHE+AESGCM:ECDHE+CHACHA20"
"""Forward-secret AEAD suites only (Mozilla's "intermediate" list); TLS 1.3 suites are
OpenSSL's, all of which are modern."""
ALPN = ["http/1.1"]


async def handshake(conn: TLSConn) -> None:
    """Complete the TLS handshake, waiting on the socket as OpenSSL asks."""
    while (want := conn.handshake_step()) is not None:
        if want == WANT_READ:
            await trio.lowlevel.wait_readable(conn)
        else:
            await trio.lowlevel.wait_writable(conn)


_HINTS = {
    "UNSUPPORTED_PROTOCOL": "the client's TLS version is below min_version",
    "NO_SHARED_CIPHER": "the client offers none of the accepted cipher suites",
    "HTTP_REQUEST": "plain HTTP sent to a TLS port; use https:// or wss://",
    "WRONG_VERSION_NUMBER": "not TLS, or a TLS version this side refuses",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "client_ca is set and the client sent no certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "the peer does not trust this side's certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the peer rejected this side's certificate",
}
"""OpenSSL's reasons that are common at an edge, and what they mean to an operator."""


def tls_failure(exc: BaseException) -> str:
    """An operator's description of why a handshake failed: OpenSSL's reason (verification
    detail first), with what it usually means."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verification failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        reason = exc.reason.lower().replace("_", " ")
        hint = _HINTS.get(exc.reason)
        return f"{reason} ({hint})" if hint else reason
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def peer_subject(conn: TLSConn) -> str:
    """The verified client certificate's subject (RFC 4514), "" when there is none.

    Characters outside printable ASCII are escaped as RFC 4514 allows (``\\XX`` per UTF-8 byte),
    so the value can travel in a header and carries no line break."""
    der = conn.tls.getpeercert(binary_form=True)
    if not der:
        return ""
    subject = x509.load_der_x509_certificate(der).subject.rfc4514_string()
    return "".join(
        c if " " <= c <= "~" else "".join(f"\\{b:02X}" for b in c.encode()) for c in subject
    )


@dataclass(frozen=True, slots=True)
class _Loaded:
    """The contexts built from one reading of a listener's files."""

    default: ssl.SSLContext
    """The first pair's; SNI switches a handshake to another pair's context."""
    digest: bytes
    """Of every file read, to see when one changes."""


def listener_tls(config: Config) -> list[ServerTLS | None]:
    """Each listener's TLS (None for a plain one), its files loaded now. Raises
    ``ConfigError`` naming the key and the file."""
    return [
        ServerTLS(listener.tls, f"listeners[{i}].tls") if listener.tls is not None else None
        for i, listener in enumerate(config.listeners)
    ]


def backend_contexts(config: Config) -> dict[str, ssl.SSLContext]:
    """A client context per route with ``wss://`` backends, by route name, its files loaded
    now. Raises ``ConfigError`` naming the key and the file."""
    return {
        route.name: client_context(route.backend_tls, f"routes[{i}].backend_tls")
        for i, route in enumerate(config.routes)
        if any(backend.tls for backend in route.backends)
    }


class ServerTLS:
    """A listener's TLS: the current contexts, reloaded without dropping open tunnels."""

    def __init__(self, settings: ListenerTLS, key: str) -> None:
        """``key`` names the listener in errors and logs (``listeners[0].tls``). Raises
        ``ConfigError`` when the files cannot be loaded: a server must not start without its
        certificates."""
        self.settings = settings
        self.key = key
        contents = self._read_files()
        self._loaded = self._load(contents, _digest_of(contents))
        self._rejected: bytes | str | None = None
        """What the last failed reload saw (a digest, or an unreadable file's error), so that
        the watcher logs a broken pair once, not at every check."""

    @property
    def context(self) -> ssl.SSLContext:
        """The context for the next handshake; SNI may switch it to another pair's."""
        return self._loaded.default

    def reload(self, *, force: bool) -> bool:
        """Load the files again when they changed (or always, with ``force``); True when new
        contexts are in use. On failure the old ones stay, and the log says which file."""
        try:
            contents = self._read_files()
        except ConfigError as error:
            return self._reject(error, error.message, force)
        digest = _digest_of(contents)
        if not force and digest in (self._loaded.digest, self._rejected):
            return False
        try:
            self._loaded = self._load(contents, digest)
        except ConfigError as error:
            return self._reject(error, digest, force)
        self._rejected = None
        log.info(
            "TLS certificates reloaded; new handshakes use them",
            extra=fields(
                listener=self.key, certificates=",".join(p.cert for p in self.settings.certs)
            ),
        )
        return True

    def _reject(self, error: ConfigError, seen: bytes | str, force: bool) -> bool:
        if force or seen != self._rejected:
            log.error(
                "TLS certificates not reloaded; the previous ones stay in use",
                extra=fields(listener=self.key, error=error.message),
            )
        self._rejected = seen
        return False

    def _read_files(self) -> dict[str, bytes]:
        files = [name for pair in self.settings.certs for name in (pair.cert, pair.key)]
        if self.settings.client_ca:
            files.append(self.settings.client_ca)
        return {name: _read(name, self.key) for name in files}

    def _load(self, contents: dict[str, bytes], digest: bytes) -> _Loaded:
        contexts = [
            _server_context(self.settings, contents, pair.cert, pair.key, self.key)
            for pair in self.settings.certs
        ]
        by_name: dict[str, ssl.SSLContext] = {}
        for pair, context in reversed(list(zip(self.settings.certs, contexts, strict=True))):
            for name in _names(contents[pair.cert]):
                by_name[name] = context
        default = contexts[0]
        if len(contexts) > 1:
            for context in contexts:
                context.sni_callback = _choose(by_name, default)
        return _Loaded(default, digest)


def _choose(
    by_name: dict[str, ssl.SSLContext], default: ssl.SSLContext
) -> Callable[[ssl.SSLObject, str | None, ssl.SSLContext], None]:
    """The SNI callback: an exact name first, then a wildcard one label up, else the default.
    ``by_name`` holds exact names and ``*.suffix`` wildcards (as ``.suffix``)."""

    def choose(tls: ssl.SSLObject, server_name: str | None, _current: ssl.SSLContext) -> None:
        if not server_name:
            return
        name = server_name.lower().rstrip(".")
        context = by_name.get(name)
        if context is None:
            parent = name.partition(".")[2]
            context = by_name.get("." + parent) if parent else None
        tls.context = context or default

    return choose


def _server_context(
    settings: ListenerTLS, contents: dict[str, bytes], cert: str, key_file: str, key: str
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = TLS_VERSIONS[settings.min_version]
    context.set_ciphers(CIPHERS_TLS12)
    context.set_alpn_protocols(ALPN)
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    _load_pair(context, cert, key_file, key)
    if settings.client_ca:
        try:
            context.load_verify_locations(cadata=contents[settings.client_ca].decode("latin-1"))
        except (ssl.SSLError, ValueError) as exc:
            raise ConfigError(
                f"{key}.client_ca", f"{settings.client_ca}: no usable CA certificate ({exc})"
            ) from exc
        context.verify_mode = ssl.CERT_REQUIRED
    # Last: the ticket layer checks the SSL_CTX it reaches against these settings.
    tickets.install(context, settings.ticket_key_rotation)
    return context


def client_context(settings: BackendTLS, key: str) -> ssl.SSLContext:
    """The context for a route's ``wss://`` backends. Raises ``ConfigError`` naming the key."""
    cadata = _read(settings.ca, f"{key}.ca").decode("latin-1") if settings.ca else None
    try:
        context = ssl.create_default_context(cadata=cadata)
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"{key}.ca", f"{settings.ca}: no usable CA certificate ({exc})") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(ALPN)
    if settings.cert:
        _load_pair(context, settings.cert, settings.key, key)
    if not settings.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _load_pair(context: ssl.SSLContext, cert: str, key_file: str, key: str) -> None:
    try:
        context.load_cert_chain(cert, key_file)
    except OSError as exc:
        problem = exc.strerror if not isinstance(exc, ssl.SSLError) else exc.reason or str(exc)
        raise ConfigError(
            f"{key}.cert",
            f"cannot load certificate {cert} with key {key_file}: {problem}"
            " (PEM files; the key must match the certificate and not be encrypted)",
        ) from exc


def _read(name: str, key: str) -> bytes:
    try:
        return Path(name).read_bytes()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {name}: {exc.strerror}") from exc


def _digest_of(contents: dict[str, bytes]) -> bytes:
    digest = hashlib.sha256()
    for name in sorted(contents):
        digest.update(name.encode() + b"\0" + contents[name] + b"\0")
    return digest.digest()


def _names(pem: bytes) -> list[str]:
    """The DNS names and IP addresses a certificate covers (its first, in the chain)."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    names = [name.lower().rstrip(".") for name in san.get_values_for_type(x509.DNSName)]
    names = ["." + name[2:] if name.startswith("*.") else name for name in names]
    ips = [
        str(ip)
        for ip in san.get_values_for_type(x509.IPAddress)
        if isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address)
    ]
    return names + ips
