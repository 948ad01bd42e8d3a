"""Map every error to an OpenAI error object at the HTTP boundary; no stack trace reaches a client."""

from __future__ import annotations

import logging
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from coe.errors import CoeError, from_validation

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


async def parse_body(request: Request, model: type[M]) -> M:
    """Validate the raw body in one pass (bytes to model); errors name the exact ``param``."""
    try:
        return model.model_validate_json(await request.body())
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
