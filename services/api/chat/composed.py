"""``model="coe"``: the composition pipeline answers (``coe.pipeline``).

Everything before the final stage completes first; then the final stage (the
aggregator, or the single expert when k = 1) is returned whole or streamed
token by token. A final answer that is already text (a vote, a consensus, the
best answer) streams as one content chunk. ``usage`` sums every call the request
made; ``coe`` carries the trace.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any, cast

import orjson
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from coe import usage as usage_mod
from coe.aggregate import FinalCall
from coe.dispatch import ExpertCall
from coe.errors import CoeError, InvalidRequest
from coe.pipeline import CallRecord, ChatCaller, Options, State
from coe.pipeline.nodes import degrade
from coe.pipeline.response import answered, calls_of, coe_field, completion, log_run, text_chunks
from coe.registry import Registry
from services.api.app import AppState, state_of
from services.api.chat.protocol import ChatCompletionRequest
from services.api.chat.service import ClientDisconnected, done, event, log, sse, until_disconnect

ROUTE = "routed"


def options(body: ChatCompletionRequest, registry: Registry) -> Options:
    """The request's ``coe`` options checked against the registry; a clear 400 otherwise."""
    bad = body.routed_unsupported()
    if bad:
        raise InvalidRequest(f"model='coe' composes several experts' answers and cannot honour {', '.join(bad)}; "
                             "name one expert as the model to use them", param=bad[0])
    opts = body.coe
    if opts is None:
        return Options()
    if opts.experts:
        unknown = [n for n in opts.experts if registry.expert(n) is None]
        if unknown:
            raise InvalidRequest(f"unknown experts: {', '.join(unknown)}", param="coe.experts")
    max_k = registry.config.pipeline.max_k
    if opts.k is not None and opts.k > max_k:
        raise InvalidRequest(f"coe.k ({opts.k}) exceeds pipeline.max_k ({max_k})", param="coe.k")
    return Options(k=opts.k, experts=list(dict.fromkeys(opts.experts)) if opts.experts else None,
                   strategy=opts.strategy, rag=opts.rag)


async def run_pipeline(state: AppState, registry: Registry, body: ChatCompletionRequest, request_id: str,
                       session: str | None, staged: ChatCaller | None = None) -> tuple[State, dict[str, Any]]:
    """The graph's run for one request (the final stage left open when it streams), and the sampling
    parameters every call of it used. ``staged``: a batch's stager (``coe.batch.stages``) that holds
    the expert calls for their wave; the run's time deadlines are then off (``Context.staged``)."""
    opts = options(body, registry)
    params = body.upstream()
    messages = params.pop("messages")
    for key in ("model", "stream", "stream_options"):
        params.pop(key, None)
    ctx = state.pipeline.context(registry, metrics=state.metrics, messages=messages, params=params,
                                 request_id=request_id, options=opts, session=session, stream=body.stream,
                                 dispatcher=staged, staged=staged is not None)
    return await state.pipeline.run(ctx), params


async def create(request: Request, body: ChatCompletionRequest) -> Response:
    state = state_of(request.app)
    request_id: str = request.state.request_id
    started = time.perf_counter()
    state.enter()
    state.metrics.in_flight.inc()
    handed_over = False  # a streaming response finishes the bookkeeping itself
    status = 500
    answered_by = ""
    try:
        registry = state.registry.current
        session = body.user or request.headers.get("x-coe-session")
        run, params = await until_disconnect(request, run_pipeline(state, registry, body, request_id, session))
        if body.stream:
            client_usage = bool(body.stream_options and body.stream_options.include_usage)
            response = await _stream(request, state, registry, run, params, request_id, client_usage, started)
            handed_over, status = True, 200
            return response
        log_run(run, request_id)
        result = completion(run, request_id)
        status, answered_by = 200, run.get("answered_by") or ""
        return Response(orjson.dumps(result), media_type="application/json",
                        headers={"x-coe-experts": answered(run.get("calls", [])) or answered_by})
    except ClientDisconnected:
        status = 499
        log.info("client disconnected; the pipeline and its expert calls were cancelled")
        return Response(status_code=499)
    except CoeError as exc:
        status = exc.status
        raise
    finally:
        if not handed_over:
            done(state, ROUTE, status, started, stream=False, expert=answered_by)


async def _stream(request: Request, state: AppState, registry: Registry, run: State, params: dict[str, Any],
                  request_id: str, client_usage: bool, started: float) -> Response:
    final = run["final"]
    if isinstance(final, FinalCall):
        experts = [e for e in (registry.expert(n) for n in final.experts) if e is not None]
        body = {**params, **final.params, "messages": final.messages}
        try:
            opened = await until_disconnect(
                request, state.dispatcher.open_stream(experts, body, request_id=request_id))
        except CoeError as exc:
            if not run.get("answers"):
                raise
            update = degrade(run, final, exc)  # the aggregator is down: the experts' vote, not an error
            run = cast(State, {**run, **update, "calls": [*run.get("calls", []), *update["calls"]],
                               "trace": [*run.get("trace", []), *update["trace"]]})
        else:
            role = "aggregator" if run.get("answers") else "final"

            def finish(call: ExpertCall) -> tuple[dict[str, Any], dict[str, Any] | None]:
                record = CallRecord(call.name, role, max(run.get("round", 0), 1), "ok", call.usage, call.cost,
                                    call.latency_ms)
                step = {"step": "answer", "expert": call.name, "role": role, "streamed": True,
                        **({"skipped": call.skipped} if call.skipped else {})}
                finished: State = {**run, "answered_by": call.name, "trace": [*run.get("trace", []), step]}
                log_run(finished, request_id, [record])
                return coe_field(finished, request_id, [record]), usage_mod.add(
                    c.usage for c in calls_of(finished, [record]))

            names = answered(run.get("calls", []))
            return StreamingResponse(
                sse(state, opened, finish, client_usage, ROUTE, started, request_id), media_type="text/event-stream",
                headers={"x-coe-experts": ",".join(filter(None, [names, opened.expert.name])),
                         "cache-control": "no-cache"})
    log_run(run, request_id)
    return StreamingResponse(_text_sse(state, run, request_id, client_usage, started),
                             media_type="text/event-stream",
                             headers={"x-coe-experts": answered(run.get("calls", [])), "cache-control": "no-cache"})


async def _text_sse(state: AppState, run: State, request_id: str, client_usage: bool,
                    started: float) -> AsyncIterator[bytes]:
    status = 200
    try:
        for chunk in text_chunks(run, request_id, client_usage):
            yield event(chunk)
        yield b"data: [DONE]\n\n"
    except BaseException:
        status = 499
        raise
    finally:
        done(state, ROUTE, status, started, stream=True, expert=run.get("answered_by") or "")
