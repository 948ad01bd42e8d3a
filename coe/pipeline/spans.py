"""What a trace shows of a composed request: one span per step, and the request's summary.

The graph's steps that decide something (``classify``, ``recruit``, ``retrieve``, each ``fanout`` round,
``assess``, ``escalate``, ``aggregate``) run under a span of that name (``traced``, wired in
``coe.pipeline.graph``); the expert calls of a round are its children (the dispatcher's ``chat {model}``
spans, labelled with ``coe.role`` and ``coe.round``), and the final call, made by the ``answer`` step or
streamed by the caller, is a child of the request's span. The attributes are coe's own (``coe.*``): they
describe routing and composition, not a model call, so no ``gen_ai.*`` goes here. Each is read from what
the step returned, and only while the span records.

``record_request`` writes the request's outcome (who answered, cost, rounds, reliability) on the current
span: the HTTP server span, or a batch item's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar, cast

from langgraph.runtime import Runtime

from coe.pipeline.state import Context, State
from coe.telemetry import attributes, current_span

Node = TypeVar("Node", bound=Callable[[State, Runtime[Context]], Awaitable[dict[str, Any]]])
Attrs = Callable[[State, dict[str, Any]], Mapping[str, Any]]


def traced(name: str, node: Node, attrs: Attrs) -> Node:
    """``node`` run under a span called ``name``, with ``attrs(state, update)`` on it once it returns (the
    same signature: LangGraph passes ``runtime`` by its name)."""
    async def run(state: State, runtime: Runtime[Context]) -> dict[str, Any]:
        with runtime.context.telemetry.span(name) as span:
            update = await node(state, runtime)
            if span.is_recording():
                span.set_attributes(attributes(iter(attrs(state, update).items())))
            return update

    run.__name__ = run.__qualname__ = getattr(node, "__name__", name)
    run.__doc__ = node.__doc__
    return cast(Node, run)


def _step(update: dict[str, Any]) -> dict[str, Any]:
    steps = update.get("trace") or [{}]
    return dict(steps[0])


def classify(state: State, update: dict[str, Any]) -> Mapping[str, Any]:
    d = update["decision"]
    return {"coe.router": d.router, "coe.category": d.category, "coe.confidence": d.confidence,
            "coe.skills": d.skills, "coe.experts": d.names(), "coe.expert_scores": [e.score for e in d.experts],
            "coe.candidates": [c.name for c in d.candidates], "coe.level1.experts": [c.name for c in d.level1],
            "coe.level1.scores": [c.score for c in d.level1], "coe.recruit": d.recruit,
            "coe.aggregator": d.aggregator, "coe.fallback": d.fallback or None, "coe.reason": d.reason or None}


def recruit(state: State, update: dict[str, Any]) -> Mapping[str, Any]:
    step = _step(update)
    return {"coe.k": step.get("k"), "coe.requested_k": step.get("requested_k"), "coe.experts": step.get("experts"),
            "coe.retrieval": step.get("retrieval")}


def retrieve(state: State, update: dict[str, Any]) -> Mapping[str, Any]:
    step = _step(update)
    return {"coe.rag.retrieved": step.get("retrieved"), "coe.rag.similarity": step.get("similarity"),
            "coe.rag.reason": step.get("reason"), "coe.rag.passages": step.get("passages")}


def fanout(state: State, update: dict[str, Any]) -> Mapping[str, Any]:
    step = _step(update)
    return {"coe.round": step.get("round"), "coe.experts": step.get("experts"),
            "coe.answered": [a["expert"] for a in step.get("answers", [])],
            "coe.skipped": [s["name"] for s in step.get("skipped", [])],
            "coe.skipped_outcomes": [s["outcome"] for s in step.get("skipped", [])]}


def assess(state: State, update: dict[str, Any]) -> Mapping[str, Any]:
    step = _step(update)
    return {"coe.reliability": step.get("reliability"), "coe.answers": step.get("answers"),
            "coe.called": step.get("called"), "coe.agreeing": step.get("agreeing")}


def escalate(state: State, update: dict[str, Any]) -> Mapping[str, Any]:
    step = _step(update)
    return {"coe.escalation.round": step.get("round"), "coe.experts": step.get("experts"),
            "coe.escalation.reason": step.get("reason"), "coe.reliability": state.get("reliability")}


def aggregate(state: State, update: dict[str, Any]) -> Mapping[str, Any]:
    step = _step(update)
    return {"coe.strategy": step.get("strategy"), "coe.reliability": state.get("reliability"),
            "coe.consensus": step.get("consensus"), "coe.aggregator_called": step.get("aggregator_called"),
            "coe.answer_from": step.get("answer_from"), "coe.aggregator": step.get("aggregator"),
            "coe.truncated": step.get("truncated"), "coe.aggregate.reason": step.get("reason")}


def record_request(route: str, field: Mapping[str, Any]) -> None:
    """A finished request's outcome (its ``coe`` field) on the current span, when it records."""
    span = current_span()
    if not span.is_recording():
        return
    decision = field.get("decision") or {}
    experts = field.get("experts") or []
    usage = field.get("usage") or {}
    span.set_attributes(attributes(iter({
        "coe.route": route, "coe.category": decision.get("category"), "coe.confidence": decision.get("confidence"),
        "coe.experts": list(dict.fromkeys(e["name"] for e in experts if e.get("outcome", "ok") == "ok")),
        "coe.answered_by": field.get("answered_by") or (experts[0]["name"] if len(experts) == 1 else None),
        "coe.cost": field.get("cost"), "coe.rounds": field.get("rounds"), "coe.reliability": field.get("reliability"),
        "coe.aggregator_called": field.get("aggregator_called"),
        "coe.usage.input_tokens": usage.get("prompt_tokens"), "coe.usage.output_tokens": usage.get("completion_tokens"),
    }.items())))
