"""A RECORDING transport for tests: it wraps the real network transport to a real vLLM server, keeps
every chat request coe sent with the answer it got, and can inject faults (delay or fail the
requests for one upstream model). Everything it records really went to vLLM and back."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class Exchange:
    body: dict[str, Any]
    response: dict[str, Any] | None
    """The parsed JSON answer (None for a stream, a failure, or a cancelled request)."""
    headers: dict[str, str] = field(default_factory=dict)
    """The request's headers as sent (``traceparent``, ``x-request-id``)."""


@dataclass
class RecordingTransport(httpx.AsyncBaseTransport):
    inner: httpx.AsyncBaseTransport = field(default_factory=httpx.AsyncHTTPTransport)
    exchanges: list[Exchange] = field(default_factory=list)
    delay_s: dict[str, float] = field(default_factory=dict)
    """Upstream model name -> seconds to wait before forwarding (a slow expert)."""
    fail: set[str] = field(default_factory=set)
    """Upstream model names answered with HTTP 500 without reaching vLLM (a failing expert)."""

    def chats(self) -> list[Exchange]:
        return list(self.exchanges)

    def clear(self) -> None:
        self.exchanges.clear()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not request.url.path.endswith("/chat/completions"):
            return await self.inner.handle_async_request(request)
        body = json.loads(await request.aread())
        exchange = Exchange(body, None, dict(request.headers))
        self.exchanges.append(exchange)
        model = str(body.get("model"))
        if model in self.delay_s:
            await asyncio.sleep(self.delay_s[model])
        if model in self.fail:
            return httpx.Response(500, json={"error": {"message": "injected failure", "type": "internal_error"}})
        response = await self.inner.handle_async_request(request)
        if body.get("stream"):
            return response
        content = await response.aread()
        await response.aclose()
        try:
            exchange.response = json.loads(content)
        except ValueError:
            exchange.response = None
        framing = ("content-length", "transfer-encoding")
        headers = [(k, v) for k, v in response.headers.items() if k.lower() not in framing]
        return httpx.Response(response.status_code, headers=headers, content=content)

    async def aclose(self) -> None:
        await self.inner.aclose()
