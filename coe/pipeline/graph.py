"""The composition graph, compiled once per server.

    classify -> recruit -> [retrieve] -> single ---------------------------> answer
                                      -> fanout -> assess -> aggregate ---> answer
                                           ^          |
                                           +- escalate (reliability below the bar, rounds and deadline left)

Reliability is checked before the aggregator is called, not after: agreement
among the experts does not need the aggregator's text, escalating after it would
waste its call, and the aggregator must be the last stage so it can stream.

The deciding steps run under a span each (``coe.pipeline.spans``); ``single`` and ``answer`` do not:
the one call they lead to is its own span.

Only the rounds (fanout, assess, escalate, aggregate) loop, so only they run in LangGraph
(``build_rounds``). The steps before them and a single expert's path run straight, one after the
other, through the same node functions and reducers (``run``): LangGraph's Pregel loop cost about
half the CPU of a ``model="coe"`` request with k = 1 and added nothing to a path without a branch
back. ``build_graph`` is the whole graph in one, kept as the reference the split is tested against.
"""

from __future__ import annotations

import operator
import typing
from typing import Any

from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime

from coe.pipeline import nodes, spans
from coe.pipeline.state import Context, State

NODES = {
    "classify": spans.traced("classify", nodes.classify, spans.classify),
    "recruit": spans.traced("recruit", nodes.recruit, spans.recruit),
    "retrieve": spans.traced("retrieve", nodes.retrieve, spans.retrieve),
    "single": nodes.single,
    "fanout": spans.traced("fanout", nodes.fanout, spans.fanout),
    "assess": spans.traced("assess", nodes.assess, spans.assess),
    "escalate": spans.traced("escalate", nodes.escalate, spans.escalate),
    "aggregate": spans.traced("aggregate", nodes.aggregate, spans.aggregate),
    "answer": nodes.answer,
}
APPEND = frozenset(k for k, hint in typing.get_type_hints(State, include_extras=True).items()
                   if typing.get_origin(hint) is typing.Annotated and operator.add in hint.__metadata__)
"""The State keys whose reducer appends (LangGraph's ``Annotated[list, operator.add]``)."""


def after_recruit(state: State, runtime: Runtime[Context]) -> str:
    return "retrieve" if state["retrieval"] else after_retrieve(state, runtime)


def after_retrieve(state: State, runtime: Runtime[Context]) -> str:
    return "single" if len(state["recruits"]) == 1 else "fanout"


def after_assess(state: State, runtime: Runtime[Context]) -> str:
    return "escalate" if nodes.should_escalate(state, runtime.context) else "aggregate"


def build_graph() -> Any:
    """The whole graph, compiled (typed ``Any``: LangGraph's compiled type is generic over four
    parameters that add nothing here)."""
    graph = StateGraph(State, context_schema=Context)
    for name, node in NODES.items():
        graph.add_node(name, node)
    graph.add_edge(START, "classify")
    graph.add_edge("classify", "recruit")
    graph.add_conditional_edges("recruit", after_recruit, ["retrieve", "single", "fanout"])
    graph.add_conditional_edges("retrieve", after_retrieve, ["single", "fanout"])
    graph.add_edge("single", "answer")
    _rounds(graph)
    return graph.compile()


def build_rounds() -> Any:
    """The rounds alone (k > 1), from ``fanout`` on: the part of the graph that loops."""
    graph = StateGraph(State, context_schema=Context)
    for name in ("fanout", "assess", "escalate", "aggregate", "answer"):
        graph.add_node(name, NODES[name])
    graph.add_edge(START, "fanout")
    _rounds(graph)
    return graph.compile()


def _rounds(graph: StateGraph[Any, Any, Any, Any]) -> None:
    graph.add_edge("fanout", "assess")
    graph.add_conditional_edges("assess", after_assess, ["escalate", "aggregate"])
    graph.add_edge("escalate", "fanout")
    graph.add_edge("aggregate", "answer")
    graph.add_edge("answer", END)


def merge(state: State, update: dict[str, Any]) -> None:
    """Apply one node's update as LangGraph's reducers would: append to the appending keys, else replace."""
    loose = typing.cast(dict[str, Any], state)  # keys are the nodes' own: State's TypedDict keys
    for key, value in update.items():
        loose[key] = [*loose.get(key, []), *value] if key in APPEND else value


async def run(rounds: Any, ctx: Context) -> State:
    """One request: the straight steps here, the rounds (k > 1) in ``rounds`` (from ``build_rounds``)."""
    runtime = Runtime(context=ctx)
    state: State = {}
    for name in ("classify", "recruit"):
        merge(state, await NODES[name](state, runtime))
    if state["retrieval"]:
        merge(state, await NODES["retrieve"](state, runtime))
    if after_retrieve(state, runtime) == "fanout":
        done: State = await rounds.ainvoke(state, context=ctx, config={"recursion_limit": 64})
        return done
    for name in ("single", "answer"):
        merge(state, await NODES[name](state, runtime))
    return state
