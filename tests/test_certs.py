"""Development certificates, proved with the stdlib ``ssl`` module over real loopback sockets.

Each handshake test runs a TLS server in a thread and a client in the test, both on 127.0.0.1
(or ::1), and checks what OpenSSL decided: the certificate is accepted for its names and
addresses, refused for others and by a client that does not trust its CA. The rest checks the
X.509 fields, the files ``write_dev_certificates`` leaves behind, and ``tunnel cert``.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import stat
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from tunnel.certs import (
    DEFAULT_DAYS,
    DevCertificates,
    Issued,
    issue,
    make_ca,
    trust_instructions,
    write_dev_certificates,
)
from tunnel.cli import main
from tunnel.errors import ConfigError

SOCKET_SECONDS = 10.0
"""Bound on every accept, handshake, read and thread join; a loopback handshake takes ms."""

GREETING = b"hello over TLS"


# --- a real TLS exchange over loopback --------------------------------------------------------


@dataclass
class Exchange:
    """What each side of one TLS connection saw."""

    client_error: ssl.SSLError | None = None
    server_error: OSError | None = None
    received: bytes = b""
    """What the client read from the server after the handshake."""
    client_cert: dict[str, Any] | None = None
    """The client's certificate as the server's ``getpeercert()`` saw it."""

    @property
    def ok(self) -> bool:
        return self.client_error is None and self.server_error is None and self.received == GREETING


def tls_exchange(
    server: ssl.SSLContext, client: ssl.SSLContext, server_hostname: str, *, via: str = "127.0.0.1"
) -> Exchange:
    """Accept one connection on ``via`` in a thread, handshake, send GREETING; the client reads it.

    The client reads after its handshake because with TLS 1.3 a server's refusal of the client's
    certificate reaches the client only then.
    """
    family = socket.AF_INET6 if ":" in via else socket.AF_INET
    result = Exchange()
    with socket.create_server((via, 0), family=family) as listener:
        listener.settimeout(SOCKET_SECONDS)
        port = listener.getsockname()[1]

        def serve_one() -> None:
            try:
                conn, _ = listener.accept()
                conn.settimeout(SOCKET_SECONDS)
                with server.wrap_socket(conn, server_side=True) as tls:
                    result.client_cert = tls.getpeercert() or None
                    tls.sendall(GREETING)
            except OSError as exc:  # ssl.SSLError is an OSError
                result.server_error = exc

        thread = threading.Thread(target=serve_one, daemon=True)
        thread.start()
        try:
            with (
                socket.create_connection((via, port), timeout=SOCKET_SECONDS) as raw,
                client.wrap_socket(raw, server_hostname=server_hostname) as tls,
            ):
                result.received = _read_all(tls)
        except ssl.SSLError as exc:
            result.client_error = exc
        finally:
            thread.join(SOCKET_SECONDS)
        assert not thread.is_alive(), "the TLS server thread did not finish"
    return result


def _read_all(tls: ssl.SSLSocket) -> bytes:
    data = b""
    for _ in range(len(GREETING) + 1):  # at least one byte per read until the greeting is in
        chunk = tls.recv(len(GREETING) - len(data))
        data += chunk
        if not chunk or data == GREETING:
            break
    return data


def pem_files(directory: Path, issued: Issued, stem: str) -> tuple[Path, Path]:
    cert, key = directory / f"{stem}.pem", directory / f"{stem}-key.pem"
    cert.write_bytes(issued.cert_pem)
    key.write_bytes(issued.key_pem)
    return cert, key


def server_context(
    directory: Path, issued: Issued, *, require_client_cert_from: Issued | None = None
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*pem_files(directory, issued, "server"))
    if require_client_cert_from is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=require_client_cert_from.cert_pem.decode())
    return context


def client_context(
    trusting: Issued, directory: Path | None = None, certificate: Issued | None = None
) -> ssl.SSLContext:
    """Trusts ``trusting`` only (no system store: ``cadata`` replaces the defaults)."""
    context = ssl.create_default_context(cadata=trusting.cert_pem.decode())
    if certificate is not None:
        assert directory is not None
        context.load_cert_chain(*pem_files(directory, certificate, "client"))
    return context


def ipv6_loopback() -> str:
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    return "::1"


@pytest.fixture(scope="module")
def ca() -> Issued:
    return make_ca()


@pytest.fixture(scope="module")
def server_cert(ca: Issued) -> Issued:
    return issue(ca, ["localhost", "127.0.0.1", "::1", "*.dev.test"])


# --- handshakes that must pass ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["localhost", "LocalHost", "chat.dev.test"])
def test_a_client_trusting_the_ca_accepts_the_certificate_for_a_dns_name(
    tmp_path: Path, ca: Issued, server_cert: Issued, name: str
) -> None:
    exchange = tls_exchange(server_context(tmp_path, server_cert), client_context(ca), name)
    assert exchange.ok, exchange


def test_the_certificate_is_accepted_for_127_0_0_1_as_an_ip_san(
    tmp_path: Path, ca: Issued, server_cert: Issued
) -> None:
    exchange = tls_exchange(server_context(tmp_path, server_cert), client_context(ca), "127.0.0.1")
    assert exchange.ok, exchange


def test_the_certificate_is_accepted_for_ipv6_loopback_as_an_ip_san(
    tmp_path: Path, ca: Issued, server_cert: Issued
) -> None:
    via = ipv6_loopback()
    exchange = tls_exchange(
        server_context(tmp_path, server_cert), client_context(ca), "::1", via=via
    )
    assert exchange.ok, exchange


def test_a_client_certificate_is_accepted_by_a_server_that_requires_one(
    tmp_path: Path, ca: Issued, server_cert: Issued
) -> None:
    alice = issue(ca, ["alice.dev.test"], client=True, common_name="alice")
    server = server_context(tmp_path, server_cert, require_client_cert_from=ca)
    exchange = tls_exchange(server, client_context(ca, tmp_path, alice), "localhost")

    assert exchange.ok, exchange
    assert exchange.client_cert is not None
    assert (("commonName", "alice"),) in exchange.client_cert["subject"]


# --- handshakes that must fail ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["example.com", "a.b.dev.test", "dev.test", "127.0.0.2", "::2"])
def test_a_name_or_address_not_in_the_certificate_is_refused(
    tmp_path: Path, ca: Issued, server_cert: Issued, name: str
) -> None:
    exchange = tls_exchange(server_context(tmp_path, server_cert), client_context(ca), name)

    assert isinstance(exchange.client_error, ssl.SSLCertVerificationError), exchange
    assert "mismatch" in exchange.client_error.verify_message
    assert exchange.received == b""


def test_a_client_that_does_not_trust_the_ca_refuses_even_a_ca_of_the_same_name(
    tmp_path: Path, server_cert: Issued
) -> None:
    impostor = make_ca()  # same subject name, different key
    exchange = tls_exchange(
        server_context(tmp_path, server_cert), client_context(impostor), "localhost"
    )

    assert isinstance(exchange.client_error, ssl.SSLCertVerificationError), exchange
    assert exchange.received == b""


def test_a_client_certificate_cannot_serve_and_a_server_certificate_cannot_log_in(
    tmp_path: Path, ca: Issued, server_cert: Issued
) -> None:
    client_cert = issue(ca, ["localhost"], client=True)
    as_server = tls_exchange(server_context(tmp_path, client_cert), client_context(ca), "localhost")
    assert isinstance(as_server.client_error, ssl.SSLCertVerificationError), as_server
    assert "purpose" in as_server.client_error.verify_message

    server = server_context(tmp_path, server_cert, require_client_cert_from=ca)
    as_client = tls_exchange(server, client_context(ca, tmp_path, server_cert), "localhost")
    assert isinstance(as_client.server_error, ssl.SSLError), as_client
    assert as_client.received == b""


def test_a_server_that_requires_a_client_certificate_refuses_a_client_without_one(
    tmp_path: Path, ca: Issued, server_cert: Issued
) -> None:
    server = server_context(tmp_path, server_cert, require_client_cert_from=ca)
    exchange = tls_exchange(server, client_context(ca), "localhost")

    assert isinstance(exchange.server_error, ssl.SSLError), exchange
    assert exchange.received == b""


# --- the certificate fields -------------------------------------------------------------------


def _extension(cert: x509.Certificate, kind: type[Any]) -> x509.Extension[Any]:
    return cert.extensions.get_extension_for_class(kind)


def test_the_ca_may_sign_end_entity_certificates_only() -> None:
    now = datetime(2030, 1, 2, 3, 4, 5, 678_000, tzinfo=UTC)
    cert = x509.load_pem_x509_certificate(make_ca(days=10, now=now).cert_pem)

    constraints = _extension(cert, x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value == x509.BasicConstraints(ca=True, path_length=0)
    usage = _extension(cert, x509.KeyUsage)
    assert usage.critical
    assert usage.value.key_cert_sign
    assert usage.value.crl_sign
    assert not usage.value.digital_signature
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == (
        "tunnel development CA"
    )
    assert cert.not_valid_before_utc == datetime(2030, 1, 2, 2, 4, 5, tzinfo=UTC)
    assert cert.not_valid_after_utc == datetime(2030, 1, 12, 3, 4, 5, tzinfo=UTC)


def test_a_server_certificate_has_the_fields_browsers_check(ca: Issued) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    issued = issue(ca, ["LocalHost", "127.0.0.1", "[::1]", "Bücher.example"], days=30, now=now)
    cert = x509.load_pem_x509_certificate(issued.cert_pem)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)

    names = _extension(cert, x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost", "xn--bcher-kva.example"]
    assert names.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "LocalHost"
    assert _extension(cert, x509.BasicConstraints).value.ca is False
    usage = _extension(cert, x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert not usage.value.key_cert_sign
    assert list(_extension(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert (
        _extension(cert, x509.AuthorityKeyIdentifier).value.key_identifier
        == _extension(ca_cert, x509.SubjectKeyIdentifier).value.digest
    )
    assert _extension(cert, x509.SubjectKeyIdentifier).value == (
        x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    )
    assert cert.issuer == ca_cert.subject
    cert.verify_directly_issued_by(ca_cert)
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    assert cert.not_valid_before_utc == now - timedelta(hours=1)
    assert cert.not_valid_after_utc == now + timedelta(days=30)

    key = serialization.load_pem_private_key(issued.key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    assert issued.key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted


def test_a_client_certificate_says_client_auth_and_takes_its_common_name(ca: Issued) -> None:
    cert = x509.load_pem_x509_certificate(
        issue(ca, ["alice.dev.test"], client=True, common_name="alice").cert_pem
    )
    assert list(_extension(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "alice"


def test_the_default_validity_is_825_days_cut_short_where_the_ca_ends() -> None:
    now = datetime(2030, 6, 1, tzinfo=UTC)
    ca = make_ca(now=now)
    cert = x509.load_pem_x509_certificate(issue(ca, ["localhost"], now=now).cert_pem)
    assert DEFAULT_DAYS == 825
    assert cert.not_valid_after_utc == now + timedelta(days=825)

    later = x509.load_pem_x509_certificate(
        issue(ca, ["localhost"], now=now + timedelta(days=1)).cert_pem
    )
    assert later.not_valid_after_utc == now + timedelta(days=825), "cut to the CA's own end"

    with pytest.raises(ConfigError, match="the CA expired on 2032-09-03; make a new CA"):
        issue(ca, ["localhost"], now=now + timedelta(days=825))


@pytest.mark.parametrize(
    ("hosts", "why"),
    [
        pytest.param([], "at least one DNS name or IP address", id="none"),
        pytest.param([""], "an empty name", id="empty"),
        pytest.param(["exa mple.com"], "label 'exa mple' must be 1 to 63 letters", id="space"),
        pytest.param(["under_score.test"], "label 'under_score'", id="underscore"),
        pytest.param(["-lead.test"], "may not start or end with a hyphen", id="hyphen"),
        pytest.param(["a..b"], "empty label", id="double-dot"),
        pytest.param(["example.com."], "empty label", id="trailing-dot"),
        pytest.param(["x" * 64 + ".test"], "1 to 63", id="long-label"),
        pytest.param([("a" * 60 + ".") * 5 + "test"], "longer than 253", id="long-name"),
        pytest.param(["a.*.test"], "wildcard may only be the whole first label", id="wildcard"),
        pytest.param(["300.1.1.1"], "looks like an IPv4 address", id="bad-ipv4"),
        pytest.param(["localhost", "10.0.0"], "'10.0.0' is not a DNS name", id="second-host"),
        pytest.param(["fe80::1%eth0"], "zone index", id="ipv6-zone"),
    ],
)
def test_a_bad_host_raises_config_error_naming_it(ca: Issued, hosts: list[str], why: str) -> None:
    with pytest.raises(ConfigError, match=r"^--host: ") as caught:
        issue(ca, hosts)
    assert why in str(caught.value)


def test_a_string_instead_of_a_list_of_hosts_is_a_type_error(ca: Issued) -> None:
    with pytest.raises(TypeError, match="wrap a single name in a list"):
        issue(ca, "localhost")


def test_days_below_one_and_a_leaf_as_ca_are_refused(ca: Issued, server_cert: Issued) -> None:
    with pytest.raises(ConfigError, match="--days: must be 1 or more"):
        issue(ca, ["localhost"], days=0)
    with pytest.raises(ConfigError, match="not a CA"):
        issue(server_cert, ["localhost"])
    with pytest.raises(ConfigError, match="does not belong"):
        issue(Issued(ca.cert_pem, server_cert.key_pem), ["localhost"])


# --- the files --------------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _contents(paths: DevCertificates) -> list[bytes]:
    return [p.read_bytes() for p in (paths.ca_cert, paths.ca_key, paths.cert, paths.key)]


def test_write_dev_certificates_writes_four_files_keys_0600(tmp_path: Path) -> None:
    out = tmp_path / "new" / "certs"
    paths = write_dev_certificates(out, ["localhost", "127.0.0.1"])

    assert paths == DevCertificates(
        ca_cert=out / "ca.pem",
        ca_key=out / "ca-key.pem",
        cert=out / "cert.pem",
        key=out / "key.pem",
    )
    assert sorted(p.name for p in out.iterdir()) == ["ca-key.pem", "ca.pem", "cert.pem", "key.pem"]
    assert _mode(paths.ca_key) == 0o600
    assert _mode(paths.key) == 0o600
    for cert in (paths.ca_cert, paths.cert):
        assert _mode(cert) & (stat.S_IWGRP | stat.S_IWOTH) == 0
        assert _mode(cert) & stat.S_IRUSR
    assert _mode(out) & 0o077 == 0, "a new directory is the owner's only"
    assert paths.cert.read_bytes().count(b"BEGIN CERTIFICATE") == 1


def test_written_files_serve_tls_with_ssl_loading_them_from_disk(tmp_path: Path) -> None:
    paths = write_dev_certificates(tmp_path, ["localhost"])
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(paths.cert, paths.key)
    client = ssl.create_default_context(cafile=paths.ca_cert)

    exchange = tls_exchange(server, client, "localhost")
    assert exchange.ok, exchange


def test_existing_files_are_kept_unless_overwrite(tmp_path: Path) -> None:
    paths = write_dev_certificates(tmp_path, ["localhost"])
    before = _contents(paths)

    with pytest.raises(ConfigError, match=r"ca\.pem: already exists; pass --force"):
        write_dev_certificates(tmp_path, ["localhost"])
    assert _contents(paths) == before

    paths.key.chmod(0o644)  # an old key left readable must not pass its mode on
    again = write_dev_certificates(tmp_path, ["localhost"], overwrite=True)
    assert again == paths
    after = _contents(paths)
    assert all(old != new for old, new in zip(before, after, strict=True))
    assert _mode(paths.key) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ca-key.pem",
        "ca.pem",
        "cert.pem",
        "key.pem",
    ], "no temporary files are left behind"


def test_one_existing_file_stops_all_four_from_being_written(tmp_path: Path) -> None:
    (tmp_path / "key.pem").write_bytes(b"precious")
    with pytest.raises(ConfigError, match=r"key\.pem: already exists; pass --force") as caught:
        write_dev_certificates(tmp_path, ["localhost"])
    assert str(tmp_path / "key.pem") in str(caught.value)
    assert [p.name for p in tmp_path.iterdir()] == ["key.pem"]
    assert (tmp_path / "key.pem").read_bytes() == b"precious"


def test_an_out_dir_that_is_a_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="cannot create the directory"):
        write_dev_certificates(tmp_path / "file", ["localhost"])


def test_trust_instructions_name_the_files_and_every_store(tmp_path: Path) -> None:
    out = tmp_path / "with space"
    paths = DevCertificates(out / "ca.pem", out / "ca-key.pem", out / "cert.pem", out / "key.pem")
    text = trust_instructions(paths)

    ca = f"'{out}/ca.pem'"  # shell-quoted, as the path has a space
    assert f"sudo cp {ca} /usr/local/share/ca-certificates/" in text
    assert ".crt" in text
    assert "sudo update-ca-certificates" in text
    assert 'certutil -d "sql:$HOME/.pki/nssdb" -A -t C,, -n ' in text
    assert f"-i {ca}" in text
    assert "Firefox" in text
    assert f"curl --cacert {ca}" in text
    assert f"ssl.create_default_context(cafile={str(out / 'ca.pem')!r})" in text
    assert "tunnel run --listen :8443" in text
    assert f"--tls-cert '{out}/cert.pem' --tls-key '{out}/key.pem'" in text
    assert f'tls = {{ cert = "{out}/cert.pem", key = "{out}/key.pem" }}' in text


# --- tunnel cert ------------------------------------------------------------------------------


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_cert_command_writes_the_files_and_prints_paths_and_instructions(tmp_path: Path) -> None:
    out = tmp_path / "dev"
    result = invoke(
        "cert", "--host", "localhost", "--host", "::1", "--out", str(out), "--days", "9"
    )

    assert result.exit_code == 0, result.output
    for name in ("ca.pem", "ca-key.pem", "cert.pem", "key.pem"):
        assert str(out / name) in result.stdout
    assert "update-ca-certificates" in result.stdout
    assert "certutil" in result.stdout
    assert "--tls-cert" in result.stdout
    cert = x509.load_pem_x509_certificate((out / "cert.pem").read_bytes())
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=9, hours=1)
    assert _mode(out / "key.pem") == 0o600


def test_cert_command_with_a_bad_host_exits_1_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "dev"
    result = invoke("cert", "--host", "localhost", "--host", "bad_name", "--out", str(out))

    assert result.exit_code == 1
    assert "tunnel: --host: 'bad_name' is not a DNS name or an IP address" in result.stderr
    assert "Traceback" not in result.output
    assert not out.exists()


def test_cert_command_refuses_existing_files_until_force(tmp_path: Path) -> None:
    args = ("cert", "--host", "localhost", "--out", str(tmp_path))
    assert invoke(*args).exit_code == 0
    old_key = (tmp_path / "key.pem").read_bytes()

    refused = invoke(*args)
    assert refused.exit_code == 1
    assert f"tunnel: {tmp_path / 'ca.pem'}: already exists; pass --force" in refused.stderr
    assert "Traceback" not in refused.output
    assert (tmp_path / "key.pem").read_bytes() == old_key

    forced = invoke(*args, "--force")
    assert forced.exit_code == 0, forced.output
    assert (tmp_path / "key.pem").read_bytes() != old_key


def test_cert_command_needs_a_host_and_an_out_dir(tmp_path: Path) -> None:
    assert invoke("cert", "--out", str(tmp_path)).exit_code == 2
    assert invoke("cert", "--host", "localhost").exit_code == 2
    assert (
        invoke("cert", "--host", "localhost", "--out", str(tmp_path), "--days", "0").exit_code == 2
    )
    assert os.listdir(tmp_path) == []
