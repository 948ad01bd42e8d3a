"""``POST /v1/route``: the routing decision for a chat-completions body, without calling any expert."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Request

from coe.runtime import ChatCompletionRequest
from routers import RouteRequest
from routers.decisions import record
from services.api.auth import check_client
from services.api.errors import json_body, openai_responses, parse_body
from services.api.state import runtime_of

router = APIRouter(tags=["route"])


@router.post("/v1/route", dependencies=[Depends(check_client)], responses=openai_responses(400, 401, 503),
             openapi_extra=json_body(ChatCompletionRequest),
             summary="Which experts would answer this chat request, and why (no expert is called)")
async def route(request: Request) -> dict[str, Any]:
    body = await parse_body(request, ChatCompletionRequest)
    registry = runtime_of(request.app).registry.current
    started = time.perf_counter()
    route_request = RouteRequest(messages=[m.model_dump(exclude_unset=True) for m in body.messages],
                                 session=body.user or request.headers.get("x-coe-session"),
                                 request_id=request.state.request_id)
    decision = await registry.router.route(route_request, list(registry.experts.values()))
    return record(request.state.request_id, decision, (time.perf_counter() - started) * 1000)
