"""``POST /v1/chat/completions``."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import ValidationError

from services.api.auth import check_client
from services.api.chat import service
from services.api.chat.protocol import ChatCompletionRequest
from services.api.errors import openai_responses, validation_error

router = APIRouter(tags=["chat"])


@router.post(
    "/v1/chat/completions",
    dependencies=[Depends(check_client)],
    responses=openai_responses(400, 401, 404, 502, 503),
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
        "schema": ChatCompletionRequest.model_json_schema()}}}},
    summary="OpenAI chat completions: model = an expert's name, or 'coe' to route",
)
async def chat_completions(request: Request) -> Response:
    # Parsed here rather than by FastAPI: one pass from bytes, and errors name the exact param.
    try:
        body = ChatCompletionRequest.model_validate_json(await request.body())
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None
    return await service.create(request, body)
