"""The composition pipeline: one LangGraph graph turns a ``model="coe"`` request into one answer.

``Pipeline`` is built once per server (the graph is compiled in its constructor)
and run per request with a ``Context``. The final state holds every step: the
routing decision, retrieved passages, each expert's answer and call, the
agreement, the final plan and (unless the final stage streams) the response.
See ``coe.pipeline.graph`` for the shape, ``coe.pipeline.response`` for what
the client sees and ``coe.pipeline.spans`` for what a trace shows.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from coe.config import ExpertConfig
from coe.dispatch import Dispatcher
from coe.pipeline import graph
from coe.pipeline.state import CallRecord, ChatCaller, Context, Options, State
from coe.rag.gate import GateDecision
from coe.rag.live import LiveGate
from coe.registry import Registry
from coe.telemetry import OFF, Telemetry

log = logging.getLogger("coe.pipeline")

DEFAULT_CONTEXT_TOKENS = 4096
"""Assumed when neither pipeline.context_tokens nor the server's max_model_len is known."""


class Pipeline:
    def __init__(self, dispatcher: Dispatcher, telemetry: Telemetry = OFF) -> None:
        self.dispatcher = dispatcher
        self.telemetry = telemetry
        self.rounds = graph.build_rounds()
        self.gate = LiveGate()
        self._context: dict[tuple[str, str], int] = {}

    async def run(self, ctx: Context) -> State:
        return await graph.run(self.rounds, ctx)

    def context(self, registry: Registry, *, dispatcher: ChatCaller | None = None, **kwargs: Any) -> Context:
        """A run context wired to this pipeline's retrieval, similarity and context-length lookups,
        all reading the request's own registry snapshot. ``dispatcher`` replaces the pipeline's own for
        the run's expert calls (a batch's stager)."""
        config = registry.config

        async def retrieve(query: str, category: str | None, force: bool | None) -> GateDecision:
            return await self.gate.decide(config.rag, query, category, force)

        async def context_tokens(expert: ExpertConfig) -> int:
            return config.pipeline.context_tokens or await self.max_model_len(expert)

        folder = config.rag.folder / config.rag.index if config.rag.folder is not None else None
        return Context(registry=registry, dispatcher=dispatcher or self.dispatcher, retrieve=retrieve, rag_index=folder,
                       similar=similar, context_tokens=context_tokens, telemetry=self.telemetry, **kwargs)

    async def max_model_len(self, expert: ExpertConfig) -> int:
        """The expert's context length as its server reports it (cached per backend and model)."""
        key = (expert.backend, expert.model)
        if key not in self._context:
            try:
                models = await self.dispatcher.pool.get(expert.backend).api.list_models()
            except Exception as exc:  # a down server: assume the default this once, ask again next time
                log.warning("cannot read max_model_len of %s from %s: %s", expert.model, expert.backend, exc)
                return DEFAULT_CONTEXT_TOKENS
            lengths = {m.get("id"): m.get("max_model_len") for m in models}
            value = lengths.get(expert.upstream_model) or lengths.get(expert.model)
            self._context[key] = int(value) if value else DEFAULT_CONTEXT_TOKENS
        return self._context[key]


def similar(texts: Sequence[str]) -> list[list[float]]:
    """Cosine similarities of the texts under the packaged MiniLM (for the consensus check)."""
    from coe.embed import shared_embedder

    vectors = shared_embedder().encode(list(texts))
    return [[float(x) for x in row] for row in vectors @ vectors.T]


__all__ = ["CallRecord", "ChatCaller", "Context", "Options", "Pipeline", "State", "similar"]
