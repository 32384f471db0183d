"""A small WebSocket echo backend to put behind the tunnel.

    pip install websockets
    python examples/echo_backend.py --port 9000
    tunnel run --listen 127.0.0.1:8080 --backend 127.0.0.1:9000

It prints the headers the tunnel forwarded (X-Forwarded-For, X-Real-IP, ...) for each
connection, then echoes every message.
"""

from __future__ import annotations

import argparse
import asyncio

from websockets.asyncio.server import ServerConnection, serve


async def echo(connection: ServerConnection) -> None:
    request = connection.request
    if request is not None:
        forwarded = {k: v for k, v in request.headers.raw_items() if k.lower().startswith("x-")}
        print(f"connection from {connection.remote_address} path={request.path} {forwarded}")
    async for message in connection:
        await connection.send(message)


async def main(host: str, port: int) -> None:
    async with serve(echo, host, port, max_size=None) as server:
        print(f"echo backend on ws://{host}:{port}/")
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    options = parser.parse_args()
    asyncio.run(main(options.host, options.port))
