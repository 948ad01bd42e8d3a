"""The one exception tree of coe.

Every error coe raises on purpose is a ``CoeError``; the API renders each as an
OpenAI error object ``{"error": {"message", "type", "param", "code"}}`` with the
class's HTTP status, and the CLI prints its message and exits non-zero. Library
errors (httpx, pydantic, yaml, redis) are mapped to these at the boundary with
``raise ... from`` so a client never sees a stack trace.

    CoeError                         500 internal_error
    ├── ConfigError                  500 a registry file is invalid (file:line: field: message)
    ├── InvalidRequest               400 invalid_request_error (param names the field)
    │   ├── PayloadTooLarge          413 code=payload_too_large (a body or file over its limit)
    │   └── TrainError               400 code=invalid_training_input (coe.models.train; nothing written)
    ├── Unauthorized                 401 authentication_error
    ├── Forbidden                    403 permission_error
    ├── NotFound                     404 not_found_error
    │   └── ModelNotFound            404 code=model_not_found
    ├── Conflict                     409 conflict
    ├── BackendUnavailable           503 service_unavailable (Retry-After)
    ├── UpstreamError                502 an expert's server answered with an error
    ├── UpstreamTimeout              504 an expert took longer than its backend's timeouts.total_s
    └── StoreError                   500 the state store failed
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


class CoeError(Exception):
    status: int = 500
    type: str = "internal_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI error object clients (and the openai SDK) expect."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {}


class ConfigError(CoeError):
    """A registry file is invalid; ``errors`` holds every problem found, one line each."""

    type = "config_error"

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


class InvalidRequest(CoeError):
    status = 400
    type = "invalid_request_error"


class PayloadTooLarge(InvalidRequest):
    status = 413
    code = "payload_too_large"


class Unauthorized(CoeError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(CoeError):
    status = 403
    type = "permission_error"


class NotFound(CoeError):
    status = 404
    type = "not_found_error"


class ModelNotFound(NotFound):
    type = "invalid_request_error"
    code = "model_not_found"


class Conflict(CoeError):
    status = 409
    type = "conflict_error"
    code = "conflict"


class BackendUnavailable(CoeError):
    """No expert could be reached; the client should retry after ``retry_after`` seconds."""

    status = 503
    type = "service_unavailable"
    code = "backend_unavailable"

    def __init__(self, message: str, *, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class RateLimited(CoeError):
    """A virtual key is over one of its limits (requests, tokens per minute, budget): 429 with
    ``Retry-After`` (when the limit frees up by itself) and OpenAI's ``x-ratelimit-*`` headers."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: float | None, limit_headers: Mapping[str, str],
                 code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after
        self.limit_headers = dict(limit_headers)

    def headers(self) -> dict[str, str]:
        out = dict(self.limit_headers)
        if self.retry_after is not None:
            out["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return out


class UpstreamError(CoeError):
    """An expert's server rejected the request (4xx) or failed after it began answering."""

    status = 502
    type = "upstream_error"

    def __init__(self, message: str, *, status: int = 502, param: str | None = None,
                 code: str | None = None, type: str | None = None) -> None:
        super().__init__(message, param=param, code=code)
        self.status = status
        if type is not None:
            self.type = type


class UpstreamTimeout(CoeError):
    """The expert did not finish within ``timeouts.total_s``; not retried (the work was too long, not lost)."""

    status = 504
    type = "timeout_error"
    code = "upstream_timeout"


class StoreError(CoeError):
    type = "store_error"


def clip(value: object, limit: int = 120) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters: a client-sent id of 10k characters
    is not echoed back whole."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def format_param(loc: Sequence[Any]) -> str:
    """A pydantic error location as the OpenAI ``param``: ``("body", "messages", 0, "role")`` ->
    ``messages[0].role``."""
    out = ""
    for p in (p for p in loc if p != "body"):
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def from_validation(errors: Sequence[Mapping[str, Any]]) -> InvalidRequest:
    """pydantic's error list (``ValidationError.errors()``) as one ``InvalidRequest`` naming the first
    problem's ``param``: the same message for a request body, a batch line or an API registration."""
    first = errors[0]
    param = format_param(tuple(first.get("loc", ()))) or str((first.get("ctx") or {}).get("param") or "")
    msg = first.get("msg", "invalid value")
    if first.get("type") == "json_invalid":
        return InvalidRequest(f"the request body is not valid JSON: {first.get('ctx', {}).get('error', msg)}")
    if first.get("type") == "missing":
        msg = "this field is required"
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return InvalidRequest(f"{param}: {msg}{more}" if param else f"{msg}{more}", param=param or None)
