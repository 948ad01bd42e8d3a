"""The final stage of a composed answer, in one place for the two ways it ends.

Without streaming, the graph's ``answer`` node calls the final expert (the
aggregator, or the single expert when k = 1) itself. With streaming, the graph
stops before that call and the caller streams it; once the stream ends, the
caller applies the same record, trace step and state merge as the node would
have. Both go through ``answered`` and ``merge`` here, so the ``coe`` field of a
streamed answer is the one its non-streamed twin would carry.
"""

from __future__ import annotations

import functools
import typing
from collections.abc import Callable
from typing import Any, cast

from coe.aggregate import AGGREGATORS, AggregateInput, Answer, FinalCall, FinalText
from coe.config import ExpertConfig
from coe.dispatch import ExpertCall
from coe.errors import CoeError
from coe.pipeline.state import CallRecord, State


def role(state: State) -> str:
    """``aggregator`` when experts already answered, else ``final`` (a single expert answers directly)."""
    return "aggregator" if state.get("answers") else "final"


def labels(state: State) -> dict[str, Any]:
    """What the final call's span says of it: its role and round."""
    return {"coe.role": role(state), "coe.round": max(state.get("round", 0), 1)}


def request(state: State, final: FinalCall, params: dict[str, Any],
            experts: dict[str, ExpertConfig]) -> tuple[list[ExpertConfig], dict[str, Any]]:
    """The final call's experts (best first, the registered ones) and its body; a ``stop`` of the plan's
    is added to the client's, not put in its place."""
    body = {**params, **final.params, "messages": final.messages}
    if "stop" in final.params and params.get("stop"):
        client = [params["stop"]] if isinstance(params["stop"], str) else list(params["stop"])
        body["stop"] = list(dict.fromkeys([*client, *final.params["stop"]]))
    return [experts[n] for n in final.experts if n in experts], body


def answered(state: State, call: ExpertCall, *, streamed: bool = False) -> dict[str, Any]:
    """What the final call adds to the state: its call record, its trace step and who answered."""
    who = role(state)
    record = CallRecord(call.name, who, max(state.get("round", 0), 1), "ok", call.usage, call.cost, call.latency_ms)
    step = {"step": "answer", "expert": call.name, "role": who, **({"streamed": True} if streamed else {}),
            **({"skipped": call.skipped} if call.skipped else {})}
    return {"answered_by": call.name, "calls": [record], "trace": [step]}


def text_response(answer: Answer) -> dict[str, Any]:
    """An answer already given, as the final completion (reasoning stripped)."""
    response = dict(answer.response)
    choices = [dict(c) for c in response.get("choices") or [{}]]
    choices[0] = {**choices[0], "message": {**(choices[0].get("message") or {}), "role": "assistant",
                                            "content": answer.text}}
    return {**response, "choices": choices[:1]}


def degrade(state: State, final: FinalCall, exc: CoeError) -> dict[str, Any]:
    """The aggregator could not be reached: the experts' vote is the answer (recorded), not an error."""
    vote = AGGREGATORS["vote"]().plan(AggregateInput("", state["answers"], state["agreement"], "", 1))
    assert isinstance(vote, FinalText)
    record = CallRecord(final.experts[0], "aggregator", max(state.get("round", 0), 1), "failed", error=exc.message)
    step = {"step": "answer", "degraded": f"the aggregator failed ({exc.message}); returning the vote: {vote.reason}"}
    return {"final": vote, "response": text_response(vote.answer), "answered_by": vote.answer.expert,
            "calls": [record], "trace": [step]}


@functools.cache
def _reducers() -> dict[str, Callable[[Any, Any], Any]]:
    """The ``State`` keys LangGraph merges with a reducer (``Annotated[list, operator.add]``), read from the
    type once, so ``merge`` cannot drift from the graph."""
    out: dict[str, Callable[[Any, Any], Any]] = {}
    for key, hint in typing.get_type_hints(State, include_extras=True).items():
        extras = getattr(hint, "__metadata__", ())
        if extras and callable(extras[0]):
            out[key] = extras[0]
    return out


def merge(state: State, update: dict[str, Any]) -> State:
    """``update`` applied to ``state`` as the graph applies a node's return value (reducers for the
    appending keys, replacement for the rest): for the stage that runs outside the graph."""
    merged: dict[str, Any] = dict(state)
    reducers = _reducers()
    for key, value in update.items():
        merged[key] = reducers[key](merged[key], value) if key in reducers and key in merged else value
    return cast(State, merged)
