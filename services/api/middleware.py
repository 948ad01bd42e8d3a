"""ASGI middleware of the API server: the request id, and the request's server span."""

from __future__ import annotations

import re
import uuid
from typing import Any

from opentelemetry.trace import Status, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coe.logs import request_id_var
from coe.telemetry import OFF, SpanKind, Telemetry, extract

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")


class RequestIdMiddleware:
    """Give every request an id (the client's ``x-request-id`` when sane, else a new one),
    echo it in the response, and put it on every log line of the request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = ""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                rid = value.decode("latin-1")
                break
        if not _REQUEST_ID.match(rid):
            rid = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        raw = rid.encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", raw)]
            await send(message)

        token = request_id_var.set(rid)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


def _telemetry(scope: Scope) -> Telemetry:
    """The runtime's telemetry (``OFF`` while the app is starting, before the lifespan opened it)."""
    app: Any = scope.get("app")
    state = getattr(getattr(app, "state", None), "coe", None)
    return state.runtime.telemetry if state is not None else OFF


class TracingMiddleware:
    """One SERVER span per HTTP request, continuing the client's ``traceparent`` when it sends one; the
    spans of the request's work (pipeline steps, expert calls) nest under it, and it lasts until a
    streamed body is sent whole. Inside ``RequestIdMiddleware``, so the request id is known. With
    tracing off, or for an excluded path (health probes, metrics scrapes), the request passes through."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        telemetry = _telemetry(scope)
        path: str = scope["path"]
        if not telemetry.enabled or telemetry.excluded(path):
            await self.app(scope, receive, send)
            return
        method: str = scope["method"]
        span = telemetry.start(method, kind=SpanKind.SERVER, parent=extract(scope["headers"]), attributes={
            "http.request.method": method, "url.path": path, "url.scheme": scope.get("scheme", "http"),
            "coe.request_id": scope.get("state", {}).get("request_id", "")})

        async def send_traced(message: Message) -> None:
            if message["type"] == "http.response.start":
                status = int(message["status"])
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_attribute("error.type", str(status))
                    span.set_status(Status(StatusCode.ERROR))
            await send(message)

        try:
            with telemetry.use(span):  # an exception fails the span (the 500 is written further out)
                await self.app(scope, receive, send_traced)
        finally:
            route = getattr(scope.get("route"), "path", None)  # the matched template, e.g. /v1/files/{file_id}
            if route:
                span.set_attribute("http.route", route)
                span.update_name(f"{method} {route}")
            span.end()
