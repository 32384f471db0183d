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
    without ``Host``), as there is nowhere to send it.
    Not checked: anything else about the request; it is never forwarded.
    """
    raw = list(request.headers)
    host_values = headers.values(raw, b"host")
    target = request.target.decode("latin-1")
    if not target.startswith("/"):
        parts = urlsplit(target) if "://" in target else None
        host_values = host_values or ([parts.netloc.encode("latin-1")] if parts else [])
        target = (
            ((parts.path or "/") + (f"?{parts.query}" if parts.query else "")) if parts else "/"
        )
    if not host_values or not host_values[0]:
        return HandshakeError("the request names no Host, so it cannot be redirected to HTTPS")
    hostname, _ = headers.split_host(host_values[0].decode("latin-1"))
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
