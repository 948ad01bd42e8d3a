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

from coe.errors import CoeError, InvalidRequest, PayloadTooLarge, from_validation

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


def once(*names: str) -> Any:
    """A dependency that refuses a query parameter given more than once (``?limit=1&limit=2``): 400 naming
    it, rather than silently taking the last."""
    async def check(request: Request) -> None:
        for name in names:
            if len(request.query_params.getlist(name)) > 1:
                raise InvalidRequest(f"{name}: given more than once", param=name)

    return check


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` declaring ``model`` as the request body (for endpoints that parse it themselves).
    Its ``$defs`` are inlined: a ``#/$defs/...`` reference does not resolve inside the OpenAPI document."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline({**defs[ref.removeprefix("#/$defs/")], **{k: v for k, v in node.items() if k != "$ref"}})
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


def openapi_400_not_422(app: FastAPI) -> None:
    """Validation errors answer 400 (OpenAI's status, through ``install``); FastAPI documents 422 for every
    operation with parameters. Make the schema say what the server does."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    responses = operation.get("responses", {}) if isinstance(operation, dict) else {}
                    if responses.pop("422", None) is not None:
                        responses.setdefault("400", ERROR_SCHEMA)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def error_response(exc: CoeError) -> JSONResponse:
    return JSONResponse(exc.to_openai(), status_code=exc.status, headers=exc.headers())


def allowed_methods(request: Request) -> list[str]:
    """The methods some route of the app serves at the request's path. A path that is a route of its own
    (``/v1/experts/merge``) answers for that route, not for a template it also fits (``/v1/experts/{name}``):
    that is what the OpenAPI schema documents for it."""
    from starlette.routing import Match

    methods: set[str] = set()
    exact: set[str] = set()
    for route in request.app.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        route_methods = getattr(route, "methods", None)
        if match != Match.NONE and route_methods:
            methods |= set(route_methods)
            if not getattr(route, "param_convertors", None):
                exact |= set(route_methods)
    return sorted(exact or methods)


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
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:  # every method the path has, not only those of the first route matched
            headers["Allow"] = ", ".join(allowed_methods(request))
        return JSONResponse(body, status_code=exc.status_code, headers=headers or None)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": {"message": "internal error; see the server log",
                                       "type": "internal_error", "param": None, "code": None}}, status_code=500)
