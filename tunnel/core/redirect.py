"""``redirect_https``: what a plain listener answers when the site is served over TLS."""

from __future__ import annotations

from urllib.parse import urlsplit

import h11

from tunnel.core import headers
from tunnel.errors import HandshakeError, PermanentRedirect, TunnelError, UpgradeRequired

HTTPS_PORT = 443


def https_redirect(request: h11.Request, https_port: int = HTTPS_PORT) -> TunnelError:
    """The answer to ``request`` on a listener that sends everyone to HTTPS.

    A plain request (any method) gets ``PermanentRedirect`` (308, which keeps the method and
    body) to the same host and target over ``https://``; an upgrade request gets
    ``UpgradeRequired`` (426) naming the ``wss://`` URL, since WebSocket clients do not follow
    redirects. ``https_port`` 443 is left out of the URL.

    Raises nothing; returns ``HandshakeError`` (400) when the request names no host (HTTP/1.0
    without ``Host``), as there is nowhere to send it, or a host that is not one
    (``headers.parse_host``), which must not end up in a ``Location``.
    Not checked: anything else about the request; it is never forwarded.
    """
    raw = list(request.headers)
    target = request.target.decode("latin-1")
    host_values = headers.values(raw, b"host")
    authority = host_values[0].decode("latin-1") if host_values else ""
    if "://" in target:
        # An absolute-form target names the host itself, and Host is then ignored
        # (RFC 9112, section 3.2.2).
        try:
            parts = urlsplit(target)
        except ValueError:
            return HandshakeError(f"request target {target!r} is not a valid URL")
        authority = parts.netloc
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    elif not target.startswith("/"):
        target = "/"  # asterisk or authority form: the site's root is the nearest page
    try:
        hostname = headers.parse_host(authority)[0] if authority else ""
    except HandshakeError as error:
        return error
    if not hostname:
        return HandshakeError("the request names no Host, so it cannot be redirected to HTTPS")
    authority = f"[{hostname}]" if ":" in hostname else hostname
    if https_port != HTTPS_PORT:
        authority += f":{https_port}"
    offered = headers.tokens(raw, b"upgrade")
    if offered and "upgrade" in headers.tokens(raw, b"connection"):
        url = f"wss://{authority}{target}"
        return UpgradeRequired(
            f"this address accepts only TLS; connect to {url}", headers=[("Location", url)]
        )
    return PermanentRedirect(f"https://{authority}{target}")
