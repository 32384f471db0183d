"""``[[routes]]``, their ``backends`` and ``backend_tls``: where upgrades go, each key declared
once."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import urlsplit

from tunnel.config.hosts import (
    check_backend_host,
    check_characters,
    is_ip_address,
    join_host_port,
    split_host_port,
)
from tunnel.config.kinds import (
    REQUIRED,
    TABLE_KEY,
    Choice,
    Context,
    FilePath,
    Flag,
    Key,
    Kind,
    Text,
    TextList,
    declare,
    setting,
)
from tunnel.config.tables import Table, TableList
from tunnel.errors import ConfigError

BALANCE_METHODS = ("round-robin",)
DEFAULT_PORTS = {"ws": 80, "wss": 443}
UPGRADE_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+(?:/[!#$%&'*+\-.^_`|~0-9A-Za-z]+)?")
_SCHEME_TYPO = re.compile(r"(wss?)(?::/*|/+)(.+)", re.ASCII | re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class BackendURL(Kind[str]):
    """A backend URL (see ``BackendConfig.parse_url``), kept in its normal spelling."""

    def parse(self, raw: object, key: str, ctx: Context) -> str:
        return BackendConfig.parse_url(raw, key).url

    def dump(self, value: str) -> object:
        return value


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """One upstream server. ``path`` replaces the route's ``path_prefix`` when set (nginx style)."""

    EXTRA_KEYS: ClassVar[tuple[Key, ...]] = (
        Key(
            "url",
            BackendURL(),
            "`host:port`, `ws://host[:port][/path]` (port 80 when omitted) or "
            "`wss://host[:port][/path]` (TLS, port 443 when omitted). With a path, the path "
            "replaces the route's `path_prefix` at the front of the request path, like nginx's "
            "`proxy_pass http://b/path/`: route `/ws/`, backend `ws://b:9000/chat/`, request "
            "`/ws/room?id=1` → `/chat/room?id=1`. See [backend URLs](#backend-urls) for what is "
            "refused.",
            REQUIRED,
            missing='missing; write url = "ws://127.0.0.1:9000"',
        ),
    )
    name: str = field(
        metadata=declare(
            Text(), "Shown in logs. Unique within the route.", default="", shown="the `host:port`"
        )
    )
    host: str
    port: int
    path: str = ""
    scheme: str = "ws"

    @classmethod
    def from_keys(cls, values: dict[str, Any], key: str) -> BackendConfig:
        """The ``url`` key makes ``host``, ``port``, ``path`` and ``scheme``."""
        return cls.parse_url(values["url"], f"{key}.url", values["name"])

    @classmethod
    def parse_url(cls, url: object, key: str, name: str = "") -> BackendConfig:
        """Parse ``host:port``, ``ws://host:port[/path]`` or ``wss://host:port[/path]``.

        Refused, because no request could ever reach such a backend: a host that is neither an
        IP address nor a host name (see ``hosts.split_host_port``), port 0, spaces, control or
        non-ASCII characters anywhere (urlsplit would silently drop tabs and newlines), a query,
        fragment or credentials (even empty), and a path starting with "//". Names are not
        resolved.
        """
        if not isinstance(url, str) or not url:
            raise ConfigError(
                key, f'expected a backend URL like "ws://127.0.0.1:9000", got {url!r}'
            )
        check_characters(url, key, url=True)
        if "://" not in url:
            try:
                host, port = split_host_port(url, key, default_port=None, min_port=1)
            except ConfigError as exc:
                typo = _SCHEME_TYPO.fullmatch(url)
                if typo is None:
                    raise
                meant = f"{typo.group(1).lower()}://{typo.group(2)}"
                raise ConfigError(
                    key, f'{url!r} is neither host:port nor a URL; did you mean "{meant}"?'
                ) from exc
            check_backend_host(host, url, key)
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
        host, port = split_host_port(
            parts.netloc, key, default_port=DEFAULT_PORTS[parts.scheme], min_port=1
        )
        check_backend_host(host, url, key)
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
class BackendTLS:
    """How ``wss://`` backends of a route are verified (``[routes.backend_tls]``)."""

    ca: str = setting(
        "",
        FilePath(),
        'PEM bundle to verify backend certificates against; `""` = the system\'s trust store.',
    )
    server_name: str = setting(
        "",
        Text(),
        'Name the backend certificate must carry, also sent as SNI; `""` = the host of each '
        "backend URL.",
    )
    cert: str = setting(
        "",
        FilePath(),
        "Client certificate for backends that require one; needs `key` too.",
    )
    key: str = setting("", FilePath(), "Its private key; needs `cert` too.")
    verify: bool = setting(
        True,
        Flag(),
        "`false` accepts any certificate (logged as a warning at start). A backend that fails "
        "verification is skipped like a refused connect; when none is left the client gets 502 "
        "and the log names the reason.",
    )


def _host_problem(host: str) -> str:
    if not host or "*" in host or "/" in host:
        return f"{host!r} is not an exact host name"
    if (":" in host and not is_ip_address(host)) or host.startswith("["):
        return f"{host!r}: write the host name alone, without port or brackets"
    return ""


def _token_problem(token: str) -> str:
    return "" if UPGRADE_TOKEN.fullmatch(token) else f"{token!r} is not an Upgrade token"


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """Where matching upgrade requests go. First matching route wins."""

    name: str = field(
        metadata=declare(Text(), "Shown in logs. Unique.", default=TABLE_KEY, shown='`"routes[N]"`')
    )
    backends: tuple[BackendConfig, ...] = field(
        metadata=declare(
            TableList(BackendConfig, inline=True, least="a route needs at least one backend"),
            "Array of `{ url, name }`, tried in turn (see `balance`).",
            missing='missing; write backends = [{ url = "ws://127.0.0.1:9000" }]',
        )
    )
    hosts: tuple[str, ...] = setting(
        (),
        TextList(lower=True, check=_host_problem),
        "Exact host names compared case-insensitively, without the port. Empty = any host.",
    )
    path_prefix: str = setting(
        "/",
        Text(re.compile("/.*", re.DOTALL), "must start with /", empty=False),
        "The request path must start with this.",
    )
    upgrades: tuple[str, ...] = setting(
        ("websocket",),
        TextList(lower=True, check=_token_problem, least="must name at least one Upgrade token"),
        "Upgrade tokens accepted on this route. The first token the client offers that is in "
        "this list is used; none → 426 naming the allowed tokens. `websocket` upgrades are also "
        "checked against RFC 6455 (`Sec-WebSocket-Key`, version 13).",
    )
    balance: str = setting(
        "round-robin",
        Choice(BALANCE_METHODS),
        "Each new connection starts one backend further along; a backend that refuses or times "
        "out is skipped in favour of the next, while nothing has been sent to the client.",
    )
    preserve_host: bool = setting(
        True,
        Flag(),
        "`true` sends the client's `Host` to the backend (HAProxy's default); `false` sends the "
        "backend's `host:port` (nginx's default; the port left out when it is the scheme's "
        "own).",
    )
    backend_tls: BackendTLS = field(
        default=BackendTLS(),
        metadata=declare(
            Table(BackendTLS),
            "How `wss://` backends are verified: the `[routes.backend_tls]` table below.",
            shown="verify against the system store",
        ),
    )
