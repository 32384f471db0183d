"""Host names, IP addresses and ports as a file or a flag writes them, checked before any socket.

What no listener or backend could use is refused here, naming the key: a host that is neither an
IP address nor a host name, a bad port, spaces, control or non-ASCII characters. Names are not
resolved.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from tunnel.errors import ConfigError

_NAME_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?", re.ASCII)
"""One label of a host name, lower-cased: LDH (RFC 1123), plus "_", which internal names such as
Docker Compose services use and resolvers accept."""
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*", re.ASCII)
"""A last label that makes the resolver read the name as an IPv4 number (inet_aton: ``127.1``,
``0x7f000001``, ``2130706433``), which would hide an address from every comparison."""


@dataclass(frozen=True, slots=True)
class Address:
    """A listening address; ``host`` is ``""`` for every interface (written ``:port``)."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: object, key: str) -> Address:
        """Parse ``host:port``, ``[v6]:port`` or ``:port``."""
        if not isinstance(text, str):
            raise ConfigError(key, f'expected "host:port", got {text!r}')
        check_characters(text, key, url=False)
        if text.startswith("*:"):
            raise ConfigError(key, f'{text!r}: for every interface write "{text[1:]}"')
        host, port = split_host_port(text, key, default_port=None, min_port=0)
        if ":" in host and (mapped := ipaddress.IPv6Address(host).ipv4_mapped) is not None:
            raise ConfigError(
                key, f'{text!r} is an IPv4 address in IPv6 form; write "{mapped}:{port}"'
            )
        return cls(host, port)

    def __str__(self) -> str:
        return join_host_port(self.host, self.port)


def join_host_port(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_ip_address(text: str) -> bool:
    """True for a numeric IPv4 or IPv6 address (no brackets, no port)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def check_characters(text: str, key: str, url: bool) -> None:
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


def check_backend_host(host: str, url: str, key: str) -> None:
    """What a listener may have and a backend may not: no host, or the every-interface one."""
    if not host:
        raise ConfigError(key, f"{url!r} names no host")
    if is_ip_address(host) and ipaddress.ip_address(host).is_unspecified:
        raise ConfigError(
            key,
            f"{url!r}: {host} means every interface to a listener; a backend needs the address "
            "to connect to, like 127.0.0.1",
        )


def split_host_port(
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
        _check_ipv6(host, text, key)
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


def _check_ipv6(host: str, text: str, key: str) -> None:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError as exc:
        raise ConfigError(key, f"{host!r} in {text!r} is not an IPv6 address") from exc
    if ip.version != 6:
        raise ConfigError(key, f"{host!r} in {text!r} is not an IPv6 address")


def check_listen_together(addresses: Sequence[Address], keys: Sequence[str]) -> None:
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
