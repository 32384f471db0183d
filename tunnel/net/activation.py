"""Listening sockets handed to this process: systemd socket activation, or a supervisor's.

systemd's protocol (sd_listen_fds(3)): the service is started with its sockets open as fds 3,
4, ... and ``LISTEN_FDS`` (how many), ``LISTEN_PID`` (the pid they are for: a child that inherits
the environment must not take them) and optionally ``LISTEN_FDNAMES`` (colon-separated names from
``FileDescriptorName=``). Because systemd, not the tunnel, holds the listening socket, a restart
of the tunnel refuses no connection: clients that arrive while no process runs wait in the
socket's backlog until the next one accepts them.

``listen_fds`` reads that protocol from an environment and a pid given as parameters, checks
that every descriptor is a listening TCP socket (an error naming the fd otherwise), marks them
close-on-exec and removes the three variables, as ``sd_listen_fds(1)`` does, so that no child
process reads them as its own. ``Inherited`` matches those sockets to the configured listener
addresses: a listener with a matching socket accepts on it, one without binds as usual, and a
socket no listener names is logged and closed.

``inherited()`` is the one ``Inherited`` of this process. It is read once, at its first call,
and kept: the descriptors belong to the process, not to one ``serve`` or one configuration, and
the environment that announced them is gone after the first reading. Keeping them also lets a
reload that removes a listener and a later one that brings it back use the same socket, and lets
the supervisor of ``workers = N`` pass them to every worker it (re)starts. A worker learns of
its sockets from the supervisor's ``--listen-fd ADDR=FD`` (``take_from_supervisor``), since
``LISTEN_PID`` could not name a process that did not exist yet.

Stdlib only (no trio): the synchronous supervisor uses it too.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import stat
import threading
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass

from tunnel.config import Address
from tunnel.errors import ConfigError
from tunnel.logs import LOGGER_NAME, fields

log = logging.getLogger(LOGGER_NAME)

LISTEN_FDS_START = 3
"""SD_LISTEN_FDS_START: the first inherited descriptor (after stdin, stdout and stderr)."""
VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
UNNAMED = "unknown"
"""The name systemd reports for a socket without ``FileDescriptorName=``."""
WORKER_OPTION = "--listen-fd"
"""The hidden worker option, ``ADDR=FD``, by which a supervisor passes an inherited socket."""

_FAMILIES = {socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6"}
_WILDCARD_IPS = {"0.0.0.0", "::"}


class ActivationError(OSError):
    """An inherited descriptor, or the variables announcing it, that the tunnel cannot serve on.

    ``strerror`` says which fd or variable, what is wrong and what to do.
    """


@dataclass(frozen=True, slots=True)
class InheritedSocket:
    """A listening TCP socket this process was started with."""

    fd: int
    """The descriptor number it arrived as (3, 4, ...)."""
    name: str
    """Its ``LISTEN_FDNAMES`` entry (``unknown`` when none), or the address a supervisor gave."""
    sock: socket.socket
    """Owns ``fd``; close-on-exec, otherwise as received."""

    @property
    def address(self) -> str:
        """``host:port`` it is bound to."""
        host, port = self.sock.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def describe(self) -> str:
        """``fd 3 (127.0.0.1:8080, name "web")`` for log lines and errors."""
        named = "" if self.name == UNNAMED else f', name "{self.name}"'
        return f"fd {self.fd} ({self.address}{named})"


def listen_fds(
    environ: MutableMapping[str, str], pid: int, *, start: int = LISTEN_FDS_START
) -> list[InheritedSocket]:
    """The listening sockets announced in ``environ`` for process ``pid``.

    Follows sd_listen_fds(3) with ``unset_environment``: the three variables are removed from
    ``environ`` whatever they say; no ``LISTEN_PID``, or one naming another process, means no
    sockets (the second is logged: the variables were meant for someone else). Descriptors
    ``start`` .. ``start + LISTEN_FDS - 1`` are taken, made close-on-exec, and returned in that
    order with their names. ``start`` is 3 except in tests.

    Raises:
        ActivationError: ``LISTEN_PID`` or ``LISTEN_FDS`` is not a number, ``LISTEN_FDNAMES``
            has another count of names, or a descriptor is not open, not a socket, not TCP
            (IPv4 or IPv6) or not listening. Nothing is taken then: every descriptor is left
            as it was, so that the caller can report the error and exit.
    """
    values = {name: environ.pop(name, None) for name in VARIABLES}
    pid_text, count_text, names_text = (values[name] for name in VARIABLES)
    if pid_text is None:
        return []
    if not pid_text.isdigit():
        raise ActivationError(
            errno.EINVAL,
            f"LISTEN_PID={pid_text!r} is not a process id; socket activation sets it to the pid "
            "of the process it starts",
        )
    if int(pid_text) != pid:
        log.warning(
            "LISTEN_FDS is for another process; not taking its sockets",
            extra=fields(
                pid=pid,
                reason=f"LISTEN_PID={pid_text}; start the tunnel with exec (no shell or wrapper "
                "process in between) so that it is the process systemd started",
            ),
        )
        return []
    count_text = "0" if count_text is None else count_text
    if not count_text.isdigit():
        raise ActivationError(
            errno.EINVAL,
            f"LISTEN_FDS={count_text!r} is not a number of descriptors; socket activation sets "
            "it to how many sockets it passes from fd 3 on",
        )
    fds = range(start, start + int(count_text))
    names = [UNNAMED] * len(fds)
    if names_text is not None and fds:
        names = names_text.split(":")
        if len(names) != len(fds):
            raise ActivationError(
                errno.EINVAL,
                f"LISTEN_FDNAMES={names_text!r} names {len(names)} sockets but LISTEN_FDS="
                f"{count_text}; give each socket one name (FileDescriptorName=), or none",
            )
    for fd, name in zip(fds, names, strict=True):
        check_listening(fd, name)
    taken = []
    for fd, name in zip(fds, names, strict=True):
        os.set_inheritable(fd, False)
        taken.append(InheritedSocket(fd, name, socket.socket(fileno=fd)))
    return taken


def check_listening(fd: int, name: str = UNNAMED) -> None:
    """Raise ``ActivationError`` unless ``fd`` is a listening TCP socket over IPv4 or IPv6.

    Leaves ``fd`` open and unchanged either way.
    """
    label = f"inherited fd {fd}" + ("" if name == UNNAMED else f' (name "{name}")')
    fix = "the tunnel serves only listening TCP sockets: ListenStream=HOST:PORT in a .socket unit"
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise ActivationError(
            exc.errno or errno.EBADF,
            f"{label} is not open, though LISTEN_FDS says it was passed; start the tunnel "
            "with the sockets systemd (or its supervisor) gives, and no other LISTEN_ variables",
        ) from exc
    if not stat.S_ISSOCK(mode):
        raise ActivationError(errno.ENOTSOCK, f"{label} is not a socket{_file_kind(mode)}; {fix}")
    probe = socket.socket(fileno=fd)
    try:
        if probe.family not in _FAMILIES:
            kind = "a Unix socket" if probe.family == socket.AF_UNIX else "not an IP socket"
            raise ActivationError(errno.EAFNOSUPPORT, f"{label} is {kind}; {fix}")
        if probe.type != socket.SOCK_STREAM:
            kind = "a UDP socket" if probe.type == socket.SOCK_DGRAM else "not a TCP socket"
            raise ActivationError(
                errno.ESOCKTNOSUPPORT, f"{label} is {kind} ({_where(probe)}); {fix}"
            )
        if not probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ActivationError(
                errno.EINVAL,
                f"{label} is a TCP socket ({_where(probe)}) that is not listening; "
                "pass a listening socket (ListenStream=, with Accept=no)",
            )
    finally:
        probe.detach()


def _file_kind(mode: int) -> str:
    """`` but a pipe`` and the like, or nothing."""
    kinds = {
        stat.S_ISFIFO: "a pipe",
        stat.S_ISREG: "a regular file",
        stat.S_ISCHR: "a character device (a terminal, /dev/null)",
        stat.S_ISDIR: "a directory",
    }
    return next((f" but {kind}" for test, kind in kinds.items() if test(mode)), "")


def _where(sock: socket.socket) -> str:
    try:
        host, port = sock.getsockname()[:2]
    except OSError:
        return "address unknown"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def serves(address: Address, host: str, port: int) -> bool:
    """Whether listener ``address`` would have bound ``host``:``port`` (a socket's name) itself.

    The ports must be equal (port 0, "any free port", matches nothing). ``:port`` matches the
    IPv4 and the IPv6 wildcard (``0.0.0.0``, ``::``); an IP address matches itself, however it
    is written; a host name matches the addresses it resolves to now (the same lookup that
    binding it would make; blocking).
    """
    if address.port == 0 or port != address.port:
        return False
    if not address.host:
        return host in _WILDCARD_IPS
    bound = ipaddress.ip_address(host)
    try:
        return ipaddress.ip_address(address.host) == bound
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(
            address.host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError:
        return False
    return any(ipaddress.ip_address(info[4][0]) == bound for info in infos)


class Inherited:
    """The inherited listening sockets of one process, and which listener address uses which.

    It owns the sockets for the life of the process: ``claim`` hands out the records, and
    whoever accepts on one does so on its own duplicate, so that closing a listener never
    closes the inherited descriptor (which a later reload or a restarted worker may need).
    Thread-safe: ``serve`` claims from a worker thread.
    """

    def __init__(
        self,
        sockets: Sequence[InheritedSocket] = (),
        assigned: Sequence[tuple[Address, InheritedSocket]] = (),
    ) -> None:
        self._unsettled = list(sockets)
        self._assigned = list(assigned)
        self._settled = not self._unsettled
        self._lock = threading.Lock()

    @property
    def settled(self) -> bool:
        """Whether every socket has its listener (or was closed): ``claim`` resolves no name."""
        with self._lock:
            return self._settled

    def claim(self, addresses: Sequence[Address]) -> list[list[InheritedSocket]]:
        """For each listener address, the inherited sockets it accepts on (none: bind it).

        The first call settles the sockets not yet assigned, so it must name every configured
        listener (``serve`` opens them all at once before any reload): each socket goes to the
        first address that ``serves`` it, and one that none does is logged as a warning and
        closed. Later calls (a reload adding a listener) find only sockets assigned then.
        """
        with self._lock:
            if not self._settled:
                self._settle(addresses)
            claimed = [
                [inherited for assigned, inherited in self._assigned if assigned == address]
                for address in addresses
            ]
        # Two listeners may share an address only on port 0 (a hand-off passes each its own
        # bound socket, in the listeners' order): the k-th of them takes the k-th socket.
        seen: dict[Address, int] = {}
        for i, address in enumerate(addresses):
            if addresses.count(address) > 1:
                k = seen[address] = seen.get(address, -1) + 1
                claimed[i] = claimed[i][k : k + 1]
        return claimed

    def assigned(self) -> list[tuple[Address, int]]:
        """Every (listener address, descriptor) pair in use: what a supervisor passes on."""
        with self._lock:
            return [(address, inherited.fd) for address, inherited in self._assigned]

    def _settle(self, addresses: Sequence[Address]) -> None:
        for inherited in self._unsettled:
            host, port = inherited.sock.getsockname()[:2]
            address = next((a for a in addresses if serves(a, host, port)), None)
            if address is None:
                log.warning(
                    "inherited socket matches no listener; closed",
                    extra=fields(
                        address=inherited.address,
                        reason=f"{inherited.describe()} is not the address of any [[listeners]] "
                        "listen; connections to it wait unanswered until systemd closes it. Add "
                        "a listener for it, or remove it from the .socket unit",
                    ),
                )
                inherited.sock.close()
                continue
            self._assigned.append((address, inherited))
            log.info(
                "using an inherited listening socket",
                extra=fields(address=inherited.address, listener=str(address)),
            )
            if _dual_stack(inherited.sock):
                log.warning(
                    "inherited IPv6 socket also accepts IPv4",
                    extra=fields(
                        address=inherited.address,
                        reason="IPV6_V6ONLY is off, so IPv4 clients appear as ::ffff:a.b.c.d "
                        "in logs and X-Forwarded-For and match no IPv4 trusted_proxies; set "
                        "BindIPv6Only=ipv6-only and add ListenStream=0.0.0.0:PORT",
                    ),
                )
        self._unsettled = []
        self._settled = True


def _dual_stack(sock: socket.socket) -> bool:
    if sock.family != socket.AF_INET6:
        return False
    return not sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)


def listen_fd_argument(address: Address, fd: int) -> str:
    """``ADDR=FD``, the value of the worker's ``--listen-fd``."""
    return f"{address}={fd}"


def parse_listen_fd(text: str) -> tuple[Address, int]:
    """The inverse of ``listen_fd_argument``.

    Raises:
        ActivationError: ``text`` is not ``ADDR=FD``.
    """
    address_text, _, fd_text = text.rpartition("=")
    try:
        address = Address.parse(address_text, WORKER_OPTION)
    except ConfigError as exc:
        raise ActivationError(errno.EINVAL, str(exc)) from exc
    if not fd_text.isdigit():
        raise ActivationError(errno.EINVAL, f"{WORKER_OPTION}: {text!r} is not ADDR=FD")
    return address, int(fd_text)


def from_supervisor(values: Sequence[str]) -> Inherited:
    """The ``Inherited`` of a worker whose supervisor passed ``--listen-fd ADDR=FD`` values.

    Raises:
        ActivationError: a value is not ``ADDR=FD`` or its descriptor not a listening TCP
            socket.
    """
    assigned = []
    for value in values:
        address, fd = parse_listen_fd(value)
        check_listening(fd, str(address))
        os.set_inheritable(fd, False)
        assigned.append((address, InheritedSocket(fd, str(address), socket.socket(fileno=fd))))
    return Inherited(assigned=assigned)


_lock = threading.Lock()
_inherited: Inherited | None = None
_failure: ActivationError | None = None
_from_supervisor: tuple[str, ...] | None = None


def inherited() -> Inherited:
    """This process's inherited sockets, read at the first call and kept (see the module's
    docstring for why once per process): from the supervisor's ``--listen-fd`` values when
    ``take_from_supervisor`` was called, otherwise from systemd's variables in ``os.environ``.

    Raises:
        ActivationError: as ``listen_fds``; every later call raises it again.
    """
    global _inherited, _failure
    with _lock:
        if _failure is not None:
            raise _failure
        if _inherited is None:
            try:
                if _from_supervisor is not None:
                    _inherited = from_supervisor(_from_supervisor)
                else:
                    _inherited = Inherited(listen_fds(os.environ, os.getpid()))
            except ActivationError as exc:
                _failure = exc
                raise
        return _inherited


def take_from_supervisor(values: Sequence[str]) -> None:
    """Make ``inherited()`` return the sockets named by a worker's ``--listen-fd`` values (read
    at that first call, so that an error reaches the caller that opens the listeners).

    Raises:
        RuntimeError: ``inherited()`` was already called in this process.
    """
    global _from_supervisor
    with _lock:
        if _inherited is not None or _failure is not None:
            raise RuntimeError("the inherited sockets were already read in this process")
        _from_supervisor = tuple(values)
