"""A TLS connection over a non-blocking socket that is driven like the socket itself.

``recv``, ``recv_into`` and ``send`` raise ``BlockingIOError`` where the socket would, so the
handshake helpers (``sockio``) and the relay engine serve TLS and plain connections with the same
code. OpenSSL works on memory buffers (``ssl.MemoryBIO``) and this class moves the encrypted bytes
itself, which ``ssl.SSLSocket`` cannot be made to do safely in two places a tunnel needs:

- half-close: ``SSLSocket.unwrap`` calls ``SSL_shutdown`` twice, and the second call reads the
  socket and throws away (with ``APPLICATION_DATA_AFTER_CLOSE_NOTIFY``) data the peer sent before
  it saw our close_notify. Here the socket is read only when OpenSSL needs bytes, so records
  already read are decrypted and kept before close_notify goes out, and nothing is lost;
- edge-triggered readiness: ``recv_into`` keeps decrypting records until the buffer is full or
  the socket is drained (``EAGAIN``, or a socket read shorter than asked for), so a short read
  means drained, as it does for a plain socket.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import ssl
from typing import Any, Literal

RAW_READ = 64 * 1024
"""Encrypted bytes read from the socket at a time: four full TLS records."""

_SCRATCH = bytearray(RAW_READ)
_SCRATCH_VIEW = memoryview(_SCRATCH)
"""One buffer for every socket read: its bytes go straight on into OpenSSL's memory buffer,
and a buffer per connection would cost 64 KiB each (the relay runs in one thread)."""

WANT_READ: Literal["read"] = "read"
WANT_WRITE: Literal["write"] = "write"


class TLSConn:
    """TLS over ``sock``; owns the socket and closes it."""

    __slots__ = (
        "_backlog",
        "_eof",
        "_incoming",
        "_obj",
        "_outgoing",
        "_plain",
        "_wr_shut",
        "sock",
        "tls",
    )

    def __init__(
        self,
        sock: socket.socket,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
    ) -> None:
        self.sock = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(
            self._incoming,
            self._outgoing,
            server_side=server_side,
            server_hostname=server_hostname,
        )
        self._obj: Any = getattr(self.tls, "_sslobj", self.tls)
        """``_ssl``'s object behind ``tls``, called without ``SSLObject``'s Python wrappers
        (``read``, ``write`` and ``pending`` are the same there); ``tls`` itself if a Python
        version hides it."""
        self._backlog = bytearray()
        """Encrypted bytes the socket has not taken yet."""
        self._plain = bytearray()
        """Decrypted bytes kept aside when close_notify was sent (see ``shutdown``)."""
        self._eof = False
        self._wr_shut = 0
        """0: open; 1: close_notify queued, FIN to follow once the backlog is out; 2: done."""

    def fileno(self) -> int:
        return self.sock.fileno()

    def handshake_step(self) -> Literal["read", "write"] | None:
        """Advance the handshake as far as the socket allows: None when it is complete, else
        what to wait for. Raises ``ssl.SSLError`` (such as a failed verification) or
        ``OSError``."""
        while True:
            try:
                self.tls.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            except ssl.SSLError:
                # The alert that says why (protocol_version, unknown_ca...) is queued: send it,
                # so the peer learns the reason instead of seeing a bare close.
                self._queue_output()
                with contextlib.suppress(OSError):
                    self.flush()
                raise
            self._queue_output()
            if not self.flush():
                return WANT_WRITE
            if done:
                return None
            try:
                if not self._fill():
                    raise ConnectionAbortedError(
                        errno.ECONNABORTED,
                        "the peer closed the connection during the TLS handshake",
                    )
            except BlockingIOError:
                return WANT_READ

    def recv_into(self, buffer: bytearray | memoryview, nbytes: int = 0, /) -> int:
        """Decrypt into ``buffer`` until it is full, the socket has nothing more (a short count,
        or ``BlockingIOError`` when there was nothing at all) or the peer closed (0).

        OpenSSL is asked for bytes only when it holds some, and a socket read shorter than
        asked for counts as drained, as the engine counts a plain socket's: a message costs one
        ``recv`` and one ``read``, not the exceptions of asking an empty buffer. This runs for
        every message, so it calls ``_ssl`` directly (``_obj``), not through ``SSLObject``'s
        Python wrappers, and slices ``buffer`` only after a first record filled part of it."""
        want = nbytes or len(buffer)
        filled = self._take_plain(buffer, want) if self._plain else 0
        obj, incoming = self._obj, self._incoming
        # SSL_read hands over one record at a time and all of it that fits, so decrypted bytes
        # can be left over only from a call that filled its buffer: check once, here.
        held = incoming.pending or obj.pending()
        drained = False
        view: memoryview | None = None
        while filled < want:
            if held:
                try:
                    if filled:
                        if view is None:
                            view = memoryview(buffer)
                        n = obj.read(want - filled, view[filled:])
                    else:
                        n = obj.read(want, buffer)
                except ssl.SSLWantReadError:
                    n = -1  # an incomplete record: more bytes are needed
                except ssl.SSLZeroReturnError:
                    n = 0
                if n > 0:
                    filled += n
                    held = incoming.pending
                    continue
                if n == 0:
                    self._eof = True
                    break
            if self._eof or (drained and filled):
                break
            try:
                if drained:
                    raise BlockingIOError(errno.EAGAIN, "the socket was drained")
                got = self.sock.recv_into(_SCRATCH)
            except BlockingIOError:
                if filled:
                    break
                self._answer_quietly()
                raise
            if not got:
                self._eof = True  # closed without close_notify: an EOF all the same
                break
            incoming.write(_SCRATCH if got == RAW_READ else _SCRATCH_VIEW[:got])
            held = True
            drained = got < RAW_READ
        if self._outgoing.pending:
            self._answer_quietly()
        return filled

    def _take_plain(self, buffer: bytearray | memoryview, want: int) -> int:
        """Hand over what ``shutdown`` kept aside first."""
        filled = min(want, len(self._plain))
        memoryview(buffer)[:filled] = self._plain[:filled]
        del self._plain[:filled]
        return filled

    def recv(self, bufsize: int, /) -> bytes:
        buffer = bytearray(bufsize)
        return bytes(buffer[: self.recv_into(buffer)])

    def send(self, data: bytes | bytearray | memoryview, /) -> int:
        """Encrypt all of ``data`` and write what the socket takes; the rest waits in a backlog
        that ``flush`` (or the next ``send``) writes. While a backlog remains, nothing new is
        accepted (``BlockingIOError``), which is the back-pressure a socket gives."""
        if self._backlog and not self.flush():
            raise BlockingIOError(errno.EAGAIN, "TLS records still waiting for the socket")
        if not data:
            return 0
        self._obj.write(data)
        records = self._outgoing.read()
        try:
            sent = self.sock.send(records)
        except BlockingIOError:
            sent = 0
        if sent < len(records):
            self._backlog += memoryview(records)[sent:]
        return len(data)

    @property
    def backlog(self) -> int:
        """Encrypted bytes accepted but not yet taken by the socket."""
        return len(self._backlog)

    @property
    def has_buffered_input(self) -> bool:
        """Bytes wait here, decrypted or not, that no socket event will announce: what the
        handshake code read past its needs, or what ``shutdown`` kept aside."""
        return bool(self._plain or self._incoming.pending or self.tls.pending())

    def flush(self) -> bool:
        """Write the backlog; True when it is empty. Sends the FIN a ``shutdown`` asked for once
        its close_notify is out."""
        backlog = self._backlog
        while backlog:
            try:
                sent = self.sock.send(backlog)
            except BlockingIOError:
                return False
            del backlog[:sent]
        if self._wr_shut == 1:
            self._wr_shut = 2
            self.sock.shutdown(socket.SHUT_WR)
        return True

    def shutdown(self, how: int, /) -> None:
        """Close the write direction: close_notify, then FIN. Reading goes on (TLS 1.3 allows
        the peer to keep sending, and OpenSSL delivers it); only ``SHUT_WR`` is meaningful."""
        if self._wr_shut:
            return
        self._keep_decrypted()
        # close_notify is queued; the peer's own comes later, through recv_into.
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.unwrap()
        self._queue_output()
        self._wr_shut = 1
        try:
            self.flush()
        except OSError:
            if not self._eof:
                raise
            # The peer closed first and may be gone: its kernel answers the close_notify with a
            # reset. Both directions have ended in order, which is a clean close.
            self._backlog.clear()
            self._wr_shut = 2

    def close(self) -> None:
        """Close the socket, after a best-effort close_notify when none was sent."""
        try:
            if not self._wr_shut and self.tls.version() is not None:
                self._wr_shut = 2
                with contextlib.suppress(ssl.SSLError):
                    self.tls.unwrap()
                self._queue_output()
                self.flush()
        except OSError:
            pass
        finally:
            self.sock.close()

    def _fill(self) -> int:
        """Read encrypted bytes into OpenSSL; 0 at EOF, ``BlockingIOError`` when none wait."""
        n = self.sock.recv_into(_SCRATCH)
        if n:
            self._incoming.write(_SCRATCH_VIEW[:n])
        return n

    def _queue_output(self) -> None:
        if self._outgoing.pending:
            self._backlog += self._outgoing.read()

    def _answer_quietly(self) -> None:
        """Send what reading produced (TLS 1.3 key updates, session tickets); a socket error
        here is left for the next write to meet."""
        if self._outgoing.pending:
            self._queue_output()
            with contextlib.suppress(OSError):
                self.flush()

    def _keep_decrypted(self) -> None:
        """Decrypt every complete record OpenSSL already holds, before close_notify is sent:
        ``unwrap`` would otherwise discard them."""
        while True:
            try:
                data = self.tls.read(RAW_READ)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                return
            if not data:
                return
            self._plain += data
