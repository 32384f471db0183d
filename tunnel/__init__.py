"""tunnel: an edge proxy for HTTP/1.1 Upgrade connections (WebSockets first), built on trio.

Embed it with ``from tunnel import Config, serve`` and ``await nursery.start(serve, config)``;
``serve_until_signal`` is the same but returns on Ctrl-C or SIGTERM, as ``tunnel run`` stops,
and ``setup_logging()`` prints the log lines ``tunnel run`` prints. ``run_workers(config)``
(blocking, from the main thread) serves with ``server.workers`` processes. Pass
``control=Control()`` to ``serve`` to reload TLS certificates from the caller
(``control.reload_certificates()``), as SIGHUP does for ``tunnel run``.
"""

from tunnel._version import __version__
from tunnel.app import Control, serve, serve_until_signal
from tunnel.config import Config
from tunnel.errors import ConfigError, TunnelError
from tunnel.logs import setup_logging
from tunnel.supervisor import run_workers

__all__ = [
    "Config",
    "ConfigError",
    "Control",
    "TunnelError",
    "__version__",
    "run_workers",
    "serve",
    "serve_until_signal",
    "setup_logging",
]
