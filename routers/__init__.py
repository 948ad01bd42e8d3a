"""Routing strategies behind one interface (``routers.base.Router``).

``ROUTERS`` is the explicit registry the ``router.strategy`` key names: add a
router by writing its module and adding one line here.
"""

from __future__ import annotations

from coe.config import RegistryConfig
from coe.errors import ConfigError
from routers.base import Completer, ExpertChoice, Router, RouteRequest, RouterFactory, RoutingDecision
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
    factory = ROUTERS.get(config.router.strategy)
    if factory is None:
        known = ", ".join(sorted(ROUTERS))
        raise ConfigError([f"router.strategy: unknown router {config.router.strategy!r} (known: {known})"])
    return factory(config, complete)


__all__ = ["ROUTERS", "Completer", "ExpertChoice", "RouteRequest", "Router", "RoutingDecision", "make_router"]
