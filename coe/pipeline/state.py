"""What the composition graph carries: the per-request ``Context`` (fixed for the run, LangGraph's
run context) and the ``State`` the nodes build up (reducers append, so every step is kept)."""

from __future__ import annotations

import operator
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Protocol, TypedDict

from coe.aggregate import Agreement, Answer, Final
from coe.aggregate.text import Similar
from coe.config import ExpertConfig, PipelineConfig
from coe.dispatch import ExpertCall
from coe.errors import CoeError
from coe.metrics import Metrics
from coe.rag.gate import GateDecision
from coe.rag.store import Passage
from coe.registry import Registry
from coe.telemetry import OFF, Telemetry
from routers.base import RoutingDecision


@dataclass(frozen=True)
class Options:
    """Per-request control (``extra_body={"coe": {...}}``), validated."""

    k: int | None = None
    experts: list[str] | None = None
    strategy: str | None = None
    rag: bool | None = None
    """True: always retrieve; False: never; None: the gate decides."""
    level2: bool | None = None
    """False: rank by level 1 alone (skills off), for side-by-side comparisons; None: as configured."""


class ChatCaller(Protocol):
    """What the graph calls experts through: the app's ``Dispatcher``, or a batch's stager
    (``coe.batch.stages``), which holds each call until its wave runs."""

    async def chat(self, experts: Sequence[ExpertConfig], body: dict[str, Any], *,
                   request_id: str) -> tuple[dict[str, Any], ExpertConfig, ExpertCall]: ...


Retrieve = Callable[[str, "str | None", "bool | None"], Awaitable[GateDecision]]
"""(query, category, force) -> the gate's decision with its passages."""


@dataclass(frozen=True)
class Context:
    registry: Registry
    dispatcher: ChatCaller
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
    telemetry: Telemetry = OFF
    """Where the steps' spans go (``coe.pipeline.spans``); off: nowhere, at no cost."""
    staged: bool = False
    """A batch run whose calls wait for their wave: the time deadlines (``expert_deadline_s`` per round,
    ``deadline_s`` for escalation) are off, since waiting is not the experts' time; the quorum still
    ends a round, and each call is bounded by its backend's ``timeouts.total_s`` once it runs."""

    @property
    def config(self) -> PipelineConfig:
        return self.registry.config.pipeline

    def elapsed(self) -> float:
        """Seconds counted against ``pipeline.deadline_s``: none in a staged run (see ``staged``)."""
        return 0.0 if self.staged else time.perf_counter() - self.started


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
