"""HTTP around an answer: cancel on client disconnect, OpenAI's SSE framing, and the one access-log line.

Streaming keeps OpenAI's framing: content chunks pass through as they arrive
(only ``model`` is rewritten); the chunk carrying ``finish_reason`` is held
until the server's usage arrives (immediately after) so the ``coe`` field can
ride on the last chunk before ``data: [DONE]``. coe always asks the server for
usage, and drops the usage-only chunk when the client did not ask for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import orjson
from fastapi import Request

from coe.errors import CoeError
from coe.runtime import Runtime, Streamed

log = logging.getLogger("coe.chat")

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client went away before the answer was ready; the upstream call was cancelled."""


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` unless the client disconnects first, in which case cancel it
    (closing the upstream connection makes vLLM abort the request)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    raise ClientDisconnected


def done(runtime: Runtime, route: str, status: int, started: float, *, stream: bool, expert: str) -> None:
    """Count the request and write its one access-log line (the request id is on it via coe.logs)."""
    elapsed = time.perf_counter() - started
    runtime.metrics.requests.labels(route, str(status)).inc()
    runtime.metrics.request_latency.labels(route, str(stream).lower()).observe(elapsed)
    log.info("chat %s%s -> %d in %.1f ms%s", route, " stream" if stream else "", status, elapsed * 1000,
             f" by {expert}" if expert else "")
    runtime.metrics.in_flight.dec()
    runtime.leave()


def event(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


async def sse(runtime: Runtime, streamed: Streamed, client_usage: bool, route: str, started: float,
              request_id: str) -> AsyncIterator[bytes]:
    opened = streamed.opened
    name = opened.expert.name
    held: list[dict[str, Any]] = []
    usage: dict[str, Any] | None = None
    last: dict[str, Any] = {}
    first = True
    status = 200
    try:
        async for chunk in opened.chunks:
            if first:
                runtime.metrics.ttft.labels(route).observe(time.perf_counter() - started)
                first = False
            chunk["model"] = name
            last = chunk
            if chunk.get("usage"):
                usage = chunk["usage"]
            if not chunk.get("choices"):
                continue  # the usage-only chunk: re-sent at the end with the coe field
            if not client_usage:
                chunk.pop("usage", None)
            if any(c.get("finish_reason") for c in chunk["choices"]):
                held.append(chunk)
                continue
            yield event(chunk)
        call = opened.finish(usage, runtime.metrics)
        trace, total = streamed.finish(call)
        usage = usage if total is None else total
        for chunk in held[:-1]:
            yield event(chunk)
        if client_usage or not held:
            if held:
                yield event(held[-1])
            yield event({"id": last.get("id", f"chatcmpl-{request_id}"), "object": "chat.completion.chunk",
                          "created": last.get("created", int(time.time())), "model": name, "choices": [],
                          "usage": usage if client_usage else None, "coe": trace})
        else:
            yield event({**held[-1], "coe": trace})
        yield b"data: [DONE]\n\n"
    except asyncio.CancelledError:
        status = 499
        log.info("client disconnected mid-stream; upstream request cancelled")
        raise
    except CoeError as exc:
        status = exc.status if exc.status >= 500 else 502
        log.warning("stream from %s failed after it began: %s", name, exc.message)
        yield event(exc.to_openai())
    except Exception:
        status = 500
        log.exception("stream from %s failed after it began", name)
        yield event({"error": {"message": "internal error while streaming; see the server log",
                                "type": "internal_error", "param": None, "code": None}})
    finally:
        await opened.aclose()
        done(runtime, route, status, started, stream=True, expert=name)


async def text_sse(runtime: Runtime, chunks: list[dict[str, Any]], route: str, started: float,
                   expert: str) -> AsyncIterator[bytes]:
    """An answer that is already text, as SSE events."""
    status = 200
    try:
        for chunk in chunks:
            yield event(chunk)
        yield b"data: [DONE]\n\n"
    except BaseException:
        status = 499
        raise
    finally:
        done(runtime, route, status, started, stream=True, expert=expert)
