"""Baseline routers: a fixed default expert, and a uniformly random one.

They exist as honest baselines for evaluating the real routers, and as the
simplest thing that works when one expert is enough.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from coe.config import ExpertConfig, RegistryConfig
from coe.errors import BackendUnavailable
from routers.base import Completer, ExpertChoice, Router, RouteRequest, RoutingDecision


def _require(experts: Sequence[ExpertConfig]) -> None:
    if not experts:
        raise BackendUnavailable("no experts are registered", retry_after=30)


class DefaultRouter(Router):
    """Always the configured default expert (the registry's first when none is set), then fallbacks."""

    name = "default"

    def __init__(self, config: RegistryConfig, complete: Completer | None = None) -> None:
        self.config = config.router

    async def route(self, request: RouteRequest, experts: Sequence[ExpertConfig]) -> RoutingDecision:
        _require(experts)
        names = [e.name for e in experts]
        first = self.config.default_expert if self.config.default_expert in names else names[0]
        ordered = [first] + [n for n in names if n != first]
        chosen = ordered[: 1 + self.config.fallbacks]
        return RoutingDecision(
            router=self.name,
            experts=[ExpertChoice(name=n, score=1.0 if i == 0 else 0.0) for i, n in enumerate(chosen)],
            recruit=1,
            confidence=1.0,
            reason=f"default expert {first!r}",
        )


class RandomRouter(Router):
    """A uniformly random expert; seeded when ``router.seed`` is set, for reproducible evaluations."""

    name = "random"

    def __init__(self, config: RegistryConfig, complete: Completer | None = None) -> None:
        self.config = config.router
        self._rng = random.Random(self.config.seed)

    async def route(self, request: RouteRequest, experts: Sequence[ExpertConfig]) -> RoutingDecision:
        _require(experts)
        names = [e.name for e in experts]
        self._rng.shuffle(names)
        chosen = names[: 1 + self.config.fallbacks]
        score = 1.0 / len(experts)
        return RoutingDecision(
            router=self.name,
            experts=[ExpertChoice(name=n, score=score) for n in chosen],
            recruit=1,
            confidence=score,
            reason="uniformly random",
        )
