"""The one error tree of tunnel.

Every refusal the proxy can give is an exception here; each carries the HTTP status it maps to and
formats its own message, so the handler needs one ``except TunnelError`` and one function
(``core.response.error_response``) to answer the client::

    TunnelError
    ├── PermanentRedirect (308)           redirect_https: a plain request sent to https://
    ├── HandshakeError (400)              the client's request head is unacceptable
    │   ├── RequestTimeout (408)          the head did not arrive within handshake_timeout
    │   ├── NoRoute (404)                 no route matches the Host and path
    │   ├── MethodNotAllowed (405)
    │   ├── UpgradeRequired (426)
    │   ├── HeadersTooLarge (431)
    │   │   └── TooManyHeaders (431)      more field lines than max_headers
    │   ├── UriTooLong (414)              the request line alone is over max_header_bytes
    │   ├── Forbidden (403)               access rules: address, Origin
    │   ├── Unauthorized (401)            auth: no valid credential; WWW-Authenticate: Bearer
    │   ├── TooManyRequests (429)         per-client limits; Retry-After when a rate
    │   └── BadProxyHeader (400)          PROXY protocol: missing, malformed or untrusted; never
    │                                     answered (the connection is closed)
    ├── ServiceUnavailable (503)          answered with Retry-After
    │   ├── Overloaded (503)              max_tunnels reached
    │   └── OutOfResources (503)          the proxy could not make a socket (EMFILE, ENOBUFS)
    ├── BackendError (502)                the backend side failed
    │   ├── NoHealthyBackend (503)
    │   ├── BackendUnreachable (502)
    │   ├── BackendTimeout (504)
    │   └── BadBackendResponse (502)      a 101 that does not match the request
    └── ConfigError                       a bad configuration key (never sent to a client)
"""

from __future__ import annotations

from collections.abc import Sequence


class TunnelError(Exception):
    """Base of every error tunnel raises on purpose.

    ``message`` is for the operator (logs) and says everything known; ``public`` is the body a
    client gets, the same unless the error is about the inside (a backend's address or socket
    error is none of a public client's business).
    """

    status: int = 500
    reason: str = "Internal Server Error"

    def __init__(self, message: str, *, headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.headers: tuple[tuple[str, str], ...] = tuple(headers)

    @property
    def public(self) -> str:
        return self.message

    def __str__(self) -> str:
        return f"{self.status} {self.reason}: {self.message}"


class PermanentRedirect(TunnelError):
    """Not a failure: the answer of a ``redirect_https`` listener to a plain HTTP request."""

    status = 308
    reason = "Permanent Redirect"

    def __init__(self, location: str) -> None:
        super().__init__(
            f"this site is served over HTTPS: {location}", headers=[("Location", location)]
        )
        self.location = location


class HandshakeError(TunnelError):
    """The client's upgrade request cannot be accepted as sent."""

    status = 400
    reason = "Bad Request"


class RequestTimeout(HandshakeError):
    status = 408
    reason = "Request Timeout"


class NoRoute(HandshakeError):
    status = 404
    reason = "Not Found"


class MethodNotAllowed(HandshakeError):
    status = 405
    reason = "Method Not Allowed"

    def __init__(self, method: str) -> None:
        super().__init__(
            f"method {method} cannot open a tunnel; use GET", headers=[("Allow", "GET")]
        )
        self.method = method


class UpgradeRequired(HandshakeError):
    status = 426
    reason = "Upgrade Required"


class HeadersTooLarge(HandshakeError):
    status = 431
    reason = "Request Header Fields Too Large"

    def __init__(self, limit: int) -> None:
        super().__init__(f"request head is larger than max_header_bytes ({limit} bytes)")
        self.limit = limit


class TooManyHeaders(HeadersTooLarge):
    """More field lines than ``max_headers``: each costs the parsers work, so a head of
    thousands of tiny fields is refused before they are parsed (Apache's
    ``LimitRequestFields``)."""

    def __init__(self, limit: int) -> None:
        HandshakeError.__init__(
            self, f"request head has more than max_headers ({limit}) header fields"
        )
        self.limit = limit


class UriTooLong(HandshakeError):
    """The request line alone does not fit in ``max_header_bytes`` (nginx answers 414 too)."""

    status = 414
    reason = "URI Too Long"

    def __init__(self, limit: int) -> None:
        super().__init__(f"request target is longer than max_header_bytes ({limit} bytes)")
        self.limit = limit


class Forbidden(HandshakeError):
    status = 403
    reason = "Forbidden"


class Unauthorized(HandshakeError):
    """No valid credential (RFC 6750): ``error`` is ``invalid_request`` (none was sent) or
    ``invalid_token`` (one was sent and refused); the message says why, for the log only."""

    status = 401
    reason = "Unauthorized"

    def __init__(
        self, message: str, *, error: str = "invalid_token", realm: str = "tunnel"
    ) -> None:
        challenge = f'Bearer realm="{realm}"'
        if error:
            challenge += f', error="{error}"'
        super().__init__(message, headers=[("WWW-Authenticate", challenge)])
        self.error = error

    @property
    def public(self) -> str:
        return "a valid credential is required" if self.error else "a credential is required"


class TooManyRequests(HandshakeError):
    status = 429
    reason = "Too Many Requests"

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        headers = [] if retry_after is None else [("Retry-After", str(retry_after))]
        super().__init__(message, headers=headers)
        self.retry_after = retry_after


class BadProxyHeader(HandshakeError):
    """A PROXY protocol header that is missing, malformed, or sent by a peer outside
    ``trusted_proxies``: the connection is closed without an answer."""


class ServiceUnavailable(TunnelError):
    """Not the client's fault and not for long: ``Retry-After`` says when to come back."""

    status = 503
    reason = "Service Unavailable"

    def __init__(self, message: str, *, retry_after: int = 5) -> None:
        super().__init__(message, headers=[("Retry-After", str(retry_after))])
        self.retry_after = retry_after


class Overloaded(ServiceUnavailable):
    def __init__(self, limit: int, retry_after_seconds: int = 5) -> None:
        super().__init__(
            f"the proxy holds max_tunnels ({limit}) tunnels; retry later",
            retry_after=retry_after_seconds,
        )
        self.limit = limit


class OutOfResources(ServiceUnavailable):
    """The proxy itself ran out of descriptors or buffers: not the backend's failure, so it
    does not count toward marking the backend down."""

    def __init__(self, doing: str, error: OSError) -> None:
        super().__init__(
            f"cannot {doing}: {error.strerror or error}; raise the descriptor limit "
            "(ulimit -n, LimitNOFILE=) or lower max_handshakes",
            retry_after=1,
        )


class BackendError(TunnelError):
    """The backend could not be reached or answered wrongly. The client's body says only
    ``public_text``; which backend and which socket error stay in the log."""

    status = 502
    reason = "Bad Gateway"
    public_text = "the service behind this address is unavailable; try again later"

    @property
    def public(self) -> str:
        return self.public_text


class NoHealthyBackend(BackendError):
    status = 503
    reason = "Service Unavailable"


class BackendUnreachable(BackendError):
    status = 502
    reason = "Bad Gateway"


class BackendTimeout(BackendError):
    status = 504
    reason = "Gateway Timeout"
    public_text = "the service behind this address did not answer in time; try again later"


class BadBackendResponse(BackendError):
    status = 502
    reason = "Bad Gateway"
    public_text = "the service behind this address gave an invalid answer to the upgrade"


class ConfigError(TunnelError):
    """A configuration value is wrong; ``key`` is its dotted path, like ``routes[0].backends``."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem

    def __str__(self) -> str:
        return self.message
