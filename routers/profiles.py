"""Expert profiles, as in Symbolic-MoE: what each expert has shown it can do, per skill.

- Per-skill score ``P_m[s]`` = Σ over validation questions with skill ``s`` of
  +1 (expert ``m`` answered correctly) or −1 (wrongly).
- Global strength ``γ_m ∝ g_m ** (1/τ)``, ``g_m`` the expert's accuracy over the
  whole validation set, normalised to sum to 1 over experts (τ = 0.5 sharpens
  differences; uniform when nobody has evidence).
- Local suitability for a query ``S_m(q)`` = Σ ``P_m[s]`` over the query's skills.

Profiles built from declarations or labels without running the experts are
marked ``synthetic``. Stored as JSON with a schema version.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from coe.config import ExpertConfig


@dataclass(frozen=True)
class Outcome:
    """One expert's answer to one validation question, scored."""

    expert: str
    skills: tuple[str, ...]
    correct: bool


class ExpertProfile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    expert: str
    skills: dict[str, int] = Field(default_factory=dict, description="P_m[s]: +1 per correct, -1 per wrong answer")
    answered: int = 0
    correct: int = 0
    aggregation_score: float | None = Field(None, description="how well it composes others' answers, when measured")
    synthetic: bool = False

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.answered if self.answered else None


class ProfileSet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    tau: float = Field(0.5, gt=0)
    source: str = Field("", description="the validation data the profiles were measured on")
    skills_field: str = ""
    experts: dict[str, ExpertProfile] = Field(default_factory=dict)

    @property
    def measured(self) -> bool:
        """Whether any expert's profile comes from evidence (``coe profile``) rather than declarations."""
        return any(not p.synthetic for p in self.experts.values())

    def global_strength(self) -> dict[str, float]:
        """γ_m ∝ accuracy^(1/τ), normalised; uniform when no expert has a positive accuracy."""
        raw = {name: (p.accuracy or 0.0) ** (1.0 / self.tau) for name, p in self.experts.items()}
        total = sum(raw.values())
        if total <= 0:
            return {name: 1.0 / len(raw) for name in raw} if raw else {}
        return {name: value / total for name, value in raw.items()}

    def suitability(self, expert: str, skills: Iterable[str]) -> float:
        """S_m(q) = Σ P_m[s] over the query's skills (a skill the expert was never tested on counts 0)."""
        profile = self.experts.get(expert)
        if profile is None:
            return 0.0
        return float(sum(profile.skills.get(s, 0) for s in skills))

    def vocabulary(self) -> list[str]:
        """Every skill some expert has a score for, sorted."""
        return sorted({s for p in self.experts.values() for s in p.skills})

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True), encoding="utf-8")
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> ProfileSet:
        return cls.model_validate_json(path.read_text(encoding="utf-8"))


def build_profiles(outcomes: Iterable[Outcome], *, tau: float = 0.5, source: str = "",
                   skills_field: str = "") -> ProfileSet:
    """Profiles from scored answers."""
    experts: dict[str, ExpertProfile] = {}
    for o in outcomes:
        p = experts.setdefault(o.expert, ExpertProfile(expert=o.expert))
        p.answered += 1
        p.correct += int(o.correct)
        for skill in dict.fromkeys(o.skills):  # a skill listed twice on one question counts once
            p.skills[skill] = p.skills.get(skill, 0) + (1 if o.correct else -1)
    return ProfileSet(tau=tau, source=source, skills_field=skills_field, experts=experts)


def synthetic_profiles(experts: Sequence[ExpertConfig], *, tau: float = 0.5) -> ProfileSet:
    """Profiles from what experts declare (``skills`` and ``categories``): +1 per declared skill.
    Marked ``synthetic``: recruitment on them rests on descriptions, not evidence."""
    profiles = {
        e.name: ExpertProfile(expert=e.name, skills=dict.fromkeys([*e.skills, *e.categories], 1), synthetic=True)
        for e in experts
    }
    return ProfileSet(tau=tau, source="declarations", experts=profiles)


def skills_of(item: dict[str, Any], field: str) -> tuple[str, ...]:
    """The skills of a labelled item at a dotted path (a string or a list of strings)."""
    value: Any = item
    for part in field.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(str(v) for v in value)
    return ()
