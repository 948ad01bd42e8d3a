"""Merged experts: a new adapter expert built from registered adapter experts (``coe experts merge`` and
``POST /v1/experts/merge`` share this).

The merge math lives in ``coe.models.merge``; this module is the registry's side of it: which experts
may be merged (adapters with files, on one backend), where the result may be written (under one of the
backend's ``adapter_roots``, which API registration requires anyway), whether the backend can serve
the resulting rank (``--max-lora-rank``), and the expert the result becomes. Everything that can be
checked is checked before the first byte is written, and the output appears by one rename.

The merged expert's skills and categories are the union of its sources'; the settings they all share
(``params`` such as the stop sequence, ``cost``, ``tier``, ``max_tokens``, and the system prompt unless
one is given) carry over. It has no measured profile,
so the router gives it a synthetic one until ``coe profile`` measures it.
"""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from coe.config import Adapter, ExpertConfig, RegistryConfig
from coe.errors import Conflict, Forbidden, NotFound, clip
from coe.models.merge import Lora, Merged, MergeError, MergeSpec, fitting_max_lora_rank, read_lora

if TYPE_CHECKING:
    from coe.backends.pool import BackendPool
    from coe.registry import RegistryManager

__all__ = ["MergePlan", "merge_and_register", "plan_merge", "run_merge", "yaml_stanza"]


@dataclass(frozen=True)
class MergePlan:
    """A checked merge: what to read, how to merge, where to write, and the expert it becomes."""

    name: str
    sources: list[ExpertConfig]
    spec: MergeSpec
    out: Path
    backend: str
    max_lora_rank: int | None
    system_prompt: str | None
    description: str

    def expert(self) -> ExpertConfig:
        shared: dict[str, Any] = {}  # what every source agrees on (sampling params and stop sequences, cost, tier)
        for key in ("params", "cost", "tier", "max_tokens"):
            values = [getattr(e, key) for e in self.sources]
            if all(v == values[0] for v in values):
                shared[key] = values[0]
        skills = list(dict.fromkeys(s for e in self.sources for s in e.skills))
        categories = list(dict.fromkeys(c for e in self.sources for c in e.categories))
        return ExpertConfig(name=self.name, backend=self.backend, model=self.sources[0].model,
                            adapter=Adapter(name=self.name, path=self.out), system_prompt=self.system_prompt,
                            description=self.description, skills=skills, categories=categories, **shared)


def plan_merge(config: RegistryConfig, experts: dict[str, ExpertConfig], name: str, source_names: list[str],
               spec: MergeSpec, *, out: Path | None = None, require_root: bool = False,
               system_prompt: str | None = None, description: str | None = None) -> MergePlan:
    """Check a merge against the registry. ``require_root``: the output must lie under an adapter root
    (API registration needs that; the CLI without ``--register`` may write anywhere)."""
    try:
        ExpertConfig(name=name, backend="-", model="-")  # the name's own rules
    except ValidationError as exc:
        raise MergeError(f"invalid name {clip(name)!r}: {exc.errors()[0]['msg']}", param="name") from exc
    spec.check(len(source_names))
    if len(set(source_names)) != len(source_names):
        raise MergeError(f"a source is named twice: {', '.join(source_names)}", param="from")
    if name in experts:
        raise Conflict(f"an expert named {name!r} already exists", param="name")
    sources: list[ExpertConfig] = []
    for source in source_names:
        expert = experts.get(source)
        if expert is None:
            raise NotFound(f"no expert named {clip(source)}", param="from", code="expert_not_found")
        if expert.adapter is None:
            raise MergeError(f"expert {source!r} is a whole model, not an adapter: only adapters merge",
                             param="from")
        if expert.adapter.path is None:
            raise MergeError(f"expert {source!r} names no adapter.path, so its files cannot be read",
                             param="from")
        sources.append(expert)
    backends = sorted({e.backend for e in sources})
    models = sorted({e.model for e in sources})
    if len(backends) > 1 or len(models) > 1:
        raise MergeError(f"the sources are on different backends or bases ({', '.join(backends)}; "
                         f"{', '.join(models)}): a merged adapter needs one base", param="from")
    backend_cfg = config.backends[backends[0]]
    roots = [root.resolve() for root in backend_cfg.adapter_roots]
    if out is None:
        if not roots:
            raise Forbidden(f"backend {backends[0]!r} has no adapter_roots, so there is nowhere to write the "
                            "merged adapter; add one (or pass --out)", param="name")
        out = roots[0] / name
    out = out.resolve()
    if require_root and not any(out.is_relative_to(root) for root in roots):
        raise Forbidden(f"{out} is not under an adapter root of backend {backends[0]!r} "
                        f"({', '.join(map(str, roots)) or 'none configured'})", param="out")
    if out.exists():
        raise Conflict(f"{out} already exists; pick another name or remove it", param="name")
    prompts = {e.system_prompt for e in sources}
    if system_prompt is None and len(prompts) == 1:
        system_prompt = prompts.pop()
    launch = backend_cfg.launch
    return MergePlan(name=name, sources=sources, spec=spec, out=out, backend=backends[0],
                     max_lora_rank=launch.max_lora_rank if launch is not None else None,
                     system_prompt=system_prompt,
                     description=description or f"{spec.method} merge of {', '.join(source_names)}")


def result_rank(plan: MergePlan, loras: list[Lora]) -> int:
    if plan.spec.method == "cat":
        return sum(lora.rank for lora in loras)
    return plan.spec.rank if plan.spec.rank is not None else max(lora.rank for lora in loras)


def run_merge(plan: MergePlan) -> tuple[Merged, ExpertConfig]:
    """Read, check the rank against the backend, merge, write (blocking: run it off the event loop)."""
    from coe.models.merge import check_compatible, merge_loras, write_merged

    if plan.out.exists():  # checked again here: under the adapter lock, a twin merge has finished meanwhile
        raise Conflict(f"{plan.out} already exists; pick another name or remove it", param="name")
    loras = [read_lora(e.adapter.path) for e in plan.sources if e.adapter is not None and e.adapter.path]
    check_compatible(loras)
    rank = result_rank(plan, loras)
    if plan.max_lora_rank is not None and rank > plan.max_lora_rank:
        fits = fitting_max_lora_rank(rank)
        hint = (f"raise launch.max_lora_rank (vLLM's --max-lora-rank) of backend {plan.backend!r} to {fits}"
                if fits is not None else "vLLM serves no LoRA rank that large")
        lower = " or pass a lower --rank" if plan.spec.method != "cat" else ""
        raise MergeError(f"the merged adapter has rank {rank}, above the backend's --max-lora-rank "
                         f"{plan.max_lora_rank}: {hint}{lower}", param="rank")
    merged = merge_loras(loras, plan.spec)
    write_merged(merged, loras, [e.name for e in plan.sources], plan.spec, plan.out, name=plan.name)
    return merged, plan.expert()


def yaml_stanza(expert: ExpertConfig) -> str:
    """The ``experts:`` entry for the file, for operators who keep their registry in YAML."""
    doc: dict[str, Any] = expert.model_dump(mode="json", exclude_defaults=True)
    return yaml.safe_dump({"experts": [doc]}, sort_keys=False, allow_unicode=True)


async def merge_and_register(registry: RegistryManager, pool: BackendPool, name: str, sources: list[str],
                             spec: MergeSpec, *, system_prompt: str | None = None,
                             description: str | None = None) -> tuple[ExpertConfig, dict[str, Any]]:
    """``POST /v1/experts/merge``: merge off the event loop under the new adapter's lock, then register
    (which loads it into vLLM). A failed registration removes the folder, so a retry starts clean.
    The lock (``BackendRuntime.adapter_lock``) holds across the replicas of one Redis store; the output
    folder appearing by one rename still keeps two merges of one name from both winning without one."""
    current = registry.current
    plan = plan_merge(current.config, current.experts, name, sources, spec, require_root=True,
                      system_prompt=system_prompt, description=description)
    async with pool.get(plan.backend).adapter_lock(plan.name):
        merged, expert = await asyncio.to_thread(run_merge, plan)
    try:
        registered = await registry.register(expert)
    except BaseException:
        shutil.rmtree(plan.out, ignore_errors=True)
        raise
    return registered, merged.manifest
