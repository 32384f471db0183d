"""TLS session ticket keys shared by every process of a server, and rotated.

A returning client resumes its TLS session (a TLS 1.3 ticket: no certificate, no signature) on
whichever worker accepts it, because every process derives the same keys from one 32-byte master
secret with no messages between them: the key for rotation period ``p = floor(unix_time /
rotation)`` is HKDF-SHA256 of the secret with ``p`` (and the rotation) in its info. New tickets
are sealed under the current period's key; tickets sealed under the previous period's key are
still accepted, and every resumed client gets a fresh ticket. A ticket's lifetime (the hint the
client gets, and the age past which OpenSSL refuses it) is one rotation, so every ticket a client
holds is under a key still accepted.

Contract for the processes that share a secret (the supervisor, its workers, a hand-off):

- ``new_secret()`` makes one; ``use_secret(secret)`` installs it for this process, and must come
  before the first TLS context is built. A process that never calls it makes its own at first use
  (resumption then works only on that process).
- ``current_secret()`` is the secret in use, to pass on at a hand-off.
- ``write_secret_to_pipe()`` writes the secret into a new pipe and returns its read end,
  inheritable, for a child (32 bytes then EOF; the parent closes its copy once the child is
  started); the child calls ``use_secret(read_secret(fd))``, which closes ``fd``.

The secret lives only in memory. CPython's ``ssl`` has no API for ticket keys, so ``install``
reaches the ``SSL_CTX`` behind an ``ssl.SSLContext`` with ``ctypes`` (``_openssl``); when anything
there does not match (another libssl than ``_ssl``'s, a missing symbol, a layout check that
fails) it logs one warning and leaves OpenSSL's own per-context keys: resumption then works only
on the process and the certificate load that issued the ticket, and nothing else changes.
"""

from __future__ import annotations

import logging
import math
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tunnel.logs import LOGGER_NAME, fields

log = logging.getLogger(LOGGER_NAME)

SECRET_SIZE = 32
NAME_SIZE = 16
"""OpenSSL's key name: the first bytes of a ticket, by which a key is found."""
_KEY_SIZE = 32
"""AES-256-CBC and HMAC-SHA256 keys, as OpenSSL's own tickets use."""

clock: Callable[[], float] = time.time
"""The time that picks the rotation period; tests replace it to step through periods."""

_secret: bytes | None = None


def new_secret() -> bytes:
    """A fresh master secret."""
    return os.urandom(SECRET_SIZE)


def use_secret(secret: bytes) -> None:
    """Derive this process's ticket keys from ``secret`` from now on (before TLS contexts are
    built, so no ticket is issued under another one)."""
    global _secret
    if len(secret) != SECRET_SIZE:
        raise ValueError(f"a ticket key secret is {SECRET_SIZE} bytes, not {len(secret)}")
    _secret = bytes(secret)


def current_secret() -> bytes:
    """The secret in use (made now if none was given), to pass on to another process."""
    global _secret
    if _secret is None:
        _secret = new_secret()
    return _secret


def write_secret_to_pipe() -> int:
    """A pipe holding the current secret then EOF: its read end, inheritable, for a child."""
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, current_secret())  # 32 bytes always fit a pipe's buffer
    finally:
        os.close(write_end)
    os.set_inheritable(read_end, True)
    return read_end


def read_secret(fd: int) -> bytes:
    """The secret a parent wrote with ``write_secret_to_pipe``; closes ``fd``."""
    data = b""
    try:
        while chunk := os.read(fd, SECRET_SIZE + 1):
            data += chunk
    finally:
        os.close(fd)
    if len(data) != SECRET_SIZE:
        raise ValueError(f"expected a {SECRET_SIZE}-byte ticket key secret, got {len(data)} bytes")
    return data


@dataclass(frozen=True, slots=True)
class TicketKey:
    """One period's key: its name, then HMAC and AES keys."""

    period: int
    name: bytes
    hmac: bytes
    aes: bytes


def derive(secret: bytes, rotation: float, period: int) -> TicketKey:
    """The key of ``period``, the same in every process holding ``secret``."""
    info = b"tunnel session ticket key v1;rotation=%d;period=%d" % (round(rotation * 1000), period)
    material = HKDF(hashes.SHA256(), NAME_SIZE + 2 * _KEY_SIZE, None, info).derive(secret)
    return TicketKey(
        period, material[:NAME_SIZE], material[NAME_SIZE:48], material[48 : 48 + _KEY_SIZE]
    )


class KeyRing:
    """The keys of one rotation: the current period's seals, it and the previous one open."""

    __slots__ = ("_cache", "rotation")

    def __init__(self, rotation: float) -> None:
        self.rotation = rotation
        self._cache: dict[tuple[bytes, int], TicketKey] = {}

    def key(self, period: int) -> TicketKey:
        secret = current_secret()
        found = self._cache.get((secret, period))
        if found is None:
            if len(self._cache) > 8:
                self._cache.clear()
            found = self._cache[secret, period] = derive(secret, self.rotation, period)
        return found

    def period(self) -> int:
        return math.floor(clock() / self.rotation)

    def sealing(self) -> TicketKey:
        """The key new tickets are sealed under."""
        return self.key(self.period())

    def opening(self, name: bytes) -> TicketKey | None:
        """The key named ``name`` if it is still accepted (this period's or the previous one's);
        None otherwise."""
        current = self.period()
        for period in (current, current - 1):
            key = self.key(period)
            if key.name == name:
                return key
        return None


def install(context: ssl.SSLContext, rotation: float) -> bool:
    """Make ``context`` issue tickets under the shared keys of ``rotation`` seconds, or no
    tickets at all when it is 0. False when the shared keys are unavailable (one warning is
    logged; OpenSSL's per-context keys stay)."""
    if rotation <= 0:
        context.options |= ssl.OP_NO_TICKET
        context.num_tickets = 0
        return True
    from tunnel.net import openssl_tickets  # here: that module imports this one

    ring = _rings.get(rotation)
    if ring is None:
        ring = _rings[rotation] = KeyRing(rotation)
    return openssl_tickets.install(context, ring, _warn_once)


_rings: dict[float, KeyRing] = {}


_warned = False


def _warn_once(reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning(
            "TLS session tickets are per process: a client resumes only on the process that "
            "issued its ticket",
            extra=fields(reason=reason),
        )
