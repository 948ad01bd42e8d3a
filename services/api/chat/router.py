"""``POST /v1/chat/completions``."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from coe.errors import CoeError
from coe.runtime import ChatCompletionRequest
from services.api.auth import check_client
from services.api.errors import json_body, openai_responses, parse_body
from services.api.keys.enforce import with_key_limits
from services.api.state import state_of

router = APIRouter(tags=["chat"])


@router.post(
    "/v1/chat/completions",
    dependencies=[Depends(check_client)],
    responses=openai_responses(400, 401, 404, 429, 502, 503),
    openapi_extra=json_body(ChatCompletionRequest),
    summary="OpenAI chat completions: model = an expert's name, or 'coe' to route",
)
async def chat_completions(request: Request) -> Response:
    # Parsed here rather than by FastAPI: one pass from bytes, and errors name the exact param.
    state = state_of(request.app)
    try:
        body = await parse_body(request, ChatCompletionRequest)
    except CoeError as exc:  # counted too, so dashboards see refused requests (route "rejected")
        state.runtime.metrics.requests.labels("rejected", str(exc.status)).inc()
        raise
    return await with_key_limits(request, body, lambda: state.chat.create(request, body))
