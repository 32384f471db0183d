"""tunnel: an edge proxy for HTTP/1.1 Upgrade connections (WebSockets first), built on trio.

Embed it with ``from tunnel import Config, serve`` and ``await nursery.start(serve, config)``.
"""

from tunnel._version import __version__
from tunnel.app import serve
from tunnel.config import Config
from tunnel.errors import ConfigError, TunnelError

__all__ = ["Config", "ConfigError", "TunnelError", "__version__", "serve"]
