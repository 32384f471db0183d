"""``[[routes]]``, their ``backends`` and ``backend_tls``: where upgrades go, each key declared
once."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import urlsplit

from tunnel.config.access import RouteAccess
from tunnel.config.auth import RouteAuth
from tunnel.config.hosts import (
    _name_problem,
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
    Duration,
    FilePath,
    Flag,
    Integer,
    Key,
    Kind,
    Text,
    TextList,
    declare,
    setting,
)
from tunnel.config.limits import RouteLimits
from tunnel.config.tables import Table, TableList
from tunnel.config.units import format_duration
from tunnel.errors import ConfigError

BALANCE_METHODS = ("round-robin", "least-conn", "hash", "cookie")
ON_DOWN = ("keep", "close")
HEALTH_KINDS = ("none", "websocket", "tcp")
MAX_WEIGHT = 256
MIN_COOKIE_SECRET = 16
"""Characters of ``sticky_cookie.secret`` at least, with ``balance = "cookie"``."""
DEFAULT_PORTS = {"ws": 80, "wss": 443}
UPGRADE_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+(?:/[!#$%&'*+\-.^_`|~0-9A-Za-z]+)?")
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
COOKIE_NAME = re.compile(_TOKEN)
"""A cookie name: an RFC 9110 token (RFC 6265 §4.1.1)."""
CHECK_PATH = re.compile(r"/[!-~]*")
"""A health check's request target: it is written into a request line as it is."""
HASH_KEY = re.compile(rf"ip|(?:header|cookie|query):{_TOKEN}")
"""``balance = "hash"`` input: ``ip``, ``header:NAME``, ``cookie:NAME`` or ``query:NAME``."""
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
    weight: int = setting(
        1,
        Integer(1, MAX_WEIGHT),
        "Share of new tunnels against the route's other backends, 1 to 256: weight 2 gets twice "
        "as many as weight 1 (HAProxy `weight`, nginx `server ... weight=`).",
        omit_default=True,
    )
    max_tunnels: int = setting(
        0,
        Integer(0, zero="no cap"),
        "Open tunnels this backend takes at most; a backend at its cap is skipped like one that "
        "is down, and 503 when every backend is. 0 = no cap (HAProxy `maxconn` on a server, "
        "nginx `max_conns`).",
        omit_default=True,
    )
    slow_start: float = setting(
        0.0,
        Duration(allow_zero=True),
        "After the backend comes up, its share of new tunnels grows from little to `weight` over "
        'this long, so a cold backend is not flooded; `"0s"` = full share at once (HAProxy '
        "`slowstart`, nginx `slow_start`).",
        omit_default=True,
    )
    send_proxy_protocol: str = setting(
        "",
        Choice(("", "v1", "v2")),
        '`"v1"` (text) or `"v2"` (binary): open each connection to the backend with a PROXY '
        "protocol header naming the client's address and port and the address and port it "
        "connected to, for backends that read it (HAProxy `send-proxy`/`send-proxy-v2`, nginx "
        '`proxy_protocol on`); `""` = none. `"websocket"` health checks send one that names '
        "no client (v1 `UNKNOWN`, v2 `LOCAL`), as HAProxy's `check-send-proxy` does.",
        omit_default=True,
    )

    @classmethod
    def from_keys(cls, values: dict[str, Any], key: str) -> BackendConfig:
        """The ``url`` key makes ``host``, ``port``, ``path`` and ``scheme``; the other keys are
        fields of their own."""
        backend = cls.parse_url(values.pop("url"), f"{key}.url", values.pop("name"))
        return dataclasses.replace(backend, **values)

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


@dataclass(frozen=True, slots=True)
class StickyCookie:
    """The cookie of ``balance = "cookie"`` (``[routes.sticky_cookie]``): it names the backend
    a client was given, signed so that a client cannot pick one."""

    name: str = setting(
        "tunnel_backend",
        Text(
            COOKIE_NAME,
            "is not a cookie name (a token: letters, digits, !#$%&'*+-.^_`|~)",
            empty=False,
        ),
        "Cookie that remembers the client's backend (HAProxy `cookie NAME insert`, nginx "
        "`sticky cookie NAME`).",
    )
    secret: str = field(
        default="",
        repr=False,
        metadata=declare(
            Text(),
            "Key the cookie's value is signed with (HMAC), so that a client cannot choose its "
            'backend; at least 16 characters, and needed, with `balance = "cookie"`. Anyone who '
            "can read the file can forge cookies.",
        ),
    )
    max_age: float = setting(
        0.0,
        Duration(allow_zero=True),
        'Cookie lifetime (`Max-Age`); `"0s"` = a session cookie, gone when the browser closes '
        "(HAProxy `maxlife`, nginx `sticky cookie ... expires=`).",
    )
    strip: bool = setting(
        False,
        Flag(),
        "`true` removes the cookie from the request sent to the backend (HAProxy `cookie ... "
        "indirect`).",
    )


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """Active checks of each backend of a route (``[routes.health]``); HAProxy's defaults."""

    kind: str = setting(
        "none",
        Choice(HEALTH_KINDS),
        '`"none"`: no active checks (a backend is down only by `passive_failures`); '
        '`"websocket"`: a WebSocket handshake to `path` must get 101; `"tcp"`: a connect must '
        "succeed (HAProxy `check`, with `option httpchk` for a request, nginx `health_check`).",
    )
    path: str = setting(
        "/",
        Text(
            CHECK_PATH,
            "must start with / and hold no space, control or non-ASCII character",
            empty=False,
        ),
        'Request target of `"websocket"` checks (HAProxy `option httpchk GET PATH`, nginx '
        "`health_check uri=`).",
    )
    interval: float = setting(
        2.0,
        Duration(),
        "Time between two checks of one backend (HAProxy `inter`, nginx `interval=`).",
    )
    timeout: float = setting(
        1.0,
        Duration(),
        "A check not passed within this long failed; less than `interval` (HAProxy `timeout "
        "check`).",
    )
    rise: int = setting(
        2,
        Integer(1),
        "Checks passed in a row that mark a down backend up (HAProxy `rise`, nginx `passes=`).",
    )
    fall: int = setting(
        3,
        Integer(1),
        "Checks failed in a row that mark an up backend down (HAProxy `fall`, nginx `fails=`).",
    )

    @classmethod
    def from_keys(cls, values: dict[str, Any], key: str) -> HealthCheck:
        """A check must end before the next one starts: ``timeout`` < ``interval``."""
        health = cls(**values)
        if health.timeout >= health.interval:
            raise ConfigError(
                f"{key}.timeout",
                f"must be less than interval ({format_duration(health.interval)}): a check "
                "must end before the next one starts",
            )
        return health


def _host_problem(host: str) -> str:
    """Why ``host`` (lower case) cannot be in ``hosts``: an exact name or an IP address, or
    ``*.`` and a host name."""
    if host.startswith("*."):
        problem = _name_problem(host[2:])
        return f"{host!r} is not a wildcard host: {problem}" if problem else ""
    if "*" in host:
        return (
            f'{host!r}: a wildcard is written "*." before a host name, like "*.example.org" '
            "(it matches any name below example.org, not example.org itself)"
        )
    if not host or "/" in host:
        return f'{host!r} is not an exact host name or a "*." wildcard'
    if (":" in host and not is_ip_address(host)) or host.startswith("["):
        return f"{host!r}: write the host name alone, without port or brackets"
    return ""


def _token_problem(token: str) -> str:
    return "" if UPGRADE_TOKEN.fullmatch(token) else f"{token!r} is not an Upgrade token"


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """Where matching upgrade requests go: the best host match among routes whose path prefix
    matches (exact, then the longest wildcard, then any host), the first of equals
    (``policy.routing``)."""

    name: str = field(
        metadata=declare(Text(), "Shown in logs. Unique.", default=TABLE_KEY, shown='`"routes[N]"`')
    )
    backends: tuple[BackendConfig, ...] = field(
        metadata=declare(
            TableList(BackendConfig, inline=True, least="a route needs at least one backend"),
            "Array of `{ url, name, weight, max_tunnels, slow_start }`, chosen by `balance`.",
            missing='missing; write backends = [{ url = "ws://127.0.0.1:9000" }]',
        )
    )
    hosts: tuple[str, ...] = setting(
        (),
        TextList(lower=True, check=_host_problem),
        'Host names compared case-insensitively, without the port: exact (`"chat.example.com"`) '
        'or a wildcard (`"*.example.org"`: any name below example.org, at any depth, but not '
        "example.org itself; nginx `server_name *.example.org`). Empty = any host. See "
        "[which route](#which-route-a-request-takes).",
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
        '`"round-robin"`: each new tunnel starts one backend further along, by `weight` '
        '(HAProxy `roundrobin`, nginx\'s default); `"least-conn"`: the backend with the fewest '
        'open tunnels for its `weight` (HAProxy `leastconn`, nginx `least_conn`); `"hash"`: '
        "`hash_key` picks the backend, the same one while the backends that are up stay the "
        'same (HAProxy `balance source`/`hdr`, nginx `hash ... consistent`); `"cookie"`: a '
        "signed `sticky_cookie` brings a client back to its backend, and new clients go "
        "round-robin (HAProxy `cookie ... insert`, nginx `sticky cookie`). A backend that "
        "refuses or times out is skipped in favour of the next, while nothing has been sent to "
        "the client.",
    )
    hash_key: str = setting(
        "ip",
        Text(
            HASH_KEY,
            "is not ip, header:NAME, cookie:NAME or query:NAME (NAME a token)",
            empty=False,
        ),
        'What `balance = "hash"` hashes: `"ip"`, the client\'s address (after `trusted_proxies`), '
        'or a request header, cookie or query parameter, `"header:X-User"`, `"cookie:sid"`, '
        '`"query:room"` (HAProxy `balance source`/`hdr(NAME)`/`url_param NAME`, nginx `hash '
        "$remote_addr`/`$http_NAME`/`$cookie_NAME`/`$arg_NAME`).",
    )
    on_down: str = setting(
        "keep",
        Choice(ON_DOWN),
        '`"keep"`: tunnels open to a backend marked down stay open (HAProxy\'s default); '
        '`"close"`: they are closed with reason `backend_down` (HAProxy `on-marked-down '
        "shutdown-sessions`).",
    )
    passive_failures: int = setting(
        3,
        Integer(0, zero="off"),
        "Failed connects to a backend in a row (refused, timed out, TLS refused) that mark it "
        "down; 0 = off (nginx `max_fails`, HAProxy `observe layer4` with `error-limit`).",
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
    sticky_cookie: StickyCookie = field(
        default=StickyCookie(),
        metadata=declare(
            Table(StickyCookie),
            'The cookie of `balance = "cookie"`: the `[routes.sticky_cookie]` table below.',
            shown='unused unless `balance = "cookie"`',
        ),
    )
    health: HealthCheck = field(
        default=HealthCheck(),
        metadata=declare(
            Table(HealthCheck),
            "Active health checks of each backend: the `[routes.health]` table below.",
            shown="off",
        ),
    )
    access: RouteAccess = field(
        default=RouteAccess(),
        metadata=declare(
            Table(RouteAccess),
            "Address lists, browser origins and stripped headers: the `[routes.access]` table "
            "below.",
            shown="anyone",
        ),
    )
    limits: RouteLimits = field(
        default=RouteLimits(),
        metadata=declare(
            Table(RouteLimits),
            "Per-client caps and rates: the `[routes.limits]` table below.",
            shown="none",
        ),
    )
    auth: RouteAuth = field(
        default=RouteAuth(),
        metadata=declare(
            Table(RouteAuth),
            "A credential checked before the upgrade: the `[routes.auth]` table below.",
            shown="none",
        ),
    )

    @classmethod
    def from_keys(cls, values: dict[str, Any], key: str) -> RouteConfig:
        """The keys that only work together: ``hash_key`` with ``balance = "hash"``, a
        ``sticky_cookie`` with ``balance = "cookie"``, which needs its ``secret``."""
        route = cls(**values)
        cookie = route.sticky_cookie
        if route.balance == "cookie" and len(cookie.secret) < MIN_COOKIE_SECRET:
            have = f"is {len(cookie.secret)} characters" if cookie.secret else "is missing"
            raise ConfigError(
                f"{key}.sticky_cookie.secret",
                f'balance = "cookie" needs a secret of at least {MIN_COOKIE_SECRET} characters '
                f"and this one {have}: a short secret can be brute-forced, and then any client "
                "can forge a cookie that picks its backend",
            )
        if route.hash_key != "ip" and route.balance != "hash":
            raise ConfigError(
                f"{key}.hash_key",
                f'hash_key applies to balance = "hash", and this route has balance = '
                f'"{route.balance}"; remove hash_key or set balance = "hash"',
            )
        if route.limits.per_identity_tunnels and route.auth.kind == "none":
            raise ConfigError(
                f"{key}.limits.per_identity_tunnels",
                "counts tunnels per verified identity, and this route has no [routes.auth]; "
                'set auth kind = "bearer" or "jwt", or use per_ip_tunnels',
            )
        if cookie != StickyCookie() and route.balance != "cookie":
            raise ConfigError(
                f"{key}.sticky_cookie",
                f'applies to balance = "cookie", and this route has balance = '
                f'"{route.balance}"; remove it or set balance = "cookie"',
            )
        return route
