"""Routing strategies behind one interface (``routers.base.Router``), and everything they are made of.

- the routers: ``baseline`` (default, random) and ``twolevel`` (two-level, embedding, symbolic);
- level 1, the category classifier: ``level1`` over the artifact of ``classifier`` (with ``tfidf``),
  which ``fit`` builds;
- level 2, Symbolic-MoE recruitment: ``recruiter`` over the ``profiles`` that ``profiling``
  (``coe profile``) measures;
- ``decisions``: ``coe route``'s inputs and the decision records it and ``POST /v1/route`` give.

The package imports only coe's leaves (``coe.config``, ``coe.errors``, ``coe.embed``, ``coe.files``,
``coe.jsonl``, ``coe.scoring``): what must call an expert takes an injected ``Ask`` or ``Completer``
(``routers.base``), so routing never starts backends or dispatches by itself.

``ROUTERS`` is the explicit registry the ``router.strategy`` key names (``coe.loader`` checks it):
add a router by writing its module and adding one line here.
"""

from __future__ import annotations

from coe.config import RegistryConfig, unknown_name
from coe.errors import ConfigError
from routers.base import Ask, Completer, ExpertChoice, Router, RouteRequest, RouterFactory, RoutingDecision
from routers.baseline import DefaultRouter, RandomRouter
from routers.twolevel import EmbeddingRouter, SymbolicRouter, TwoLevelRouter

ROUTERS: dict[str, RouterFactory] = {
    DefaultRouter.name: DefaultRouter,
    RandomRouter.name: RandomRouter,
    EmbeddingRouter.name: EmbeddingRouter,
    SymbolicRouter.name: SymbolicRouter,
    TwoLevelRouter.name: TwoLevelRouter,
}


def make_router(config: RegistryConfig, complete: Completer | None = None) -> Router:
    """The router ``router.strategy`` names; the two-level ones load (or fit) their classifier here."""
    problem = unknown_name(config.router.strategy, ROUTERS, "router")  # the loader checked it; code may not have
    if problem is not None:
        raise ConfigError([f"router.strategy: {problem}"])
    return ROUTERS[config.router.strategy](config, complete)


__all__ = ["ROUTERS", "Ask", "Completer", "ExpertChoice", "RouteRequest", "Router", "RoutingDecision", "make_router"]
