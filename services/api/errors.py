"""Map every error to an OpenAI error object at the HTTP boundary; no stack trace reaches a client."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from coe.errors import CoeError, PayloadTooLarge, from_validation

log = logging.getLogger("coe.api")

ERROR_SCHEMA: dict[str, Any] = {
    "description": "An OpenAI error object",
    "content": {"application/json": {"example": {"error": {
        "message": "...", "type": "invalid_request_error", "param": None, "code": None}}}},
}


def openai_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses an endpoint can return."""
    return {s: ERROR_SCHEMA for s in statuses}


M = TypeVar("M", bound=BaseModel)


LARGE_BODY = 256 * 1024
"""Bodies above this are validated in a worker thread, so one big request does not stall the loop."""


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The raw body, refused with 413 as soon as it passes ``max_bytes``: by its declared length before
    anything is read, else while it streams in (a chunked body is never held whole)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(int(declared), max_bytes)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(size, max_bytes, at_least=True)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int, *, at_least: bool = False) -> PayloadTooLarge:
    return PayloadTooLarge(f"the request body has {'more than ' if at_least else ''}{size} bytes; the limit is "
                           f"{limit} (limits.max_body_bytes)")


async def parse_body(request: Request, model: type[M]) -> M:
    """Validate the raw body in one pass (bytes to model); errors name the exact ``param``."""
    state = getattr(request.app.state, "coe", None)
    limit = state.runtime.registry.current.config.limits.max_body_bytes if state is not None else 8 * 1024 * 1024
    raw = await read_body(request, limit)
    try:
        if len(raw) > LARGE_BODY:
            return await asyncio.to_thread(model.model_validate_json, raw)
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise from_validation(exc.errors()) from None


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` declaring ``model`` as the request body (for endpoints that parse it themselves)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": model.model_json_schema()}}}}


def error_response(exc: CoeError) -> JSONResponse:
    return JSONResponse(exc.to_openai(), status_code=exc.status, headers=exc.headers())


def install(app: FastAPI) -> None:
    @app.exception_handler(CoeError)
    async def _coe(request: Request, exc: CoeError) -> Response:
        if exc.status >= 500:
            log.warning("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        return error_response(from_validation(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        types = {404: "not_found_error", 405: "invalid_request_error"}
        body = {"error": {"message": str(exc.detail), "type": types.get(exc.status_code, "invalid_request_error"),
                          "param": None, "code": None}}
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": {"message": "internal error; see the server log",
                                       "type": "internal_error", "param": None, "code": None}}, status_code=500)
