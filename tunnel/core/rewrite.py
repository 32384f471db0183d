"""Rewriting the client's upgrade request into the request sent to the backend."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

import h11

from tunnel.core import headers
from tunnel.core.handshake import UpgradeRequest

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_REPLACED = frozenset(
    {
        b"host",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-real-ip",
        b"content-length",
    }
)


# RFC 7239's Forwarded says the same as X-Forwarded-*; from an untrusted peer it is a spoof.
_UNTRUSTED = frozenset({b"forwarded"})


@dataclass(frozen=True, slots=True)
class Forwarding:
    """What the proxy knows about the hop it is forwarding: who sent it and where it goes."""

    peer_ip: str
    scheme: str = "http"
    trusted_proxies: Sequence[IPNetwork] = ()
    backend_host: str | None = None
    """Host header toward the backend; ``None`` keeps the client's (``preserve_host``)."""
    path_prefix: str = "/"
    backend_path: str = ""
    """When set, replaces ``path_prefix`` at the front of the path (nginx ``proxy_pass`` URI)."""
    added: tuple[tuple[bytes, bytes], ...] = ()
    """Headers the proxy vouches for (a verified client certificate's subject): appended, and
    any copy the client sent under the same name is dropped."""


@dataclass(frozen=True, slots=True)
class ForwardRequest:
    """The request the backend receives: a GET without a body.

    Every part comes from the client's request as h11 validated it, or from the validated
    configuration, so it is written out without building (and validating) an ``h11.Request``
    again, which cost more than the rest of the rewrite. ``to_h11()`` builds one when h11's
    client state machine is needed (a reply other than a clean 101), and the tests check that
    h11 accepts every request this module builds.
    """

    target: bytes
    fields: list[tuple[bytes, bytes]]
    """(name as the client cased it, value), in order."""
    method: bytes = b"GET"
    http_version: bytes = b"1.1"

    def to_bytes(self) -> bytes:
        lines = [b"%s %s HTTP/%s\r\n" % (self.method, self.target, self.http_version)]
        lines += [b"%s: %s\r\n" % (name, value) for name, value in self.fields]
        lines.append(b"\r\n")
        return b"".join(lines)

    def to_h11(self) -> h11.Request:
        return h11.Request(
            method=self.method,
            target=self.target,
            headers=self.fields,
            http_version=self.http_version,
        )

    @classmethod
    def from_h11(cls, request: h11.Request) -> ForwardRequest:
        return cls(request.target, list(request.headers.raw_items()), request.method)


def is_trusted(ip: str, networks: Sequence[IPNetwork]) -> bool:
    if not networks:
        return False
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in network for network in networks)


def rewrite_request(upgrade: UpgradeRequest, token: str, hop: Forwarding) -> ForwardRequest:
    """Build the request the backend receives.

    Header casing and order survive (built from ``raw_items()``); hop-by-hop headers and every
    header named in ``Connection`` are dropped; ``Connection: Upgrade`` and the chosen
    ``Upgrade`` token are sent. ``X-Forwarded-For`` is replaced by the peer address, or appended
    to when the peer is a trusted proxy, whose ``X-Forwarded-Proto``/``-Host`` and ``Forwarded``
    are then kept; an untrusted peer's ``Forwarded`` is dropped. ``hop.added`` headers go
    last, replacing any the client sent under their names.
    ``Sec-WebSocket-*`` headers pass untouched.
    """
    request = upgrade.request
    named = {name.encode("latin-1") for name in headers.tokens(upgrade.fields, b"connection")}
    trusted = is_trusted(hop.peer_ip, hop.trusted_proxies)
    dropped = headers.HOP_BY_HOP | named | _REPLACED
    if not trusted:
        dropped |= _UNTRUSTED
    if hop.added:
        dropped |= {name.lower() for name, _ in hop.added}
    kept = [(k, v) for k, v in request.headers.raw_items() if k.lower() not in dropped]
    client_chain = _forwarded_for(upgrade.fields) if trusted else []
    chain = [*client_chain, hop.peer_ip]
    proto = hop.scheme
    forwarded_host = upgrade.host
    if trusted:
        proto = _last(upgrade.fields, b"x-forwarded-proto") or proto
        forwarded_host = _last(upgrade.fields, b"x-forwarded-host") or forwarded_host
    real_ip = next(
        (ip for ip in reversed(chain) if not is_trusted(ip, hop.trusted_proxies)), chain[0]
    )
    host = hop.backend_host if hop.backend_host is not None else upgrade.host
    added = [
        (b"Connection", "Upgrade"),
        (b"Upgrade", token),
        (b"X-Forwarded-For", ", ".join(chain)),
        (b"X-Forwarded-Proto", proto),
        (b"X-Forwarded-Host", forwarded_host),
        (b"X-Real-IP", real_ip),
    ]
    out = [(b"Host", host.encode("latin-1")), *kept]
    out += [(name, value.encode("latin-1")) for name, value in added]
    out += hop.added
    return ForwardRequest(_target(upgrade.target, hop).encode("latin-1"), out)


def _target(target: str, hop: Forwarding) -> str:
    if not hop.backend_path:
        return target
    rest = target[len(hop.path_prefix) :] if target.startswith(hop.path_prefix) else target
    base = hop.backend_path
    if base.endswith("/") and rest.startswith("/"):
        rest = rest[1:]
    elif rest and not base.endswith("/") and not rest.startswith(("/", "?")):
        base += "/"
    return base + rest


def _forwarded_for(raw: headers.HeaderList) -> list[str]:
    return [
        item.strip().decode("latin-1")
        for value in headers.values(raw, b"x-forwarded-for")
        for item in value.split(b",")
        if item.strip()
    ]


def _last(raw: headers.HeaderList, name: bytes) -> str | None:
    found = headers.values(raw, name)
    return found[-1].decode("latin-1") if found else None
