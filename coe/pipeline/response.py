"""What a client sees of a pipeline run: the completion, its summed ``usage``, and the ``coe`` field.

``coe`` carries the routing decision, every call made (role, round, outcome,
usage, cost, latency), the step-by-step ``trace``, the agreement and, when
retrieval ran, the ``citations``. ``usage`` is the sum over every call, so a
client billing by it pays for what the request really used.

Citations are checked against what was retrieved: a model may write a passage id it was never
given. Each retrieved passage says whether the answer ``cited`` it, and ``unknown_citations``
lists ids the answer cites that no retrieved passage has, so a client can flag or drop them.
(A streamed answer is checked only where its text is known at the end: not for the aggregator's
streamed final stage.)
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator, Sequence
from typing import Any

from coe import usage as usage_mod
from coe.aggregate import FinalCall
from coe.pipeline.spans import record_request
from coe.pipeline.state import CallRecord, State
from coe.telemetry import current_span

log = logging.getLogger("coe.pipeline")


def calls_of(state: State, extra: Sequence[CallRecord] = ()) -> list[CallRecord]:
    return [*state.get("calls", []), *extra]


_BRACKETED = re.compile(r"\[([^\[\]\s]{1,256})\]")


def check_citations(text: str, ids: Sequence[str]) -> tuple[list[str], list[str]]:
    """(retrieved ids the text cites, cited ids that were never retrieved). A bracketed token counts
    as a citation when it is a retrieved id or looks like one (``source#n``, or a bare number)."""
    known = set(ids)
    cited, unknown = [], []
    for token in dict.fromkeys(_BRACKETED.findall(text)):
        if token in known:
            cited.append(token)
        elif "#" in token or token.isdigit():
            unknown.append(token)
    return cited, unknown


def final_text(state: State) -> str | None:
    response = state.get("response") or {}
    choices = response.get("choices") or [{}]
    content = (choices[0].get("message") or {}).get("content")
    return content if isinstance(content, str) else None


def citations(state: State) -> list[dict[str, Any]]:
    passages = state.get("passages", [])
    cited, _ = check_citations(final_text(state) or "", [p.id for p in passages])
    return [{"id": p.id, "source": p.source, "score": p.score, "text": p.text, "cited": p.id in cited}
            for p in passages]


def coe_field(state: State, request_id: str, extra: Sequence[CallRecord] = ()) -> dict[str, Any]:
    calls = calls_of(state, extra)
    done = [c for c in calls if c.usage is not None or c.outcome == "ok"]
    final = state.get("final")
    out: dict[str, Any] = {
        "request_id": request_id,
        "decision": state["decision"].model_dump(mode="json"),
        "experts": [c.to_json() for c in calls],
        "usage": usage_mod.add(c.usage for c in calls),
        "cost": usage_mod.total_cost(c.cost for c in done),
        # a single expert answering directly is round 1, as its call record says
        "rounds": max([state.get("round", 0), *(c.round for c in calls)]),
        "answered_by": state.get("answered_by"),
        "trace": state.get("trace", []),
    }
    # agreement needs two answers: with one expert there is none to measure (null, not missing)
    out["reliability"] = state.get("reliability")
    if final is not None:
        out["aggregator_called"] = isinstance(final, FinalCall) and bool(state.get("answers"))
    if state.get("rag") is not None and state.get("passages"):
        out["citations"] = citations(state)
        text = final_text(state)
        if text is not None:
            out["unknown_citations"] = check_citations(text, [p.id for p in state["passages"]])[1]
    return out


def answered(calls: Sequence[CallRecord]) -> str:
    """The ``x-coe-experts`` header: every expert that answered, in call order."""
    return ",".join(dict.fromkeys(c.name for c in calls if c.outcome == "ok"))


def completion(state: State, request_id: str) -> dict[str, Any]:
    """The non-streaming response body."""
    response = dict(state["response"])
    response["model"] = state.get("answered_by") or response.get("model")
    response["usage"] = usage_mod.add(c.usage for c in state.get("calls", []))
    response["coe"] = coe_field(state, request_id)
    return response


def text_chunks(state: State, request_id: str, client_usage: bool) -> Iterator[dict[str, Any]]:
    """A final answer that is already text (a vote, a consensus, the best answer) as OpenAI chunks:
    the role, the content, the finish; the ``coe`` field rides on the last chunk."""
    response = state["response"]
    choice = (response.get("choices") or [{}])[0]
    base = {"id": response.get("id", f"chatcmpl-{request_id}"), "object": "chat.completion.chunk",
            "created": response.get("created", int(time.time())), "model": state.get("answered_by")}
    content = str((choice.get("message") or {}).get("content") or "")
    yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    if content:
        yield {**base, "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]}
    finish = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": choice.get("finish_reason") or "stop"}]}
    trace = coe_field(state, request_id)
    if client_usage:
        yield finish
        yield {**base, "choices": [], "usage": trace["usage"], "coe": trace}
    else:
        yield {**finish, "coe": trace}


def log_run(state: State, request_id: str, extra: Sequence[CallRecord] = ()) -> None:
    """One INFO line per composed request; the whole trace at DEBUG; the outcome on the request's span
    (called once per composed request, when its answer is complete)."""
    if current_span().is_recording():
        record_request("routed", coe_field(state, request_id, extra))
    decision = state.get("decision")
    calls = calls_of(state, extra)
    steps = {s["step"]: s for s in state.get("trace", [])}
    rag = steps.get("retrieve", {})
    agg = steps.get("aggregate", {})
    log.info("pipeline %s: category=%s experts=%s rounds=%d rag=%s strategy=%s%s answered_by=%s",
             request_id, decision.category if decision else None, answered(calls) or "-", state.get("round", 0),
             rag.get("retrieved", "off"), agg.get("strategy", "single"),
             " consensus-skip" if agg.get("consensus") and not agg.get("aggregator_called") else "",
             state.get("answered_by"))
    log.debug("pipeline %s trace: %s", request_id, state.get("trace"))
