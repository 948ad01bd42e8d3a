"""The composition graph's nodes. Each reads the state, does one step, and returns what it adds,
including one ``trace`` entry (what the response's ``coe.trace`` and the logs show)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from langgraph.runtime import Runtime

from coe.aggregate import (
    AGGREGATORS,
    AggregateInput,
    FinalCall,
    FinalText,
    agreement,
    choices_in,
)
from coe.errors import BackendUnavailable, CoeError, UpstreamTimeout
from coe.pipeline import final as final_stage
from coe.pipeline.fanout import content_of, fan_out
from coe.pipeline.state import Context, State
from coe.pipeline.text import conversation_text, last_user_text, with_passages
from routers.base import ExpertChoice, RouteRequest, RoutingDecision

TEMPLATE_TOKENS = 64
"""Room kept for the chat template's own tokens around the aggregator's messages."""


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000, 2)


async def classify(state: State, runtime: Runtime[Context]) -> dict[str, Any]:
    """The router's decision: level 1's category and level 2's ranking (or the request's own list)."""
    ctx, started = runtime.context, time.perf_counter()
    if ctx.options.experts:
        decision = RoutingDecision(router="request", experts=[ExpertChoice(name=n, score=1.0)
                                                              for n in ctx.options.experts],
                                   reason="the request listed its experts")
    else:
        request = RouteRequest(messages=ctx.messages, session=ctx.session, request_id=ctx.request_id,
                               level2=ctx.options.level2 is not False)
        decision = await ctx.registry.router.route(request, list(ctx.registry.experts.values()))
    step = {"step": "classify", "router": decision.router, "category": decision.category,
            "confidence": decision.confidence, "experts": decision.names(), "ms": _ms(started)}
    return {"decision": decision, "trace": [step]}


async def recruit(state: State, runtime: Runtime[Context]) -> dict[str, Any]:
    """The k experts of the first round, and the order escalation takes the rest in."""
    ctx, decision = runtime.context, state["decision"]
    experts = ctx.registry.experts
    if ctx.options.experts:
        order = [*ctx.options.experts, *(n for n, e in experts.items() if e.tier == "strong")]
    else:
        order = [*decision.names(), *(c.name for c in decision.candidates), *(c.name for c in decision.level1),
                 *experts]
    ranked = [n for n in dict.fromkeys(order) if n in experts]
    if not ranked:
        raise BackendUnavailable("the router chose no available expert", retry_after=5)
    k = ctx.options.k or len(ctx.options.experts or []) or decision.recruit or len(decision.names()) or 1
    recruits = ranked[:k]
    step: dict[str, Any] = {"step": "recruit", "k": k, "experts": recruits,
                            **({"requested_k": ctx.options.k} if ctx.options.k else {})}
    rag_off = _retrieval_off(ctx)
    if rag_off:
        step["retrieval"] = rag_off
    return {"ranked": ranked, "recruits": recruits, "round": 0, "expert_messages": ctx.messages,
            "retrieval": not rag_off, "trace": [step]}


def _retrieval_off(ctx: Context) -> str | None:
    """Why the retrieve step is skipped for this request, or None when the gate will decide."""
    if ctx.options.rag is False:
        return "off: the request turned retrieval off"
    if ctx.retrieve is None or ctx.rag_index is None:
        return "off: retrieval is not configured"
    if not (ctx.rag_index / "meta.json").exists():
        return f"off: no retrieval index at {ctx.rag_index} (run: coe rag ingest)"
    return None


async def retrieve(state: State, runtime: Runtime[Context]) -> dict[str, Any]:
    """Ask the gate; when it opens, the experts get the passages with their ids."""
    ctx, started = runtime.context, time.perf_counter()
    assert ctx.retrieve is not None
    gate = await ctx.retrieve(last_user_text(ctx.messages), state["decision"].category, ctx.options.rag)
    ctx.metrics.retrievals.labels("retrieved" if gate.retrieve else "skipped").inc()
    step: dict[str, Any] = {"step": "retrieve", "retrieved": gate.retrieve, "similarity": gate.similarity,
                            "reason": gate.reason, "passages": [p.id for p in gate.passages], "ms": _ms(started)}
    if not gate.retrieve:
        return {"rag": gate, "passages": [], "trace": [step]}
    return {"rag": gate, "passages": gate.passages, "expert_messages": with_passages(ctx.messages, gate.passages),
            "trace": [step]}


async def single(state: State, runtime: Runtime[Context]) -> dict[str, Any]:
    """k = 1: the one expert's answer is the final stage (streamed when the client streams)."""
    ctx, decision = runtime.context, state["decision"]
    expert = state["recruits"][0]
    spare = decision.names()[1:] if decision.names()[:1] == [expert] else []  # the router's own fallbacks
    spare += [c.name for c in decision.candidates][: ctx.registry.config.router.fallbacks]
    fallbacks = [n for n in dict.fromkeys(spare) if n != expert and n in ctx.registry.experts]
    final = FinalCall([expert, *fallbacks], state["expert_messages"], f"one expert recruited: {expert} answers "
                      "directly" + (f" (fallbacks: {', '.join(fallbacks)})" if fallbacks else ""))
    return {"final": final, "trace": [{"step": "single", "expert": expert}]}


async def fanout(state: State, runtime: Runtime[Context]) -> dict[str, Any]:
    ctx, started = runtime.context, time.perf_counter()
    round_no = state["round"] + 1
    experts = [ctx.registry.experts[n] for n in state["recruits"]]
    answers, records, errors = await fan_out(ctx, experts, state["expert_messages"], round_no)
    step = {"step": "fanout", "round": round_no, "experts": state["recruits"],
            "answers": [{"expert": a.expert, "text": a.text} for a in answers],
            "skipped": [{"name": r.name, "outcome": r.outcome, "error": r.error} for r in records if r.outcome != "ok"],
            "ms": _ms(started)}
    return {"round": round_no, "called": state["recruits"], "answers": answers, "calls": records, "errors": errors,
            "trace": [step]}


async def assess(state: State, runtime: Runtime[Context]) -> dict[str, Any]:
    """Reliability: the largest agreeing group's share of every expert called (TAGS-style consistency)."""
    ctx, started = runtime.context, time.perf_counter()
    answers = state.get("answers", [])
    called = len(state.get("called", []))
    if not answers:
        return {"reliability": 0.0, "trace": [{"step": "assess", "answers": 0, "called": called,
                                               "reliability": 0.0}]}
    threshold = ctx.config.consensus_similarity
    similar = ctx.similar if threshold is not None else None
    choices = choices_in(last_user_text(ctx.messages))
    agreed = await asyncio.to_thread(agreement, [a.text for a in answers], choices, similar=similar,
                                     threshold=threshold if threshold is not None else 1.0)
    reliability = round(len(agreed.holders) / max(called, len(answers)), 4)
    step = {"step": "assess", "answers": len(answers), "called": called, "agreeing": [
        answers[i].expert for i in agreed.holders], "reliability": reliability, "ms": _ms(started)}
    return {"agreement": agreed, "reliability": reliability, "trace": [step]}


def escalation_picks(state: State, ctx: Context) -> list[str]:
    """Unused experts marked ``tier: strong`` first, then the next-ranked ones."""
    used = set(state.get("called", []))
    unused = [n for n in state["ranked"] if n not in used]
    strong = [n for n in unused if ctx.registry.experts[n].tier == "strong"]
    return [*strong, *(n for n in unused if n not in strong)][: ctx.config.escalate_k]


def should_escalate(state: State, ctx: Context) -> str | None:
    """Why the graph escalates now, or None (reliable enough, or a bound reached)."""
    cfg = ctx.config
    if state["reliability"] >= cfg.escalate_below:
        return None
    if state["round"] >= cfg.max_rounds or ctx.elapsed() >= cfg.deadline_s or not escalation_picks(state, ctx):
        return None
    return f"reliability {state['reliability']:.2f} < escalate_below {cfg.escalate_below:g}"


async def escalate(state: State, runtime: Runtime[Context]) -> dict[str, Any]:
    ctx = runtime.context
    picks = escalation_picks(state, ctx)
    ctx.metrics.escalations.inc()
    step = {"step": "escalate", "round": state["round"] + 1, "experts": picks, "reason": should_escalate(state, ctx)}
    return {"recruits": picks, "trace": [step]}


def _no_answer(state: State) -> CoeError:
    """Every expert failed: the error that best tells the client why."""
    errors = state.get("errors", [])
    for exc in errors:
        if exc.status < 500:
            return exc  # the request itself was refused (e.g. too long): retrying elsewhere will not help
    if any(r.outcome == "late" for r in state.get("calls", [])) and not errors:
        return UpstreamTimeout("no expert answered within pipeline.expert_deadline_s")
    detail = "; ".join(f"{r.name}: {r.error}" for r in state.get("calls", []) if r.error)
    return BackendUnavailable(f"no recruited expert answered ({detail})", retry_after=5)


async def aggregate(state: State, runtime: Runtime[Context]) -> dict[str, Any]:
    ctx, started = runtime.context, time.perf_counter()
    answers = state.get("answers", [])
    if not answers:
        raise _no_answer(state)
    name = ctx.options.strategy or ctx.config.strategy
    decision = state["decision"]
    aggregator = decision.aggregator if decision.aggregator in ctx.registry.experts else state["ranked"][0]
    expert = ctx.registry.experts[aggregator]
    reply_room = int(ctx.params.get("max_tokens") or ctx.params.get("max_completion_tokens")
                     or expert.params.get("max_tokens") or ctx.config.aggregator_max_tokens)
    context = await ctx.context_tokens(expert) if ctx.context_tokens is not None else 4096
    plan = AGGREGATORS[name]().plan(AggregateInput(
        question=conversation_text(state["expert_messages"]), answers=answers, agreement=state["agreement"],
        aggregator=aggregator, budget_tokens=max(1, context - reply_room - TEMPLATE_TOKENS)))
    if isinstance(plan, FinalText) and plan.consensus and name == "synthesize":
        ctx.metrics.consensus_skips.inc()
    step: dict[str, Any] = {"step": "aggregate", "strategy": name, "reason": plan.reason, "ms": _ms(started)}
    if isinstance(plan, FinalText):
        step |= {"answer_from": plan.answer.expert, "consensus": plan.consensus, "aggregator_called": False}
    else:
        step |= {"aggregator": plan.experts[0], "aggregator_called": True, "truncated": plan.truncated,
                 "context_tokens": context}
    return {"final": plan, "trace": [step]}


async def answer(state: State, runtime: Runtime[Context]) -> dict[str, Any]:
    """The final stage (``coe.pipeline.final``). A ``FinalCall`` is left to the caller when it streams; when
    the aggregator cannot be reached, the vote of the answers already given is returned rather than an error."""
    ctx, plan = runtime.context, state["final"]
    if isinstance(plan, FinalText):
        return {"response": final_stage.text_response(plan.answer), "answered_by": plan.answer.expert}
    if ctx.stream:
        return {}
    experts, body = final_stage.request(state, plan, ctx.params, ctx.registry.experts)
    try:
        with ctx.telemetry.labels(final_stage.labels(state)):
            response, _, call = await ctx.dispatcher.chat(experts, body, request_id=ctx.request_id)
    except CoeError as exc:
        if final_stage.role(state) == "final":
            raise
        return final_stage.degrade(state, plan, exc)
    return {"response": response, **final_stage.answered(state, call)}


__all__ = ["aggregate", "answer", "assess", "classify", "content_of", "escalate", "fanout", "recruit",
           "retrieve", "should_escalate", "single"]
