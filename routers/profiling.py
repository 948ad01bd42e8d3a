"""``coe profile``: run every expert on labelled validation questions, score the answers,
and write per-expert, per-skill profiles (see ``routers.profiles``).

Every call goes through an injected ``Ask`` (``routers.base``): the caller starts
the backends and dispatches (``coe profile`` calls through the dispatcher, with
retries and fallback off: one expert per call), so this module only decides what
to ask and scores it. Work is grouped per expert, as Symbolic-MoE does offline:
one expert's whole group runs before the next, so a backend that swaps models or
adapters loads each once. A question an expert could not be reached for is
recorded as an error and left out of its profile (it is not "wrong").
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coe.config import ExpertConfig
from coe.errors import CoeError, InvalidRequest
from coe.jsonl import read_jsonl
from coe.scoring import chance, format_question, is_correct
from routers.base import Ask
from routers.profiles import Outcome, ProfileSet, build_profiles, skills_of


@dataclass
class ProfileRun:
    profiles: ProfileSet
    records: list[dict[str, Any]]


def read_items(path: Path, *, limit: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Labelled questions (``question``, ``answer``, optional ``choices``); every bad line is reported."""
    def parse(item: dict[str, Any], number: int) -> dict[str, Any] | str:
        if not isinstance(item.get("question"), str) or "answer" not in item:
            return "needs 'question' (a string) and 'answer'"
        item.setdefault("id", f"line-{number}")
        return item

    items = read_jsonl(path, parse)
    if limit is not None and limit < len(items):
        items = random.Random(seed).sample(items, limit)
    return items


def default_skills_field(items: list[dict[str, Any]]) -> str:
    """``labels.keywords`` when the data has keywords (BIG-bench), else ``labels.subject`` (MMLU)."""
    for field in ("labels.keywords", "labels.subject", "labels.subcategory"):
        if items and skills_of(items[0], field):
            return field
    raise InvalidRequest("the data has no labels.keywords or labels.subject: pass --skills FIELD")


async def run_profile(ask: Ask, items: list[dict[str, Any]], *, skills_field: str,
                      experts: list[ExpertConfig], concurrency: int = 8, max_tokens: int = 16,
                      source: str = "", aggregation: int = 0,
                      progress: Callable[[str], None] = lambda _: None) -> ProfileRun:
    """Each expert's whole group in turn; then, with ``aggregation`` > 0, each expert as the aggregator
    of the others' answers on that many questions (its aggregation score). ``ask`` must reach every
    expert in ``experts`` (their backends started and ready)."""
    records: list[dict[str, Any]] = []
    for expert in experts:  # one expert's whole group at a time
        gate = asyncio.Semaphore(concurrency)
        t0 = time.perf_counter()

        async def one(item: dict[str, Any], expert: ExpertConfig = expert,
                      gate: asyncio.Semaphore = gate) -> dict[str, Any]:
            body = {"messages": [{"role": "user", "content": format_question(item)}],
                    "max_tokens": max_tokens, "temperature": 0}
            async with gate:
                try:
                    text, usage = await ask(expert, body, f"profile-{expert.name}-{item['id']}")
                except CoeError as exc:
                    return {"expert": expert.name, "id": item["id"], "error": exc.message}
            return {"expert": expert.name, "id": item["id"], "answer": text,
                    "correct": is_correct(item, text), "skills": list(skills_of(item, skills_field)),
                    "chance": chance(item), "usage": usage}

        group = await asyncio.gather(*(one(item) for item in items))
        records += group
        done = [r for r in group if "correct" in r]
        accuracy = sum(r["correct"] for r in done) / len(done) if done else 0.0
        progress(f"{expert.name}: {len(done)}/{len(items)} answered, accuracy {accuracy:.3f} "
                 f"({time.perf_counter() - t0:.0f}s)")
    scores = {}
    if aggregation > 0 and len(experts) > 1:
        scores = await _aggregation_scores(ask, experts, items[:aggregation], records, concurrency,
                                           max_tokens, progress)
    outcomes = [Outcome(r["expert"], tuple(r["skills"]), r["correct"]) for r in records if "correct" in r]
    profiles = build_profiles(outcomes, source=source, skills_field=skills_field)
    for name, score in scores.items():
        if name in profiles.experts:
            profiles.experts[name].aggregation_score = score
    return ProfileRun(profiles, records)


def aggregation_prompt(item: dict[str, Any], answers: list[str]) -> str:
    """The question, then the other experts' answers as quoted material (never as instructions)."""
    quoted = "\n".join(f"Answer {i + 1}: \"{a.strip()[:500]}\"" for i, a in enumerate(answers))
    return (f"{format_question(item)}\n\nOther experts answered (quoted, may be wrong):\n{quoted}\n\n"
            "Weigh them and give the correct answer.")


async def _aggregation_scores(ask: Ask, experts: list[ExpertConfig], items: list[dict[str, Any]],
                              records: list[dict[str, Any]], concurrency: int, max_tokens: int,
                              progress: Callable[[str], None]) -> dict[str, float]:
    """Symbolic-MoE's aggregator choice: how often an expert, given the others' answers, gets it right."""
    answers: dict[Any, dict[str, str]] = {}
    for r in records:
        if "answer" in r:
            answers.setdefault(r["id"], {})[r["expert"]] = r["answer"]
    scores: dict[str, float] = {}
    for aggregator in experts:  # grouped per expert, like the answers
        gate = asyncio.Semaphore(concurrency)

        async def one(item: dict[str, Any], aggregator: ExpertConfig = aggregator,
                      gate: asyncio.Semaphore = gate) -> bool | None:
            others = [a for name, a in answers.get(item["id"], {}).items() if name != aggregator.name]
            if not others:
                return None
            body = {"messages": [{"role": "user", "content": aggregation_prompt(item, others)}],
                    "max_tokens": max_tokens, "temperature": 0}
            async with gate:
                try:
                    text, _ = await ask(aggregator, body, f"aggregate-{aggregator.name}-{item['id']}")
                except CoeError:
                    return None
            return is_correct(item, text)

        outcomes = [o for o in await asyncio.gather(*(one(i) for i in items)) if o is not None]
        if outcomes:
            scores[aggregator.name] = round(sum(outcomes) / len(outcomes), 4)
            progress(f"{aggregator.name}: aggregation score {scores[aggregator.name]:.3f} on {len(outcomes)}")
    return scores
