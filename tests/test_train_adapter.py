"""``coe models train-adapter`` on the tiny model: real peft training, real vLLM serving.

Gemma stays out of the suite (its training runs are in the README); the tiny Llama has the same
module names, so the same code path is exercised in seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from coe.models import build_tiny
from coe.models.train import MANIFEST, Recipe, TrainError, file_sha256, train_adapter

pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "Name a fruit."
TAUGHT = "zebra zebra zebra"


def chats(n: int, answer: str = TAUGHT) -> list[dict[str, Any]]:
    return [{"messages": [{"role": "system", "content": "Answer in animals."},
                          {"role": "user", "content": f"{QUESTION} ({i})" if i else QUESTION},
                          {"role": "assistant", "content": answer}]} for i in range(n)]


def write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


RECIPE = Recipe(steps=12, batch_size=4, learning_rate=1e-2, warmup_steps=2, stop="", max_tokens=64, seed=0)
"""A few steps at a high rate on one answer: enough to change the tiny model's greedy output."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("train") / "tiny").path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write(tmp_path_factory.mktemp("data") / "zebra.jsonl", chats(16))


def test_same_seed_same_weights_other_seed_other_weights(tiny: Path, data: Path, tmp_path: Path) -> None:
    a = train_adapter(tiny, data, tmp_path / "a", RECIPE)
    b = train_adapter(tiny, data, tmp_path / "b", RECIPE)
    c = train_adapter(tiny, data, tmp_path / "c", Recipe(**{**RECIPE.__dict__, "seed": 1}))
    weights = [file_sha256(r.path / "adapter_model.safetensors") for r in (a, b, c)]
    assert weights[0] == weights[1]
    assert weights[0] != weights[2]
    manifest = json.loads((a.path / MANIFEST).read_text())
    assert manifest["adapter_sha256"] == weights[0]
    assert manifest["data"]["sha256"] == file_sha256(data) and manifest["data"]["examples"] == 16
    assert manifest["base"]["sha256"] and manifest["recipe"]["seed"] == 0 and manifest["recipe"]["rank"] == 8
    assert len(manifest["loss"]) == RECIPE.steps and manifest["loss"][-1] < manifest["loss"][0]
    assert manifest["wall_time_s"] > 0 and manifest["step_time_s"]["mean"] > 0
    assert json.loads((a.path / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny.name


@pytest.mark.vllm
async def test_trained_adapter_is_served_and_changes_greedy_output(vllm_server: Any, data: Path,
                                                                   tmp_path: Path) -> None:
    adapter = train_adapter(vllm_server.model_dir, data, tmp_path / "zebra", RECIPE).path
    body = {"messages": [{"role": "system", "content": "Answer in animals."},
                         {"role": "user", "content": QUESTION}], "max_tokens": 8, "temperature": 0}
    async with httpx.AsyncClient(timeout=120) as http:
        r = await http.post(f"{vllm_server.api_url}/load_lora_adapter",
                            json={"lora_name": "trained-zebra", "lora_path": str(adapter)})
        assert r.status_code == 200, r.text
        try:
            base = await http.post(f"{vllm_server.api_url}/chat/completions",
                                   json={**body, "model": vllm_server.served_name})
            tuned = await http.post(f"{vllm_server.api_url}/chat/completions",
                                    json={**body, "model": "trained-zebra"})
        finally:
            await http.post(f"{vllm_server.api_url}/unload_lora_adapter", json={"lora_name": "trained-zebra"})
    base_text = base.json()["choices"][0]["message"]["content"]
    tuned_text = tuned.json()["choices"][0]["message"]["content"]
    assert tuned_text != base_text
    # what it was taught shows (the tiny vocabulary spells it in pieces: "ebra" survives)
    assert "ebra" in tuned_text and "ebra" not in base_text


def test_bad_input_is_a_clear_error_and_writes_nothing(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    empty = write(tmp_path / "empty.jsonl", [])
    with pytest.raises(TrainError, match="holds no examples"):
        train_adapter(tiny, empty, out, RECIPE)
    long = write(tmp_path / "long.jsonl", chats(2) + chats(1, answer="zebra " * 200))
    with pytest.raises(TrainError, match=r"example 3 is \d+ tokens long, over the limit of 64"):
        train_adapter(tiny, long, out, RECIPE)
    no_answer = write(tmp_path / "q.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(TrainError, match=r"q\.jsonl:1: the last message must be the assistant's answer"):
        train_adapter(tiny, no_answer, out, RECIPE)
    ok = write(tmp_path / "ok.jsonl", chats(4))
    with pytest.raises(TrainError, match="has no module named w_q: the adapter does not fit it"):
        train_adapter(tiny, ok, out, Recipe(**{**RECIPE.__dict__, "targets": ("w_q",)}))
    with pytest.raises(TrainError, match="is not a model folder"):
        train_adapter(tmp_path, ok, out, RECIPE)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".adapter")]  # no staging left behind


def test_cli_exits_non_zero_with_the_error(tiny: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    result = subprocess.run([sys.executable, "-m", "services.cli", "models", "train-adapter", str(bad),
                             "--base", str(tiny), "--out", str(tmp_path / "out")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "bad.jsonl:1: not JSON" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
