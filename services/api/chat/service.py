"""Chat completions: pick the experts, call them through the dispatcher, answer in
OpenAI's exact shape plus coe's ``coe`` field (who answered, usage, cost, why).

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
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import orjson
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from coe import usage as usage_mod
from coe.config import ROUTED_MODEL, ExpertConfig
from coe.dispatch import ExpertCall, OpenedStream
from coe.errors import CoeError, InvalidRequest, ModelNotFound
from routers.base import ExpertChoice, RoutingDecision
from services.api.app import AppState, state_of
from services.api.chat.protocol import ChatCompletionRequest

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


def coe_field(decision: RoutingDecision, calls: list[ExpertCall], request_id: str) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "decision": decision.model_dump(mode="json"),
        "experts": [c.to_json() for c in calls],
        "usage": usage_mod.add(c.usage for c in calls),
        "cost": usage_mod.total_cost(c.cost for c in calls),
    }


def direct(state: AppState, body: ChatCompletionRequest) -> tuple[ExpertConfig, RoutingDecision]:
    expert = state.registry.current.expert(body.model)
    if expert is None:
        raise ModelNotFound(f"The model '{body.model}' does not exist: use 'coe' or an expert from /v1/models",
                            param="model")
    if body.coe is not None:
        raise InvalidRequest("the 'coe' options apply to model='coe' only; this request names one expert",
                             param="coe")
    decision = RoutingDecision(router="direct", experts=[ExpertChoice(name=expert.name, score=1.0)],
                               confidence=1.0, reason="the request named this expert")
    return expert, decision


async def create(request: Request, body: ChatCompletionRequest) -> Response:
    """``model`` = an expert: that expert answers, bypassing the pipeline; ``model="coe"``: the pipeline."""
    if body.model == ROUTED_MODEL:
        from services.api.chat import composed

        return await composed.create(request, body)
    state = state_of(request.app)
    request_id: str = request.state.request_id
    started = time.perf_counter()
    state.enter()
    state.metrics.in_flight.inc()
    streaming = False
    status = 500
    answered = ""
    try:
        expert, decision = direct(state, body)
        upstream = body.upstream()
        if body.stream:
            opened = await until_disconnect(
                request, state.dispatcher.open_stream([expert], upstream, request_id=request_id))
            streaming = True
            status = 200
            client_usage = bool(body.stream_options and body.stream_options.include_usage)

            def finish(call: ExpertCall) -> tuple[dict[str, Any], dict[str, Any] | None]:
                return coe_field(decision, [call], request_id), None  # the server's own usage, as sent

            return StreamingResponse(
                sse(state, opened, finish, client_usage, "direct", started, request_id),
                media_type="text/event-stream",
                headers={"x-coe-experts": opened.expert.name, "cache-control": "no-cache"},
            )
        result, expert, call = await until_disconnect(
            request, state.dispatcher.chat([expert], upstream, request_id=request_id))
        result["model"] = expert.name
        result["coe"] = coe_field(decision, [call], request_id)
        status = 200
        answered = expert.name
        return Response(orjson.dumps(result), media_type="application/json",
                        headers={"x-coe-experts": expert.name})
    except ClientDisconnected:
        status = 499
        log.info("client disconnected; upstream request cancelled")
        return Response(status_code=499)
    except CoeError as exc:
        status = exc.status
        raise
    finally:
        if not streaming:
            done(state, "direct", status, started, stream=False, expert=answered)


def done(state: AppState, route: str, status: int, started: float, *, stream: bool, expert: str) -> None:
    """Count the request and write its one access-log line (the request id is on it via coe.logs)."""
    elapsed = time.perf_counter() - started
    state.metrics.requests.labels(route, str(status)).inc()
    state.metrics.request_latency.labels(route, str(stream).lower()).observe(elapsed)
    log.info("chat %s%s -> %d in %.1f ms%s", route, " stream" if stream else "", status, elapsed * 1000,
             f" by {expert}" if expert else "")
    state.metrics.in_flight.dec()
    state.leave()


def event(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


Finish = Callable[[ExpertCall], tuple[dict[str, Any], "dict[str, Any] | None"]]
"""Given the streamed call (usage known): the ``coe`` field, and the usage the client is told
(None: the server's own)."""


async def sse(state: AppState, opened: OpenedStream, finish: Finish, client_usage: bool, route: str,
              started: float, request_id: str) -> AsyncIterator[bytes]:
    name = opened.expert.name
    held: list[dict[str, Any]] = []
    usage: dict[str, Any] | None = None
    last: dict[str, Any] = {}
    first = True
    status = 200
    try:
        async for chunk in opened.chunks:
            if first:
                state.metrics.ttft.labels(route).observe(time.perf_counter() - started)
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
        call = opened.finish(usage, state.metrics)
        trace, total = finish(call)
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
        done(state, route, status, started, stream=True, expert=name)
