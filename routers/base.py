"""The router interface: from a request and the registry to a ``RoutingDecision``.

A router is one class with one async method. Decisions are plain data: they go
into the response's ``coe`` field and the logs, so every field must be JSON.
New routers are one module plus one entry in ``routers.ROUTERS``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from coe.config import ExpertConfig, RegistryConfig


class ExpertChoice(BaseModel):
    name: str
    score: float


class RoutingDecision(BaseModel):
    """Which experts should answer, best first, and why."""

    router: str
    experts: list[ExpertChoice] = Field(description="chosen experts, best first")
    recruit: int | None = Field(
        None, ge=1, description="how many of ``experts``, from the first, answer together (the composition's k); "
        "the rest are fallbacks for when those are down. None: all of them")
    category: str | None = None
    confidence: float | None = None
    skills: list[str] = Field(default_factory=list)
    candidates: list[ExpertChoice] = Field(default_factory=list)
    fallback: bool = False
    reason: str = ""
    lexical_gate: bool = Field(
        False, description="level 1 decided from the conversation's words alone (``router.lexical_gate``), "
        "without embedding it, so level 2 matched no skills to an embedding")
    aggregator: str | None = Field(None, description="the expert that composes the recruits' answers")
    level1: list[ExpertChoice] = Field(
        default_factory=list, description="the ranking level 1 alone gives, to show what level 2 changed")
    categories: list[ExpertChoice] = Field(
        default_factory=list, description="level 1's most likely categories with their probabilities, best first "
        "(``name`` is the category)")
    skill_matches: list[ExpertChoice] = Field(
        default_factory=list, description="level 2's skills nearest the query, with their similarity "
        "(``name`` is the skill)")

    def names(self) -> list[str]:
        return [e.name for e in self.experts]


class RouteRequest(BaseModel):
    """What a router may look at: the conversation, and who is asking."""

    messages: Sequence[Mapping[str, Any]]
    session: str | None = None
    request_id: str = ""
    level2: bool = True
    """False turns the two-level router's skill ranking off for this request (``coe.level2``)."""


class Router(ABC):
    """Picks experts for a request. Implementations must not call experts unless configured to."""

    name: str = "router"

    @abstractmethod
    async def route(self, request: RouteRequest, experts: Sequence[ExpertConfig]) -> RoutingDecision:
        """Choose experts among ``experts`` (the registry's current ones, file order)."""

    async def route_many(self, requests: Sequence[RouteRequest],
                         experts: Sequence[ExpertConfig]) -> list[RoutingDecision]:
        """Decide for many requests at once (``coe route``); routers that embed override this to batch."""
        return [await self.route(r, experts) for r in requests]

    def describe(self, experts: Sequence[ExpertConfig]) -> dict[str, Any]:
        """What the router knows, for people (the routing explorer): plain JSON. Routers that learned
        something (a classifier's fit report, skill profiles) say it here."""
        return {"router": self.name}


Completer = Callable[["ExpertConfig", list[dict[str, Any]], dict[str, Any]], Awaitable[str]]
"""Asks one expert: (expert, messages, sampling params) -> the answer's text (for routers that annotate)."""

Ask = Callable[["ExpertConfig", dict[str, Any], str], Awaitable[tuple[str, dict[str, Any] | None]]]
"""Asks one expert a whole chat body: (expert, body, request id) -> (the answer's text, its usage).
A call that fails raises ``coe.errors.CoeError``. Injected so that routing code (``coe profile``)
never starts backends or dispatches itself: the caller owns those."""

RouterFactory = Callable[["RegistryConfig", "Completer | None"], Router]
"""Builds a router from the whole registry (level 1 is fitted on the experts' descriptions too)."""
