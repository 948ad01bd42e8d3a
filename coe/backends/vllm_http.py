"""An OpenAI-compatible vLLM server over HTTP.

The ``httpx.AsyncClient`` is injected (tests swap its transport for fault
injection); one client per backend keeps connections pooled. httpx errors are
mapped here, at the boundary, onto coe's two failure kinds. Every request made
under a span carries its ``traceparent`` (``coe.telemetry.inject``), so vLLM
continues coe's trace; with tracing off no header is added.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson

from coe.backends.base import ChatStream, ExpertBackend
from coe.config import Timeouts
from coe.errors import BackendUnavailable, UpstreamError
from coe.telemetry import inject

_MAX_LORA = re.compile(r'^vllm:lora_requests_info\{[^}]*\bmax_lora="(\d+)"', re.MULTILINE)
"""vLLM's LoRA gauge in ``/metrics``; it appears once the server has scheduled a request."""


def make_client(base_url: str, timeouts: Timeouts, api_key: str | None = None,
                max_connections: int = 256, transport: httpx.AsyncBaseTransport | None = None) -> httpx.AsyncClient:
    """The pooled client for one backend; ``base_url`` is the server root (no ``/v1``).

    The default transport is aiohttp's connection pool under httpx's API: on the hot
    path it costs a third of httpcore's CPU per request (bench/README.md); the
    httpx API stays, so tests inject their own transport as before.
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    if transport is None:
        from httpx_aiohttp import AiohttpTransport

        transport = AiohttpTransport(limits=limits)
    return httpx.AsyncClient(
        base_url=base_url,
        headers=headers,
        timeout=httpx.Timeout(connect=timeouts.connect_s, read=timeouts.read_s, write=timeouts.read_s, pool=None),
        limits=limits,
        transport=transport,
    )


def server_root(url: str) -> str:
    """``http://h:8000/v1/`` -> ``http://h:8000``: coe adds ``/v1/...`` and ``/health`` itself."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _error_from(response_body: bytes, status: int, backend: str) -> UpstreamError:
    """Map vLLM's error object onto ours, keeping its message and param."""
    message, param, type_ = f"expert backend {backend!r} answered HTTP {status}", None, None
    try:
        data = orjson.loads(response_body)
        err = data.get("error", data) if isinstance(data, dict) else {}
        if isinstance(err, dict):
            message = str(err.get("message") or message)
            param = err.get("param")
            type_ = "invalid_request_error" if status < 500 else None
    except orjson.JSONDecodeError:
        pass
    return UpstreamError(message, status=status if status < 500 else 502, param=param, type=type_)


class _HTTPChatStream(ChatStream):
    def __init__(self, response: httpx.Response, backend: str) -> None:
        self._response = response
        self._backend = backend

    async def chunks(self) -> AsyncIterator[dict[str, Any]]:
        done = False
        try:
            async for line in self._response.aiter_lines():
                if done or not line.startswith("data:"):
                    continue  # after [DONE], read to the end so the connection goes back to the pool
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    continue
                chunk = orjson.loads(data)
                if isinstance(chunk, dict) and "error" in chunk:
                    err = chunk["error"] if isinstance(chunk["error"], dict) else {"message": str(chunk["error"])}
                    raise UpstreamError(f"expert failed while answering: {err.get('message', 'unknown error')}")
                yield chunk
        except httpx.HTTPError as exc:
            raise UpstreamError(f"expert backend {self._backend!r} broke off the stream: {exc!r}") from exc
        finally:
            await self._response.aclose()

    async def aclose(self) -> None:
        await self._response.aclose()


class VLLMBackend(ExpertBackend):
    def __init__(self, name: str, client: httpx.AsyncClient) -> None:
        self.name = name
        self.client = client
        # Built once: a chat call's request skips httpx's per-request URL merging and header merging
        # (about a fifth of the direct path's CPU when built by ``client.build_request``).
        self._chat_url = client.base_url.join("/v1/chat/completions")
        self._headers = dict(client.headers)
        self._timeout = client.timeout.as_dict()

    def _chat_request(self, body: dict[str, Any], request_id: str, *, stream: bool) -> httpx.Request:
        headers = {**self._headers, "content-type": "application/json", "x-request-id": request_id}
        if stream:
            headers["accept"] = "text/event-stream"
        inject(headers)
        return httpx.Request("POST", self._chat_url, headers=headers, content=orjson.dumps(body),
                             extensions={"timeout": self._timeout})

    def _unavailable(self, exc: Exception) -> BackendUnavailable:
        return BackendUnavailable(f"expert backend {self.name!r} is unreachable: {type(exc).__name__}")

    async def _send(self, request: httpx.Request) -> httpx.Response:
        try:
            response = await self.client.send(request)
        except (httpx.TransportError, httpx.TimeoutException) as exc:
            raise self._unavailable(exc) from exc
        if response.status_code >= 500:
            raise BackendUnavailable(f"expert backend {self.name!r} answered HTTP {response.status_code}")
        return response

    async def _post(self, path: str, body: dict[str, Any], request_id: str) -> httpx.Response:
        headers = {"content-type": "application/json", "x-request-id": request_id}
        inject(headers)
        return await self._send(self.client.build_request("POST", path, content=orjson.dumps(body), headers=headers))

    async def chat(self, body: dict[str, Any], *, request_id: str) -> dict[str, Any]:
        response = await self._send(self._chat_request(body, request_id, stream=False))
        if response.status_code >= 400:
            raise _error_from(response.content, response.status_code, self.name)
        result: dict[str, Any] = orjson.loads(response.content)
        return result

    async def open_chat_stream(self, body: dict[str, Any], *, request_id: str) -> ChatStream:
        try:
            response = await self.client.send(self._chat_request(body, request_id, stream=True), stream=True)
        except (httpx.TransportError, httpx.TimeoutException) as exc:
            raise self._unavailable(exc) from exc
        if response.status_code >= 400:
            content = await response.aread()
            await response.aclose()
            if response.status_code >= 500:
                raise BackendUnavailable(f"expert backend {self.name!r} answered HTTP {response.status_code}")
            raise _error_from(content, response.status_code, self.name)
        return _HTTPChatStream(response, self.name)

    async def list_models(self) -> list[dict[str, Any]]:
        try:
            headers: dict[str, str] = {}
            inject(headers)
            response = await self.client.get("/v1/models", headers=headers)
        except (httpx.TransportError, httpx.TimeoutException) as exc:
            raise self._unavailable(exc) from exc
        if response.status_code != 200:
            raise _error_from(response.content, response.status_code, self.name)
        data: list[dict[str, Any]] = response.json().get("data", [])
        return data

    async def load_adapter(self, name: str, path: Path) -> None:
        response = await self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)}, "")
        if response.status_code == 400 and b"already been loaded" in response.content:
            return
        if response.status_code >= 400:
            raise _error_from(response.content, response.status_code, self.name)

    async def unload_adapter(self, name: str) -> None:
        response = await self._post("/v1/unload_lora_adapter", {"lora_name": name}, "")
        if response.status_code == 404:
            return
        if response.status_code >= 400:
            raise _error_from(response.content, response.status_code, self.name)

    async def health(self) -> bool:
        try:
            response = await self.client.get("/health", timeout=2.0)
        except (httpx.TransportError, httpx.TimeoutException):
            return False
        return response.status_code == 200

    async def max_loras(self) -> int | None:
        try:
            response = await self.client.get("/metrics", timeout=2.0)
        except (httpx.TransportError, httpx.TimeoutException):
            return None
        match = _MAX_LORA.search(response.text) if response.status_code == 200 else None
        return int(match.group(1)) if match else None

    async def aclose(self) -> None:
        await self.client.aclose()
