"""Development certificates: a private CA and the certificates it signs, for ``tunnel cert``.

This replaces a shell session with ``openssl`` (or installing mkcert) when all that is wanted is a
``wss://`` listener on a laptop or in a test lab. Keys are EC P-256 (small, fast, accepted by every
TLS stack in use) and are written unencrypted, readable by their owner only. Nothing here is for
production: a real deployment brings certificates from its own CA or ACME.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tunnel.errors import ConfigError

DEFAULT_DAYS = 825
"""Validity of the CA and of the certificates it issues.

825 days is the longest any TLS server certificate may live on Apple platforms, which apply the
limit to private CAs too. The shorter 398-day rule of Chromium, Firefox and Safari binds only CAs
in the public root programs, so a certificate from a locally trusted CA may use the full 825 days
everywhere. The CA lives as long as its first certificate: one ``tunnel cert`` run, one renewal.
"""

CLOCK_SKEW = timedelta(hours=1)
"""notBefore is backdated this much, so that a peer whose clock is a little behind accepts it."""

CA_COMMON_NAME = "tunnel development CA"
ORGANIZATION = "tunnel development certificates"

CA_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"

_MAX_COMMON_NAME = 64  # X.520 ub-common-name; cryptography refuses longer ones
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)\Z")
_HOST_KEY = "--host"


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate and its private key, both PEM (the key PKCS#8, unencrypted)."""

    cert_pem: bytes
    key_pem: bytes


@dataclass(frozen=True, slots=True)
class DevCertificates:
    """Where ``write_dev_certificates`` put the CA and the server certificate (absolute paths)."""

    ca_cert: Path
    ca_key: Path
    cert: Path
    key: Path


def make_ca(
    common_name: str = CA_COMMON_NAME, *, days: int = DEFAULT_DAYS, now: datetime | None = None
) -> Issued:
    """A self-signed CA that may sign end-entity certificates only (path length 0).

    ``now`` (aware, or naive meaning UTC) is a parameter so that tests can fix the validity window.
    """
    start = _start(now)
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(_common_name(common_name, "common_name"))
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - CLOCK_SKEW)
        .not_valid_after(start + _days(days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    )
    return Issued(_pem(builder.sign(key, hashes.SHA256())), _key_pem(key))


def issue(
    ca: Issued,
    hosts: Sequence[str],
    *,
    days: int = DEFAULT_DAYS,
    client: bool = False,
    common_name: str | None = None,
    now: datetime | None = None,
) -> Issued:
    """A certificate signed by ``ca`` for ``hosts``: DNS names, ``*.`` wildcards, IP literals.

    Clients match the subjectAltName only; the common name (``hosts[0]`` unless given) is for
    people reading the certificate. ``client=True`` makes a client certificate (clientAuth) for
    mutual TLS instead of a server certificate (serverAuth). The certificate is valid from an
    hour before ``now`` for ``days``, or until the CA expires if that comes first.

    Raises:
        ConfigError: a host is not a valid DNS name or IP literal, ``hosts`` is empty, ``days``
            is below 1, or ``ca`` is not a usable CA or has expired.

    Not checked: that the names resolve, or that they belong to you.
    """
    if isinstance(hosts, str):
        raise TypeError("hosts is a sequence of names; wrap a single name in a list")
    names = _subject_alt_names(hosts)
    ca_cert, ca_key = _load_ca(ca)
    start = _start(now)
    # A certificate never outlives its CA: chains stop verifying when the CA expires anyway.
    end = min(start + _days(days), ca_cert.not_valid_after_utc)
    if end <= start:
        raise ConfigError(
            "ca", f"the CA expired on {ca_cert.not_valid_after_utc:%Y-%m-%d}; make a new CA"
        )
    if common_name is None:
        common_name = hosts[0] if len(hosts[0]) <= _MAX_COMMON_NAME else ORGANIZATION
    key = ec.generate_private_key(ec.SECP256R1())
    purpose = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(_common_name(common_name, "common_name")))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - CLOCK_SKEW)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_authority_key_id(ca_cert, ca_key), critical=False)
    )
    return Issued(_pem(builder.sign(ca_key, hashes.SHA256())), _key_pem(key))


def write_dev_certificates(
    out_dir: Path, hosts: Sequence[str], *, days: int = DEFAULT_DAYS, overwrite: bool = False
) -> DevCertificates:
    """Make a CA and a server certificate for ``hosts`` and write them into ``out_dir``.

    Key files are created 0600 in one ``open(2)``, so no other user can ever read them, not even
    between a write and a chmod; certificates are 0644 (less if the umask says so). ``out_dir`` is
    created 0700 when missing. Without ``overwrite`` nothing is written when any of the four files
    exists; with it, each file is replaced atomically by a new one.

    Raises:
        ConfigError: a bad host or ``days`` (see ``issue``), a file exists without
            ``overwrite``, or the directory or a file cannot be written.
    """
    now = datetime.now(UTC)
    ca = make_ca(days=days, now=now)
    server = issue(ca, hosts, days=days, now=now)
    out_dir = out_dir.absolute()
    paths = DevCertificates(
        ca_cert=out_dir / CA_FILE,
        ca_key=out_dir / CA_KEY_FILE,
        cert=out_dir / CERT_FILE,
        key=out_dir / KEY_FILE,
    )
    try:
        out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(str(out_dir), f"cannot create the directory: {exc.strerror}") from exc
    if not overwrite:
        for path in (paths.ca_cert, paths.ca_key, paths.cert, paths.key):
            if os.path.lexists(path):
                raise _exists(path)
    _write(paths.ca_cert, ca.cert_pem, 0o644, overwrite)
    _write(paths.ca_key, ca.key_pem, 0o600, overwrite)
    _write(paths.cert, server.cert_pem, 0o644, overwrite)
    _write(paths.key, server.key_pem, 0o600, overwrite)
    return paths


def trust_instructions(paths: DevCertificates) -> str:
    """How to make clients trust the CA and how to point tunnel at the certificate."""
    ca = shlex.quote(str(paths.ca_cert))
    nickname = shlex.quote(CA_COMMON_NAME)
    nssdb = '"sql:$HOME/.pki/nssdb"'
    return f"""\
Trust the CA ({paths.ca_cert.name}) on the machines you test from. Keep {paths.ca_key.name} private:
whoever holds it can make certificates that those machines will trust.

Debian/Ubuntu system store (curl, wget, git, Python with the system store):
  sudo cp {ca} /usr/local/share/ca-certificates/tunnel-development-ca.crt
  sudo update-ca-certificates
  (undo: remove that file, then sudo update-ca-certificates --fresh)

Chromium/Chrome on Linux (NSS, per user; certutil is in libnss3-tools):
  certutil -d {nssdb} -A -t C,, -n {nickname} -i {ca}
  (undo: certutil -d {nssdb} -D -n {nickname})

Firefox keeps its own store: Settings > Privacy & Security > Certificates > View Certificates >
Authorities > Import, pick {paths.ca_cert.name} and tick "Trust this CA to identify websites".

One client at a time, without touching any store:
  curl --cacert {ca} https://localhost:8443/
  Python: ssl.create_default_context(cafile={str(paths.ca_cert)!r})
  Node.js: NODE_EXTRA_CA_CERTS={ca} node app.js

Serve TLS with tunnel:
  tunnel run --listen :8443 --backend ws://127.0.0.1:9000 \\
    --tls-cert {shlex.quote(str(paths.cert))} --tls-key {shlex.quote(str(paths.key))}
or in the configuration file:
  [[listeners]]
  listen = ":8443"
  tls = {{ cert = {_toml_string(paths.cert)}, key = {_toml_string(paths.key)} }}
"""


def _subject_alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    if not hosts:
        raise ConfigError(_HOST_KEY, "give at least one DNS name or IP address")
    names: list[x509.GeneralName] = []
    for host in hosts:
        name = _general_name(host)
        if name not in names:
            names.append(name)
    return names


def _general_name(host: str) -> x509.GeneralName:
    """One ``--host`` as a SAN entry: an IP literal (``[v6]`` allowed) or an LDH DNS name."""
    literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        address = ipaddress.ip_address(literal)
    except ValueError:
        return x509.DNSName(_dns_name(host))
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        raise ConfigError(_HOST_KEY, f"{host!r}: a zone index (%...) cannot go in a certificate")
    return x509.IPAddress(address)


def _dns_name(host: str) -> str:
    """``host`` lower-cased in ASCII (IDNA for non-ASCII labels), or ConfigError saying why not."""
    problem = f"{host!r} is not a DNS name or an IP address"
    if not host:
        raise ConfigError(_HOST_KEY, "an empty name is not a DNS name or an IP address")
    labels = [_ascii_label(label, problem) for label in host.split(".")]
    wildcard = labels[0] == "*" and len(labels) > 1
    for label in labels[1:] if wildcard else labels:
        if not _LABEL.match(label):
            raise ConfigError(_HOST_KEY, f"{problem}: {_label_problem(label)}")
    if labels[-1].isdigit():
        raise ConfigError(_HOST_KEY, f"{problem}: it looks like an IPv4 address but is not one")
    name = ".".join(labels)
    if len(name) > 253:
        raise ConfigError(_HOST_KEY, f"{problem}: longer than 253 characters")
    return name


def _label_problem(label: str) -> str:
    if not label:
        return "it has an empty label (a doubled dot, or a dot at either end)"
    if "*" in label:
        return "a wildcard may only be the whole first label, like *.example.com"
    return (
        f"label {label!r} must be 1 to 63 letters, digits or hyphens, "
        "and may not start or end with a hyphen"
    )


def _ascii_label(label: str, problem: str) -> str:
    if label.isascii():
        return label.lower()
    try:
        return label.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise ConfigError(_HOST_KEY, f"{problem}: label {label!r} has no IDNA (xn--) form") from exc


def _load_ca(ca: Issued) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(ca.cert_pem)
        key = serialization.load_pem_private_key(ca.key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError("ca", f"cannot load the CA certificate and key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ConfigError("ca", "the CA key must be an EC or RSA key")
    if cert.public_key() != key.public_key():
        raise ConfigError("ca", "the CA key does not belong to the CA certificate")
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise ConfigError("ca", "the CA certificate is not a CA (BasicConstraints ca=TRUE)")
    return cert, key


def _authority_key_id(
    ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
) -> x509.AuthorityKeyIdentifier:
    """The CA's own key identifier when it has one, so that the two always match."""
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _start(now: datetime | None) -> datetime:
    """Whole seconds, as certificates store them, so that a CA and a certificate made with the
    same ``now`` and ``days`` end at the very same second."""
    start = datetime.now(UTC) if now is None else now
    if start.tzinfo is None:
        start = start.replace(tzinfo=UTC)
    return start.astimezone(UTC).replace(microsecond=0)


def _days(days: int) -> timedelta:
    if days < 1:
        raise ConfigError("--days", f"must be 1 or more, got {days}")
    return timedelta(days=days)


def _common_name(common_name: str, key: str) -> str:
    if not 1 <= len(common_name) <= _MAX_COMMON_NAME:
        raise ConfigError(key, f"must be 1 to {_MAX_COMMON_NAME} characters long")
    return common_name


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, mode: int, overwrite: bool) -> None:
    """Create ``path`` with ``mode`` from the first byte; with ``overwrite``, write a fresh file
    beside it and rename it over the old one (a new inode, so an old file's mode never leaks)."""
    target = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp") if overwrite else path
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC
    try:
        fd = os.open(target, flags, mode)
    except FileExistsError as exc:
        raise _exists(path) from exc
    except OSError as exc:
        raise ConfigError(str(path), f"cannot write the file: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        if overwrite:
            os.replace(target, path)
    except OSError as exc:
        if overwrite:
            target.unlink(missing_ok=True)
        raise ConfigError(str(path), f"cannot write the file: {exc.strerror}") from exc


def _exists(path: Path) -> ConfigError:
    return ConfigError(str(path), "already exists; pass --force to replace it")


def _toml_string(path: Path) -> str:
    """A TOML basic string: JSON's escapes (``\\"``, ``\\\\``, ``\\uXXXX``) are TOML's too."""
    return json.dumps(str(path), ensure_ascii=False)
