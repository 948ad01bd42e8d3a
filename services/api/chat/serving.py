"""``POST /v1/chat/completions`` over HTTP, built once per server: the runtime's chat paths
(``coe.runtime.chat``) plus what only HTTP has (client disconnects, SSE, headers, the access log).

``model`` = an expert: that expert answers, bypassing the pipeline. ``model="coe"``:
everything before the final stage completes first; then the final stage is
returned whole or streamed token by token; a final answer that is already text
(a vote, a consensus, the best answer) streams as one content chunk. Every
response carries the ``coe`` field and an ``x-coe-experts`` header.
"""

from __future__ import annotations

import time

import orjson
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from coe.config import ROUTED_MODEL
from coe.errors import CoeError
from coe.pipeline.response import answered, completion, text_chunks
from coe.runtime import ChatCompletionRequest, Runtime, Streamed
from services.api.chat.streaming import ClientDisconnected, done, log, sse, text_sse, until_disconnect

SSE_HEADERS = {"cache-control": "no-cache"}


class ChatServing:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.paths = runtime.chat

    async def create(self, request: Request, body: ChatCompletionRequest) -> Response:
        route = "routed" if body.model == ROUTED_MODEL else "direct"
        request_id: str = request.state.request_id
        started = time.perf_counter()
        self.runtime.enter()
        self.runtime.metrics.in_flight.inc()
        handed_over = False  # a streaming response finishes the bookkeeping itself
        status, expert = 500, ""
        try:
            if route == "routed":
                response, expert = await self._composed(request, body, request_id, started)
            else:
                response, expert = await self._direct(request, body, request_id, started)
            handed_over, status = isinstance(response, StreamingResponse), 200
            return response
        except ClientDisconnected:
            status = 499
            log.info("client disconnected; the upstream calls were cancelled")
            return Response(status_code=499)
        except CoeError as exc:
            status = exc.status
            raise
        finally:
            if not handed_over:
                done(self.runtime, route, status, started, stream=False, expert=expert)

    def _stream(self, streamed: Streamed, body: ChatCompletionRequest, route: str, started: float,
                request_id: str) -> StreamingResponse:
        return StreamingResponse(sse(self.runtime, streamed, _client_usage(body), route, started, request_id),
                                 media_type="text/event-stream",
                                 headers={"x-coe-experts": streamed.experts, **SSE_HEADERS})

    async def _direct(self, request: Request, body: ChatCompletionRequest, request_id: str,
                      started: float) -> tuple[Response, str]:
        if body.stream:
            streamed = await until_disconnect(request, self.paths.open_direct(body, request_id))
            return self._stream(streamed, body, "direct", started, request_id), streamed.opened.expert.name
        result = await until_disconnect(request, self.paths.direct(body, request_id))
        return Response(orjson.dumps(result), media_type="application/json",
                        headers={"x-coe-experts": result["model"]}), result["model"]

    async def _composed(self, request: Request, body: ChatCompletionRequest, request_id: str,
                        started: float) -> tuple[Response, str]:
        session = body.user or request.headers.get("x-coe-session")
        composed = await until_disconnect(request, self.paths.compose(body, request_id, session=session))
        if body.stream:
            streamed = await until_disconnect(request, self.paths.open_final(composed, request_id))
            if streamed is not None:
                return self._stream(streamed, body, "routed", started, request_id), streamed.opened.expert.name
        run = composed.run
        names = answered(run.get("calls", []))
        by = run.get("answered_by") or ""
        if body.stream:
            self.paths.finished(composed, request_id, stream=True)
            chunks = list(text_chunks(run, request_id, _client_usage(body)))
            return StreamingResponse(text_sse(self.runtime, chunks, "routed", started, by),
                                     media_type="text/event-stream",
                                     headers={"x-coe-experts": names, **SSE_HEADERS}), by
        response = completion(run, request_id)
        self.paths.finished(composed, request_id, field=response["coe"])
        return Response(orjson.dumps(response), media_type="application/json",
                        headers={"x-coe-experts": names or by}), by


def _client_usage(body: ChatCompletionRequest) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)
