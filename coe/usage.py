"""Token usage and cost: summed over every expert call a request makes.

Usage dicts are OpenAI's shape (``prompt_tokens``, ``completion_tokens``,
``total_tokens``); missing usage (a server that did not report it) counts as
zero tokens and makes the cost ``None`` rather than a wrong number.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from coe.config import ExpertConfig

USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")


def normalize(usage: Mapping[str, Any] | None) -> dict[str, int] | None:
    if not usage:
        return None
    out = {k: int(usage.get(k) or 0) for k in USAGE_KEYS}
    out["total_tokens"] = out["total_tokens"] or out["prompt_tokens"] + out["completion_tokens"]
    return out


def add(usages: Iterable[Mapping[str, int] | None]) -> dict[str, int]:
    total = dict.fromkeys(USAGE_KEYS, 0)
    for usage in usages:
        for key in USAGE_KEYS:
            total[key] += int((usage or {}).get(key, 0))
    return total


def cost(expert: ExpertConfig, usage: Mapping[str, int] | None) -> float | None:
    """USD for one call at the expert's prices; None when the server reported no usage."""
    if usage is None:
        return None
    return round(expert.cost.of(usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)), 10)


def total_cost(costs: Iterable[float | None]) -> float | None:
    values = list(costs)
    if not values or any(c is None for c in values):
        return None
    return round(sum(c for c in values if c is not None), 10)
