"""A virtual key's limits on the chat path: which models it may call, and tokens and spend reserved
before the call and corrected to the real usage after it (``coe.keys.limits`` says how far a burst can
overshoot). Requests per minute were already counted by ``check_client``.

A streamed answer is settled when its stream ends, from the ``coe`` field of its last event (every
stream carries one, with the real usage and cost); a stream cut short (the client left, the upstream
failed) is settled at its reservation, which is at most what it could have used.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from coe.errors import Forbidden
from coe.keys import Admission, estimate_tokens
from coe.runtime import ChatCompletionRequest
from services.api.auth import VirtualKeys, caller_of
from services.api.state import ApiState, state_of

log = logging.getLogger("coe.keys")


async def with_key_limits(request: Request, body: ChatCompletionRequest,
                          call: Callable[[], Awaitable[Response]]) -> Response:
    """Run ``call`` under the caller's key: refuse a model it may not use (403), reserve, call, settle."""
    caller = caller_of(request)
    key = caller.key
    state = state_of(request.app)
    vkeys: VirtualKeys | None = state.vkeys
    if key is None or vkeys is None:
        return await call()
    if key.models is not None and body.model not in key.models:
        raise Forbidden(f"key {key.name} may not use model {body.model!r}", param="model", code="model_not_allowed")
    admission: Admission | None = getattr(request.state, "admission", None)
    headers = dict(admission.headers) if admission else {}
    reserved = None
    if key.tpm or key.budget is not None:
        prompt, completion = estimate_tokens(body.messages, body.max_completion_tokens or body.max_tokens)
        experts = state.runtime.registry.current.experts
        priced = [experts[body.model]] if body.model in experts else list(experts.values())
        cost = max((e.cost.of(prompt, completion) for e in priced), default=0.0)  # routed: the dearest expert
        reserved = await vkeys.limiter.admit(key, tokens=prompt + completion, cost=cost, requests=0)
        headers.update(reserved.headers)
    tokens, spent = (reserved.tokens, reserved.cost) if reserved else (0, 0.0)
    try:
        response = await call()
    except BaseException:
        await _settle(state, vkeys, reserved or Admission(key), 0, 0.0)  # nothing answered: all given back
        raise
    if isinstance(response, StreamingResponse):
        response.body_iterator = _settled_at_end(response.body_iterator, state, vkeys, reserved or Admission(key))
    else:
        tokens, spent = _used(response, tokens, spent)
        await _settle(state, vkeys, reserved or Admission(key), tokens, spent)
    response.headers.update(headers)
    return response


async def _settle(state: ApiState, vkeys: VirtualKeys, admission: Admission, tokens: int, cost: float) -> None:
    _count(state, admission, tokens, cost)
    await vkeys.limiter.settle(admission, tokens, cost)


def _count(state: ApiState, admission: Admission, tokens: int, cost: float) -> None:
    state.runtime.metrics.key_tokens.labels(admission.key.name).inc(tokens)
    state.runtime.metrics.key_cost.labels(admission.key.name).inc(cost)


async def _settled_at_end(chunks: AsyncIterable[Any], state: ApiState, vkeys: VirtualKeys, admission: Admission
                          ) -> AsyncIterator[Any]:
    """The stream as it is; when it ends, settle from its last ``coe`` field (the reservation if it had
    none)."""
    tokens, cost = admission.tokens, admission.cost
    try:
        async for chunk in chunks:
            if isinstance(chunk, bytes) and b'"coe":' in chunk:
                tokens, cost = _used_of(chunk.removeprefix(b"data: "), tokens, cost)
            yield chunk
    finally:  # not awaited here: a generator closed by a client that left may not await
        _count(state, admission, tokens, cost)
        vkeys.limiter.settle_soon(admission, tokens, cost)


def _used(response: Response, tokens: int, cost: float) -> tuple[int, float]:
    """The answer's real usage and cost (its ``coe`` field); the reservation when it has none."""
    return _used_of(bytes(response.body), tokens, cost)


def _used_of(raw: bytes, tokens: int, cost: float) -> tuple[int, float]:
    try:
        field = orjson.loads(raw).get("coe") or {}
        usage = field.get("usage") or {}
        real_cost = field.get("cost")
        return int(usage.get("total_tokens", tokens)), float(real_cost) if real_cost is not None else cost
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
        return tokens, cost
