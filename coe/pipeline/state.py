"""What the composition graph carries: the per-request ``Context`` (fixed for the run, LangGraph's
run context) and the ``State`` the nodes build up (reducers append, so every step is kept)."""

from __future__ import annotations

import operator
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypedDict

from coe.aggregate import Agreement, Answer, Final
from coe.aggregate.text import Similar
from coe.config import ExpertConfig, PipelineConfig
from coe.dispatch import Dispatcher
from coe.errors import CoeError
from coe.metrics import Metrics
from coe.rag.gate import GateDecision
from coe.rag.store import Passage
from coe.registry import Registry
from routers.base import RoutingDecision


@dataclass(frozen=True)
class Options:
    """Per-request control (``extra_body={"coe": {...}}``), validated."""

    k: int | None = None
    experts: list[str] | None = None
    strategy: str | None = None
    rag: bool | None = None
    """True: always retrieve; False: never; None: the gate decides."""


Retrieve = Callable[[str, "str | None", "bool | None"], Awaitable[GateDecision]]
"""(query, category, force) -> the gate's decision with its passages."""


@dataclass(frozen=True)
class Context:
    registry: Registry
    dispatcher: Dispatcher
    metrics: Metrics
    messages: list[dict[str, Any]]
    params: dict[str, Any]
    """The client's other body fields (sampling parameters), passed to every expert call."""
    request_id: str
    options: Options = field(default_factory=Options)
    session: str | None = None
    stream: bool = False
    retrieve: Retrieve | None = None
    rag_index: Path | None = None
    """The retrieval index folder; the retrieve step is skipped while nothing was ingested there."""
    similar: Similar | None = None
    context_tokens: Callable[[ExpertConfig], Awaitable[int]] | None = None
    started: float = field(default_factory=time.perf_counter)

    @property
    def config(self) -> PipelineConfig:
        return self.registry.config.pipeline

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


@dataclass
class CallRecord:
    """One expert call the request made (the response's ``coe.experts`` entries)."""

    name: str
    role: str
    """``expert`` (fan-out), ``aggregator`` or ``final`` (a single expert answering directly)."""
    round: int
    outcome: str
    """``ok``, ``failed`` or ``late`` (past the deadline or after the quorum; cancelled)."""
    usage: dict[str, int] | None = None
    cost: float | None = None
    latency_ms: float = 0.0
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "round": self.round, "outcome": self.outcome,
                "usage": self.usage, "cost": self.cost, "latency_ms": round(self.latency_ms, 2),
                **({"error": self.error} if self.error else {})}


class State(TypedDict, total=False):
    decision: RoutingDecision
    ranked: list[str]
    """Every expert in the order escalation takes them: the router's choice, candidates, the rest."""
    recruits: list[str]
    """The experts the next fan-out round calls."""
    called: Annotated[list[str], operator.add]
    round: int
    retrieval: bool
    """Whether the retrieve step runs (an index exists and the request did not turn it off)."""
    rag: GateDecision
    passages: list[Passage]
    expert_messages: list[dict[str, Any]]
    """The conversation as the experts get it (with retrieved passages when the gate opened)."""
    answers: Annotated[list[Answer], operator.add]
    calls: Annotated[list[CallRecord], operator.add]
    errors: Annotated[list[CoeError], operator.add]
    trace: Annotated[list[dict[str, Any]], operator.add]
    agreement: Agreement
    reliability: float
    final: Final
    answered_by: str
    """The expert whose text is the final answer (the aggregator, a single expert, or the vote's)."""
    response: dict[str, Any]
    """The final answer as an OpenAI chat completion (not set when the final stage streams)."""
