"""A STUB OpenAI-compatible upstream, for two jobs only: fault injection in tests
(slow, failing, broken-stream, recording cancellations) and measuring coe's own
overhead in ``bench/overhead.py`` (it answers instantly, so what remains is us).
It is not a model and never stands in for vLLM where behaviour matters.

Behaviour per request comes from the ``model`` name's suffixes, so one stub serves
many cases: ``stub``, ``stub+slow`` (waits ``slow_s`` before answering),
``stub+fail`` (HTTP 500), ``stub+break`` (streams two chunks then drops the
connection), ``stub+404``.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


@dataclass
class StubRecord:
    """What the stub saw: requests, and requests whose client went away (cancelled upstream)."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)
    fail_next: int = 0


def _completion(model: str, text: str, prompt_tokens: int) -> dict[str, Any]:
    return {
        "id": "chatcmpl-stub", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                     "logprobs": None}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 4, "total_tokens": prompt_tokens + 4},
    }


def _chunk(model: str, delta: dict[str, Any], finish: str | None = None) -> bytes:
    obj = {"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def create_stub_app(*, slow_s: float = 5.0, tokens: int = 4, token_delay_s: float = 0.0,
                    record: StubRecord | None = None) -> Starlette:
    rec = record if record is not None else StubRecord()

    async def chat(request: Request) -> Response:
        body = await request.json()
        rec.requests.append(body)
        rec.headers.append(dict(request.headers))
        model = str(body.get("model", "stub"))
        rid = request.headers.get("x-request-id", "")
        if rec.fail_next > 0:
            rec.fail_next -= 1
            return JSONResponse({"error": {"message": "injected failure", "type": "InternalServerError",
                                           "param": None, "code": 500}}, status_code=500)
        if model.endswith("+fail"):
            return JSONResponse({"error": {"message": "stub failure", "type": "InternalServerError",
                                           "param": None, "code": 500}}, status_code=500)
        if model.endswith("+404"):
            return JSONResponse({"error": {"message": f"The model `{model}` does not exist.",
                                           "type": "NotFoundError", "param": None, "code": 404}}, status_code=404)
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
        if not body.get("stream"):
            if model.endswith("+slow"):
                # Like vLLM: watch the connection and abort the work when the caller hangs up.
                deadline = time.monotonic() + slow_s
                while time.monotonic() < deadline:
                    if await request.is_disconnected():
                        rec.cancelled.append(rid)
                        return Response(status_code=499)
                    await asyncio.sleep(0.02)
            rec.completed.append(rid)
            return JSONResponse(_completion(model, "stub answer one two", prompt_tokens))

        async def events() -> Any:
            try:
                yield _chunk(model, {"role": "assistant", "content": ""})
                for i in range(tokens):
                    if model.endswith("+slow") and i == 1:
                        await asyncio.sleep(slow_s)
                    elif token_delay_s:
                        await asyncio.sleep(token_delay_s)
                    yield _chunk(model, {"content": f" t{i}"})
                    if model.endswith("+break") and i == 1:
                        raise ConnectionError("stub drops the connection mid-stream")
                yield _chunk(model, {}, "length")
                if (body.get("stream_options") or {}).get("include_usage"):
                    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": tokens,
                             "total_tokens": prompt_tokens + tokens}
                    obj = {"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": int(time.time()),
                           "model": model, "choices": [], "usage": usage}
                    yield b"data: " + json.dumps(obj).encode() + b"\n\n"
                yield b"data: [DONE]\n\n"
                rec.completed.append(rid)
            except asyncio.CancelledError:
                rec.cancelled.append(rid)
                raise

        return StreamingResponse(events(), media_type="text/event-stream")

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "stub", "object": "model", "parent": None}]})

    async def health(request: Request) -> Response:
        return Response(status_code=200)

    async def lora(request: Request) -> Response:
        return Response("Success", status_code=200)

    app = Starlette(routes=[
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/models", models),
        Route("/health", health),
        Route("/v1/load_lora_adapter", lora, methods=["POST"]),
        Route("/v1/unload_lora_adapter", lora, methods=["POST"]),
    ])
    app.state.record = rec
    return app
