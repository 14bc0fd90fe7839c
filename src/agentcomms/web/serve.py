"""Serving the dashboard with uvicorn in this event loop, stopped by SIGINT or SIGTERM, then cleaning up.

uvicorn handles those signals itself and, once stopped, raises them again with the
handler it found: a program that has more to close afterwards (the demo's agents and
Redis) installs its own handler first, so that the raised signal only says "stop".
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from types import FrameType

from fastapi import FastAPI

__all__ = ["serve"]


async def serve(app: FastAPI, host: str, port: int, on_ready: Callable[[int], None]) -> None:
    """Serve ``app`` on ``host``:``port`` (0: a free port) until SIGINT or SIGTERM; ``on_ready(port)`` once listening.

    Raises:
        OSError: the address cannot be used (the port is taken ...).
    """
    import uvicorn

    def noted(signum: int, frame: FrameType | None) -> None:
        """What uvicorn's re-raised signal reaches: nothing more to do, the caller cleans up."""

    previous = {sig: signal.signal(sig, noted) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
        serving = asyncio.create_task(server.serve())
        while not server.started and not serving.done():
            await asyncio.sleep(0.05)  # uvicorn has no "started" event to wait on
        if server.started and server.servers:
            on_ready(server.servers[0].sockets[0].getsockname()[1])
        await serving
        if not server.started:
            raise OSError(f"the dashboard could not listen on {host}:{port}")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
