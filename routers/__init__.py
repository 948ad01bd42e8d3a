"""Routing strategies behind one interface (``routers.base.Router``).

``ROUTERS`` is the explicit registry the ``router.strategy`` key names: add a
router by writing its module and adding one line here.
"""

from __future__ import annotations

from coe.config import RouterConfig
from coe.errors import ConfigError
from routers.base import ExpertChoice, Router, RouteRequest, RouterFactory, RoutingDecision
from routers.baseline import DefaultRouter, RandomRouter

ROUTERS: dict[str, RouterFactory] = {
    DefaultRouter.name: DefaultRouter,
    RandomRouter.name: RandomRouter,
}


def make_router(config: RouterConfig) -> Router:
    factory = ROUTERS.get(config.strategy)
    if factory is None:
        known = ", ".join(sorted(ROUTERS))
        raise ConfigError([f"router.strategy: unknown router {config.strategy!r} (known: {known})"])
    return factory(config)


__all__ = ["ROUTERS", "ExpertChoice", "RouteRequest", "Router", "RoutingDecision", "make_router"]
