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
"""

from __future__ import annotations

from typing import Any

from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime

from coe.pipeline import nodes, spans
from coe.pipeline.state import Context, State


def after_recruit(state: State, runtime: Runtime[Context]) -> str:
    return "retrieve" if state["retrieval"] else after_retrieve(state, runtime)


def after_retrieve(state: State, runtime: Runtime[Context]) -> str:
    return "single" if len(state["recruits"]) == 1 else "fanout"


def after_assess(state: State, runtime: Runtime[Context]) -> str:
    return "escalate" if nodes.should_escalate(state, runtime.context) else "aggregate"


def build_graph() -> Any:
    """The compiled ``StateGraph`` (typed ``Any``: LangGraph's compiled type is generic over four
    parameters that add nothing here)."""
    graph = StateGraph(State, context_schema=Context)
    graph.add_node("classify", spans.traced("classify", nodes.classify, spans.classify))
    graph.add_node("recruit", spans.traced("recruit", nodes.recruit, spans.recruit))
    graph.add_node("retrieve", spans.traced("retrieve", nodes.retrieve, spans.retrieve))
    graph.add_node("single", nodes.single)
    graph.add_node("fanout", spans.traced("fanout", nodes.fanout, spans.fanout))
    graph.add_node("assess", spans.traced("assess", nodes.assess, spans.assess))
    graph.add_node("escalate", spans.traced("escalate", nodes.escalate, spans.escalate))
    graph.add_node("aggregate", spans.traced("aggregate", nodes.aggregate, spans.aggregate))
    graph.add_node("answer", nodes.answer)
    graph.add_edge(START, "classify")
    graph.add_edge("classify", "recruit")
    graph.add_conditional_edges("recruit", after_recruit, ["retrieve", "single", "fanout"])
    graph.add_conditional_edges("retrieve", after_retrieve, ["single", "fanout"])
    graph.add_edge("single", "answer")
    graph.add_edge("fanout", "assess")
    graph.add_conditional_edges("assess", after_assess, ["escalate", "aggregate"])
    graph.add_edge("escalate", "fanout")
    graph.add_edge("aggregate", "answer")
    graph.add_edge("answer", END)
    return graph.compile()
