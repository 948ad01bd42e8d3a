"""The baseline routers and the router registry (no network)."""

from __future__ import annotations

from pathlib import Path

import pytest

from coe.config import ExpertConfig, RegistryConfig, RouterConfig
from coe.errors import BackendUnavailable, ConfigError
from coe.loader import parse_registry
from routers import ROUTERS, RouteRequest, make_router

EXPERTS = [ExpertConfig(name=n, backend="b", model="m") for n in ("a", "b", "c", "d")]
def _cfg(**router: object) -> RegistryConfig:
    return RegistryConfig(router=RouterConfig.model_validate(router))


REQ = RouteRequest(messages=[{"role": "user", "content": "hi"}])


async def test_default_router_puts_the_default_first_then_fallbacks_in_file_order() -> None:
    decision = await make_router(_cfg(default_expert="c", fallbacks=2)).route(REQ, EXPERTS)
    assert decision.router == "default"
    assert decision.names() == ["c", "a", "b"]
    assert decision.experts[0].score == 1.0


async def test_default_router_without_default_takes_the_first() -> None:
    decision = await make_router(_cfg(fallbacks=0)).route(REQ, EXPERTS)
    assert decision.names() == ["a"]


async def test_random_router_is_reproducible_with_a_seed_and_covers_all() -> None:
    def router() -> object:
        return make_router(_cfg(strategy="random", seed=7, fallbacks=0))

    one, two = router(), router()
    first = [(await one.route(REQ, EXPERTS)).names()[0] for _ in range(40)]  # type: ignore[attr-defined]
    second = [(await two.route(REQ, EXPERTS)).names()[0] for _ in range(40)]  # type: ignore[attr-defined]
    assert first == second
    assert set(first) == {"a", "b", "c", "d"}


async def test_no_experts_is_unavailable() -> None:
    with pytest.raises(BackendUnavailable):
        await make_router(_cfg()).route(REQ, [])


def test_unknown_strategy_is_rejected_by_the_loader_and_by_make_router() -> None:
    with pytest.raises(ConfigError, match=r"experts\.yaml:2: router\.strategy: unknown router 'smart'"):
        parse_registry("router:\n  strategy: smart\n", "experts.yaml", Path("/srv/coe"))
    with pytest.raises(ConfigError, match=r"router\.strategy: unknown router 'smart'"):  # a config built in code
        make_router(_cfg(strategy="smart"))
    assert {"default", "random"} <= set(ROUTERS)


def test_decisions_are_json() -> None:
    import asyncio

    decision = asyncio.run(make_router(_cfg()).route(REQ, EXPERTS))
    assert decision.model_dump(mode="json")["experts"][0] == {"name": "a", "score": 1.0}
