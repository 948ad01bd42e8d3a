"""Routing without answering: the decision record ``coe route`` writes and ``POST /v1/route``
returns, and the reading of route inputs, where every bad line is found before anything runs.

Input lines are ``{"id": ..., "question": ...}`` or OpenAI batch lines
(``custom_id``, ``body.messages``; then ``id`` = ``custom_id``); other keys are
ignored; blank lines are skipped.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coe.jsonl import BadLines, read_jsonl
from routers.base import RoutingDecision

CANDIDATES = 5
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


@dataclass(frozen=True)
class RouteInput:
    id: Any
    messages: list[dict[str, Any]]
    line: int


class RouteInputError(BadLines):
    """Some input lines are bad; ``problems`` lists each as ``line N: why``."""


def _messages_problem(messages: Any) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "'body.messages' must be a non-empty list"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            return f"'body.messages[{i}]' needs a 'role' ({', '.join(sorted(ROLES))})"
        if not isinstance(m.get("content"), str | list | None):
            return f"'body.messages[{i}].content' must be a string or a list of parts"
    return None


def parse_line(obj: dict[str, Any], number: int) -> RouteInput | str:
    """One input line's object, or why it is bad."""
    if "custom_id" in obj:
        body = obj.get("body")
        if not isinstance(body, dict):
            return "an OpenAI batch line needs a 'body' object with 'messages'"
        problem = _messages_problem(body.get("messages"))
        if problem:
            return problem
        if not isinstance(obj["custom_id"], str | int) or obj["custom_id"] == "":
            return "'custom_id' must be a non-empty string or an integer"
        return RouteInput(obj["custom_id"], list(body["messages"]), number)
    if "question" in obj or "id" in obj:
        if not isinstance(obj.get("id"), str | int) or obj.get("id") == "":
            return "'id' must be a non-empty string or an integer"
        question = obj.get("question")
        if not isinstance(question, str) or not question.strip():
            return "'question' must be a non-empty string"
        return RouteInput(obj["id"], [{"role": "user", "content": question}], number)
    return "expected {'id', 'question'} or an OpenAI batch line {'custom_id', 'body': {'messages'}}"


def read_inputs(path: Path) -> list[RouteInput]:
    """Every line checked first: raises ``RouteInputError`` listing every bad line number."""
    seen: dict[str, int] = {}

    def parse(obj: dict[str, Any], number: int) -> RouteInput | str:
        parsed = parse_line(obj, number)
        if isinstance(parsed, RouteInput):
            key = json.dumps(parsed.id)
            if key in seen:
                return f"duplicate id {parsed.id!r} (also line {seen[key]})"
            seen[key] = number
        return parsed

    try:
        return read_jsonl(path, parse, consequence="nothing was routed")
    except BadLines as exc:
        raise RouteInputError(str(path), exc.problems, "nothing was routed") from None


def record(id: Any, decision: RoutingDecision, latency_ms: float) -> dict[str, Any]:
    """The decision as ``coe route`` writes it and ``POST /v1/route`` returns it."""
    return {
        "id": id,
        "category": decision.category,
        "confidence": decision.confidence,
        "fallback": decision.fallback,
        "skills": list(decision.skills),
        "experts": [e.model_dump() for e in decision.experts],
        "candidates": [c.model_dump() for c in (decision.candidates or decision.experts)[:CANDIDATES]],
        "latency_ms": round(latency_ms, 3),
        "router": decision.router,
        "reason": decision.reason,
        "lexical_gate": decision.lexical_gate,
        "aggregator": decision.aggregator,
        "level1": [c.model_dump() for c in decision.level1],
        "categories": [c.model_dump() for c in decision.categories],
        "skill_matches": [c.model_dump() for c in decision.skill_matches],
    }


def summary(records: Sequence[dict[str, Any]], seconds: float) -> str:
    """The human summary ``coe route`` prints to stderr."""
    n = len(records)
    if not n:
        return "routed 0 queries"
    tops: dict[str, int] = {}
    for r in records:
        name = r["experts"][0]["name"] if r["experts"] else "(none)"
        tops[name] = tops.get(name, 0) + 1
    latencies = sorted(r["latency_ms"] for r in records)
    fallbacks = sum(1 for r in records if r["fallback"])
    gated = sum(1 for r in records if r.get("lexical_gate"))  # shown only where the gate is on and decided some
    by_expert = ", ".join(f"{k} {v}" for k, v in sorted(tops.items(), key=lambda kv: -kv[1]))
    return (f"routed {n} queries in {seconds:.2f}s ({n / seconds if seconds else 0:.0f}/s); "
            f"fallback {fallbacks}; " + (f"decided by the words alone {gated}; " if gated else "")
            + f"latency p50 {latencies[n // 2]:.2f} ms; first choice: {by_expert}")
