"""Configuration: build a valid file, break one key, check that the error names that key."""

from __future__ import annotations

import ipaddress
import json
import os
import tomllib
from pathlib import Path

import pytest

from tunnel.config import (
    Address,
    AdminConfig,
    BackendConfig,
    BackendTLS,
    CertPair,
    Config,
    ListenerConfig,
    ListenerTLS,
    RouteConfig,
    ServerConfig,
    parse_duration,
    parse_size,
)
from tunnel.errors import ConfigError

OMIT = "<omit>"


def doc(
    *,
    top: str = "",
    server: str = "",
    listen: str = '"127.0.0.1:8080"',
    route: str = "",
    backends: str = '[{ name = "a", url = "ws://127.0.0.1:9000" }]',
    more: str = "",
) -> str:
    """A valid configuration file; each argument replaces one part of it."""
    listen_line = "" if listen == OMIT else f"listen = {listen}"
    return (
        f"{top}\n[server]\n{server}\n\n[[listeners]]\n{listen_line}\n\n"
        f'[[routes]]\nname = "chat"\n{route}\nbackends = {backends}\n{more}\n'
    )


TLS_LISTEN = '"127.0.0.1:8443"'


def tls_doc(extra: str = "", *, pair: str = 'cert = "c.pem", key = "k.pem"') -> str:
    """A valid file whose one listener serves TLS; ``extra`` adds keys to its tls table."""
    inside = ", ".join(part for part in (pair, extra) if part)
    return doc(listen=f"{TLS_LISTEN}\ntls = {{ {inside} }}")


def test_minimal_file_has_safe_defaults() -> None:
    config = Config.from_toml(doc())
    s = config.server
    assert s.handshake_timeout == 10.0
    assert s.connect_timeout == 5.0
    assert s.response_timeout == 10.0
    assert s.idle_timeout == 3600.0
    assert s.max_header_bytes == 32 * 1024
    assert s.max_tunnels == 10_000
    assert s.trusted_proxies == ()
    assert s.log_format == "text"
    assert s == ServerConfig()
    assert config.listeners == (ListenerConfig(Address("127.0.0.1", 8080)),)
    (route,) = config.routes
    assert route.name == "chat"
    assert route.hosts == ()
    assert route.path_prefix == "/"
    assert route.upgrades == ("websocket",)
    assert route.balance == "round-robin"
    assert route.preserve_host is True
    assert route.backends == (BackendConfig("a", "127.0.0.1", 9000),)


def test_full_file_is_read() -> None:
    config = Config.from_toml(
        doc(
            server='handshake_timeout = "500ms"\nconnect_timeout = "2s"\n'
            'response_timeout = "1m"\nidle_timeout = "0s"\nmax_header_bytes = "64KiB"\n'
            'max_tunnels = 5\ntrusted_proxies = ["10.0.0.0/8", "::1"]\nlog_format = "json"',
            route='hosts = ["Chat.Example.com"]\npath_prefix = "/ws/"\n'
            'upgrades = ["WebSocket", "mqtt"]\npreserve_host = false',
        )
    )
    s = config.server
    assert (s.handshake_timeout, s.connect_timeout, s.response_timeout) == (0.5, 2.0, 60.0)
    assert s.idle_timeout == 0.0
    assert s.max_header_bytes == 65536
    assert s.max_tunnels == 5
    assert s.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert s.log_format == "json"
    (route,) = config.routes
    assert route.hosts == ("chat.example.com",)
    assert route.path_prefix == "/ws/"
    assert route.upgrades == ("websocket", "mqtt")
    assert route.preserve_host is False


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("10s", 10.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("1.5s", 1.5),
        (" 2 s ", 2.0),
        ("10S", 10.0),
        ("0s", 0.0),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text, "k") == seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("32KiB", 32768),
        ("32kib", 32768),
        ("1MiB", 1048576),
        ("1GiB", 1024**3),
        ("512B", 512),
        ("1.5KiB", 1536),
        ("0.25MiB", 262144),
        ("1.0B", 1),
        (" 32 KIB ", 32768),
        ("0", 0),
        ("0B", 0),
        ("1024GiB", 1024**4),
        ("4096", 4096),
        (4096, 4096),
    ],
)
def test_sizes(text: str | int, size: int) -> None:
    assert parse_size(text, "k") == size


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("32KB", 'is ambiguous; write "32KiB" (32768 bytes) or a number of bytes'),
        ("32kb", 'write "32KiB" (32768 bytes)'),
        ("32k", 'write "32KiB" (32768 bytes)'),
        ("32K", 'write "32KiB" (32768 bytes)'),
        ("1MB", 'write "1MiB" (1048576 bytes)'),
        ("1m", 'write "1MiB" (1048576 bytes)'),
        ("1GB", 'write "1GiB" (1073741824 bytes)'),
        ("1g", 'write "1GiB" (1073741824 bytes)'),
        ("0.1KB", "is ambiguous; write a number of bytes"),
        ("9" * 5000 + "KB", "is ambiguous; write a number of bytes"),
        ("0.5B", "is not a whole number of bytes"),
        ("1.1KiB", "is not a whole number of bytes"),
        ("0.3", "is not a whole number of bytes"),
        ("-1KiB", "cannot be negative"),
        (-1, "cannot be negative"),
        ("1025GiB", "is too large; sizes go up to 1024GiB"),
        ("9" * 400 + "KiB", "is too large"),
        ("9" * 5000, "is too large"),
        ("0." + "0" * 5000 + "1KiB", "is not a whole number of bytes"),
        (1024**4 + 1, "is too large"),
        ("2TiB", "is not a size"),
        ("1e3B", "is not a size"),
        ("\uff13\uff12KiB", "is not a size"),
        ("32\u00a0KiB", "is not a size"),
        (True, "expected a size"),
        (1.5, "expected a size"),
    ],
)
def test_bad_sizes(text: str | int, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_size(text, "server.max_header_bytes")
    assert caught.value.key == "server.max_header_bytes"
    assert message in caught.value.problem


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('"32KB"', "is ambiguous"),
        ('"0.5KiB"', "must be between 1KiB and 1MiB"),
        ('"1.0001KiB"', "is not a whole number of bytes"),
        ("-32768", "cannot be negative"),
        (f'"{"9" * 400}KiB"', "is too large"),
    ],
)
def test_bad_sizes_in_a_file_name_their_key(value: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_toml(doc(server=f"max_header_bytes = {value}"))
    assert caught.value.key == "server.max_header_bytes"
    assert message in caught.value.problem


BAD = [
    # (id, file text, dotted key, message substring)
    ("not-toml", "[server\n", "(file)", "not valid TOML"),
    ("unknown-top-level", doc(top='[limit]\nstore = "memory"'), "limit", "unknown key"),
    ("server-not-table", doc(top="server = 5").replace("[server]\n", ""), "server", "table"),
    (
        "duration-no-unit",
        doc(server='handshake_timeout = "10"'),
        "server.handshake_timeout",
        "is not a duration",
    ),
    (
        "duration-bad-unit",
        doc(server='connect_timeout = "10 parsecs"'),
        "server.connect_timeout",
        "is not a duration",
    ),
    (
        "duration-number",
        doc(server="response_timeout = 10"),
        "server.response_timeout",
        "expected a duration string",
    ),
    (
        "duration-negative",
        doc(server='idle_timeout = "-1s"'),
        "server.idle_timeout",
        "is not a duration",
    ),
    (
        "duration-zero-not-allowed",
        doc(server='handshake_timeout = "0s"'),
        "server.handshake_timeout",
        "must be more than 0s",
    ),
    (
        "duration-infinite",
        doc(server=f'idle_timeout = "{"9" * 400}h"'),
        "server.idle_timeout",
        "too large",
    ),
    (
        "size-bad-unit",
        doc(server='max_header_bytes = "32 potatoes"'),
        "server.max_header_bytes",
        "is not a size",
    ),
    (
        "size-too-small",
        doc(server='max_header_bytes = "100B"'),
        "server.max_header_bytes",
        "must be between 1KiB and 1MiB",
    ),
    (
        "size-too-large",
        doc(server='max_header_bytes = "2MiB"'),
        "server.max_header_bytes",
        "must be between 1KiB and 1MiB",
    ),
    (
        "size-bool",
        doc(server="max_header_bytes = true"),
        "server.max_header_bytes",
        "expected a size",
    ),
    ("tunnels-zero", doc(server="max_tunnels = 0"), "server.max_tunnels", "must be 1 or more"),
    ("tunnels-string", doc(server='max_tunnels = "10"'), "server.max_tunnels", "expected int"),
    ("tunnels-bool", doc(server="max_tunnels = true"), "server.max_tunnels", "expected an integer"),
    (
        "proxy-bad-cidr",
        doc(server='trusted_proxies = ["10.0.0.0/33"]'),
        "server.trusted_proxies",
        "'10.0.0.0/33' is not a CIDR",
    ),
    (
        "proxy-not-list",
        doc(server='trusted_proxies = "10.0.0.0/8"'),
        "server.trusted_proxies",
        "expected a list of strings",
    ),
    (
        "log-format",
        doc(server='log_format = "xml"'),
        "server.log_format",
        "must be one of text, json",
    ),
    ("server-unknown-key", doc(server="no_such_key = 2"), "server.no_such_key", "unknown key"),
    ("workers-zero", doc(server="workers = 0"), "server.workers", "between 1 and 256"),
    ("workers-text", doc(server='workers = "2"'), "server.workers", "expected int"),
    ("relay-mode", doc(server='relay = "sendfile"'), "server.relay", "auto, splice, copy"),
    ("splice-pipes", doc(server="splice_pipes = -1"), "server.splice_pipes", "0 (never splice)"),
    ("listen-no-port", doc(listen='"8080"'), "listeners[0].listen", "needs a port"),
    ("listen-bad-port", doc(listen='"h:99999"'), "listeners[0].listen", "port '99999'"),
    ("listen-empty-port", doc(listen='"h:"'), "listeners[0].listen", "port ''"),
    ("listen-bare-v6", doc(listen='"::1:80"'), "listeners[0].listen", "in brackets"),
    ("listen-open-bracket", doc(listen='"[::1:80"'), "listeners[0].listen", "never closes"),
    ("listen-v4-in-brackets", doc(listen='"[127.0.0.1]:80"'), "listeners[0].listen", "IPv6"),
    ("listen-junk-after-v6", doc(listen='"[::1]x80"'), "listeners[0].listen", "[v6]:port"),
    ("listen-number", doc(listen="8080"), "listeners[0].listen", "host:port"),
    ("listen-missing", doc(listen=OMIT), "listeners[0].listen", "missing"),
    (
        "listener-unknown-key",
        doc(listen='":8080"\nproxy_protocoll = true'),
        "listeners[0].proxy_protocoll",
        "unknown key",
    ),
    (
        "no-listener",
        doc().replace('[[listeners]]\nlisten = "127.0.0.1:8080"', ""),
        "listeners",
        "no listener",
    ),
    ("no-route", doc().split("[[routes]]")[0], "routes", "no route"),
    (
        "routes-not-array",
        doc(top="routes = 5").split("[[routes]]")[0],
        "routes",
        "expected an array",
    ),
    (
        "backend-http",
        doc(backends='[{ url = "http://b:80" }]'),
        "routes[0].backends[0].url",
        "scheme 'http' is not supported",
    ),
    (
        "backend-query",
        doc(backends='[{ url = "ws://b:80/p?q=1" }]'),
        "routes[0].backends[0].url",
        "query, fragment and credentials are not allowed",
    ),
    (
        "backend-credentials",
        doc(backends='[{ url = "ws://u:p@b:80" }]'),
        "routes[0].backends[0].url",
        "credentials",
    ),
    (
        "backend-no-host-url",
        doc(backends='[{ url = "ws://:9000" }]'),
        "routes[0].backends[0].url",
        "names no host",
    ),
    (
        "backend-no-host",
        doc(backends='[{ url = ":9000" }]'),
        "routes[0].backends[0].url",
        "names no host",
    ),
    (
        "backend-no-port",
        doc(backends='[{ url = "localhost" }]'),
        "routes[0].backends[0].url",
        "needs a port",
    ),
    (
        "backend-bad-port",
        doc(backends='[{ url = "ws://b:http" }]'),
        "routes[0].backends[0].url",
        "port 'http'",
    ),
    (
        "backend-unclosed-v6",
        doc(backends='[{ url = "ws://[::1:9000/x" }]'),
        "routes[0].backends[0].url",
        "not a valid URL",
    ),
    (
        "backend-empty-url",
        doc(backends='[{ url = "" }]'),
        "routes[0].backends[0].url",
        "expected a backend URL",
    ),
    (
        "backend-url-number",
        doc(backends="[{ url = 9000 }]"),
        "routes[0].backends[0].url",
        "expected a backend URL",
    ),
    (
        "backend-missing-url",
        doc(backends='[{ name = "a" }]'),
        "routes[0].backends[0].url",
        "missing",
    ),
    (
        "backend-unknown-key",
        doc(backends='[{ url = "b:1", colour = 2 }]'),
        "routes[0].backends[0].colour",
        "unknown key",
    ),
    ("backends-empty", doc(backends="[]"), "routes[0].backends", "at least one backend"),
    (
        "backends-same-name",
        doc(backends='[{ url = "b:1" }, { url = "ws://b:1" }]'),
        "routes[0].backends",
        "unique",
    ),
    (
        "backend-path-space",
        doc(backends='[{ url = "ws://h:1/a b" }]'),
        "routes[0].backends[0].url",
        "percent-encode it",
    ),
    ("route-unknown-key", doc(route='authz = "x"'), "routes[0].authz", "unknown key"),
    (
        "route-wildcard-host",
        doc(route='hosts = ["a.*.example.com"]'),
        "routes[0].hosts",
        'a wildcard is written "*." before a host name',
    ),
    ("route-empty-host", doc(route='hosts = [""]'), "routes[0].hosts", "not an exact host name"),
    (
        "route-prefix-relative",
        doc(route='path_prefix = "ws/"'),
        "routes[0].path_prefix",
        "must start with /",
    ),
    ("route-no-upgrades", doc(route="upgrades = []"), "routes[0].upgrades", "at least one"),
    (
        "route-bad-upgrade",
        doc(route='upgrades = ["web socket"]'),
        "routes[0].upgrades",
        "is not an Upgrade token",
    ),
    (
        "route-balance",
        doc(route='balance = "random"'),
        "routes[0].balance",
        "'random': must be one of round-robin, least-conn, hash, cookie",
    ),
    (
        "route-preserve-host-string",
        doc(route='preserve_host = "yes"'),
        "routes[0].preserve_host",
        "expected bool",
    ),
    (
        "route-name-twice",
        doc(more='[[routes]]\nname = "chat"\nbackends = [{ url = "b:1" }]'),
        "routes[1].name",
        "'chat' is used twice",
    ),
    (
        "second-route-bad-backend",
        doc(more='[[routes]]\nname = "two"\nbackends = [{ url = "b:1" }, { url = "ftp://c:1" }]'),
        "routes[1].backends[1].url",
        "use ws:// or wss://",
    ),
    (
        "tls-min-version",
        tls_doc('min_version = "1.1"'),
        "listeners[0].tls.min_version",
        "'1.1': must be one of 1.2, 1.3",
    ),
    (
        "tls-min-version-number",
        tls_doc("min_version = 1.3"),
        "listeners[0].tls.min_version",
        "expected str",
    ),
    (
        "tls-missing-key",
        doc(listen=f'{TLS_LISTEN}\ntls = {{ cert = "c.pem" }}'),
        "listeners[0].tls.key",
        "missing",
    ),
    (
        "tls-missing-cert",
        doc(listen=f'{TLS_LISTEN}\ntls = {{ key = "k.pem" }}'),
        "listeners[0].tls.cert",
        "missing",
    ),
    (
        "tls-empty-cert",
        tls_doc().replace('cert = "c.pem"', 'cert = ""'),
        "listeners[0].tls.cert",
        "missing",
    ),
    ("tls-no-pair", doc(listen=f"{TLS_LISTEN}\ntls = {{}}"), "listeners[0].tls", "no certificate"),
    (
        "tls-no-pair-only-options",
        doc(listen=f'{TLS_LISTEN}\ntls = {{ min_version = "1.3" }}'),
        "listeners[0].tls",
        "no certificate",
    ),
    (
        "tls-not-table",
        doc(listen=f'{TLS_LISTEN}\ntls = "c.pem"'),
        "listeners[0].tls",
        "expected a table",
    ),
    ("tls-unknown-key", tls_doc('ciphers = "ALL"'), "listeners[0].tls.ciphers", "unknown key"),
    (
        "tls-certs-missing-key",
        doc(
            listen=f"{TLS_LISTEN}\ntls = {{ certs = "
            '[{ cert = "a.pem", key = "a.key" }, { cert = "b.pem" }] }'
        ),
        "listeners[0].tls.certs[1].key",
        "missing",
    ),
    (
        "tls-certs-unknown-key",
        doc(
            listen=f"{TLS_LISTEN}\ntls = {{ certs = "
            '[{ cert = "a.pem", key = "a.key", chain = "x" }] }'
        ),
        "listeners[0].tls.certs[0].chain",
        "unknown key",
    ),
    (
        "tls-certs-not-array",
        doc(listen=f'{TLS_LISTEN}\ntls = {{ certs = "a.pem" }}'),
        "listeners[0].tls.certs",
        "expected an array",
    ),
    (
        "tls-subject-header-without-client-ca",
        tls_doc('client_subject_header = "X-Client-Subject"'),
        "listeners[0].tls.client_subject_header",
        "needs client_ca",
    ),
    (
        "tls-bad-header-name",
        tls_doc('client_ca = "ca.pem", client_subject_header = "X Client"'),
        "listeners[0].tls.client_subject_header",
        "'X Client' is not a header name",
    ),
    (
        "tls-header-name-with-colon",
        tls_doc('client_ca = "ca.pem", client_subject_header = "X-Subject:"'),
        "listeners[0].tls.client_subject_header",
        "is not a header name",
    ),
    (
        "tls-on-second-listener",
        doc(more="").replace(
            "\n\n[[routes]]",
            f'\n[[listeners]]\nlisten = {TLS_LISTEN}\ntls = {{ cert = "c.pem" }}\n\n[[routes]]',
            1,
        ),
        "listeners[1].tls.key",
        "missing",
    ),
    (
        "redirect-on-a-tls-listener",
        doc(
            listen=f'{TLS_LISTEN}\nredirect_https = true\ntls = {{ cert = "c.pem", key = "k.pem" }}'
        ),
        "listeners[0].redirect_https",
        "a TLS listener cannot redirect to itself",
    ),
    (
        "redirect-not-bool",
        doc(listen='"127.0.0.1:8080"\nredirect_https = "yes"'),
        "listeners[0].redirect_https",
        "expected bool",
    ),
    (
        "backend-tls-cert-without-key",
        doc(more='[routes.backend_tls]\ncert = "client.pem"'),
        "routes[0].backend_tls.cert",
        "needs both cert and key",
    ),
    (
        "backend-tls-key-without-cert",
        doc(more='[routes.backend_tls]\nkey = "client.key"'),
        "routes[0].backend_tls.cert",
        "needs both cert and key",
    ),
    (
        "backend-tls-unknown-key",
        doc(more='[routes.backend_tls]\nciphers = "ALL"'),
        "routes[0].backend_tls.ciphers",
        "unknown key",
    ),
    (
        "backend-tls-verify-string",
        doc(more='[routes.backend_tls]\nverify = "no"'),
        "routes[0].backend_tls.verify",
        "expected bool",
    ),
    (
        "backend-tls-not-table",
        doc(more='backend_tls = "ca.pem"'),
        "routes[0].backend_tls",
        "expected a table",
    ),
    (
        "backend-https",
        doc(backends='[{ url = "https://b:443" }]'),
        "routes[0].backends[0].url",
        "use ws:// or wss://",
    ),
    (
        "cert-check-interval-no-unit",
        doc(server='cert_check_interval = "5"'),
        "server.cert_check_interval",
        "is not a duration",
    ),
    (
        "cert-check-interval-number",
        doc(server="cert_check_interval = 5"),
        "server.cert_check_interval",
        "expected a duration string",
    ),
]


@pytest.mark.parametrize(
    ("text", "key", "message"), [pytest.param(*case[1:], id=case[0]) for case in BAD]
)
def test_bad_values_name_their_key(text: str, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_toml(text)
    assert caught.value.key == key
    assert message in caught.value.problem
    assert str(caught.value).startswith(f"{key}: ")


@pytest.mark.parametrize(
    ("url", "host", "port", "path", "name"),
    [
        ("127.0.0.1:9000", "127.0.0.1", 9000, "", "127.0.0.1:9000"),
        ("Backend.Local:9000", "backend.local", 9000, "", "backend.local:9000"),
        ("[::1]:9000", "::1", 9000, "", "[::1]:9000"),
        ("ws://10.0.0.5:8080", "10.0.0.5", 8080, "", "10.0.0.5:8080"),
        ("ws://10.0.0.5:8080/", "10.0.0.5", 8080, "", "10.0.0.5:8080"),
        ("ws://backend:8080/socket/", "backend", 8080, "/socket/", "backend:8080"),
        ("ws://[::1]:9000/x", "::1", 9000, "/x", "[::1]:9000"),
        ("ws://backend", "backend", 80, "", "backend:80"),
        ("WS://backend:81", "backend", 81, "", "backend:81"),
    ],
)
def test_backend_urls(url: str, host: str, port: int, path: str, name: str) -> None:
    backend = BackendConfig.parse_url(url, "k")
    assert (backend.host, backend.port, backend.path, backend.name) == (host, port, path, name)
    assert backend.scheme == "ws"
    again = BackendConfig.parse_url(backend.url, "k")
    assert (again.host, again.port, again.path) == (host, port, path)


def test_backend_name_from_the_file_wins() -> None:
    assert BackendConfig.parse_url("b:1", "k", name="primary").name == "primary"


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:8080", "127.0.0.1", 8080),
        ("localhost:8080", "localhost", 8080),
        ("[::1]:8080", "::1", 8080),
        ("[::]:0", "::", 0),
        (":8080", "", 8080),
    ],
)
def test_addresses(text: str, host: str, port: int) -> None:
    address = Address.parse(text, "k")
    assert (address.host, address.port) == (host, port)
    assert Address.parse(str(address), "k") == address


LONG_LABEL = "a" * 64
LONGEST_NAME = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])  # 253 characters

BAD_BACKEND_URLS = [
    # (backend URL, message substring): each is refused naming routes[0].backends[0].url
    ("ws//127.0.0.1:9000", 'did you mean "ws://127.0.0.1:9000"'),
    ("ws:/127.0.0.1:9000", 'did you mean "ws://127.0.0.1:9000"'),
    ("WSS:127.0.0.1:9000", 'did you mean "wss://127.0.0.1:9000"'),
    ("ws://ws//127.0.0.1:9000", 'starts with "//"'),
    ("ws://b:0", "port '0' in 'b:0' is not a number from 1 to 65535"),
    ("b:0", "from 1 to 65535"),
    ("ws://b:65536", "from 1 to 65535"),
    ("ws://b:" + "9" * 5000, "from 1 to 65535"),
    ("ws://b:+80", "port '+80'"),
    ("ws://b:-80", "port '-80'"),
    ("ws://b:", "port ''"),
    ("ws://b: 80", "space or control character"),
    ("ws://exa mple.com:80", "space or control character"),
    (" ws://b:80", "space or control character"),
    ("ws://b:80\n", "space or control character"),
    ("ws://b\t:80", "space or control character"),
    ("ws://b:\uff18\uff10", "outside ASCII"),
    ("ws://b\u00fccher.example", '"xn--"'),
    ("ws://b:80/pa th", "percent-encode it"),
    ("ws://:9000", "names no host"),
    ("ws://0.0.0.0:9000", "a backend needs the address to connect to"),
    ("[::]:9000", "a backend needs the address to connect to"),
    ("ws://[::1", "not a valid URL"),
    ("ws://[::1]x:80", "[v6]:port"),
    ("ws://[127.0.0.1]:80", "not a valid URL"),
    ("[127.0.0.1]:80", "'127.0.0.1' in '[127.0.0.1]:80' is not an IPv6 address"),
    ("ws://user@b:80", "credentials"),
    ("ws://@b:80", "credentials"),
    ("ws://b:80?", "query, fragment"),
    ("ws://b:80#", "query, fragment"),
    ("http://b", "scheme 'http' is not supported"),
    ("b@c:80", "'@' is not allowed"),
    ("b/c:80", "'/' is not allowed"),
    ("ws://b!c:80", "'!' is not allowed"),
    ("ws://b.:80", "ends with a dot"),
    ("ws://.b:80", "empty label"),
    ("ws://a..b:80", "empty label"),
    ("ws://-b:80", "starts or ends with '-'"),
    ("ws://b-:80", "starts or ends with '-'"),
    (f"ws://{LONG_LABEL}.example:80", "longer than 63"),
    (f"ws://{LONGEST_NAME}a:80", "longer than 253"),
    ("ws://127.1:80", "looks like an IPv4 address"),
    ("ws://2130706433:80", "looks like an IPv4 address"),
    ("ws://0x7f000001:80", "looks like an IPv4 address"),
    ("ws://0x7f.1:80", "looks like an IPv4 address"),
    ("ws://0177.0.0.1:80", "looks like an IPv4 address"),
    ("ws://256.0.0.1:80", "looks like an IPv4 address"),
    ("ws://b:80:90", "in brackets"),
]


@pytest.mark.parametrize(("url", "message"), BAD_BACKEND_URLS)
def test_backend_urls_that_cannot_work_are_refused(url: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_toml(doc(backends=f"[{{ url = {json.dumps(url)} }}]"))
    assert caught.value.key == "routes[0].backends[0].url"
    assert message in caught.value.problem
    with pytest.raises(ConfigError) as flag:
        Config.from_toml(doc()).with_overrides(backends=[url])
    assert flag.value.key == f"--backend {url}"
    assert message in flag.value.problem


@pytest.mark.parametrize(
    ("url", "host", "port"),
    [
        ("ws://my_service:9000", "my_service", 9000),
        ("_internal.example:1", "_internal.example", 1),
        ("ws://a-b.c_d.Example:65535", "a-b.c_d.example", 65535),
        ("ws://xn--bcher-kva.example", "xn--bcher-kva.example", 80),
        (f"ws://{LONGEST_NAME}:80", LONGEST_NAME, 80),
        ("ws://[0:0::1]:9000", "::1", 9000),
        ("[::FFFF:127.0.0.1]:9000", "::ffff:7f00:1", 9000),
        ("ws://b:08080", "b", 8080),
        ("ws:9000", "ws", 9000),
        ("ws://0x7f.example:1", "0x7f.example", 1),
        ("ws://123abc:1", "123abc", 1),
    ],
)
def test_backend_hosts_that_are_accepted(url: str, host: str, port: int) -> None:
    backend = BackendConfig.parse_url(url, "k")
    assert (backend.host, backend.port) == (host, port)
    assert BackendConfig.parse_url(backend.url, "k") == backend


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("exa mple:80", "space or control character"),
        ("*:8080", 'write ":8080"'),
        ("b.:80", "ends with a dot"),
        ("a..b:80", "empty label"),
        ("a/b:80", "'/' is not allowed"),
        ("127.1:80", "looks like an IPv4 address"),
        ("0x7f000001:80", "looks like an IPv4 address"),
        ("b\u00fccher:80", '"xn--"'),
        ("h:65536", "not a number from 0 to 65535"),
        ("h:" + "9" * 5000, "not a number from 0 to 65535"),
        ("h:\u0668\u0660", "outside ASCII"),
        ("[::ffff:127.0.0.1]:80", 'write "127.0.0.1:80"'),
    ],
)
def test_listen_addresses_with_a_bad_host_are_refused(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_toml(doc(listen=json.dumps(text)))
    assert caught.value.key == "listeners[0].listen"
    assert message in caught.value.problem
    with pytest.raises(ConfigError) as flag:
        Config.from_toml(doc()).with_overrides(listen=[text])
    assert flag.value.key == f"--listen {text}"
    assert message in flag.value.problem


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("[0:0::1]:80", "::1", 80),
        ("localhost:08080", "localhost", 8080),
        ("My_Host:0", "my_host", 0),
        (":0", "", 0),
    ],
)
def test_listen_addresses_are_normalised(text: str, host: str, port: int) -> None:
    assert Address.parse(text, "k") == Address(host, port)


def listeners_doc(*listens: str) -> str:
    """A valid file with one [[listeners]] table per address."""
    tables = "".join(f"[[listeners]]\nlisten = {json.dumps(a)}\n\n" for a in listens)
    return doc(listen=OMIT).replace("[[listeners]]\n\n", tables)


@pytest.mark.parametrize(
    ("listens", "key", "message"),
    [
        (["127.0.0.1:8080"] * 2, "listeners[1].listen", "is also listeners[0].listen"),
        (["127.0.0.1:8080", "127.0.0.1:08080"], "listeners[1].listen", "is also listeners[0]"),
        ([":8080", ":8080"], "listeners[1].listen", "is also listeners[0].listen"),
        (["[::1]:8080", "[0:0::1]:8080"], "listeners[1].listen", "is also listeners[0]"),
        (["Localhost:8080", "localhost:8080"], "listeners[1].listen", "is also listeners[0]"),
        (
            ["127.0.0.1:1", "127.0.0.1:8080", "127.0.0.1:8080"],
            "listeners[2].listen",
            "is also listeners[1].listen",
        ),
        (
            [":8080", "0.0.0.0:8080"],
            "listeners[1].listen",
            "overlaps listeners[0].listen ':8080': every interface on port 8080 includes 0.0.0.0",
        ),
        (["0.0.0.0:8080", ":8080"], "listeners[1].listen", "every interface on port 8080"),
        ([":8080", "[::1]:8080"], "listeners[1].listen", "every interface on port 8080"),
        ([":8080", "[::]:8080"], "listeners[1].listen", "every interface on port 8080"),
        ([":8080", "localhost:8080"], "listeners[1].listen", "includes localhost"),
        (
            ["0.0.0.0:8080", "127.0.0.1:8080"],
            "listeners[1].listen",
            "every IPv4 interface (0.0.0.0) on port 8080 includes 127.0.0.1",
        ),
        (["127.0.0.2:8080", "0.0.0.0:8080"], "listeners[1].listen", "includes 127.0.0.2"),
        (
            ["[::]:8080", "[::1]:8080"],
            "listeners[1].listen",
            "every IPv6 interface (::) on port 8080 includes ::1",
        ),
        (["[::1]:8080", "[::]:8080"], "listeners[1].listen", "the kernel refuses to bind both"),
    ],
)
def test_listen_addresses_one_process_cannot_bind_together_are_refused(
    listens: list[str], key: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_toml(listeners_doc(*listens))
    assert caught.value.key == key
    assert message in caught.value.problem


@pytest.mark.parametrize(
    "listens",
    [
        ["127.0.0.1:0", "127.0.0.1:0"],
        [":0", ":0", "0.0.0.0:0"],
        ["127.0.0.1:8080", "127.0.0.1:8081"],
        ["127.0.0.1:8080", "127.0.0.2:8080"],
        ["0.0.0.0:8080", "[::]:8080"],
        ["0.0.0.0:8080", "[::1]:8080"],
        ["[::]:8080", "127.0.0.1:8080"],
    ],
)
def test_listen_addresses_that_bind_together_are_accepted(listens: list[str]) -> None:
    config = Config.from_toml(listeners_doc(*listens))
    assert [str(x.listen) for x in config.listeners] == [
        str(Address.parse(a, "k")) for a in listens
    ]
    assert config.with_overrides(listen=listens).listeners == config.listeners


@pytest.mark.parametrize(
    ("listens", "key", "message"),
    [
        ([":8080", ":8080"], "--listen :8080", "':8080' is given twice"),
        (
            [":8080", "0.0.0.0:8080"],
            "--listen 0.0.0.0:8080",
            "overlaps --listen :8080 ':8080': every interface",
        ),
        (["h:1", "H:01"], "--listen H:01", "'h:1' is also --listen h:1"),
    ],
)
def test_listen_flags_one_process_cannot_bind_together_are_refused(
    listens: list[str], key: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_toml(doc()).with_overrides(listen=listens)
    assert caught.value.key == key
    assert message in caught.value.problem


def test_overrides_replace_listeners_and_routes() -> None:
    config = Config.from_toml(
        doc(more='[[routes]]\nname = "two"\nbackends = [{ url = "b:1" }]')
    ).with_overrides(
        listen=["[::1]:9001", ":9002"],
        backends=["127.0.0.1:7000", "ws://h:7001/p"],
        log_format="json",
    )
    assert [str(x.listen) for x in config.listeners] == ["[::1]:9001", ":9002"]
    (route,) = config.routes
    assert route == RouteConfig(
        "default",
        (
            BackendConfig("127.0.0.1:7000", "127.0.0.1", 7000),
            BackendConfig("h:7001", "h", 7001, "/p"),
        ),
    )
    assert config.server.log_format == "json"


def test_overrides_keep_what_is_not_given() -> None:
    config = Config.from_toml(doc(server='idle_timeout = "5m"'))
    assert config.with_overrides() == config
    only_listen = config.with_overrides(listen=[":1"])
    assert only_listen.routes == config.routes
    assert only_listen.server == config.server
    only_backend = config.with_overrides(backends=["b:2"])
    assert only_backend.listeners == config.listeners


def test_overrides_without_a_file() -> None:
    config = Config().with_overrides(listen=[":8080"], backends=["127.0.0.1:9000"])
    assert config.routes[0].backends[0].port == 9000
    with pytest.raises(ConfigError) as caught:
        Config().with_overrides(listen=[":8080"])
    assert caught.value.key == "routes"


@pytest.mark.parametrize(
    ("kwargs", "key", "message"),
    [
        ({"listen": ["nope"]}, "--listen nope", "needs a port"),
        ({"backends": ["https://b:1"]}, "--backend https://b:1", "wss://"),
        ({"log_format": "xml"}, "server.log_format", "must be one of"),
        ({"tls_cert": "c.pem"}, "--tls-cert/--tls-key", "give both, or neither"),
        ({"tls_key": "k.pem"}, "--tls-cert/--tls-key", "give both, or neither"),
        ({"listen": [":1"], "tls_cert": "c.pem"}, "--tls-cert/--tls-key", "give both"),
    ],
)
def test_bad_overrides_name_the_flag(kwargs: dict[str, object], key: str, message: str) -> None:
    config = Config.from_toml(doc())
    with pytest.raises(ConfigError) as caught:
        config.with_overrides(**kwargs)  # type: ignore[arg-type]
    assert caught.value.key == key
    assert message in caught.value.problem


EVERY_TLS_KEY = """\
[server]
cert_check_interval = "0s"

[[listeners]]
listen = "127.0.0.1:8080"
redirect_https = true

[[listeners]]
listen = "[::1]:8443"
tls = { cert = "site.pem", key = "site.key", certs = [{ cert = "other.pem", key = "other.key" }], \
min_version = "1.3", client_ca = "clients.pem", client_subject_header = "X-Client-Subject" }

[[listeners]]
listen = ":9443"
tls = { certs = [{ cert = "/etc/tunnel/a.pem", key = "/etc/tunnel/a.key" }] }

[[routes]]
name = "secure"
backends = [{ url = "wss://b.example" }, { name = "two", url = "wss://[::1]:9000/ws" }]
[routes.backend_tls]
ca = "backend-ca.pem"
server_name = "internal.example"
cert = "client.pem"
key = "client.key"
verify = false

[[routes]]
name = "plain"
hosts = ["plain.example"]
backends = [{ url = "ws://c.example" }]
"""

ROUND_TRIP = [
    pytest.param(doc(), id="minimal"),
    pytest.param(
        doc(
            server='handshake_timeout = "1.5ms"\nconnect_timeout = "1.001s"\n'
            'response_timeout = "90m"\nidle_timeout = "0s"\nmax_header_bytes = "1.5KiB"\n'
            'max_tunnels = 7\ntrusted_proxies = ["10.1.2.3/8", "2001:db8::/32"]\n'
            'log_format = "json"',
            listen='"[::1]:0"',
            route='hosts = ["a.example", "B.example"]\npath_prefix = "/ws/"\n'
            'upgrades = ["websocket", "mqtt"]\npreserve_host = false',
            backends='[{ url = "[::1]:9000" }, { name = "two", url = "ws://h:1/sock/" }]',
            more='[[routes]]\nname = "other"\nbackends = [{ url = "h:2" }]',
        ),
        id="everything",
    ),
    pytest.param(
        doc(server='idle_timeout = "1d"\nconnect_timeout = "0.00001s"', listen='":8080"'),
        id="odd-durations",
    ),
    pytest.param(
        doc(
            route='path_prefix = "/caf\u00e9/\\"quoted\\"/back\\\\slash/\\u007f"',
            backends='[{ name = "a \\"b\\" \\\\ c\\t", url = "ws://h:1/p\\"q" }]',
        ).replace('name = "chat"', 'name = "chat \\"room\\""'),
        id="characters-toml-must-escape",
    ),
    pytest.param(EVERY_TLS_KEY, id="every-tls-key"),
    pytest.param(
        tls_doc(pair='cert = "dir with \\"quotes\\"/c\u00e9rt.pem", key = "back\\\\slash.key"'),
        id="tls-paths-toml-must-escape",
    ),
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_to_toml_round_trips(text: str) -> None:
    config = Config.from_toml(text)
    printed = config.to_toml()
    assert Config.from_toml(printed) == config
    assert Config.from_toml(printed).to_toml() == printed


def test_to_toml_spells_out_the_defaults() -> None:
    printed = Config.from_toml(doc()).to_toml()
    for line in [
        'handshake_timeout = "10s"',
        'connect_timeout = "5s"',
        'response_timeout = "10s"',
        'idle_timeout = "1h"',
        'max_header_bytes = "32KiB"',
        "max_tunnels = 10000",
        "trusted_proxies = []",
        'log_format = "text"',
        'path_prefix = "/"',
        'upgrades = ["websocket"]',
        'balance = "round-robin"',
    ]:
        assert line in printed.splitlines()


def test_from_file(tmp_path: Path) -> None:
    path = tmp_path / "tunnel.toml"
    path.write_text(doc(), encoding="utf-8")
    assert Config.from_file(path) == Config.from_toml(doc())
    with pytest.raises(ConfigError) as caught:
        Config.from_file(tmp_path / "missing.toml")
    assert caught.value.key == str(tmp_path / "missing.toml")
    assert "cannot read the file" in caught.value.problem


@pytest.mark.parametrize("host", ["a.example:8080", "[::1]", "[::1]:80"])
def test_route_host_with_port_or_brackets_is_refused(host: str) -> None:
    data = {
        "listeners": [{"listen": "127.0.0.1:0"}],
        "routes": [{"name": "r", "hosts": [host], "backends": [{"url": "127.0.0.1:9"}]}],
    }
    with pytest.raises(ConfigError) as info:
        Config.from_mapping(data)
    assert info.value.key == "routes[0].hosts"
    assert "without port" in info.value.problem


def test_route_host_may_be_a_bare_ipv6_address() -> None:
    data = {
        "listeners": [{"listen": "127.0.0.1:0"}],
        "routes": [{"name": "r", "hosts": ["::1"], "backends": [{"url": "127.0.0.1:9"}]}],
    }
    assert Config.from_mapping(data).routes[0].hosts == ("::1",)


# --- TLS -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tls", "expected"),
    [
        pytest.param(
            'tls = { cert = "site.pem", key = "site.key" }',
            ListenerTLS((CertPair("site.pem", "site.key"),)),
            id="one-pair",
        ),
        pytest.param(
            'tls = { certs = [{ cert = "a.pem", key = "a.key" }, '
            '{ cert = "b.pem", key = "b.key" }] }',
            ListenerTLS((CertPair("a.pem", "a.key"), CertPair("b.pem", "b.key"))),
            id="certs",
        ),
        pytest.param(
            'tls = { certs = [{ cert = "b.pem", key = "b.key" }], cert = "a.pem", key = "a.key" }',
            ListenerTLS((CertPair("a.pem", "a.key"), CertPair("b.pem", "b.key"))),
            id="cert-key-first-then-certs",
        ),
        pytest.param(
            'tls = { cert = "a.pem", key = "a.key", min_version = "1.2" }',
            ListenerTLS((CertPair("a.pem", "a.key"),), min_version="1.2"),
            id="min-version-1.2",
        ),
        pytest.param(
            'tls = { cert = "a.pem", key = "a.key", min_version = "1.3" }',
            ListenerTLS((CertPair("a.pem", "a.key"),), min_version="1.3"),
            id="min-version-1.3",
        ),
        pytest.param(
            'tls = { cert = "a.pem", key = "a.key", client_ca = "ca.pem" }',
            ListenerTLS((CertPair("a.pem", "a.key"),), client_ca="ca.pem"),
            id="client-ca",
        ),
        pytest.param(
            'tls = { cert = "a.pem", key = "a.key", client_ca = "ca.pem", '
            'client_subject_header = "X-Client-Subject" }',
            ListenerTLS(
                (CertPair("a.pem", "a.key"),),
                client_ca="ca.pem",
                client_subject_header="X-Client-Subject",
            ),
            id="client-subject-header",
        ),
        pytest.param(
            '[listeners.tls]\ncert = "a.pem"\nkey = "a.key"\nmin_version = "1.3"',
            ListenerTLS((CertPair("a.pem", "a.key"),), min_version="1.3"),
            id="as-a-table",
        ),
    ],
)
def test_listener_tls_is_read(tls: str, expected: ListenerTLS) -> None:
    config = Config.from_toml(doc(listen=f"{TLS_LISTEN}\n{tls}"))
    (listener,) = config.listeners
    assert listener.tls == expected
    assert listener.redirect_https is False


def test_a_listener_without_tls_is_plain_and_does_not_redirect() -> None:
    (listener,) = Config.from_toml(doc()).listeners
    assert listener.tls is None
    assert listener.redirect_https is False
    assert ListenerTLS((CertPair("c", "k"),)).min_version == "1.2"


def test_redirect_https_on_a_plain_listener_beside_a_tls_one() -> None:
    text = doc(listen='"127.0.0.1:8080"\nredirect_https = true').replace(
        "\n\n[[routes]]",
        f'\n[[listeners]]\nlisten = {TLS_LISTEN}\ntls = {{ cert = "c.pem", key = "k.pem" }}'
        "\n\n[[routes]]",
        1,
    )
    plain, secure = Config.from_toml(text).listeners
    assert (plain.redirect_https, plain.tls) == (True, None)
    assert secure.redirect_https is False
    assert secure.tls == ListenerTLS((CertPair("c.pem", "k.pem"),))


@pytest.mark.parametrize(
    ("url", "host", "port", "path", "tls"),
    [
        ("wss://b.example", "b.example", 443, "", True),
        ("wss://b.example/", "b.example", 443, "", True),
        ("WSS://B.example:8443/socket", "b.example", 8443, "/socket", True),
        ("wss://[::1]", "::1", 443, "", True),
        ("ws://b.example", "b.example", 80, "", False),
        ("ws://[::1]", "::1", 80, "", False),
        ("b.example:443", "b.example", 443, "", False),
    ],
)
def test_backend_scheme_sets_the_default_port_and_tls(
    url: str, host: str, port: int, path: str, tls: bool
) -> None:
    backend = BackendConfig.parse_url(url, "k")
    assert (backend.host, backend.port, backend.path, backend.tls) == (host, port, path, tls)
    assert backend.scheme == ("wss" if tls else "ws")
    assert BackendConfig.parse_url(backend.url, "k") == backend


def test_wss_backends_in_a_file() -> None:
    config = Config.from_toml(
        doc(backends='[{ url = "wss://b.example" }, { url = "ws://c.example" }]')
    )
    secure, plain = config.routes[0].backends
    assert (secure.port, secure.tls, secure.url) == (443, True, "wss://b.example:443")
    assert (plain.port, plain.tls, plain.url) == (80, False, "ws://c.example:80")


def test_backend_tls_keys_are_read() -> None:
    config = Config.from_toml(
        doc(
            backends='[{ url = "wss://b.example" }]',
            more='[routes.backend_tls]\nca = "ca.pem"\nserver_name = "internal.example"\n'
            'cert = "client.pem"\nkey = "client.key"\nverify = false',
        )
    )
    assert config.routes[0].backend_tls == BackendTLS(
        ca="ca.pem",
        server_name="internal.example",
        cert="client.pem",
        key="client.key",
        verify=False,
    )


def test_backend_tls_defaults_verify_against_the_system_store() -> None:
    (route,) = Config.from_toml(doc(backends='[{ url = "wss://b.example" }]')).routes
    assert route.backend_tls == BackendTLS()
    assert (route.backend_tls.ca, route.backend_tls.verify) == ("", True)
    partial = Config.from_toml(
        doc(
            backends='[{ url = "wss://b.example" }]', more='[routes.backend_tls]\nserver_name = "x"'
        )
    )
    assert partial.routes[0].backend_tls == BackendTLS(server_name="x")


def test_backend_tls_on_a_route_without_wss_backends_is_refused() -> None:
    """It would do nothing there; a setting that does nothing is an error, never ignored."""
    with pytest.raises(ConfigError) as caught:
        Config.from_toml(doc(more='[routes.backend_tls]\nca = "ca.pem"'))
    assert caught.value.key == "routes[0].backend_tls"
    assert "wss://" in caught.value.problem


@pytest.mark.parametrize(
    ("text", "seconds"),
    [(None, 5.0), ('"0s"', 0.0), ('"500ms"', 0.5), ('"1m"', 60.0), ('"1h"', 3600.0)],
)
def test_cert_check_interval(text: str | None, seconds: float) -> None:
    server = "" if text is None else f"cert_check_interval = {text}"
    config = Config.from_toml(doc(server=server))
    assert config.server.cert_check_interval == seconds
    assert Config.from_toml(config.to_toml()).server.cert_check_interval == seconds


RELATIVE_TLS = doc(
    listen=f"{TLS_LISTEN}\n"
    'tls = { cert = "site.pem", key = "keys/site.key", '
    'certs = [{ cert = "../up.pem", key = "/abs/other.key" }], client_ca = "clients.pem" }',
    backends='[{ url = "wss://b.example" }]',
    more='[routes.backend_tls]\nca = "backend-ca.pem"\ncert = "client.pem"\n'
    'key = "/etc/client.key"\nserver_name = "relative.name"',
)


def test_relative_files_resolve_against_the_config_file_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "tunnel.toml").write_text(RELATIVE_TLS, encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    # The file named absolutely, and relatively to a working directory that is not its own.
    for path in (sub / "tunnel.toml", Path("../sub/tunnel.toml")):
        config = Config.from_file(path)
        tls = config.listeners[0].tls
        assert tls is not None
        backend_tls = config.routes[0].backend_tls
        files = [
            *(name for pair in tls.certs for name in (pair.cert, pair.key)),
            tls.client_ca,
            backend_tls.ca,
            backend_tls.cert,
            backend_tls.key,
        ]
        assert all(Path(name).is_absolute() for name in files), files
        assert [os.path.normpath(name) for name in files] == [
            str(sub / "site.pem"),
            str(sub / "keys" / "site.key"),
            str(tmp_path / "up.pem"),
            "/abs/other.key",
            str(sub / "clients.pem"),
            str(sub / "backend-ca.pem"),
            str(sub / "client.pem"),
            "/etc/client.key",
        ]
        assert backend_tls.server_name == "relative.name", "a name, not a file"


def test_from_toml_without_a_base_leaves_file_names_as_written() -> None:
    config = Config.from_toml(RELATIVE_TLS)
    tls = config.listeners[0].tls
    assert tls is not None
    assert tls.certs == (
        CertPair("site.pem", "keys/site.key"),
        CertPair("../up.pem", "/abs/other.key"),
    )
    assert tls.client_ca == "clients.pem"
    assert config.routes[0].backend_tls.ca == "backend-ca.pem"
    assert config.routes[0].backend_tls.cert == "client.pem"


def test_from_toml_with_a_base_resolves_against_it(tmp_path: Path) -> None:
    config = Config.from_toml(RELATIVE_TLS, base=tmp_path)
    tls = config.listeners[0].tls
    assert tls is not None
    assert tls.certs[0] == CertPair(str(tmp_path / "site.pem"), str(tmp_path / "keys/site.key"))


def test_every_tls_key_round_trips_and_is_spelled_out() -> None:
    config = Config.from_toml(EVERY_TLS_KEY)
    assert Config.from_toml(config.to_toml()) == config
    printed = tomllib.loads(config.to_toml())
    redirect, first, second = printed["listeners"]
    assert redirect == {"listen": "127.0.0.1:8080", "redirect_https": True}
    assert first["tls"] == {
        "certs": [
            {"cert": "site.pem", "key": "site.key"},
            {"cert": "other.pem", "key": "other.key"},
        ],
        "min_version": "1.3",
        "client_ca": "clients.pem",
        "client_subject_header": "X-Client-Subject",
    }
    assert second["tls"]["min_version"] == "1.2"
    assert second["tls"]["client_ca"] == ""
    secure, plain = printed["routes"]
    assert secure["backends"][0]["url"] == "wss://b.example:443"
    assert secure["backend_tls"] == {
        "ca": "backend-ca.pem",
        "server_name": "internal.example",
        "cert": "client.pem",
        "key": "client.key",
        "verify": False,
    }
    assert plain["backend_tls"]["verify"] is True
    assert printed["server"]["cert_check_interval"] == "0s"


def test_tls_overrides_make_every_listener_tls_with_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    two_plain = doc().replace(
        "\n\n[[routes]]", '\n[[listeners]]\nlisten = "127.0.0.1:8081"\n\n[[routes]]', 1
    )
    config = Config.from_toml(two_plain).with_overrides(tls_cert="c.pem", tls_key="keys/k.pem")
    pair = CertPair(str(tmp_path / "c.pem"), str(tmp_path / "keys" / "k.pem"))
    assert [listener.tls for listener in config.listeners] == [ListenerTLS((pair,))] * 2
    assert [str(listener.listen) for listener in config.listeners] == [
        "127.0.0.1:8080",
        "127.0.0.1:8081",
    ]
    absolute = Config.from_toml(doc()).with_overrides(tls_cert="/a/c.pem", tls_key="/a/k.pem")
    assert absolute.listeners[0].tls == ListenerTLS((CertPair("/a/c.pem", "/a/k.pem"),))


def test_tls_overrides_keep_a_tls_listener_options_and_end_redirects(tmp_path: Path) -> None:
    config = Config.from_toml(EVERY_TLS_KEY)
    cert, key = str(tmp_path / "new.pem"), str(tmp_path / "new.key")
    overridden = config.with_overrides(tls_cert=cert, tls_key=key)
    pair = CertPair(cert, key)
    redirect, first, second = overridden.listeners
    assert redirect.tls == ListenerTLS((pair,))
    assert redirect.redirect_https is False, "a TLS listener cannot redirect to itself"
    assert first.tls == ListenerTLS(
        (pair,),
        min_version="1.3",
        client_ca="clients.pem",
        client_subject_header="X-Client-Subject",
    )
    assert second.tls == ListenerTLS((pair,))
    assert overridden.routes == config.routes
    assert overridden.server == config.server


def test_tls_overrides_apply_to_the_listen_flags(tmp_path: Path) -> None:
    cert, key = str(tmp_path / "c.pem"), str(tmp_path / "k.pem")
    config = Config.from_toml(EVERY_TLS_KEY).with_overrides(
        listen=["127.0.0.1:9443"], tls_cert=cert, tls_key=key
    )
    assert config.listeners == (
        ListenerConfig(Address("127.0.0.1", 9443), tls=ListenerTLS((CertPair(cert, key),))),
    )
    without = Config().with_overrides(
        listen=[":1"], backends=["wss://b.example"], tls_cert=cert, tls_key=key
    )
    assert without.listeners[0].tls == ListenerTLS((CertPair(cert, key),))
    assert without.routes[0].backends[0].tls is True


# --- [admin] ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("admin", "listen"),
    [
        ("", None),
        ('[admin]\nlisten = ""', None),
        ('[admin]\nlisten = "127.0.0.1:9901"', Address("127.0.0.1", 9901)),
        ('[admin]\nlisten = "[::1]:0"', Address("::1", 0)),
    ],
)
def test_admin_listen_is_off_unless_written(admin: str, listen: Address | None) -> None:
    config = Config.from_toml(doc(top=admin))
    assert config.admin == AdminConfig(listen)
    assert Config.from_toml(config.to_toml()) == config
    assert tomllib.loads(config.to_toml())["admin"] == {
        "listen": "" if listen is None else str(listen)
    }


@pytest.mark.parametrize(
    ("admin", "key", "message"),
    [
        ('[admin]\nlisten = "9901"', "admin.listen", "needs a port"),
        ("[admin]\nlisten = 9901", "admin.listen", "expected"),
        ('[admin]\nport = "9901"', "admin.port", "unknown key"),
        ('[admin]\nlisten = "127.0.0.1:8080"', "admin.listen", "is also listeners[0].listen"),
        ('[admin]\nlisten = ":8080"', "admin.listen", "every interface on port 8080"),
    ],
)
def test_bad_admin_listen_is_refused(admin: str, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Config.from_toml(doc(top=admin))
    assert caught.value.key == key
    assert message in caught.value.problem


def test_admin_flag_replaces_the_file_value() -> None:
    config = Config.from_toml(doc(top='[admin]\nlisten = "127.0.0.1:9901"'))
    assert config.with_overrides().admin == config.admin
    moved = config.with_overrides(admin="localhost:9902")
    assert moved.admin == AdminConfig(Address("localhost", 9902))
    assert moved.listeners == config.listeners
    with pytest.raises(ConfigError) as caught:
        config.with_overrides(admin="nope")
    assert (caught.value.key, caught.value.problem) == (
        "--admin nope",
        "'nope' needs a port, like host:8080 or [::1]:8080",
    )
    with pytest.raises(ConfigError) as caught:
        config.with_overrides(admin="127.0.0.1:8080")
    assert caught.value.key == "admin.listen"
