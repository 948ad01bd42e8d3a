"""The spans of model calls, in OpenTelemetry's GenAI semantic conventions.

Only a span that calls a model carries ``gen_ai.*`` (one ``chat {model}`` CLIENT span per expert tried
by the dispatcher): stamping them on the request or pipeline spans would count the tokens twice in any
backend that sums them. coe's own facts about the call (which expert, backend, role, round, cost,
attempts) go under ``coe.``. Prompts and completions are recorded only with ``capture_content``, as
``gen_ai.input.messages`` / ``gen_ai.output.messages`` JSON, cut to ``max_content_chars`` per span and
direction (the JSON stays valid: the text parts are cut, not the string).

Every builder here is called only when the span is recording: with tracing off nothing is built.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

import orjson
from opentelemetry.trace import INVALID_SPAN

from coe.telemetry import Span, SpanKind, Telemetry, attributes, fail

PROVIDER = "vllm"
"""``gen_ai.provider.name``: every coe backend speaks vLLM's OpenAI-compatible API."""

REQUEST_PARAMS = {
    "temperature": "gen_ai.request.temperature",
    "top_p": "gen_ai.request.top_p",
    "top_k": "gen_ai.request.top_k",
    "max_tokens": "gen_ai.request.max_tokens",
    "max_completion_tokens": "gen_ai.request.max_tokens",
    "frequency_penalty": "gen_ai.request.frequency_penalty",
    "presence_penalty": "gen_ai.request.presence_penalty",
    "seed": "gen_ai.request.seed",
    "n": "gen_ai.request.choice.count",
    "stop": "gen_ai.request.stop_sequences",
}


def start_call(telemetry: Telemetry, payload: Mapping[str, Any], *, expert: str, backend: str, server: str,
               request_id: str, stream: bool = False) -> Span:
    """The span of one call to ``expert`` (not yet current; the invalid span when tracing is off). Its
    parent is the current span, or the span that adopted ``request_id`` (a batch item)."""
    if not telemetry.enabled:
        return INVALID_SPAN
    model = str(payload.get("model", ""))
    attrs = request_attributes(payload, telemetry)
    attrs.update({"gen_ai.operation.name": "chat", "gen_ai.provider.name": PROVIDER, "gen_ai.request.model": model,
                  "coe.expert": expert, "coe.backend": backend, "coe.request_id": request_id})
    parts = urlsplit(server)
    if parts.hostname:
        attrs["server.address"] = parts.hostname
        attrs["server.port"] = parts.port or (443 if parts.scheme == "https" else 80)
    if stream:
        attrs["coe.stream"] = True
    attrs.update(telemetry.call_labels())
    return telemetry.start(f"chat {model}", kind=SpanKind.CLIENT, attributes=attrs,
                           parent=telemetry.parent_for(request_id))


def request_attributes(payload: Mapping[str, Any], telemetry: Telemetry) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, name in REQUEST_PARAMS.items():
        value = payload.get(key)
        if value is None:
            continue
        out[name] = [value] if key == "stop" and isinstance(value, str) else value
    out = attributes(iter(out.items()))
    if telemetry.capture_content:
        out["gen_ai.input.messages"] = messages_json(payload.get("messages") or [],
                                                     telemetry.settings.max_content_chars)
    return out


def record_response(span: Span, telemetry: Telemetry, response: Mapping[str, Any]) -> None:
    """A whole answer's model, id, finish reasons, usage (and text, when captured)."""
    choices = response.get("choices") or []
    span.set_attributes(attributes(iter({
        "gen_ai.response.model": response.get("model"),
        "gen_ai.response.id": response.get("id"),
        "gen_ai.response.finish_reasons": [str(c.get("finish_reason")) for c in choices if c.get("finish_reason")],
    }.items())))
    record_usage(span, response.get("usage"))
    if telemetry.capture_content:
        span.set_attribute("gen_ai.output.messages", messages_json(
            [c.get("message") or {} for c in choices], telemetry.settings.max_content_chars, finish=choices))


def record_usage(span: Span, usage: Mapping[str, Any] | None) -> None:
    if not usage:
        return
    for key, name in (("prompt_tokens", "gen_ai.usage.input_tokens"),
                      ("completion_tokens", "gen_ai.usage.output_tokens")):
        if isinstance(usage.get(key), int):
            span.set_attribute(name, usage[key])


def record_call(span: Span, *, cost: float | None, attempts: int, skipped: Iterable[str]) -> None:
    """What coe adds about the call once it ended: its cost, tries and the candidates skipped before it."""
    span.set_attributes(attributes(iter({"coe.cost": cost, "coe.attempts": attempts,
                                         "coe.skipped": list(skipped)}.items())))


def messages_json(messages: Iterable[Mapping[str, Any]], budget: int,
                  finish: Iterable[Mapping[str, Any]] = ()) -> str:
    """Chat messages in the GenAI convention's shape (role + text parts), the text cut to ``budget``
    characters in all (``[...N chars cut]`` marks where)."""
    reasons = [c.get("finish_reason") for c in finish]
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        text = _text(message.get("content"))
        if len(text) > budget:
            text = f"{text[:budget]}[...{len(text) - budget} chars cut]"
        budget = max(0, budget - len(text))
        item: dict[str, Any] = {"role": message.get("role") or "assistant",
                                "parts": [{"type": "text", "content": text}]}
        if i < len(reasons) and reasons[i]:
            item["finish_reason"] = reasons[i]
        out.append(item)
    return orjson.dumps(out).decode()


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: keep the text ones
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
    return "" if content is None else str(content)


async def observe(chunks: AsyncIterator[dict[str, Any]], span: Span, telemetry: Telemetry,
                  started: float) -> AsyncIterator[dict[str, Any]]:
    """A stream's chunks passed on unchanged, noting on ``span`` the response model and id, the time to
    the first chunk, finish reasons (and the text, when captured); a broken stream fails the span. Used
    only while the span records, so an untraced stream keeps its plain iterator. ``started``: the call's
    start (``time.perf_counter()``), for ``coe.ttft_ms``."""
    first = True
    reasons: list[str] = []
    text: list[str] = []
    try:
        async for chunk in chunks:
            if first:
                first = False
                span.set_attributes(attributes(iter({
                    "gen_ai.response.model": chunk.get("model"), "gen_ai.response.id": chunk.get("id"),
                    "coe.ttft_ms": round((time.perf_counter() - started) * 1000, 2)}.items())))
            for choice in chunk.get("choices") or ():
                if choice.get("finish_reason"):
                    reasons.append(str(choice["finish_reason"]))
                if telemetry.capture_content and choice.get("index", 0) == 0:
                    text.append(str((choice.get("delta") or {}).get("content") or ""))
            yield chunk
    except BaseException as exc:
        fail(span, exc)
        raise
    finally:
        if span.is_recording():
            if reasons:
                span.set_attribute("gen_ai.response.finish_reasons", reasons)
            if telemetry.capture_content:
                span.set_attribute("gen_ai.output.messages", messages_json(
                    [{"role": "assistant", "content": "".join(text)}], telemetry.settings.max_content_chars,
                    finish=[{"finish_reason": reasons[0] if reasons else None}]))

