"""Run an ASGI app on a real loopback port inside the current event loop.

Tests and benchmarks talk to coe over real HTTP with the real ``openai`` SDK;
running uvicorn in-loop keeps that real while letting a test look inside the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import uvicorn


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class _QuietServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Any:  # leave signal handling to the test runner
        yield


@contextlib.asynccontextmanager
async def serve_app(app: Any, *, host: str = "127.0.0.1", port: int | None = None,
                    startup_timeout_s: float = 120.0, **config: Any) -> AsyncIterator[str]:
    """Yield the base URL (``http://host:port``) while ``app`` serves; shut it down after."""
    port = port or free_port(host)
    server = _QuietServer(uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                                         lifespan="on", **config))
    task = asyncio.create_task(server.serve())
    try:
        deadline = asyncio.get_running_loop().time() + startup_timeout_s
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("server exited during start-up")
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError("server did not start")
            await asyncio.sleep(0.02)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 60)
