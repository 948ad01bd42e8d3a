"""Merge LoRA adapters into one: linear, CAT, TIES and DARE, each in the space its paper defines.

Why our own code and not peft's ``add_weighted_adapter``: peft's plain ``linear``/``ties``/``dare_*``
merge the A and B factors separately, which needs equal ranks and leaves cross terms (the product of
averaged factors is not the average of the products). The papers merge *task vectors*, here the
weight deltas. So every method but CAT works on ``ΔW_i = s_i · B_i · A_i`` per target module
(``s_i = lora_alpha / r``), and the merged ΔW is factored back to LoRA form by a truncated SVD at
``rank`` (peft's ``*_svd`` combinations do the same). The relative Frobenius error of that
factoring is reported per adapter, so nobody has to guess what the rank cost.

- ``cat`` (LoRA Soups): A stacked, weighted B side by side. Exact: ΔW = Σ w_i ΔW_i at rank Σ r_i.
- ``linear`` (task arithmetic): ΔW = Σ w_i ΔW_i, then SVD. At rank ≥ Σ r_i it equals ``cat``.
- ``ties`` (TIES-Merging): τ_i = w_i ΔW_i; keep each τ_i's top ``density`` fraction by magnitude;
  elect each entry's sign as the sign of the sum of the trimmed τ; average the trimmed entries that
  agree with it (disjoint mean; λ = 1, scale with the weights).
- ``dare_linear`` / ``dare_ties`` (DARE): drop each entry of ΔW_i with probability 1 − density and
  rescale the rest by 1 / density, then sum with weights (linear) or elect signs and take the
  disjoint mean (ties, without TIES' trim). The masks come from ``seed``: same seed, same adapter.

The default rank follows peft: the largest source rank for SVD methods, the sum for ``cat``. All
arithmetic is float64; the result is written as float32 safetensors with ``lora_alpha = r`` (scale 1).
An output folder is built beside its destination and renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coe.errors import InvalidRequest

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

    Array = NDArray[np.float64]

METHODS = ("linear", "cat", "ties", "dare_linear", "dare_ties")
MANIFEST = "coe-adapter.json"
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for ``--max-lora-rank`` (``vllm.config.lora.MaxLoRARanks`` in 0.32)."""
_UNSUPPORTED = ("use_dora", "use_rslora", "modules_to_save", "rank_pattern", "alpha_pattern", "layers_to_transform")


class MergeError(InvalidRequest):
    """Sources that cannot be merged, or a bad recipe; nothing was written."""

    code = "invalid_merge"


@dataclass(frozen=True)
class MergeSpec:
    """How to merge: ``weights`` default to 1 per source, ``density`` is for TIES and DARE only."""

    method: str
    weights: tuple[float, ...] | None = None
    density: float | None = None
    rank: int | None = None
    seed: int = 0

    def check(self, sources: int) -> None:
        if self.method not in METHODS:
            raise MergeError(f"unknown merge method {self.method!r}: one of {', '.join(METHODS)}", param="method")
        if sources < 2:
            raise MergeError("a merge needs at least two source adapters", param="from")
        if self.weights is not None and len(self.weights) != sources:
            raise MergeError(f"{len(self.weights)} weights for {sources} sources", param="weights")
        uses_density = self.method in ("ties", "dare_linear", "dare_ties")
        if self.density is not None and not uses_density:
            raise MergeError(f"--density applies to ties and dare_*, not {self.method}", param="density")
        if self.density is not None and not 0.0 < self.density <= 1.0:
            raise MergeError(f"density must be in (0, 1], not {self.density}", param="density")
        if self.rank is not None and self.rank < 1:
            raise MergeError(f"rank must be at least 1, not {self.rank}", param="rank")
        if self.rank is not None and self.method == "cat":
            raise MergeError("cat is exact at the summed rank; --rank applies to the SVD methods", param="rank")


@dataclass
class Lora:
    """One adapter as read from its folder: config, and per target module (A, B, scale)."""

    path: Path
    config: dict[str, Any]
    modules: dict[str, tuple[Array, Array, float]]
    sha256: str
    base_sha256: str | None = None

    @property
    def rank(self) -> int:
        return int(self.config["r"])

    @property
    def targets(self) -> list[str]:
        raw = self.config.get("target_modules") or []
        return sorted([raw] if isinstance(raw, str) else raw)


@dataclass
class Merged:
    """The merged adapter, before or after it is written."""

    rank: int
    modules: dict[str, tuple[Array, Array]]
    error: dict[str, float] = field(default_factory=dict)
    path: Path | None = None
    manifest: dict[str, Any] = field(default_factory=dict)


def read_lora(path: Path) -> Lora:
    """Read a peft LoRA folder; every way it can be unusable for a merge is a MergeError naming it."""
    import numpy as np
    from safetensors.numpy import load_file

    config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not config_file.is_file() or not weights_file.is_file():
        raise MergeError(f"{path}: not a LoRA adapter folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        config: dict[str, Any] = json.loads(config_file.read_text(encoding="utf-8"))
        tensors = load_file(str(weights_file))
    except (OSError, ValueError) as exc:
        raise MergeError(f"{path}: cannot read the adapter: {exc}") from exc
    if config.get("peft_type", "LORA") != "LORA":
        raise MergeError(f"{path}: peft_type {config.get('peft_type')!r}; only LORA adapters merge")
    bad = [key for key in _UNSUPPORTED if config.get(key)]
    if bad:
        raise MergeError(f"{path}: uses {', '.join(bad)}, which this merge does not support")
    rank, alpha = int(config.get("r", 0)), float(config.get("lora_alpha", 0))
    modules: dict[str, tuple[Array, Array, float]] = {}
    for key in tensors:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        b_key = f"{module}.lora_B.weight"
        if b_key not in tensors:
            raise MergeError(f"{path}: {key} has no lora_B")
        a, b = tensors[key].astype(np.float64), tensors[b_key].astype(np.float64)
        if a.shape[0] != rank or b.shape[1] != rank:
            raise MergeError(f"{path}: {module} has shapes {a.shape} / {b.shape}, not rank {rank}")
        modules[module] = (a, b, alpha / rank)
    if not modules:
        raise MergeError(f"{path}: no LoRA weights in {WEIGHTS_FILE}")
    base_sha = None
    manifest = path / MANIFEST
    if manifest.is_file():
        try:
            base_sha = (json.loads(manifest.read_text(encoding="utf-8")).get("base") or {}).get("sha256")
        except (OSError, ValueError):
            base_sha = None
    digest = hashlib.sha256(weights_file.read_bytes()).hexdigest()
    return Lora(path=path, config=config, modules=modules, sha256=digest, base_sha256=base_sha)


def check_compatible(sources: list[Lora]) -> None:
    """One base, one set of target modules and the same module shapes, or a MergeError saying which."""
    first = sources[0]
    for other in sources[1:]:
        base_a, base_b = first.config.get("base_model_name_or_path"), other.config.get("base_model_name_or_path")
        if base_a != base_b or (first.base_sha256 and other.base_sha256 and first.base_sha256 != other.base_sha256):
            raise MergeError(f"different base models: {first.path} is on {base_a!r}, {other.path} on {base_b!r}")
        if first.targets != other.targets or set(first.modules) != set(other.modules):
            raise MergeError(f"different target modules: {first.path} has {first.targets}, "
                             f"{other.path} has {other.targets}")
        for module, (a, b, _) in first.modules.items():
            oa, ob, _ = other.modules[module]
            if a.shape[1] != oa.shape[1] or b.shape[0] != ob.shape[0]:
                raise MergeError(f"{module}: {first.path} and {other.path} adapt layers of different shapes")


def delta(a: Array, b: Array, scale: float) -> Array:
    """ΔW = scale · B · A, the update the adapter adds to the layer's weight."""
    result: Array = scale * (b @ a)
    return result


def trim(tau: Array, density: float) -> Array:
    """TIES' trim: keep the ``density`` fraction of entries largest in magnitude, zero the rest."""
    import numpy as np

    keep = round(density * tau.size)
    if keep >= tau.size:
        return tau
    out = np.zeros_like(tau)
    if keep <= 0:
        return out
    flat = np.abs(tau).ravel()
    top = np.argpartition(flat, tau.size - keep)[tau.size - keep:]
    out.ravel()[top] = tau.ravel()[top]
    return out


def drop(tau: Array, density: float, rng: Any) -> Array:
    """DARE: keep each entry with probability ``density`` and rescale the kept ones by 1 / density."""
    if density >= 1.0:
        return tau
    mask = rng.random(tau.shape) < density
    result: Array = tau * mask / density
    return result


def disjoint_mean(taus: list[Array]) -> Array:
    """TIES' elect and merge: each entry's sign is that of the sum; average the entries that agree."""
    import numpy as np

    stack = np.stack(taus)
    sign = np.sign(stack.sum(axis=0))
    agree = (np.sign(stack) == sign) & (stack != 0)
    count = agree.sum(axis=0)
    result: Array = np.where(agree, stack, 0.0).sum(axis=0) / np.maximum(count, 1)
    return result


def merge_delta(deltas: list[Array], spec: MergeSpec, weights: list[float], rngs: list[Any]) -> Array:
    """The merged ΔW of one module by ``spec.method`` (not ``cat``, which never forms ΔW)."""
    taus = [w * d for w, d in zip(weights, deltas, strict=True)]
    density = 1.0 if spec.density is None else spec.density
    if spec.method == "linear":
        result: Array = sum(taus[1:], taus[0])
        return result
    if spec.method == "ties":
        return disjoint_mean([trim(t, density) for t in taus])
    dropped = [drop(t, density, rng) for t, rng in zip(taus, rngs, strict=True)]
    if spec.method == "dare_linear":
        result = sum(dropped[1:], dropped[0])
        return result
    return disjoint_mean(dropped)  # dare_ties


def factor(dw: Array, rank: int) -> tuple[Array, Array, float]:
    """Truncated SVD: (A, B) with B · A the best rank-``rank`` approximation of ΔW, and the relative
    Frobenius error of that approximation."""
    import numpy as np

    u, s, vt = np.linalg.svd(dw, full_matrices=False)
    r = min(rank, s.size)
    b, a = u[:, :r] * s[:r], vt[:r]
    if r < rank:  # pad with zero rows/columns so every module has the adapter's rank
        b = np.concatenate([b, np.zeros((b.shape[0], rank - r))], axis=1)
        a = np.concatenate([a, np.zeros((rank - r, a.shape[1]))], axis=0)
    norm = float(np.linalg.norm(dw))
    error = float(np.sqrt(max(float(np.sum(s[r:] ** 2)), 0.0))) / norm if norm > 0 else 0.0
    return a, b, error


def merge_loras(sources: list[Lora], spec: MergeSpec) -> Merged:
    """The merged factors of every module (in memory); see the module docstring for each method."""
    import numpy as np

    spec.check(len(sources))
    check_compatible(sources)
    weights = list(spec.weights) if spec.weights is not None else [1.0] * len(sources)
    if spec.method == "cat":
        rank = sum(s.rank for s in sources)
        modules = {}
        for module in sorted(sources[0].modules):
            parts = [s.modules[module] for s in sources]
            a = np.concatenate([p[0] for p in parts], axis=0)
            b = np.concatenate([w * p[2] * p[1] for w, p in zip(weights, parts, strict=True)], axis=1)
            modules[module] = (a, b)
        return Merged(rank=rank, modules=modules, error=dict.fromkeys(modules, 0.0))
    rank = spec.rank if spec.rank is not None else max(s.rank for s in sources)
    modules, errors = {}, {}
    for index, module in enumerate(sorted(sources[0].modules)):
        # One generator per (seed, module, source): the masks do not depend on module order or count.
        rngs = [np.random.default_rng([spec.seed, index, j]) for j in range(len(sources))]
        deltas = [delta(*s.modules[module]) for s in sources]
        a, b, errors[module] = factor(merge_delta(deltas, spec, weights, rngs), rank)
        modules[module] = (a, b)
    return Merged(rank=rank, modules=modules, error=errors)


def fitting_max_lora_rank(rank: int) -> int | None:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds ``rank`` (None: none does)."""
    return next((value for value in VLLM_MAX_LORA_RANKS if value >= rank), None)


def write_merged(merged: Merged, sources: list[Lora], names: list[str], spec: MergeSpec, out: Path,
                 *, name: str) -> Merged:
    """Write the adapter and its manifest to ``out`` (which must not exist) through a staging folder."""
    import numpy as np
    from safetensors.numpy import save_file

    if out.exists():
        raise MergeError(f"{out} already exists; pick another name or remove it", param="name")
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.merge-", dir=out.parent))
    try:
        tensors = {}
        for module, (a, b) in merged.modules.items():
            tensors[f"{module}.lora_A.weight"] = np.ascontiguousarray(a, dtype=np.float32)
            tensors[f"{module}.lora_B.weight"] = np.ascontiguousarray(b, dtype=np.float32)
        save_file(tensors, str(stage / WEIGHTS_FILE))
        config = dict(sources[0].config)
        config.update(r=merged.rank, lora_alpha=merged.rank, lora_dropout=0.0, inference_mode=True)
        (stage / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        errors = list(merged.error.values())
        manifest = {
            "name": name,
            "base": {"model": sources[0].config.get("base_model_name_or_path"), "sha256": sources[0].base_sha256},
            "merge": {
                "method": spec.method,
                "space": "factors (exact)" if spec.method == "cat" else "delta W = B·A, then truncated SVD",
                "weights": list(spec.weights) if spec.weights is not None else [1.0] * len(sources),
                "density": spec.density, "seed": spec.seed, "rank": merged.rank,
                "implementation": "coe.models.merge (NumPy, float64)",
            },
            "sources": [{"expert": n, "path": str(s.path), "rank": s.rank, "adapter_sha256": s.sha256}
                        for n, s in zip(names, sources, strict=True)],
            "reconstruction_error": {"relative_frobenius_max": max(errors), "relative_frobenius_mean":
                                     sum(errors) / len(errors), "per_module": merged.error},
            "adapter_sha256": hashlib.sha256((stage / WEIGHTS_FILE).read_bytes()).hexdigest(),
            "wall_time_s": round(time.monotonic() - started, 3),
        }
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        try:
            os.rename(stage, out)  # fails if ``out`` appeared meanwhile and is not empty
        except OSError as exc:
            raise MergeError(f"{out} appeared while merging; nothing was written", param="name") from exc
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    merged.path, merged.manifest = out, manifest
    return merged
