"""``[server]`` (timeouts, limits, how the process runs) and ``[admin]``, each key declared
once."""

from __future__ import annotations

from dataclasses import dataclass, field

from tunnel.config.hosts import Address
from tunnel.config.kinds import (
    RATE_OFF,
    Choice,
    CIDRList,
    Duration,
    FilePath,
    Flag,
    Integer,
    IPNetwork,
    ListenAddress,
    Rate,
    RateKind,
    Size,
    declare,
    setting,
)
from tunnel.config.units import HOURS, SECONDS, KiB, MiB

LOG_FORMATS = ("text", "json")
RELAY_MODES = ("auto", "splice", "copy")
MAX_WORKERS = 256


@dataclass(frozen=True, slots=True)
class ServerConfig:
    handshake_timeout: float = setting(
        10 * SECONDS,
        Duration(),
        "The whole request head must arrive within this; otherwise 408 and close. On a TLS "
        "listener the TLS handshake counts too, from accept: a client that has not finished it "
        "in time is closed without an answer. Defeats slowloris (nginx waits 60 s). Must be "
        "more than 0.",
    )
    connect_timeout: float = setting(
        5 * SECONDS,
        Duration(),
        "TCP connect to one backend, and for a `wss://` backend its TLS handshake and the "
        "upgrade request too. On timeout or refusal the next backend of the route is tried; "
        "when all fail the client gets 502 (504 if every attempt timed out).",
    )
    response_timeout: float = setting(
        10 * SECONDS,
        Duration(),
        "The backend must answer the upgrade request within this; otherwise 504. Also bounds "
        "each read while a refusal's body is relayed.",
    )
    idle_timeout: float = setting(
        1 * HOURS,
        Duration(allow_zero=True),
        'A tunnel with no bytes either way for this long is closed. `"0s"` = never. Separate '
        "from the handshake timeouts, so idle WebSockets survive (nginx's 60 s kills them).",
    )
    max_header_bytes: int = setting(
        32 * KiB,
        Size(1 * KiB, 1 * MiB),
        "Largest request head (request line plus headers); larger gets 431. From 1KiB to 1MiB.",
    )
    max_tunnels: int = setting(
        10_000,
        Integer(1),
        "Connections past the handshake (connecting, or tunnelling) at once; beyond it new "
        "upgrades get 503 with `Retry-After: 5`.",
    )
    trusted_proxies: tuple[IPNetwork, ...] = setting(
        (),
        CIDRList(),
        'CIDRs (`"10.0.0.0/8"`, `"::1/128"`) of proxies in front of the tunnel. From them, '
        "`X-Forwarded-For` is appended to (valid addresses only), valid "
        "`X-Forwarded-Proto`/`-Host` values are kept, and so are `Forwarded` and the other "
        "headers that name the client; from anyone else they are replaced or dropped (see "
        "[limits.md](limits.md)).",
    )
    log_format: str = setting(
        "text",
        Choice(LOG_FORMATS),
        '`"text"` (`time level event key=value...`) or `"json"` (one object per line).',
    )
    workers: int = setting(
        1,
        Integer(1, MAX_WORKERS),
        "Processes serving the listeners, from 1 to 256. With more than 1, `tunnel run` "
        "becomes a supervisor that starts that many worker processes, each listening on the "
        "same ports with `SO_REUSEPORT` so the kernel spreads new connections among them, and "
        "restarts any that dies (see [operations](operations.md#workers)). Each worker applies "
        "every other limit on its own: `max_tunnels` is per worker. Set it to the number of "
        "CPU cores the tunnel may use.",
    )
    relay: str = setting(
        "auto",
        Choice(RELAY_MODES),
        'How established tunnels move bytes. `"copy"`: `recv`/`send` through one shared 64 KiB '
        'buffer. `"splice"`: `splice(2)` through a pooled pipe for every read (Linux), copying '
        'only when no pipe is free. `"auto"`: copy, and switch a direction to splice once a read '
        "brings 32 KiB or more (bulk transfers), back to copy when a read comes back under 16 "
        'KiB (messages). Pipes are asked for 256 KiB each. `"auto"` is the cheapest on every '
        'workload measured ([benchmarks](benchmarks.md)); `"splice"` where `splice(2)` is '
        "missing refuses to start.",
    )
    splice_pipes: int = setting(
        512,
        Integer(0, zero="never splice"),
        "Pipes the splice relay may hold at once, each two descriptors, held only while bytes "
        "are in it. Beyond the limit (or when descriptors run out) a read copies instead, so "
        "the limit never stalls a tunnel. `0` never splices.",
    )
    cert_check_interval: float = setting(
        5 * SECONDS,
        Duration(allow_zero=True),
        "How often the certificate, key and `client_ca` files of TLS listeners are read and, "
        "when their contents changed, loaded for new handshakes "
        '([rotation](tls.md#certificate-rotation)). SIGHUP reloads them at any time. `"0s"` '
        "= only on SIGHUP.",
    )

    drain_timeout: float = setting(
        30 * SECONDS,
        Duration(),
        "How long a graceful stop (SIGTERM, SIGINT) or a reload's drain (tunnels of a removed "
        "route or backend) lets open tunnels run. They keep flowing for the first two thirds; "
        "those still open are then closed politely one after another over the last third "
        "(reason `shutdown` or `drain`), so clients do not all reconnect at once; whatever is "
        "left at the end is closed at once. A stop exits as soon as the last tunnel is gone.",
    )
    max_lifetime: float = setting(
        0.0,
        Duration(allow_zero=True),
        "A tunnel open this long is closed politely (reason `max_lifetime`), so long-lived "
        'clients rotate across backends and releases. `"0s"` = never.',
    )
    lifetime_jitter: float = setting(
        0.0,
        Duration(allow_zero=True),
        "Spreads `max_lifetime`: each tunnel's own limit is drawn uniformly from "
        "`max_lifetime` ± this, so clients that connected together do not reconnect together. "
        "Must be less than `max_lifetime`.",
    )
    close_grace: float = setting(
        1 * SECONDS,
        Duration(allow_zero=True),
        "When the tunnel ends a WebSocket tunnel itself (idle, lifetime, drain, shutdown, "
        "admin), each side first gets a Close frame (1001, going away) after the frame it is "
        "receiving; the sockets close once both sides answered with their Close, or this long "
        'after (a frame in flight gets as long again to finish). `"0s"` closes at once, as '
        "other proxies do (browsers then report 1006).",
    )
    max_headers: int = setting(
        100,
        Integer(1),
        "Header fields a request head may carry; one more gets 431 before any field is parsed, "
        "so a head of thousands of tiny fields costs a count of its lines (Apache's "
        "`LimitRequestFields` is 100 too). A folded continuation line counts as a field.",
    )
    half_close_timeout: float = setting(
        30 * SECONDS,
        Duration(allow_zero=True),
        "Once one side of a tunnel has ended its direction (its FIN, passed on to the other "
        "side), this much silence the other way ends the tunnel (reason "
        "`half_close_timeout`); bytes still flowing restart it, as they do `idle_timeout`. "
        "HAProxy's `timeout client-fin`/`server-fin`. Without it a client that leaves a "
        'silent backend holds the tunnel for `idle_timeout`. `"0s"` = only `idle_timeout` '
        "applies.",
    )
    allow_bare_lf: bool = setting(
        False,
        Flag(),
        "Accept a bare LF as a line end in request heads, as nginx, HAProxy and Caddy do (RFC "
        "9112 allows it). `false` answers such a head with 400: `X-A: 1\\nX-B: 2` is one "
        "field to some parsers and two to others, which is how requests get smuggled.",
    )
    max_handshakes: int = setting(
        0,
        Integer(0, zero="a quarter of the descriptor limit"),
        "Connections accepted and not yet tunnels (TLS handshake, request head, backend "
        "answer) at once. At the bound, the one that has waited longest for its client is "
        "closed to make room (slow clients are old by then; a real client sends its head "
        "within milliseconds), or the new one when every handshake is past its head; counted "
        "in `tunnel_handshakes_shed_total`. 0 = a quarter of the process's descriptor limit "
        "(at least 16), which leaves three quarters to tunnels and their backend connects "
        "(HAProxy `maxconn` counts both; nginx `worker_connections`).",
        shown="a quarter of `ulimit -n`",
    )
    pid_file: str = setting(
        "",
        FilePath(),
        "File that holds the serving process's PID (nginx `pid`, HAProxy `-p`): written once "
        "it listens, replaced by the new process of a live hand-off (SIGUSR2), removed at a "
        'clean exit. `""` = none.',
    )
    admission_rate: Rate = field(
        default=RATE_OFF,
        metadata=declare(
            RateKind(allow_zero=True),
            'New upgrades this process lets through, `"500/s"` or `"30000/m"`, so a fleet of '
            "clients reconnecting at once (after a deploy or an outage) reaches the backends at "
            "a pace they can take; beyond it gets 503 with a `Retry-After` spread over the next "
            'seconds, so refused clients do not all come back together. `"0/s"` = off. Per '
            "process (with `workers = N` the fleet's pace is N times this). nginx `limit_req` on "
            "a constant key, HAProxy `rate-limit sessions`.",
        ),
    )


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: Address | None = field(
        default=None,
        metadata=declare(
            ListenAddress(off=True),
            "`host:port` of the admin listener (health, metrics, statistics, closing tunnels); "
            '`""` = off. Bind it to localhost: it has no authentication.',
        ),
    )
