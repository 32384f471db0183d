"""Configuration: frozen dataclasses read from one TOML file, every key with a safe default.

``Config.from_toml`` parses and validates; any problem raises ``ConfigError`` naming the dotted
key (``routes[0].backends[1].url``), the way ``nginx -t`` names the line. Only keys whose
behaviour exists are accepted: an unknown key is an error, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from tunnel.errors import ConfigError

MILLISECONDS = 0.001
SECONDS = 1.0
MINUTES = 60 * SECONDS
HOURS = 60 * MINUTES
DAYS = 24 * HOURS

BYTES = 1
KiB = 1024 * BYTES
MiB = 1024 * KiB
GiB = 1024 * MiB
MAX_SIZE = 1024 * GiB
"""The largest size ``parse_size`` reads: no key comes near it, so beyond it is a typo."""

_DURATION_UNITS = {"ms": MILLISECONDS, "s": SECONDS, "m": MINUTES, "h": HOURS, "d": DAYS}
_SIZE_UNITS = {"": BYTES, "b": BYTES, "kib": KiB, "mib": MiB, "gib": GiB}
_AMBIGUOUS_SIZE_UNITS = {"k": "KiB", "kb": "KiB", "m": "MiB", "mb": "MiB", "g": "GiB", "gb": "GiB"}
"""Units that mean 1000 to some programs and 1024 to others (nginx reads "32k" as 32 KiB)."""
_QUANTITY = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$", re.ASCII)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

BALANCE_METHODS = ("round-robin",)
LOG_FORMATS = ("text", "json")
RELAY_MODES = ("auto", "splice", "copy")
TLS_VERSIONS = ("1.2", "1.3")
DEFAULT_PORTS = {"ws": 80, "wss": 443}
MAX_WORKERS = 256
HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
UPGRADE_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+(?:/[!#$%&'*+\-.^_`|~0-9A-Za-z]+)?$")
_NAME_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?", re.ASCII)
"""One label of a host name, lower-cased: LDH (RFC 1123), plus "_", which internal names such as
Docker Compose services use and resolvers accept."""
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*", re.ASCII)
"""A last label that makes the resolver read the name as an IPv4 number (inet_aton: ``127.1``,
``0x7f000001``, ``2130706433``), which would hide an address from every comparison."""
_SCHEME_TYPO = re.compile(r"(wss?)(?::/*|/+)(.+)", re.ASCII | re.IGNORECASE)


def parse_duration(text: str, key: str) -> float:
    """``"10s"`` → 10.0 seconds. Units: ms, s, m, h, d. ``"0s"`` means "off" where allowed."""
    if not isinstance(text, str):
        raise ConfigError(key, f'expected a duration string such as "10s", got {text!r}')
    match = _QUANTITY.match(text)
    if not match or match.group(2).lower() not in _DURATION_UNITS:
        raise ConfigError(key, f'{text!r} is not a duration; write it like "500ms", "10s", "1h"')
    value = float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]
    if not math.isfinite(value):
        raise ConfigError(key, f"{text!r} is too large")
    return value


def parse_size(text: str | int, key: str) -> int:
    """``"32KiB"`` → 32768 bytes. Units: B, KiB, MiB, GiB, any letter case; a bare number is bytes.

    KB, MB, GB, k, m and g are refused as ambiguous rather than guessed. Fractions are exact
    (``"1.5KiB"`` is 1536) and must come to whole bytes. From 0 to ``MAX_SIZE``; each key then
    checks its own range.
    """
    if isinstance(text, bool) or not isinstance(text, int | str):
        raise ConfigError(key, f'expected a size such as "32KiB", got {text!r}')
    if isinstance(text, int):
        size = Fraction(text)
    else:
        match = _QUANTITY.match(text)
        if match is None and text.lstrip().startswith("-"):
            raise ConfigError(key, f"{text!r}: a size cannot be negative")
        unit = match.group(2).lower() if match else ""
        if match and unit in _AMBIGUOUS_SIZE_UNITS:
            raise ConfigError(key, _ambiguous_size(text, match.group(1), unit))
        if match is None or unit not in _SIZE_UNITS:
            raise ConfigError(key, f'{text!r} is not a size; write it like "512B", "32KiB", "1MiB"')
        size = Fraction(Decimal(match.group(1))) * _SIZE_UNITS[unit]  # exact, unlike float
    if size < 0:
        raise ConfigError(key, f"{text!r}: a size cannot be negative")
    if size > MAX_SIZE:
        raise ConfigError(key, f"{text!r} is too large; sizes go up to {format_size(MAX_SIZE)}")
    if size.denominator != 1:
        raise ConfigError(
            key,
            f"{text!r} is not a whole number of bytes; write a number of bytes, or a fraction "
            'of a unit that comes out whole ("1.5KiB" is 1536 bytes)',
        )
    return int(size)


def _ambiguous_size(text: str, number: str, unit: str) -> str:
    """Say which binary unit to write, and what it comes to when that is a size."""
    binary = _AMBIGUOUS_SIZE_UNITS[unit]
    size = Fraction(Decimal(number)) * _SIZE_UNITS[binary.lower()]
    whole = size <= MAX_SIZE and size.denominator == 1
    meant = f'"{number}{binary}" ({size} bytes) or ' if whole else ""
    return (
        f"{text!r} is ambiguous; write {meant}a number of bytes "
        f"({unit.upper()} is 1000-based to some programs and 1024-based to others)"
    )


def format_duration(seconds: float) -> str:
    """The spelling that ``parse_duration`` reads back as exactly ``seconds``, so ``to_toml``
    round-trips: whole units when they are exact, else decimal seconds (``"1.001s"``)."""
    if seconds == 0:
        return "0s"
    for unit, scale in (("h", HOURS), ("m", MINUTES), ("s", SECONDS), ("ms", MILLISECONDS)):
        count = seconds / scale
        if count.is_integer() and int(count) * scale == seconds:
            return f"{int(count)}{unit}"
    return f"{Decimal(repr(seconds)):f}s"


def format_size(size: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return f"{size}B"


@dataclass(frozen=True, slots=True)
class Address:
    """A listening address; ``host`` is ``""`` for every interface (written ``:port``)."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str, key: str) -> Address:
        """Parse ``host:port``, ``[v6]:port`` or ``:port``."""
        if not isinstance(text, str):
            raise ConfigError(key, f'expected "host:port", got {text!r}')
        _check_characters(text, key, url=False)
        if text.startswith("*:"):
            raise ConfigError(key, f'{text!r}: for every interface write "{text[1:]}"')
        host, port = _split_host_port(text, key, default_port=None, min_port=0)
        if ":" in host and (mapped := ipaddress.IPv6Address(host).ipv4_mapped) is not None:
            raise ConfigError(
                key, f'{text!r} is an IPv4 address in IPv6 form; write "{mapped}:{port}"'
            )
        return cls(host, port)

    def __str__(self) -> str:
        return join_host_port(self.host, self.port)


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """One upstream server. ``path`` replaces the route's ``path_prefix`` when set (nginx style)."""

    name: str
    host: str
    port: int
    path: str = ""
    scheme: str = "ws"

    @classmethod
    def parse_url(cls, url: str, key: str, name: str = "") -> BackendConfig:
        """Parse ``host:port``, ``ws://host:port[/path]`` or ``wss://host:port[/path]``.

        Refused, because no request could ever reach such a backend: a host that is neither an
        IP address nor a host name (see ``_check_host``), port 0, spaces, control or non-ASCII
        characters anywhere (urlsplit would silently drop tabs and newlines), a query, fragment
        or credentials (even empty), and a path starting with "//". Names are not resolved.
        """
        if not isinstance(url, str) or not url:
            raise ConfigError(
                key, f'expected a backend URL like "ws://127.0.0.1:9000", got {url!r}'
            )
        _check_characters(url, key, url=True)
        if "://" not in url:
            try:
                host, port = _split_host_port(url, key, default_port=None, min_port=1)
            except ConfigError as exc:
                typo = _SCHEME_TYPO.fullmatch(url)
                if typo is None:
                    raise
                meant = f"{typo.group(1).lower()}://{typo.group(2)}"
                raise ConfigError(
                    key, f'{url!r} is neither host:port nor a URL; did you mean "{meant}"?'
                ) from exc
            _check_backend_host(host, url, key)
            return cls(name or join_host_port(host, port), host, port)
        if "?" in url or "#" in url:
            raise ConfigError(key, f"{url!r}: query, fragment and credentials are not allowed")
        try:
            parts = urlsplit(url)
        except ValueError as exc:  # such as an unclosed "[" around an IPv6 host
            raise ConfigError(key, f"{url!r} is not a valid URL: {exc}") from exc
        if parts.scheme not in DEFAULT_PORTS:
            raise ConfigError(key, f"scheme {parts.scheme!r} is not supported; use ws:// or wss://")
        if "@" in parts.netloc:
            raise ConfigError(key, f"{url!r}: query, fragment and credentials are not allowed")
        host, port = _split_host_port(
            parts.netloc, key, default_port=DEFAULT_PORTS[parts.scheme], min_port=1
        )
        _check_backend_host(host, url, key)
        if parts.path.startswith("//"):
            raise ConfigError(
                key, f'{url!r}: the path starts with "//"; is the scheme written twice?'
            )
        path = parts.path if parts.path not in ("", "/") else ""
        return cls(name or join_host_port(host, port), host, port, path, parts.scheme)

    @property
    def tls(self) -> bool:
        return self.scheme == "wss"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{join_host_port(self.host, self.port)}{self.path}"


@dataclass(frozen=True, slots=True)
class CertPair:
    """A certificate chain and its private key, both PEM files."""

    cert: str
    key: str


@dataclass(frozen=True, slots=True)
class ListenerTLS:
    """TLS termination on a listener. The first pair is served to clients that send no SNI
    name, or one that no pair's certificate covers."""

    certs: tuple[CertPair, ...]
    min_version: str = "1.2"
    client_ca: str = ""
    """PEM bundle of the CAs whose client certificates are accepted; "" = no client
    certificate asked for."""
    client_subject_header: str = ""
    """Header carrying the verified client certificate's subject to the backend; "" = none."""


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    listen: Address
    tls: ListenerTLS | None = None
    redirect_https: bool = False
    """Plain listener only: answer every request with a redirect to https:// (308) or, for an
    upgrade request, 426 naming the wss:// URL."""


@dataclass(frozen=True, slots=True)
class BackendTLS:
    """How ``wss://`` backends of a route are verified (``[routes.backend_tls]``)."""

    ca: str = ""
    """PEM bundle to verify backends against; "" = the system's trust store."""
    server_name: str = ""
    """Name checked against the certificate and sent as SNI; "" = the backend's host."""
    cert: str = ""
    key: str = ""
    """Client certificate and key presented to backends that ask for one."""
    verify: bool = True


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """Where matching upgrade requests go. First matching route wins."""

    name: str
    backends: tuple[BackendConfig, ...]
    hosts: tuple[str, ...] = ()
    path_prefix: str = "/"
    upgrades: tuple[str, ...] = ("websocket",)
    balance: str = "round-robin"
    preserve_host: bool = True
    backend_tls: BackendTLS = BackendTLS()


@dataclass(frozen=True, slots=True)
class ServerConfig:
    handshake_timeout: float = 10 * SECONDS
    connect_timeout: float = 5 * SECONDS
    response_timeout: float = 10 * SECONDS
    idle_timeout: float = 1 * HOURS
    max_header_bytes: int = 32 * KiB
    max_tunnels: int = 10_000
    trusted_proxies: tuple[IPNetwork, ...] = ()
    log_format: str = "text"
    workers: int = 1
    """Processes sharing the listening ports (SO_REUSEPORT); 1 runs without a supervisor."""
    relay: str = "auto"
    """How established tunnels move bytes: splice(2) through pipes, or copying in user space."""
    splice_pipes: int = 512
    """Pipes the splice relay may hold at once (two descriptors each); beyond, it copies."""
    cert_check_interval: float = 5 * SECONDS
    """How often TLS certificate and key files are checked for new contents; 0 = only on
    SIGHUP."""


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration. Build it with ``from_toml``, ``from_file`` or ``from_mapping``."""

    listeners: tuple[ListenerConfig, ...] = ()
    routes: tuple[RouteConfig, ...] = ()
    server: ServerConfig = field(default_factory=ServerConfig)

    @classmethod
    def from_file(cls, path: str | Path) -> Config:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(str(path), f"cannot read the file: {exc.strerror}") from exc
        return cls.from_toml(text, base=Path(path).absolute().parent)

    @classmethod
    def from_toml(cls, text: str, *, base: Path | None = None) -> Config:
        """``base``: the directory relative file names (certificates, keys) are read from;
        ``from_file`` passes the file's own directory, as nginx users expect of an include."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("(file)", f"not valid TOML: {exc}") from exc
        return cls.from_mapping(data, base=base)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, base: Path | None = None) -> Config:
        _reject_unknown(data, ("server", "listeners", "routes"), "")
        files = _Files(base)
        server = _parse_server(_table(data.get("server", {}), "server"))
        listeners = tuple(
            _parse_listener(item, f"listeners[{i}]", files)
            for i, item in enumerate(_array(data.get("listeners", []), "listeners"))
        )
        routes = tuple(
            _parse_route(item, f"routes[{i}]", files)
            for i, item in enumerate(_array(data.get("routes", []), "routes"))
        )
        config = cls(listeners=listeners, routes=routes, server=server)
        config.validate()
        return config

    def with_overrides(
        self,
        *,
        listen: Sequence[str] = (),
        backends: Sequence[str] = (),
        log_format: str | None = None,
        workers: int | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> Config:
        """Apply command-line flags: each given flag replaces the file's value entirely.

        ``tls_cert`` and ``tls_key`` come together and make every listener (those of
        ``listen``, else the file's) serve TLS with that one pair."""
        config = self
        if listen:
            flags = [f"--listen {a}" for a in listen]
            addresses = [Address.parse(a, flag) for a, flag in zip(listen, flags, strict=True)]
            _check_listen_together(addresses, flags)
            config = dataclasses.replace(
                config, listeners=tuple(ListenerConfig(a) for a in addresses)
            )
        if (tls_cert is None) != (tls_key is None):
            raise ConfigError("--tls-cert/--tls-key", "give both, or neither")
        if tls_cert is not None and tls_key is not None:
            pair = CertPair(str(Path(tls_cert).absolute()), str(Path(tls_key).absolute()))
            config = dataclasses.replace(
                config,
                listeners=tuple(
                    dataclasses.replace(
                        listener,
                        tls=dataclasses.replace(listener.tls, certs=(pair,))
                        if listener.tls is not None
                        else ListenerTLS((pair,)),
                        redirect_https=False,
                    )
                    for listener in config.listeners
                ),
            )
        if backends:
            parsed = tuple(BackendConfig.parse_url(b, f"--backend {b}") for b in backends)
            config = dataclasses.replace(config, routes=(RouteConfig("default", parsed),))
        if log_format is not None:
            config = dataclasses.replace(
                config, server=dataclasses.replace(config.server, log_format=log_format)
            )
        if workers is not None:
            _require(
                workers,
                "--workers",
                lambda v: 1 <= v <= MAX_WORKERS,
                f"must be between 1 and {MAX_WORKERS}",
            )
            config = dataclasses.replace(
                config, server=dataclasses.replace(config.server, workers=workers)
            )
        config.validate()
        return config

    def validate(self) -> None:
        """Check what a single key cannot check alone; raise ``ConfigError`` naming the key."""
        if not self.listeners:
            raise ConfigError("listeners", "no listener; add [[listeners]] or pass --listen")
        _check_listen_together(
            [x.listen for x in self.listeners],
            [f"listeners[{i}].listen" for i in range(len(self.listeners))],
        )
        if not self.routes:
            raise ConfigError("routes", "no route; add [[routes]] or pass --backend")
        seen: set[str] = set()
        for i, route in enumerate(self.routes):
            if route.name in seen:
                raise ConfigError(f"routes[{i}].name", f"{route.name!r} is used twice")
            seen.add(route.name)
        if self.server.log_format not in LOG_FORMATS:
            raise ConfigError("server.log_format", f"must be one of {', '.join(LOG_FORMATS)}")
        if self.server.relay not in RELAY_MODES:
            raise ConfigError("server.relay", f"must be one of {', '.join(RELAY_MODES)}")
        for i, route in enumerate(self.routes):
            if route.backend_tls != BackendTLS() and not any(b.tls for b in route.backends):
                raise ConfigError(
                    f"routes[{i}].backend_tls",
                    "applies to wss:// backends and this route has none; remove it or use wss://",
                )
        for i, listener in enumerate(self.listeners):
            if listener.tls is not None and listener.redirect_https:
                raise ConfigError(
                    f"listeners[{i}].redirect_https",
                    "a TLS listener cannot redirect to itself; set it on the plain listener",
                )

    def to_toml(self) -> str:
        """The effective configuration, every default spelled out (``tunnel check`` prints it)."""
        s = self.server
        lines = [
            "[server]",
            f"handshake_timeout = {_toml_str(format_duration(s.handshake_timeout))}",
            f"connect_timeout = {_toml_str(format_duration(s.connect_timeout))}",
            f"response_timeout = {_toml_str(format_duration(s.response_timeout))}",
            f"idle_timeout = {_toml_str(format_duration(s.idle_timeout))}",
            f"max_header_bytes = {_toml_str(format_size(s.max_header_bytes))}",
            f"max_tunnels = {s.max_tunnels}",
            f"trusted_proxies = {_toml_list(str(n) for n in s.trusted_proxies)}",
            f"log_format = {_toml_str(s.log_format)}",
            f"workers = {s.workers}",
            f"relay = {_toml_str(s.relay)}",
            f"splice_pipes = {s.splice_pipes}",
            f"cert_check_interval = {_toml_str(format_duration(s.cert_check_interval))}",
        ]
        for listener in self.listeners:
            lines += ["", "[[listeners]]", f"listen = {_toml_str(str(listener.listen))}"]
            if listener.redirect_https:
                lines.append("redirect_https = true")
            if listener.tls is not None:
                lines += _tls_toml(listener.tls)
        for route in self.routes:
            lines += [
                "",
                "[[routes]]",
                f"name = {_toml_str(route.name)}",
                f"hosts = {_toml_list(route.hosts)}",
                f"path_prefix = {_toml_str(route.path_prefix)}",
                f"upgrades = {_toml_list(route.upgrades)}",
                f"balance = {_toml_str(route.balance)}",
                f"preserve_host = {'true' if route.preserve_host else 'false'}",
                "backends = [",
                *(
                    f"  {{ name = {_toml_str(b.name)}, url = {_toml_str(b.url)} }},"
                    for b in route.backends
                ),
                "]",
            ]
            t = route.backend_tls
            lines += [
                "[routes.backend_tls]",
                f"ca = {_toml_str(t.ca)}",
                f"server_name = {_toml_str(t.server_name)}",
                f"cert = {_toml_str(t.cert)}",
                f"key = {_toml_str(t.key)}",
                f"verify = {'true' if t.verify else 'false'}",
            ]
        return "\n".join(lines) + "\n"


def _check_listen_together(addresses: Sequence[Address], keys: Sequence[str]) -> None:
    """Refuse two addresses one process cannot bind at once: ``tunnel run`` would fail with
    "address in use" against itself (with workers > 1, SO_REUSEPORT lets both bind, and they
    silently split or shadow each other's connections). ``keys[i]`` names ``addresses[i]``.

    Learnt by binding on Linux with SO_REUSEADDR (as trio does) and IPV6_V6ONLY: the same
    address twice fails, and so does ``0.0.0.0`` beside any IPv4 address or ``::`` beside any
    IPv6 one on the same port; ``0.0.0.0`` beside ``::`` binds. ``:port`` is both wildcards.
    Port 0 is a different free port each time. Names are not resolved, so a name conflicts
    only with itself and with ``:port``.
    """
    for i, later in enumerate(addresses):
        for j, earlier in enumerate(addresses[:i]):
            if later.port != earlier.port or later.port == 0:
                continue
            if later.host == earlier.host:
                again = "is given twice" if keys[i] == keys[j] else f"is also {keys[j]}"
                raise ConfigError(keys[i], f"{str(later)!r} {again}; listen on each address once")
            for wide, narrow in ((earlier, later), (later, earlier)):
                if _includes(wide.host, narrow.host):
                    raise ConfigError(
                        keys[i],
                        f"{str(later)!r} overlaps {keys[j]} {str(earlier)!r}: "
                        f"{_WILDCARDS[wide.host]} on port {wide.port} includes "
                        f"{narrow.host or 'every interface'}, and the kernel refuses to bind "
                        "both; keep one",
                    )


_WILDCARDS = {
    "": "every interface",
    "0.0.0.0": "every IPv4 interface (0.0.0.0)",
    "::": "every IPv6 interface (::)",
}


def _includes(wide: str, narrow: str) -> bool:
    """Whether listening on ``wide`` takes the port on ``narrow`` too (hosts differ)."""
    if wide == "":
        return True
    if wide not in _WILDCARDS or not is_ip_address(narrow):
        return False
    return ipaddress.ip_address(wide).version == ipaddress.ip_address(narrow).version


def _tls_toml(tls: ListenerTLS) -> list[str]:
    pairs = ", ".join(
        f"{{ cert = {_toml_str(p.cert)}, key = {_toml_str(p.key)} }}" for p in tls.certs
    )
    return [
        "[listeners.tls]",
        f"certs = [{pairs}]",
        f"min_version = {_toml_str(tls.min_version)}",
        f"client_ca = {_toml_str(tls.client_ca)}",
        f"client_subject_header = {_toml_str(tls.client_subject_header)}",
    ]


def _toml_str(text: str) -> str:
    """A TOML basic string. Values come from users (names, paths), so quotes, backslashes and
    control characters are escaped; JSON's escapes are valid TOML, and DEL must be escaped too."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_list(items: Iterable[str]) -> str:
    return "[" + ", ".join(_toml_str(item) for item in items) + "]"


def _check_backend_host(host: str, url: str, key: str) -> None:
    """What a listener may have and a backend may not: no host, or the every-interface one."""
    if not host:
        raise ConfigError(key, f"{url!r} names no host")
    if is_ip_address(host) and ipaddress.ip_address(host).is_unspecified:
        raise ConfigError(
            key,
            f"{url!r}: {host} means every interface to a listener; a backend needs the address "
            "to connect to, like 127.0.0.1",
        )


def _check_characters(text: str, key: str, url: bool) -> None:
    """Refuse what no address or URL may hold: spaces, control and non-ASCII characters."""
    for char in text:
        if not char.isascii():
            path = "; percent-encode it in a path" if url else ""
            raise ConfigError(
                key,
                f"{text!r} has {char!r}, outside ASCII; write an internationalised host name "
                f'in its ASCII (IDNA, "xn--") form{path}',
            )
        if not "!" <= char <= "~":
            fix = "remove it, or percent-encode it in a path" if url else "remove it"
            raise ConfigError(key, f"{text!r} has a space or control character {char!r}; {fix}")


def _check_host(host: str, text: str, key: str) -> str:
    """``host`` as kept: an IPv4 address, or a host name in lower case (see ``_name_problem``)."""
    if is_ip_address(host):
        return host
    name = host.lower()
    problem = _name_problem(name)
    if problem:
        raise ConfigError(key, f"{host!r} in {text!r} is not a host: {problem}")
    return name


def _name_problem(name: str) -> str:
    """Why ``name`` (lower case, ASCII) is not a host name, or "" when it is one.

    A name is labels of letters, digits, "-" (not first or last) and "_", 1 to 63 characters
    each, separated by single dots, 253 characters at most, with no trailing dot (it would be
    carried into the Host header and the TLS server name). Non-ASCII names are refused by the
    caller, not IDNA-encoded: Python's codec (IDNA 2003) maps some names unlike IDNA 2008.
    """
    if name.endswith("."):
        return "it ends with a dot; write it without the dot"
    if len(name) > 253:
        return f"it is {len(name)} characters long, longer than 253"
    labels = name.split(".")
    for label in labels:
        bad = next((c for c in label if not (c.isascii() and (c.isalnum() or c in "-_"))), "")
        if not label:
            return 'it has an empty label (".." or a leading dot)'
        if bad:
            return f"{bad!r} is not allowed; a name is letters, digits, - and _ between dots"
        if len(label) > 63:
            return f"the label {label[:10]}... is {len(label)} characters, longer than 63"
        if not _NAME_LABEL.fullmatch(label):
            return f"the label {label!r} starts or ends with '-'"
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        return (
            "it looks like an IPv4 address but is not one; write four numbers from 0 to 255 "
            "without leading zeros, like 127.0.0.1"
        )
    return ""


def _split_host_port(
    text: str, key: str, default_port: int | None, min_port: int
) -> tuple[str, int]:
    """``(host, port)``: an IPv6 address in its compressed spelling, an IPv4 address, a host name
    in lower case (see ``_check_host``) or "" when ``text`` is ``:port``."""
    port_text: str | None
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ConfigError(key, f"{text!r} opens [ but never closes it")
        host, rest = text[1:close], text[close + 1 :]
        _check_ip(host, text, key, version=6)
        host = str(ipaddress.IPv6Address(host))
        if rest and not rest.startswith(":"):
            raise ConfigError(key, f"{text!r} is not [v6]:port")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" not in text:
        host, port_text = text, None
    else:
        raise ConfigError(key, f"{text!r}: write IPv6 addresses in brackets, like [::1]:8080")
    if port_text is None and default_port is None:
        raise ConfigError(key, f"{text!r} needs a port, like host:8080 or [::1]:8080")
    if host and not text.startswith("["):
        host = _check_host(host, text, key)
    if port_text is None:
        return host, default_port or 0
    # isdigit alone takes "²" and other non-ASCII digits; int() refuses over 4300 digits
    if not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5) or not (
        min_port <= int(port_text) <= 65535
    ):
        raise ConfigError(
            key, f"port {port_text!r} in {text!r} is not a number from {min_port} to 65535"
        )
    return host, int(port_text)


def is_ip_address(text: str) -> bool:
    """True for a numeric IPv4 or IPv6 address (no brackets, no port)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _check_ip(host: str, text: str, key: str, version: int) -> None:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError as exc:
        raise ConfigError(key, f"{host!r} in {text!r} is not an IPv{version} address") from exc
    if ip.version != version:
        raise ConfigError(key, f"{host!r} in {text!r} is not an IPv{version} address")


def join_host_port(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _table(value: Any, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(key, f"expected a table, got {type(value).__name__}")
    return value


def _array(value: Any, key: str) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(key, f"expected an array of tables ([[{key}]]), got {value!r}")
    return value


def _reject_unknown(table: Mapping[str, Any], known: Sequence[str], prefix: str) -> None:
    for name in table:
        if name not in known:
            where = f"{prefix}.{name}" if prefix else name
            raise ConfigError(where, f"unknown key; known keys here: {', '.join(known)}")


T = TypeVar("T")


def _get(table: Mapping[str, Any], name: str, prefix: str, kind: type[T], default: T) -> T:
    value = table.get(name, default)
    if kind is int and isinstance(value, bool):
        raise ConfigError(f"{prefix}.{name}", f"expected an integer, got {value!r}")
    if not isinstance(value, kind):
        raise ConfigError(
            f"{prefix}.{name}", f"expected {kind.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


def _get_list(
    table: Mapping[str, Any], name: str, prefix: str, default: Sequence[str]
) -> tuple[str, ...]:
    value = table.get(name, list(default))
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{prefix}.{name}", f"expected a list of strings, got {value!r}")
    return tuple(value)


def _require(value: T, key: str, check: Callable[[T], bool], problem: str) -> T:
    """Return ``value`` when ``check`` holds, else raise ConfigError(key, problem)."""
    if not check(value):
        raise ConfigError(key, problem)
    return value


def _parse_server(table: Mapping[str, Any]) -> ServerConfig:
    names = [f.name for f in dataclasses.fields(ServerConfig)]
    _reject_unknown(table, names, "server")
    d = ServerConfig()

    def duration(name: str, default: float, allow_zero: bool) -> float:
        key = f"server.{name}"
        if name not in table:
            return default
        value = parse_duration(table[name], key)
        floor = "0s (off) or more" if allow_zero else "more than 0s"
        return _require(value, key, lambda v: v > 0 or (allow_zero and v == 0), f"must be {floor}")

    proxies: list[IPNetwork] = []
    for cidr in _get_list(table, "trusted_proxies", "server", ()):
        try:
            proxies.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError as exc:
            raise ConfigError("server.trusted_proxies", f"{cidr!r} is not a CIDR: {exc}") from exc
    max_header_bytes = parse_size(
        table.get("max_header_bytes", d.max_header_bytes), "server.max_header_bytes"
    )
    max_tunnels = _get(table, "max_tunnels", "server", int, d.max_tunnels)
    return ServerConfig(
        handshake_timeout=duration("handshake_timeout", d.handshake_timeout, False),
        connect_timeout=duration("connect_timeout", d.connect_timeout, False),
        response_timeout=duration("response_timeout", d.response_timeout, False),
        idle_timeout=duration("idle_timeout", d.idle_timeout, True),
        max_header_bytes=_require(
            max_header_bytes,
            "server.max_header_bytes",
            lambda v: 1 * KiB <= v <= 1 * MiB,
            "must be between 1KiB and 1MiB",
        ),
        max_tunnels=_require(
            max_tunnels, "server.max_tunnels", lambda v: v > 0, "must be 1 or more"
        ),
        trusted_proxies=tuple(proxies),
        log_format=_get(table, "log_format", "server", str, d.log_format),
        workers=_require(
            _get(table, "workers", "server", int, d.workers),
            "server.workers",
            lambda v: 1 <= v <= MAX_WORKERS,
            f"must be between 1 and {MAX_WORKERS}",
        ),
        relay=_get(table, "relay", "server", str, d.relay),
        splice_pipes=_require(
            _get(table, "splice_pipes", "server", int, d.splice_pipes),
            "server.splice_pipes",
            lambda v: v >= 0,
            "must be 0 (never splice) or more",
        ),
        cert_check_interval=duration("cert_check_interval", d.cert_check_interval, True),
    )


@dataclass(frozen=True, slots=True)
class _Files:
    """Resolves file names in the configuration against the configuration file's directory."""

    base: Path | None

    def path(self, table: Mapping[str, Any], name: str, prefix: str, required: bool) -> str:
        value = _get(table, name, prefix, str, "")
        if not value:
            if required:
                raise ConfigError(f"{prefix}.{name}", "missing; write the path of a PEM file")
            return ""
        path = Path(value).expanduser()
        if self.base is not None and not path.is_absolute():
            path = self.base / path
        return str(path)

    def pair(self, table: Mapping[str, Any], prefix: str) -> CertPair:
        """The ``cert`` and ``key`` of ``table``, both required."""
        return CertPair(
            self.path(table, "cert", prefix, True), self.path(table, "key", prefix, True)
        )


def _parse_listener(item: Any, key: str, files: _Files) -> ListenerConfig:
    table = _table(item, key)
    _reject_unknown(table, ("listen", "tls", "redirect_https"), key)
    if "listen" not in table:
        raise ConfigError(f"{key}.listen", 'missing; write listen = "127.0.0.1:8080"')
    tls = _parse_listener_tls(table["tls"], f"{key}.tls", files) if "tls" in table else None
    return ListenerConfig(
        Address.parse(table["listen"], f"{key}.listen"),
        tls=tls,
        redirect_https=_get(table, "redirect_https", key, bool, False),
    )


def _parse_listener_tls(item: Any, key: str, files: _Files) -> ListenerTLS:
    table = _table(item, key)
    known = ("cert", "key", "certs", "min_version", "client_ca", "client_subject_header")
    _reject_unknown(table, known, key)
    pairs: list[CertPair] = []
    if "cert" in table or "key" in table:
        pairs.append(files.pair(table, key))
    for j, raw in enumerate(_array(table.get("certs", []), f"{key}.certs")):
        pkey = f"{key}.certs[{j}]"
        ptable = _table(raw, pkey)
        _reject_unknown(ptable, ("cert", "key"), pkey)
        pairs.append(files.pair(ptable, pkey))
    if not pairs:
        raise ConfigError(
            key, 'no certificate; write tls = { cert = "site.pem", key = "site.key" }'
        )
    min_version = _get(table, "min_version", key, str, "1.2")
    if min_version not in TLS_VERSIONS:
        raise ConfigError(
            f"{key}.min_version", f"{min_version!r}: must be one of {', '.join(TLS_VERSIONS)}"
        )
    header = _get(table, "client_subject_header", key, str, "")
    if header and not HEADER_NAME.match(header):
        raise ConfigError(f"{key}.client_subject_header", f"{header!r} is not a header name")
    client_ca = files.path(table, "client_ca", key, False)
    if header and not client_ca:
        raise ConfigError(
            f"{key}.client_subject_header", "needs client_ca: only a verified subject is sent"
        )
    return ListenerTLS(tuple(pairs), min_version, client_ca, header)


def _parse_backend_tls(item: Any, key: str, files: _Files) -> BackendTLS:
    table = _table(item, key)
    names = [f.name for f in dataclasses.fields(BackendTLS)]
    _reject_unknown(table, names, key)
    cert = files.path(table, "cert", key, False)
    private_key = files.path(table, "key", key, False)
    if bool(cert) != bool(private_key):
        raise ConfigError(f"{key}.cert", "a client certificate needs both cert and key")
    return BackendTLS(
        ca=files.path(table, "ca", key, False),
        server_name=_get(table, "server_name", key, str, ""),
        cert=cert,
        key=private_key,
        verify=_get(table, "verify", key, bool, True),
    )


def _parse_route(item: Any, key: str, files: _Files) -> RouteConfig:
    table = _table(item, key)
    names = [f.name for f in dataclasses.fields(RouteConfig)]
    _reject_unknown(table, names, key)
    name = _get(table, "name", key, str, key)
    hosts = tuple(h.lower() for h in _get_list(table, "hosts", key, ()))
    for host in hosts:
        if not host or "*" in host or "/" in host:
            raise ConfigError(f"{key}.hosts", f"{host!r} is not an exact host name")
        if (":" in host and not is_ip_address(host)) or host.startswith("["):
            raise ConfigError(
                f"{key}.hosts", f"{host!r}: write the host name alone, without port or brackets"
            )
    path_prefix = _get(table, "path_prefix", key, str, "/")
    if not path_prefix.startswith("/"):
        raise ConfigError(f"{key}.path_prefix", f"{path_prefix!r} must start with /")
    upgrades = tuple(u.lower() for u in _get_list(table, "upgrades", key, ("websocket",)))
    if not upgrades:
        raise ConfigError(f"{key}.upgrades", "must name at least one Upgrade token")
    for token in upgrades:
        if not UPGRADE_TOKEN.match(token):
            raise ConfigError(f"{key}.upgrades", f"{token!r} is not an Upgrade token")
    balance = _get(table, "balance", key, str, "round-robin")
    if balance not in BALANCE_METHODS:
        raise ConfigError(
            f"{key}.balance", f"{balance!r} unknown; one of {', '.join(BALANCE_METHODS)}"
        )
    raw_backends = _array(table.get("backends", []), f"{key}.backends")
    if not raw_backends:
        raise ConfigError(f"{key}.backends", "a route needs at least one backend")
    backends = []
    for j, raw in enumerate(raw_backends):
        bkey = f"{key}.backends[{j}]"
        btable = _table(raw, bkey)
        _reject_unknown(btable, ("name", "url"), bkey)
        if "url" not in btable:
            raise ConfigError(f"{bkey}.url", 'missing; write url = "ws://127.0.0.1:9000"')
        bname = _get(btable, "name", bkey, str, "")
        backends.append(BackendConfig.parse_url(btable["url"], f"{bkey}.url", bname))
    if len({b.name for b in backends}) != len(backends):
        raise ConfigError(f"{key}.backends", "backend names must be unique within a route")
    return RouteConfig(
        name=name,
        backends=tuple(backends),
        hosts=hosts,
        path_prefix=path_prefix,
        upgrades=upgrades,
        balance=balance,
        preserve_host=_get(table, "preserve_host", key, bool, True),
        backend_tls=_parse_backend_tls(table["backend_tls"], f"{key}.backend_tls", files)
        if "backend_tls" in table
        else BackendTLS(),
    )
