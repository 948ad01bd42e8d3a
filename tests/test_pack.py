"""The committed skill pack is what its manifests say, and the demo registry serves it as trained.

No model runs here (the last test runs the router, with the real embedder). The pack's quality numbers
come from ``bench/quality.py``; its training is tested on the tiny model (test_train_adapter.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from coe.loader import load_registry
from coe.models.train import MANIFEST, file_sha256

ROOT = Path(__file__).resolve().parent.parent
PACK = ROOT / "examples" / "pack"
sys.path.insert(0, str(PACK))

import tasks  # noqa: E402


def test_demo_registry_serves_every_skill_adapter_with_its_training_prompt() -> None:
    cfg = load_registry(ROOT / "experts.yaml")
    launch = cfg.backends["local-cpu"].launch
    assert launch is not None
    served = {m.name: m.path for m in launch.lora_modules}
    assert set(served) == set(tasks.SKILLS)
    assert launch.max_loras >= len(served) + 1  # every skill and the zero-weight base adapter in one batch
    for name, spec in tasks.SKILLS.items():
        expert = next(e for e in cfg.experts if e.name == name)
        assert expert.adapter is not None and expert.adapter.name == name
        assert expert.system_prompt == spec["system_prompt"], f"{name}: retrain, or keep the prompts equal"
        assert expert.skills == spec["skills"]
    assert cfg.router.generalist == "generalist"
    assert cfg.router.profiles is not None and cfg.router.profiles.is_file()


@pytest.mark.parametrize("name", sorted(tasks.SKILLS))
def test_manifest_matches_the_committed_adapter_and_data(name: str) -> None:
    folder = PACK / "adapters" / name
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["name"] == name
    assert manifest["adapter_sha256"] == file_sha256(folder / "adapter_model.safetensors")
    assert manifest["data"]["sha256"] == file_sha256(PACK / "train" / manifest["data"]["path"])
    assert manifest["base"]["model"] == "gemma-3-270m" and len(manifest["base"]["sha256"]) == 64
    assert manifest["recipe"]["stop"] == "\n\nQuestion:"
    assert len(manifest["loss"]) == manifest["recipe"]["steps"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == manifest["recipe"]["rank"] and config["r"] <= 8  # the demo's --max-lora-rank


def test_training_data_never_holds_an_evaluation_question() -> None:
    held_out = set()
    for part in ("part1.jsonl", "part2.jsonl"):
        for line in (ROOT / "bench" / "data" / "quality" / part).read_text().splitlines():
            held_out.add(tasks.dedup_key(json.loads(line)))
    assert len(held_out) > 800
    for path in sorted((PACK / "train").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            user = json.loads(line)["messages"][-2]["content"]
            question = user.split("\n  choice: ")[0]
            assert tasks.dedup_key({"question": question}) not in held_out, f"{path.name}: {question!r}"


def test_the_demo_router_sends_real_bigbench_questions_to_their_skill_expert(tmp_path: Path) -> None:
    """Level 1 knows the skills: `coe route` on the demo registry (real embedder, classifier fitted
    on the category examples) puts each real BIG-bench question's own expert first."""
    part1 = [json.loads(x) for x in (ROOT / "bench" / "data" / "quality" / "part1.jsonl").read_text().splitlines()]
    queries = tmp_path / "q.jsonl"
    queries.write_text("".join(json.dumps({"id": r["id"], "question": tasks.prompt(r)}) + "\n" for r in part1))
    out = tmp_path / "d.jsonl"
    result = subprocess.run([sys.executable, "-m", "services.cli", "route", "--input", str(queries),
                             "--output", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    decisions = [json.loads(x) for x in out.read_text().splitlines()]
    first = [d["experts"][0]["name"] for d in decisions]
    hits = sum(f == r["skill"] for f, r in zip(first, part1, strict=True))
    assert hits >= 0.9 * len(part1), list(zip(first, [r["skill"] for r in part1], strict=True))
