"""The PROXY protocol (HAProxy's, versions 1 and 2): parse the header a load balancer puts in front
of a connection, and build the one tunnel sends to a backend.

A proxy in front of tunnel (a TCP load balancer) opens each connection with a header naming the
client it accepted, so that limits, logs and ``X-Forwarded-For`` see the client rather than the
balancer. Version 1 is one text line (``PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\\r\\n``, at
most 107 bytes); version 2 is binary (a 12-byte signature, 4 bytes of version, command, family and
length, then addresses and optional TLVs). Both are read strictly, as the specification
(haproxy.org/download/2.9/doc/proxy-protocol.txt) asks of receivers: a connection whose header is
malformed is dropped, never guessed at.

This module knows nothing of sockets: ``parse`` is handed the bytes read so far and says whether
they hold a whole header, could still become one, or never will. ``None`` from ``parse`` promises
that every byte given belongs to the header, so a reader may consume them and wait for more.

Not checked: the contents of v2 TLVs (skipped by length: tunnel uses none of them, CRC32c
included), whether the addresses are routable, and anything after the header.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from tunnel.errors import BadProxyHeader

V1_PREFIX = b"PROXY "
V1_MAX_LENGTH = 107
"""The specification's bound on a v1 line, CRLF included (``TCP6`` with two full addresses)."""
V1_UNKNOWN = b"PROXY UNKNOWN\r\n"

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED_LENGTH = 16
"""Signature, version and command, family and transport, and the 2-byte length."""
V2_MAX_PAYLOAD = 4096
"""Bound on a v2 header's addresses and TLVs. The length field allows 65535 bytes, but addresses
take at most 216 (a UNIX pair) and the TLVs balancers send (ALPN, authority, SSL details, unique
ID, AWS/Azure/GCP endpoint IDs) are far below 4 KiB; a larger block is refused rather than read."""
MAX_LENGTH = V2_FIXED_LENGTH + V2_MAX_PAYLOAD
"""The most bytes any acceptable header occupies: what a reader needs to look at, at most."""

_V2_VERSION = 0x2
_LOCAL = 0x0
_PROXY = 0x1
_UNSPEC, _INET, _INET6, _UNIX = 0x0, 0x1, 0x2, 0x3
_STREAM, _DGRAM = 0x1, 0x2
_FAMILY_NAMES = {_UNSPEC: "UNSPEC", _INET: "INET", _INET6: "INET6", _UNIX: "UNIX"}
_ADDRESS_BYTES = {_UNSPEC: 0, _INET: 12, _INET6: 36, _UNIX: 216}
"""Bytes of the address block each family needs (two addresses and, for INET/INET6, two ports)."""

_V1_PROTOCOLS = (b"TCP4", b"TCP6", b"UNKNOWN")
_V1_TCP_CHARACTERS = frozenset(b"0123456789abcdefABCDEF.: ")
_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")
_OCTET = rb"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(rb"(?:%s\.){3}%s" % (_OCTET, _OCTET))
"""Dotted decimal without leading zeros, as ``ipaddress`` accepts it."""

Address = tuple[str, int]
_IP = ipaddress.IPv4Address | ipaddress.IPv6Address
_Endpoint = tuple[_IP, int]


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A whole PROXY header found at the start of a stream.

    ``source`` is the client and ``destination`` the address it connected to, as (address text,
    port) with IPv4-mapped IPv6 addresses written as IPv4. Both are None when the header carries
    no TCP addresses (v1 ``UNKNOWN``, v2 ``LOCAL``, v2 UDP, UNIX or UNSPEC): the socket's own
    addresses stand.
    """

    length: int
    """Bytes the header occupies at the start of the stream (TLVs included)."""
    source: Address | None
    destination: Address | None


def parse(data: bytes) -> ProxyHeader | None:
    """The PROXY header (v1 or v2) at the start of ``data``, which may go on past it.

    Returns None when ``data`` is a strict prefix of a header that more bytes could complete; all
    of ``data`` then belongs to the header (it is shorter than the header will be).

    Raises:
        BadProxyHeader: ``data`` starts with something that is not a valid header, or never can
            be: not a PROXY header at all (say, an HTTP request on a ``proxy_protocol``
            listener), a v1 line longer than 107 bytes or not in the specification's strict form
            (single spaces, CRLF, addresses of the named family, decimal ports without leading
            zeros), a v2 header with a bad signature, version, command, family or transport, a
            v2 length above ``V2_MAX_PAYLOAD``, or a v2 address block shorter than its family
            needs.
    """
    if not data:
        return None
    if data[:1] == V1_PREFIX[:1]:
        return _parse_v1(data)
    if data[:1] == V2_SIGNATURE[:1]:
        return _parse_v2(data)
    raise _not_proxy(data)


def build(version: str, source: Address, destination: Address) -> bytes:
    """The header that tells a backend about a client: ``source`` is the client's (address,
    port), ``destination`` the address and port the client connected to.

    ``version`` is ``"v1"`` or ``"v2"`` (the values of ``send_proxy_protocol``). The header
    names TCP over IPv4 when both addresses are IPv4 (IPv4-mapped IPv6 counts as IPv4), over
    IPv6 otherwise, an IPv4 address then written IPv4-mapped. An IPv6 zone (``%eth0``) is
    dropped: neither version can carry it. What cannot be expressed at all (a host name, a port
    outside 0-65535) gives v1 ``PROXY UNKNOWN`` or v2 ``LOCAL``, so the backend uses the
    connection's own addresses.

    Raises:
        ValueError: ``version`` is neither ``"v1"`` nor ``"v2"``.
    """
    if version not in ("v1", "v2"):
        raise ValueError(f"PROXY protocol version must be 'v1' or 'v2', not {version!r}")
    pair = _expressible(source, destination)
    if version == "v1":
        if pair is None:
            return V1_UNKNOWN
        (src, sport), (dst, dport) = pair
        protocol = "TCP4" if src.version == 4 else "TCP6"
        line = f"PROXY {protocol} {_v1_text(src)} {_v1_text(dst)} {sport} {dport}\r\n"
        return line.encode("ascii")
    if pair is None:
        return V2_SIGNATURE + bytes([_V2_VERSION << 4 | _LOCAL, _UNSPEC << 4]) + b"\x00\x00"
    (src, sport), (dst, dport) = pair
    family = _INET if src.version == 4 else _INET6
    block = src.packed + dst.packed + sport.to_bytes(2, "big") + dport.to_bytes(2, "big")
    return (
        V2_SIGNATURE
        + bytes([_V2_VERSION << 4 | _PROXY, family << 4 | _STREAM])
        + len(block).to_bytes(2, "big")
        + block
    )


# --- version 1 ----------------------------------------------------------------------------------


def _parse_v1(data: bytes) -> ProxyHeader | None:
    if not data.startswith(V1_PREFIX[: len(data)]):
        raise _not_proxy(data)
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        if len(data) >= V1_MAX_LENGTH:
            raise BadProxyHeader(
                f"PROXY v1 header has no CRLF within its maximum of {V1_MAX_LENGTH} bytes"
            )
        _check_v1_prefix(data)
        return None
    length = end + 2
    fields = data[:end].split(b" ")
    protocol = fields[1] if len(fields) > 1 else b""
    if protocol == b"UNKNOWN":
        # The specification: a receiver ignores everything after UNKNOWN up to the CRLF.
        return ProxyHeader(length, None, None)
    if protocol not in _V1_PROTOCOLS:
        raise BadProxyHeader(
            f"PROXY v1 header names protocol {protocol!r}; expected TCP4, TCP6 or UNKNOWN"
        )
    _check_line_ends(data[:end])
    if len(fields) != 6:
        raise BadProxyHeader(
            f"PROXY v1 {protocol.decode()} header must be 'PROXY {protocol.decode()} SOURCE"
            f" DESTINATION SPORT DPORT' with single spaces, not {data[:length]!r}"
        )
    version = 4 if protocol == b"TCP4" else 6
    source = (_v1_address(fields[2], version, "source"), _v1_port(fields[4], "source"))
    destination = (
        _v1_address(fields[3], version, "destination"),
        _v1_port(fields[5], "destination"),
    )
    return ProxyHeader(length, source, destination)


def _check_v1_prefix(data: bytes) -> None:
    """Refuse an unfinished v1 line that no further bytes could make valid, so a peer cannot
    hold a connection open with a line that is already wrong."""
    rest = data[len(V1_PREFIX) :]
    if rest.endswith(b"\r"):
        rest = rest[:-1]  # the CR of the CRLF still to come
    fields = rest.split(b" ")
    protocol = fields[0]
    if len(fields) == 1:
        if not any(name.startswith(protocol) for name in _V1_PROTOCOLS):
            raise BadProxyHeader(
                f"PROXY v1 header names protocol {protocol!r}; expected TCP4, TCP6 or UNKNOWN"
            )
        return
    if protocol == b"UNKNOWN":
        return
    if protocol not in _V1_PROTOCOLS:
        raise BadProxyHeader(
            f"PROXY v1 header names protocol {protocol!r}; expected TCP4, TCP6 or UNKNOWN"
        )
    _check_line_ends(rest)
    if len(fields) > 5 or not _V1_TCP_CHARACTERS.issuperset(rest[len(protocol) :]):
        raise BadProxyHeader(
            f"PROXY v1 {protocol.decode()} header is malformed: {data!r} (expected"
            f" 'PROXY {protocol.decode()} SOURCE DESTINATION SPORT DPORT' and CRLF)"
        )
    version = 4 if protocol == b"TCP4" else 6
    finished = fields[1:-1]  # the last field may still be growing
    for field, what in zip(finished[:2], ("source", "destination"), strict=False):
        _v1_address(field, version, what)
    if len(finished) == 3:
        _v1_port(finished[2], "source")


def _check_line_ends(line: bytes) -> None:
    if b"\n" in line or b"\r" in line:
        raise BadProxyHeader(
            f"PROXY v1 header has a bare CR or LF: {line!r}; the line must end with CRLF"
        )


def _v1_address(field: bytes, version: int, what: str) -> str:
    """The address text, IPv4 as sent (the pattern admits only its canonical form) and IPv6
    through ``ipaddress``: the pattern checks an IPv4 address in a third of the time of
    ``IPv4Address`` and ``str``, the larger part of a v1 line's cost."""
    if version == 4 and _IPV4.fullmatch(field):
        return field.decode("ascii")
    text = field.decode("ascii", errors="replace")
    try:
        if version == 4:
            raise ValueError(text)
        address = ipaddress.IPv6Address(text)
    except ValueError:
        raise BadProxyHeader(
            f"PROXY v1 header has {what} address {text!r}, not an IPv{version} address as"
            f" TCP{version} requires"
        ) from None
    if address.scope_id is not None:
        raise BadProxyHeader(f"PROXY v1 header has {what} address {text!r} with a zone")
    return _text(address)


def _v1_text(address: _IP) -> str:
    """IPv4-mapped addresses as ``::ffff:192.0.2.1``, which a person reading a backend's log
    recognises, rather than Python's ``::ffff:c000:201``."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return f"::ffff:{address.ipv4_mapped}"
    return str(address)


def _v1_port(field: bytes, what: str) -> int:
    if _PORT.fullmatch(field) is None or int(field) > 0xFFFF:
        raise BadProxyHeader(
            f"PROXY v1 header has {what} port {field.decode('ascii', errors='replace')!r};"
            " expected 0-65535 in decimal without leading zeros"
        )
    return int(field)


# --- version 2 ----------------------------------------------------------------------------------


def _parse_v2(data: bytes) -> ProxyHeader | None:
    signature = data[: len(V2_SIGNATURE)]
    if signature != V2_SIGNATURE[: len(signature)]:
        raise BadProxyHeader(
            f"PROXY v2 header has a bad signature: {signature!r}; expected {V2_SIGNATURE!r}"
        )
    if len(data) <= 12:
        return None
    version, command = data[12] >> 4, data[12] & 0xF
    if version != _V2_VERSION:
        raise BadProxyHeader(f"PROXY v2 signature is followed by version {version}, not 2")
    if command not in (_LOCAL, _PROXY):
        raise BadProxyHeader(f"PROXY v2 header has command {command}; expected LOCAL or PROXY")
    if len(data) <= 13:
        return None
    family, transport = data[13] >> 4, data[13] & 0xF
    if command == _PROXY and (family not in _FAMILY_NAMES or transport > _DGRAM):
        raise BadProxyHeader(
            f"PROXY v2 header has address family {family} and transport {transport};"
            " expected family 0-3 (UNSPEC, INET, INET6, UNIX) and transport 0-2"
            " (UNSPEC, STREAM, DGRAM)"
        )
    if len(data) < V2_FIXED_LENGTH:
        return None
    payload = int.from_bytes(data[14:16], "big")
    if payload > V2_MAX_PAYLOAD:
        raise BadProxyHeader(
            f"PROXY v2 header announces {payload} bytes of addresses and TLVs; at most"
            f" {V2_MAX_PAYLOAD} are accepted"
        )
    if command == _PROXY and payload < _ADDRESS_BYTES[family]:
        raise BadProxyHeader(
            f"PROXY v2 header announces {payload} bytes for {_FAMILY_NAMES[family]} addresses,"
            f" which need {_ADDRESS_BYTES[family]}"
        )
    length = V2_FIXED_LENGTH + payload
    if len(data) < length:
        return None
    if command == _LOCAL or transport != _STREAM or family not in (_INET, _INET6):
        return ProxyHeader(length, None, None)
    size = 4 if family == _INET else 16
    block = data[V2_FIXED_LENGTH:]
    ports = block[2 * size : 2 * size + 4]
    return ProxyHeader(
        length,
        (_packed_text(block[:size]), int.from_bytes(ports[:2], "big")),
        (_packed_text(block[size : 2 * size]), int.from_bytes(ports[2:], "big")),
    )


def _packed_text(packed: bytes) -> str:
    """IPv4 formatted directly (a quarter of ``ipaddress``'s time), IPv6 by ``ipaddress``."""
    if len(packed) == 4:
        return f"{packed[0]}.{packed[1]}.{packed[2]}.{packed[3]}"
    return _text(ipaddress.IPv6Address(packed))


# --- shared -------------------------------------------------------------------------------------


def _text(address: _IP) -> str:
    """IPv4-mapped IPv6 as IPv4 text: a dual-stack balancer's IPv4 client is an IPv4 client."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def _not_proxy(data: bytes) -> BadProxyHeader:
    return BadProxyHeader(
        "the connection did not start with a PROXY protocol header (v1 or v2), though its"
        f" listener has proxy_protocol on; it began with {data[:24]!r}"
    )


def _expressible(source: Address, destination: Address) -> tuple[_Endpoint, _Endpoint] | None:
    """Both endpoints as addresses of one family, or None when either cannot be written."""
    src, dst = _endpoint(*source), _endpoint(*destination)
    if src is None or dst is None:
        return None
    if src[0].version != dst[0].version:
        return _as_ipv6(src), _as_ipv6(dst)
    return src, dst


def _endpoint(host: str, port: int) -> _Endpoint | None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if not 0 <= port <= 0xFFFF:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        return (mapped if mapped is not None else ipaddress.IPv6Address(address.packed)), port
    return address, port


def _as_ipv6(endpoint: _Endpoint) -> _Endpoint:
    address, port = endpoint
    if isinstance(address, ipaddress.IPv4Address):
        return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed), port
    return endpoint
