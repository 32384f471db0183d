"""The PROXY protocol parser and builder: every branch table-driven, then hypothesis properties
(round trip; any bytes give a header, None or ``BadProxyHeader``; None means "all of this is
header").

``TUNNEL_FUZZ_EXAMPLES`` raises the number of examples of the property tests (conftest's fuzz
profile; 200 by default).
"""

from __future__ import annotations

import ipaddress

import pytest
from conftest import fuzz_settings
from hypothesis import example, given
from hypothesis import strategies as st

from tunnel.core.proxy_protocol import (
    MAX_LENGTH,
    V1_MAX_LENGTH,
    V2_MAX_PAYLOAD,
    V2_SIGNATURE,
    ProxyHeader,
    build,
    parse,
)
from tunnel.errors import BadProxyHeader, HandshakeError

FUZZ = fuzz_settings(200)
TAIL = b"GET /chat HTTP/1.1\r\nHost: a\r\n\r\n"


def v2(command: int, family: int, transport: int, block: bytes, length: int | None = None) -> bytes:
    """A v2 header from its parts; ``length`` overrides the length field."""
    size = len(block) if length is None else length
    return (
        V2_SIGNATURE
        + bytes([0x20 | command, family << 4 | transport])
        + size.to_bytes(2, "big")
        + block
    )


IPV4_BLOCK = bytes([192, 0, 2, 1, 198, 51, 100, 7]) + (56324).to_bytes(2, "big") + b"\x01\xbb"
IPV6_BLOCK = (
    ipaddress.IPv6Address("2001:db8::1").packed
    + ipaddress.IPv6Address("2001:db8::2").packed
    + (1).to_bytes(2, "big")
    + (65535).to_bytes(2, "big")
)
MAPPED_BLOCK = (
    ipaddress.IPv6Address("::ffff:192.0.2.1").packed
    + ipaddress.IPv6Address("::1").packed
    + b"\x00\x00\x00\x50"
)
TLVS = b"\x01\x00\x02h2" + b"\x02\x00\x0bexample.com" + b"\x04\x00\x04\x00\x00\x00\x00"
UNIX_BLOCK = b"/run/a.sock".ljust(108, b"\0") + b"/run/b.sock".ljust(108, b"\0")

SOURCE4, DESTINATION4 = ("192.0.2.1", 56324), ("198.51.100.7", 443)
SOURCE6, DESTINATION6 = ("2001:db8::1", 1), ("2001:db8::2", 65535)

VALID: list[tuple[str, bytes, tuple[str, int] | None, tuple[str, int] | None]] = [
    ("v1 TCP4", b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\n", SOURCE4, DESTINATION4),
    ("v1 TCP6", b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n", SOURCE6, DESTINATION6),
    (
        "v1 TCP6 uncompressed",
        b"PROXY TCP6 2001:0db8:0000:0000:0000:0000:0000:0001 ::2 0 0\r\n",
        ("2001:db8::1", 0),
        ("::2", 0),
    ),
    (
        "v1 TCP6 IPv4-mapped",
        b"PROXY TCP6 ::ffff:192.0.2.1 ::ffff:c633:6407 80 443\r\n",
        ("192.0.2.1", 80),
        ("198.51.100.7", 443),
    ),
    ("v1 UNKNOWN", b"PROXY UNKNOWN\r\n", None, None),
    ("v1 UNKNOWN with addresses", b"PROXY UNKNOWN ff::1 ::1 1 2\r\n", None, None),
    ("v1 UNKNOWN at 107 bytes", b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n", None, None),
    ("v2 PROXY TCP4", v2(1, 1, 1, IPV4_BLOCK), SOURCE4, DESTINATION4),
    ("v2 PROXY TCP6", v2(1, 2, 1, IPV6_BLOCK), SOURCE6, DESTINATION6),
    ("v2 PROXY TCP6 IPv4-mapped", v2(1, 2, 1, MAPPED_BLOCK), ("192.0.2.1", 0), ("::1", 80)),
    ("v2 PROXY TCP4 with TLVs", v2(1, 1, 1, IPV4_BLOCK + TLVS), SOURCE4, DESTINATION4),
    (
        "v2 PROXY TCP4 with the most TLVs",
        v2(
            1,
            1,
            1,
            (IPV4_BLOCK + b"\xee" + (V2_MAX_PAYLOAD - 15).to_bytes(2, "big")).ljust(
                V2_MAX_PAYLOAD, b"\0"
            ),
        ),
        SOURCE4,
        DESTINATION4,
    ),
    ("v2 PROXY UDP4", v2(1, 1, 2, IPV4_BLOCK), None, None),
    ("v2 PROXY UDP6", v2(1, 2, 2, IPV6_BLOCK), None, None),
    ("v2 PROXY UNIX stream", v2(1, 3, 1, UNIX_BLOCK), None, None),
    ("v2 PROXY UNIX datagram", v2(1, 3, 2, UNIX_BLOCK + TLVS), None, None),
    ("v2 PROXY UNSPEC", v2(1, 0, 0, b""), None, None),
    ("v2 PROXY INET transport UNSPEC", v2(1, 1, 0, IPV4_BLOCK), None, None),
    ("v2 LOCAL", v2(0, 0, 0, b""), None, None),
    ("v2 LOCAL with an address block", v2(0, 1, 1, IPV4_BLOCK + TLVS), None, None),
    ("v2 LOCAL ignores the family", v2(0, 0xF, 0xF, b"xy"), None, None),
]
VALID_IDS = [case[0] for case in VALID]


@pytest.mark.parametrize(("name", "header", "source", "destination"), VALID, ids=VALID_IDS)
def test_a_valid_header_gives_its_addresses_and_length(
    name: str,
    header: bytes,
    source: tuple[str, int] | None,
    destination: tuple[str, int] | None,
) -> None:
    assert parse(header + TAIL) == ProxyHeader(len(header), source, destination)
    assert parse(header) == ProxyHeader(len(header), source, destination)


@pytest.mark.parametrize(("name", "header", "source", "destination"), VALID, ids=VALID_IDS)
def test_every_strict_prefix_of_a_header_asks_for_more(
    name: str,
    header: bytes,
    source: tuple[str, int] | None,
    destination: tuple[str, int] | None,
) -> None:
    for cut in range(len(header)):
        assert parse(header[:cut]) is None, cut


INVALID: list[tuple[str, bytes, str]] = [
    ("HTTP request", TAIL, "did not start with a PROXY protocol header"),
    ("TLS ClientHello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "PROXY protocol header"),
    ("lower case", b"proxy TCP4 192.0.2.1 198.51.100.7 1 2\r\n", "did not start with a PROXY"),
    ("PROXY without space", b"PROXYTCP4", "did not start with a PROXY"),
    ("v1 without CRLF in 107 bytes", b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n", "107 bytes"),
    ("v1 TCP4 no CRLF", b"PROXY TCP4 " + b"1" * 120, "107 bytes"),
    ("v1 bare LF", b"PROXY TCP4 192.0.2.1 198.51.100.7 1 2\n" + TAIL, "bare CR or LF"),
    ("v1 unknown protocol", b"PROXY TCP5 192.0.2.1 198.51.100.7 1 2\r\n", "protocol b'TCP5'"),
    ("v1 UDP4", b"PROXY UDP4 192.0.2.1 198.51.100.7 1 2\r\n", "protocol b'UDP4'"),
    ("v1 no protocol", b"PROXY \r\n", "protocol b''"),
    ("v1 UNKNOWN glued", b"PROXY UNKNOWNX\r\n", "protocol b'UNKNOWNX'"),
    ("v1 double space", b"PROXY TCP4 192.0.2.1  198.51.100.7 1 2\r\n", "single spaces"),
    ("v1 missing port", b"PROXY TCP4 192.0.2.1 198.51.100.7 1\r\n", "single spaces"),
    ("v1 trailing space", b"PROXY TCP4 192.0.2.1 198.51.100.7 1 2 \r\n", "single spaces"),
    ("v1 TCP4 with IPv6", b"PROXY TCP4 ::1 ::1 1 2\r\n", "source address '::1'"),
    ("v1 TCP6 with IPv4", b"PROXY TCP6 192.0.2.1 ::1 1 2\r\n", "source address '192.0.2.1'"),
    ("v1 bad IPv4", b"PROXY TCP4 192.0.2.1 198.51.100.256 1 2\r\n", "destination address"),
    ("v1 IPv4 leading zero", b"PROXY TCP4 192.0.2.01 198.51.100.7 1 2\r\n", "source address"),
    ("v1 short IPv4", b"PROXY TCP4 192.0.2 198.51.100.7 1 2\r\n", "source address"),
    ("v1 host name", b"PROXY TCP4 localhost 198.51.100.7 1 2\r\n", "source address"),
    ("v1 IPv6 zone", b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "with a zone"),
    ("v1 port leading zero", b"PROXY TCP4 192.0.2.1 198.51.100.7 01 2\r\n", "source port '01'"),
    ("v1 port too big", b"PROXY TCP4 192.0.2.1 198.51.100.7 1 65536\r\n", "port '65536'"),
    ("v1 port sign", b"PROXY TCP4 192.0.2.1 198.51.100.7 +1 2\r\n", "source port '+1'"),
    ("v1 port empty", b"PROXY TCP4 192.0.2.1 198.51.100.7 1 \r\n", "destination port ''"),
    ("v1 port not ASCII", "PROXY TCP4 192.0.2.1 198.51.100.7 \u0661 2\r\n".encode(), "source port"),
    ("v1 address not ASCII", "PROXY TCP4 \u0661.0.2.1 198.51.100.7 1 2\r\n".encode(), "source"),
    ("v2 bad signature", V2_SIGNATURE[:11] + b"X" + b"\x21\x11\x00\x0c", "bad signature"),
    ("v2 version 1", V2_SIGNATURE + b"\x11\x11\x00\x0c", "version 1, not 2"),
    ("v2 version 3", V2_SIGNATURE + b"\x31", "version 3, not 2"),
    ("v2 command 2", V2_SIGNATURE + b"\x22\x11\x00\x0c", "command 2"),
    ("v2 family 4", V2_SIGNATURE + b"\x21\x41\x00\x0c", "address family 4"),
    ("v2 transport 3", V2_SIGNATURE + b"\x21\x13", "transport 3"),
    ("v2 too long", v2(1, 1, 1, b"", length=V2_MAX_PAYLOAD + 1), "4097 bytes"),
    ("v2 LOCAL too long", v2(0, 0, 0, b"", length=0xFFFF), "65535 bytes"),
    ("v2 short INET block", v2(1, 1, 1, IPV4_BLOCK[:11]), "INET addresses, which need 12"),
    ("v2 short INET6 block", v2(1, 2, 1, IPV4_BLOCK), "INET6 addresses, which need 36"),
    ("v2 short UDP6 block", v2(1, 2, 2, IPV4_BLOCK), "INET6 addresses, which need 36"),
    ("v2 short UNIX block", v2(1, 3, 1, UNIX_BLOCK[:215]), "UNIX addresses, which need 216"),
]


@pytest.mark.parametrize(("name", "data", "message"), INVALID, ids=[c[0] for c in INVALID])
def test_an_invalid_header_is_refused_with_a_reason(name: str, data: bytes, message: str) -> None:
    with pytest.raises(BadProxyHeader) as caught:
        parse(data)
    assert message in caught.value.message
    assert isinstance(caught.value, HandshakeError)


UNFINISHED_BUT_WRONG: list[tuple[str, bytes, str]] = [
    ("unknown protocol", b"PROXY TCP5", "protocol b'TCP5'"),
    ("protocol without address", b"PROXY TCP4X", "protocol b'TCP4X'"),
    ("unknown protocol and space", b"PROXY UDP4 ", "protocol b'UDP4'"),
    ("letters in an address", b"PROXY TCP4 192.0.2.x", "malformed"),
    ("lone CR", b"PROXY TCP4 192.0.2.1\r1", "bare CR or LF"),
    ("bare LF", b"PROXY TCP4 192.0.2.1 198.51.100.7 1 2\n", "bare CR or LF"),
    ("double space", b"PROXY TCP4 192.0.2.1  ", "destination address ''"),
    ("bad source", b"PROXY TCP4 192.0.2.1.1 ", "source address '192.0.2.1.1'"),
    ("bad destination", b"PROXY TCP6 ::1 1.2.3.4 ", "destination address '1.2.3.4'"),
    ("bad source port", b"PROXY TCP4 192.0.2.1 198.51.100.7 070 ", "source port '070'"),
    ("sixth field", b"PROXY TCP4 192.0.2.1 198.51.100.7 1 2 ", "malformed"),
]


@pytest.mark.parametrize(
    ("name", "data", "message"), UNFINISHED_BUT_WRONG, ids=[c[0] for c in UNFINISHED_BUT_WRONG]
)
def test_an_unfinished_v1_line_that_cannot_become_valid_is_refused_at_once(
    name: str, data: bytes, message: str
) -> None:
    with pytest.raises(BadProxyHeader, match="PROXY v1") as caught:
        parse(data)
    assert message in caught.value.message


@pytest.mark.parametrize(
    "data",
    [b"PROXY UNKNOWN", b"PROXY UNKNOWN \x00\xff junk", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r", b"P"],
)
def test_an_unfinished_line_that_can_still_become_valid_asks_for_more(data: bytes) -> None:
    assert parse(data) is None


def test_empty_input_asks_for_more() -> None:
    assert parse(b"") is None


def test_the_cap_covers_the_longest_header_of_either_version() -> None:
    assert V1_MAX_LENGTH < MAX_LENGTH == 16 + V2_MAX_PAYLOAD


# --- build --------------------------------------------------------------------------------------

BUILT: list[tuple[str, tuple[str, int], tuple[str, int], bytes]] = [
    ("v1", SOURCE4, DESTINATION4, b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\n"),
    ("v1", SOURCE6, DESTINATION6, b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n"),
    ("v1", ("::ffff:192.0.2.1", 1), ("10.0.0.1", 2), b"PROXY TCP4 192.0.2.1 10.0.0.1 1 2\r\n"),
    ("v1", ("192.0.2.1", 1), ("::1", 2), b"PROXY TCP6 ::ffff:192.0.2.1 ::1 1 2\r\n"),
    ("v1", ("fe80::1%eth0", 1), ("fe80::2", 2), b"PROXY TCP6 fe80::1 fe80::2 1 2\r\n"),
    ("v1", ("client.example", 1), DESTINATION4, b"PROXY UNKNOWN\r\n"),
    ("v1", SOURCE4, ("198.51.100.7", 65536), b"PROXY UNKNOWN\r\n"),
    ("v1", ("192.0.2.1", -1), DESTINATION4, b"PROXY UNKNOWN\r\n"),
    ("v2", SOURCE4, DESTINATION4, v2(1, 1, 1, IPV4_BLOCK)),
    ("v2", SOURCE6, DESTINATION6, v2(1, 2, 1, IPV6_BLOCK)),
    ("v2", ("192.0.2.1", 0), ("::1", 80), v2(1, 2, 1, MAPPED_BLOCK)),
    ("v2", ("/run/a.sock", 0), DESTINATION4, v2(0, 0, 0, b"")),
]


@pytest.mark.parametrize(("version", "source", "destination", "expected"), BUILT)
def test_build_writes_the_header_a_backend_expects(
    version: str, source: tuple[str, int], destination: tuple[str, int], expected: bytes
) -> None:
    assert build(version, source, destination) == expected


def test_build_refuses_an_unknown_version() -> None:
    with pytest.raises(ValueError, match="'v3'"):
        build("v3", SOURCE4, DESTINATION4)


# --- properties ---------------------------------------------------------------------------------

addresses = st.ip_addresses()
ports = st.integers(0, 0xFFFF)
versions = st.sampled_from(["v1", "v2"])


def written(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """How the parser reports an address: IPv4-mapped IPv6 as IPv4, otherwise Python's text."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


@FUZZ
@given(versions, addresses, ports, addresses, ports, st.binary(max_size=64))
@example("v1", ipaddress.IPv6Address("::ffff:1.2.3.4"), 1, ipaddress.IPv6Address("::1"), 2, b"")
def test_round_trip_gives_the_addresses_back(
    version: str,
    source: ipaddress.IPv4Address | ipaddress.IPv6Address,
    source_port: int,
    destination: ipaddress.IPv4Address | ipaddress.IPv6Address,
    destination_port: int,
    tail: bytes,
) -> None:
    header = build(version, (str(source), source_port), (str(destination), destination_port))
    assert parse(header + tail) == ProxyHeader(
        len(header), (written(source), source_port), (written(destination), destination_port)
    )


def outcome(data: bytes) -> ProxyHeader | BadProxyHeader | None:
    """What ``parse`` does with ``data``: any other exception fails the test."""
    try:
        header = parse(data)
    except BadProxyHeader as error:
        return error
    if header is not None:
        assert 0 < header.length <= min(len(data), MAX_LENGTH)
    return header


@FUZZ
@given(st.binary(max_size=300))
def test_any_bytes_give_a_header_none_or_bad_proxy_header(data: bytes) -> None:
    outcome(data)


def valid_headers() -> st.SearchStrategy[bytes]:
    built = st.builds(
        lambda v, s, sp, d, dp: build(v, (str(s), sp), (str(d), dp)),
        versions,
        addresses,
        ports,
        addresses,
        ports,
    )
    return st.one_of(built, st.sampled_from([case[1] for case in VALID]))


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid header with a few bytes replaced, inserted or deleted, then maybe more bytes."""
    data = bytearray(draw(valid_headers()))
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.integers(0, len(data)))
        byte = draw(st.sampled_from([0x00, 0x0D, 0x0A, 0x20, 0x30, 0x3A, 0xFF, 0x11, 0x21]))
        action = draw(st.sampled_from(["replace", "insert", "delete"]))
        if action == "insert" or where == len(data):
            data.insert(where, byte)
        elif action == "replace":
            data[where] = byte
        else:
            del data[where]
    return bytes(data) + draw(st.binary(max_size=16))


@FUZZ
@given(mutated())
def test_near_valid_headers_give_a_header_none_or_bad_proxy_header(data: bytes) -> None:
    outcome(data)


@FUZZ
@given(st.one_of(mutated(), valid_headers()), st.data())
def test_none_promises_that_every_byte_so_far_belongs_to_the_header(
    data: bytes, draw: st.DataObject
) -> None:
    """The reader consumes what ``parse`` asked more for: no continuation may end the header
    inside those bytes."""
    cut = draw.draw(st.integers(0, len(data)))
    if outcome(data[:cut]) is not None:
        return
    result = outcome(data)
    if isinstance(result, ProxyHeader):
        assert result.length > cut
