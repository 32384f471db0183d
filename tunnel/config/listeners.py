"""``[[listeners]]`` and their ``tls``: where clients connect, each key declared once."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from tunnel.config.hosts import Address
from tunnel.config.kinds import (
    PEM_MISSING,
    Choice,
    Duration,
    FilePath,
    Flag,
    Key,
    ListenAddress,
    Text,
    declare,
    setting,
)
from tunnel.config.tables import Table, TableList
from tunnel.config.units import HOURS
from tunnel.errors import ConfigError

TLS_VERSIONS = ("1.2", "1.3")
HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


@dataclass(frozen=True, slots=True)
class CertPair:
    """A certificate chain and its private key, both PEM files."""

    cert: str = field(
        metadata=declare(
            FilePath(empty=False),
            "Certificate chain (PEM, the server's certificate first).",
            missing=PEM_MISSING,
        )
    )
    key: str = field(
        metadata=declare(
            FilePath(empty=False), "Its unencrypted private key (PEM).", missing=PEM_MISSING
        )
    )


@dataclass(frozen=True, slots=True)
class ListenerTLS:
    """TLS termination on a listener. The first pair is served to clients that send no SNI
    name, or one that no pair's certificate covers."""

    EXTRA_KEYS: ClassVar[tuple[Key, ...]] = (
        Key(
            "cert",
            FilePath(),
            "Certificate chain (PEM, the server's certificate first); with `key`, the first pair.",
            "",
            written=False,
        ),
        Key("key", FilePath(), "Its unencrypted private key (PEM).", "", written=False),
    )
    certs: tuple[CertPair, ...] = field(
        metadata=declare(
            TableList(CertPair, inline=True),
            "More pairs, `[{ cert, key }, ...]`. The client's SNI name picks the pair whose "
            "certificate names it (exact, then a `*.` wildcard one label up); no SNI or an "
            "unknown name gets the first pair. With `cert`/`key` too, that pair is the first. At "
            "least one pair in all.",
            default=(),
        )
    )
    min_version: str = setting(
        "1.2",
        Choice(TLS_VERSIONS),
        '`"1.2"` or `"1.3"`. Older clients get a `protocol_version` alert. TLS 1.2 uses ECDHE '
        "with AES-GCM or ChaCha20 only; ALPN is `http/1.1`.",
    )
    client_ca: str = setting(
        "",
        FilePath(),
        "PEM bundle of CAs. When set, a client must present a certificate signed by one of "
        "them or is refused during the TLS handshake.",
    )
    client_subject_header: str = setting(
        "",
        Text(HEADER_NAME, "is not a header name"),
        "Header carrying the verified client certificate's subject (RFC 4514, non-ASCII "
        "escaped as `\\XX`) to the backend; any copy the client sent is removed. Needs "
        '`client_ca`. `""` = not sent.',
    )
    ticket_key_rotation: float = setting(
        1 * HOURS,
        Duration(allow_zero=True),
        "TLS session tickets let a returning client skip the certificate and signature (a "
        "resumed handshake). Their keys are shared by every worker, derived from a secret "
        "held in memory, and replaced this often; a ticket is accepted for this long after it "
        'is issued. `"0s"` = no tickets, every handshake is full. See '
        "[tls](tls.md#session-tickets).",
        omit_default=True,
    )

    @classmethod
    def from_keys(cls, values: dict[str, Any], key: str) -> ListenerTLS:
        """``cert`` and ``key``, a shorthand for one pair, come first in ``certs`` when either
        is written; at least one pair in all."""
        cert, private_key = values.pop("cert"), values.pop("key")
        pairs = []
        if cert or private_key:
            for name, path in (("cert", cert), ("key", private_key)):
                if not path:
                    raise ConfigError(f"{key}.{name}", PEM_MISSING)
            pairs.append(CertPair(cert, private_key))
        pairs += values.pop("certs")
        if not pairs:
            raise ConfigError(
                key, 'no certificate; write tls = { cert = "site.pem", key = "site.key" }'
            )
        return cls(tuple(pairs), **values)


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    listen: Address = field(
        metadata=declare(
            ListenAddress(),
            "`host:port`, `[v6]:port`, or `:port` for every interface (IPv4 and IPv6). Port 0 "
            "picks a free port (tests, the Python API). The host is an IP address or a host name "
            "as for a backend URL (below); `*:8080` and an IPv4 address written as IPv6 "
            "(`[::ffff:127.0.0.1]`) are refused.",
            missing='missing; write listen = "127.0.0.1:8080"',
        )
    )
    tls: ListenerTLS | None = field(
        default=None,
        metadata=declare(
            Table(ListenerTLS),
            'Serve TLS (`wss://`): `tls = { cert = "site.pem", key = "site.key" }`, or the '
            "`[listeners.tls]` table below.",
            shown="(none: plain)",
        ),
    )
    redirect_https: bool = setting(
        False,
        Flag(),
        "Plain listener only: answer every request with 308 to `https://` (an upgrade request: "
        "426 naming the `wss://` URL), on the port of the first TLS listener, or 443 when there "
        "is none. Nothing is forwarded. See [tls](tls.md#redirect_https).",
        omit_default=True,
    )
    proxy_protocol: bool = setting(
        False,
        Flag(),
        "Expect a PROXY protocol header (v1 or v2, told apart by its first bytes) before "
        "anything else, TLS included, as a load balancer in front sends it (HAProxy "
        "`accept-proxy`, nginx `listen ... proxy_protocol`). Believed only from "
        "`server.trusted_proxies`: a connection from anyone else is closed unanswered and "
        "logged. The address it carries is the client's for limits, access rules, logs and "
        "`X-Forwarded-For`.",
        omit_default=True,
    )
