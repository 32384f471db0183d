"""Rewriting the client's upgrade request into the request sent to the backend."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

import h11

from tunnel.core import headers
from tunnel.core.handshake import UpgradeRequest
from tunnel.errors import HandshakeError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_SET_BY_TUNNEL = frozenset(
    {
        b"host",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-real-ip",
        b"content-length",
    }
)
"""Replaced in every forwarded request (a trusted peer's values are read first)."""

_CLIENT_IDENTITY = frozenset(
    {
        b"forwarded",
        b"x-forwarded",
        b"forwarded-for",
        b"x-forwarded-port",
        b"x-forwarded-prefix",
        b"x-forwarded-ssl",
        b"x-forwarded-scheme",
        b"x-forwarded-server",
        b"x-forwarded-uri",
        b"x-forwarded-client-cert",
        b"x-original-forwarded-for",
        b"x-client-ip",
        b"client-ip",
        b"true-client-ip",
        b"cf-connecting-ip",
        b"fastly-client-ip",
        b"x-cluster-client-ip",
        b"x-proxyuser-ip",
        b"x-envoy-external-address",
        b"x-original-url",
        b"x-original-uri",
        b"x-original-host",
        b"x-rewrite-url",
        b"x-host",
        b"x-url-scheme",
        b"front-end-https",
    }
)
"""Headers by which proxies tell a backend who the client is, or what URL it asked for: a
spoof from anyone but a trusted proxy (RFC 7239's Forwarded included)."""

_HANDSHAKE = frozenset(
    {
        b"host",
        b"origin",
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-protocol",
        b"sec-websocket-extensions",
    }
)
"""End-to-end headers the handshake needs: never dropped for being named in ``Connection``
(a client listing them there would break its own handshake and the log would blame the
backend)."""

_LOOK_ALIKE_TARGETS = headers.HOP_BY_HOP | _SET_BY_TUNNEL | _CLIENT_IDENTITY | _HANDSHAKE
"""Names whose ``_`` spellings are dropped: CGI and WSGI servers read ``X_Real_IP`` as
``X-Real-IP`` and merge the two (nginx ignores underscored names by default for this)."""

_FORWARDED_PROTOS = frozenset({"http", "https", "ws", "wss"})

_DROPPED_FROM_TRUSTED = headers.HOP_BY_HOP | _SET_BY_TUNNEL
_DROPPED_FROM_ANYONE = _DROPPED_FROM_TRUSTED | _CLIENT_IDENTITY
"""Dropped from every forwarded request (before the names ``Connection`` lists and the
proxy's own added headers), by whether the peer is a trusted proxy."""


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
        lines = [b"%s %s HTTP/%s" % (self.method, self.target, self.http_version)]
        lines += [name + b": " + value for name, value in self.fields]
        lines.append(b"\r\n")
        return b"\r\n".join(lines)

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
    header named in ``Connection`` are dropped, except the end-to-end ones the handshake needs
    (``_HANDSHAKE``); ``Connection: Upgrade`` and the chosen ``Upgrade`` token are sent.

    ``X-Forwarded-For`` is replaced by the peer address, or appended to when the peer is a
    trusted proxy, whose ``X-Forwarded-Proto``/``-Host``, ``Forwarded`` and the other headers
    that name the client (``_CLIENT_IDENTITY``) are then kept; from an untrusted peer those
    are dropped. A header spelled with ``_`` for ``-`` whose ``-`` spelling is one of these,
    hop-by-hop, or one the proxy sets or checks is dropped from everyone. From a trusted peer
    only valid IP addresses are taken from ``X-Forwarded-For``, only http/https/ws/wss from
    ``X-Forwarded-Proto`` and only a valid host from ``X-Forwarded-Host``; anything else is
    left out. ``hop.added`` headers go last, replacing any the client sent under their names
    (in either spelling). ``Sec-WebSocket-*`` headers pass untouched.
    """
    request = upgrade.request
    trusted = is_trusted(hop.peer_ip, hop.trusted_proxies)
    named = {
        name.encode("latin-1")
        for name in headers.tokens(upgrade.fields, b"connection", lowered=True)
    }
    added_names = {name.lower() for name, _ in hop.added}
    dropped = _DROPPED_FROM_TRUSTED if trusted else _DROPPED_FROM_ANYONE
    extra = ((named - _HANDSHAKE) | added_names) - dropped
    if extra:
        dropped = dropped | extra
    look_alikes = _LOOK_ALIKE_TARGETS | added_names if added_names else _LOOK_ALIKE_TARGETS
    kept = [
        (k, v)
        for k, v in request.headers.raw_items()
        if (name := k.lower()) not in dropped
        and not (b"_" in name and name.replace(b"_", b"-") in look_alikes)
    ]
    hops: list[str | None] = [
        *(_forwarded_ips(upgrade.fields) if trusted else ()),
        hop.peer_ip,
    ]
    proto = hop.scheme
    forwarded_host = upgrade.host
    if trusted:
        sent_proto = (_last_item(upgrade.fields, b"x-forwarded-proto") or "").lower()
        proto = sent_proto if sent_proto in _FORWARDED_PROTOS else proto
        forwarded_host = _valid_host(_last_item(upgrade.fields, b"x-forwarded-host")) or (
            forwarded_host
        )
    host = hop.backend_host if hop.backend_host is not None else upgrade.host
    added = [
        (b"Connection", "Upgrade"),
        (b"Upgrade", token),
        (b"X-Forwarded-For", ", ".join(ip for ip in hops if ip is not None)),
        (b"X-Forwarded-Proto", proto),
        (b"X-Forwarded-Host", forwarded_host),
        (b"X-Real-IP", _real_ip(hops, hop.trusted_proxies)),
    ]
    out = [(b"Host", host.encode("latin-1")), *kept]
    out += [(name, value.encode("latin-1")) for name, value in added]
    out += hop.added
    return ForwardRequest(_target(upgrade.target, hop).encode("latin-1"), out)


def client_ip(
    peer_ip: str, fields: headers.HeaderList, trusted_proxies: Sequence[IPNetwork]
) -> str:
    """The client's address as ``X-Real-IP`` names it: the peer's, or, when the peer is a
    trusted proxy, the nearest address in ``X-Forwarded-For`` that is not one (what
    ``hash_key = "ip"`` hashes, so that clients behind a load balancer spread). ``fields``:
    (lower-case name, value), as ``UpgradeRequest.fields``."""
    if not is_trusted(peer_ip, trusted_proxies):
        return peer_ip
    return _real_ip([*_forwarded_ips(fields), peer_ip], trusted_proxies)


def _real_ip(hops: list[str | None], trusted_proxies: Sequence[IPNetwork]) -> str:
    """The client as the trusted hops vouch for it: the nearest hop that is not a trusted
    proxy. Where a trusted proxy passed on something that is not an address, that proxy is
    the nearest hop anyone vouches for."""
    nearest = hops[-1]
    assert nearest is not None  # the peer's own address
    for ip in reversed(hops):
        if ip is None:
            return nearest
        if not is_trusted(ip, trusted_proxies):
            return ip
        nearest = ip
    return nearest


def _forwarded_ips(raw: headers.HeaderList) -> list[str | None]:
    """Each ``X-Forwarded-For`` entry of ``raw`` (lower-case names) as a normalised IP address,
    or None for one that is not (``unknown``, a name, garbage). ``1.2.3.4:5678`` and
    ``[v6]:port`` lose the port."""
    return [
        _ip_of(item.strip().decode("latin-1"))
        for value in headers.lowered_values(raw, b"x-forwarded-for")
        for item in value.split(b",")
        if item.strip()
    ]


def _ip_of(entry: str) -> str | None:
    if entry.startswith("["):
        entry = entry[1 : entry.find("]")] if "]" in entry else ""
    elif entry.count(":") == 1:
        entry = entry.partition(":")[0]
    if "%" in entry:  # an IPv6 zone names the sender's interface, not a client
        return None
    try:
        return str(ipaddress.ip_address(entry))
    except ValueError:
        return None


def _valid_host(value: str | None) -> str | None:
    if not value:
        return None
    try:
        headers.parse_host(value)
    except HandshakeError:
        return None
    return value


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


def _last_item(raw: headers.HeaderList, name: bytes) -> str | None:
    """The last comma-separated item of the last ``name`` header (``raw``: lower-case
    names): what the nearest proxy wrote, when proxies append."""
    found = headers.lowered_values(raw, name)
    return found[-1].rpartition(b",")[2].strip().decode("latin-1") if found else None
