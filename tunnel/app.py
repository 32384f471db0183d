"""The composition root: build the handler from a config, open the listeners, serve."""

from __future__ import annotations

import logging

import trio

from tunnel.config import Config
from tunnel.errors import ConfigError
from tunnel.logs import LOGGER_NAME, fields
from tunnel.net.engine import Engine, splice_available
from tunnel.net.handler import Handler
from tunnel.net.listener import accept_loop, bound_address, open_listeners

log = logging.getLogger(LOGGER_NAME)


async def serve(
    config: Config,
    *,
    reuse_port: bool = False,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``config`` until cancelled.

    With ``nursery.start(serve, config)`` the caller gets the bound listeners back once they
    accept connections (port 0 is resolved in ``listener.socket.getsockname()``).
    ``reuse_port`` lets several processes listen on the same ports (the workers of
    ``tunnel.supervisor.run_workers``); see ``open_listeners``.

    This is one process, whatever ``server.workers`` says: ``run_workers(config)`` is the
    entry point that starts a supervisor and that many processes.
    """
    server = config.server
    if server.relay == "splice" and not splice_available():
        raise ConfigError("server.relay", "splice(2) is not available here; use auto or copy")
    listeners = await open_listeners(config.listeners, reuse_port=reuse_port)
    try:
        # Made once the ports are bound: its epoll descriptor lives until engine.run ends.
        engine = Engine(
            relay=server.relay,
            splice_pipes=server.splice_pipes,
            idle_timeout=server.idle_timeout,
        )
        handler = Handler(config, engine=engine)
        async with trio.open_nursery() as connections:
            await connections.start(engine.run)
            for listener in listeners:
                log.info(
                    "listening",
                    extra=fields(
                        address=bound_address(listener),
                        routes=",".join(route.name for route in config.routes),
                    ),
                )
                connections.start_soon(accept_loop, listener, handler, connections)
            task_status.started(listeners)
    finally:
        with trio.CancelScope(shield=True):
            for listener in listeners:
                await listener.aclose()
