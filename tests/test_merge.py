"""Merged adapter experts (``coe experts merge``, ``POST /v1/experts/merge``) on the tiny model.

The merge math is checked against references written here in plain NumPy, independently of
``coe.models.merge``: each merged ΔW (B·A as written to disk) must equal the reference ΔW within the
SVD error the manifest reports, and that reported error must be the true one. The merged adapter is
then served by the session's real vLLM, whose greedy tokens must equal transformers + peft with the
same adapter (fp32).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from apphelpers import running_coe, tiny_registry, write_registry
from safetensors.numpy import load_file, save_file

from coe.config import Adapter, RegistryConfig
from coe.errors import Conflict, Forbidden, NotFound
from coe.merging import plan_merge, run_merge
from coe.models.merge import MergeError, MergeSpec

pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parent.parent
TOKENS = 8


# -- independent references -------------------------------------------------------------------


def ref_deltas(folder: Path) -> dict[str, np.ndarray]:
    """Each module's ΔW = (alpha / r) · B · A, from the raw files."""
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    scale = config["lora_alpha"] / config["r"]
    out = {}
    for key in tensors:
        if key.endswith("lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            out[module] = scale * np.einsum("or,ri->oi", tensors[module + ".lora_B.weight"].astype(np.float64),
                                            tensors[key].astype(np.float64))
    return out


def ref_trim(x: np.ndarray, density: float) -> np.ndarray:
    keep = int(np.floor(density * x.size + 0.5))
    threshold = np.sort(np.abs(x).ravel())[::-1][keep - 1]
    return np.where(np.abs(x) >= threshold, x, 0.0)


def ref_elect_mean(taus: list[np.ndarray]) -> np.ndarray:
    sign = np.sign(sum(taus))
    total, count = np.zeros_like(taus[0]), np.zeros_like(taus[0])
    for tau in taus:
        agree = (np.sign(tau) == sign) & (tau != 0)
        total += np.where(agree, tau, 0.0)
        count += agree
    result: np.ndarray = total / np.maximum(count, 1)
    return result


def reference(method: str, folders: list[Path], weights: list[float], density: float, seed: int
              ) -> dict[str, np.ndarray]:
    """The merged ΔW per module, as the papers define each method. DARE's masks follow coe's stated
    contract: entry kept when ``default_rng([seed, module index (sorted), source index]).random() < density``."""
    deltas = [ref_deltas(f) for f in folders]
    out: dict[str, Any] = {}
    for index, module in enumerate(sorted(deltas[0])):
        taus = [w * d[module] for w, d in zip(weights, deltas, strict=True)]
        if method in ("linear", "cat"):
            out[module] = sum(taus)
        elif method == "ties":
            out[module] = ref_elect_mean([ref_trim(t, density) for t in taus])
        else:
            kept = [t * (np.random.default_rng([seed, index, j]).random(t.shape) < density) / density
                    for j, t in enumerate(taus)]
            out[module] = sum(kept) if method == "dare_linear" else ref_elect_mean(kept)
    return out


def written_deltas(folder: Path) -> dict[str, np.ndarray]:
    return ref_deltas(folder)


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from coe.models.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny-merge"), adapters=3)


def registry(tiny: Any, roots: list[Path], **backend: Any) -> RegistryConfig:
    experts: list[dict[str, Any]] = [
        {"name": f"a{i}", "backend": "tiny", "model": "tiny", "skills": [f"skill{i}"], "categories": [f"c{i}"],
         "params": {"stop": ["\n\nQ:"]}, "system_prompt": f"You are a{i}.",
         "adapter": {"name": f"tiny-lora-{i}", "path": str(tiny.adapters[f"tiny-lora-{i}"])}} for i in range(3)]
    experts.append({"name": "whole", "backend": "tiny", "model": "tiny"})
    return RegistryConfig.model_validate({
        "backends": {"tiny": {"launch": {"model": str(tiny.path), "max_lora_rank": 16, **backend},
                              "adapter_roots": [str(r) for r in roots]}},
        "experts": experts,
    })


def merge(tiny: Any, out: Path, method: str, sources: list[str], **spec: Any) -> Any:
    cfg = registry(tiny, [out.parent])
    plan = plan_merge(cfg, {e.name: e for e in cfg.experts}, out.name, sources, MergeSpec(method=method, **spec),
                      out=out)
    merged, expert = run_merge(plan)
    return merged, expert


# -- the math ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "spec"), [
    ("cat", {"weights": (0.7, 1.3)}),
    ("linear", {"weights": (0.5, 1.5), "rank": 16}),  # rank ≥ 8 + 8: exact
    ("linear", {"weights": (1.0, 1.0), "rank": 4}),  # truncated: the reported error is the true one
    ("ties", {"density": 0.4}),
    ("dare_linear", {"density": 0.5, "seed": 3}),
    ("dare_ties", {"density": 0.6, "seed": 5, "weights": (1.0, 0.8)}),
])
def test_merged_delta_equals_the_numpy_reference(tiny: Any, tmp_path: Path, method: str, spec: dict[str, Any]) -> None:
    sources = ["a0", "a1"]
    merged, expert = merge(tiny, tmp_path / f"m-{method}", method, sources, **spec)
    folders = [tiny.adapters["tiny-lora-0"], tiny.adapters["tiny-lora-1"]]
    want = reference(method, folders, list(spec.get("weights", (1.0, 1.0))), spec.get("density", 1.0),
                     spec.get("seed", 0))
    got = written_deltas(merged.path)
    manifest = json.loads((merged.path / "coe-adapter.json").read_text())
    config = json.loads((merged.path / "adapter_config.json").read_text())
    assert set(got) == set(want)
    rank = 16 if method == "cat" else spec.get("rank", 8)
    assert config["r"] == manifest["merge"]["rank"] == merged.rank == rank
    for module in want:
        reported = manifest["reconstruction_error"]["per_module"][module]
        actual = relative(got[module], want[module])
        assert actual <= reported + 1e-4, (module, actual, reported)
        assert abs(actual - reported) < 1e-3, "the manifest reports the true SVD error"
        if method == "cat" or (method == "linear" and rank >= 16):
            assert actual < 1e-5
    if method == "linear" and rank == 4:
        assert manifest["reconstruction_error"]["relative_frobenius_max"] > 0.01  # really truncated
    assert [s["expert"] for s in manifest["sources"]] == sources
    assert all(len(s["adapter_sha256"]) == 64 for s in manifest["sources"])
    assert expert.skills == ["skill0", "skill1"] and expert.categories == ["c0", "c1"]
    assert expert.params == {"stop": ["\n\nQ:"]}, "settings every source shares carry over"
    assert expert.system_prompt is None, "the sources' prompts differ: none is picked"
    assert expert.adapter is not None and expert.adapter.name == f"m-{method}"


def test_ties_trims_and_elects_signs_on_a_hand_sized_case() -> None:
    """The TIES steps on numbers small enough to check by eye: trim to the top half, elect, average."""
    from coe.models.merge import disjoint_mean, trim

    t1 = np.array([[3.0, -1.0], [0.5, 2.0]])
    t2 = np.array([[-1.0, -4.0], [1.0, 0.2]])
    trimmed = [trim(t1, 0.5), trim(t2, 0.5)]
    assert trimmed[0].tolist() == [[3.0, 0.0], [0.0, 2.0]] and trimmed[1].tolist() == [[0.0, -4.0], [1.0, 0.0]]
    assert disjoint_mean(trimmed).tolist() == [[3.0, -4.0], [1.0, 2.0]]
    assert disjoint_mean([t1, t2]).tolist() == [[3.0, -2.5], [0.75, 1.1]]


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties"])
def test_same_seed_same_adapter(tiny: Any, tmp_path: Path, method: str) -> None:
    spec = {"density": 0.5, "seed": 7}
    one, _ = merge(tiny, tmp_path / "one", method, ["a0", "a1", "a2"], **spec)
    two, _ = merge(tiny, tmp_path / "two", method, ["a0", "a1", "a2"], **spec)
    other, _ = merge(tiny, tmp_path / "other", method, ["a0", "a1", "a2"], **{**spec, "seed": 8})
    assert one.manifest["adapter_sha256"] == two.manifest["adapter_sha256"]
    if method.startswith("dare"):
        assert other.manifest["adapter_sha256"] != one.manifest["adapter_sha256"]


# -- checks -------------------------------------------------------------------------------------


def test_every_bad_input_is_a_clear_error_and_writes_nothing(tiny: Any, tmp_path: Path) -> None:
    roots = tmp_path / "roots"
    cfg = registry(tiny, [roots], max_lora_rank=8)
    experts = {e.name: e for e in cfg.experts}

    def attempt(name: str, sources: list[str], **spec: Any) -> Any:
        method = spec.pop("method", "linear")
        plan = plan_merge(cfg, experts, name, sources, MergeSpec(method=method, **spec))
        return run_merge(plan)

    with pytest.raises(NotFound, match="no expert named 'nope'"):
        attempt("m", ["a0", "nope"])
    with pytest.raises(MergeError, match="whole model, not an adapter"):
        attempt("m", ["a0", "whole"])
    with pytest.raises(Conflict, match="already exists"):
        attempt("a1", ["a0", "a2"])
    with pytest.raises(MergeError, match="at least two"):
        attempt("m", ["a0"])
    with pytest.raises(MergeError, match="unknown merge method"):
        attempt("m", ["a0", "a1"], method="soup")
    with pytest.raises(MergeError, match="3 weights for 2 sources"):
        attempt("m", ["a0", "a1"], weights=(1.0, 1.0, 1.0))
    with pytest.raises(MergeError, match=r"density must be in \(0, 1\]"):
        attempt("m", ["a0", "a1"], method="ties", density=1.5)
    # cat adds ranks: 8 + 8 = 16 is above this backend's --max-lora-rank 8, and 16 is what fits.
    with pytest.raises(MergeError, match=r"rank 16, above the backend's --max-lora-rank 8.*max_lora_rank.* to 16"):
        attempt("m", ["a0", "a1"], method="cat")
    with pytest.raises(MergeError, match=r"rank 24.*to 32"):
        attempt("m", ["a0", "a1"], rank=24)

    odd = tmp_path / "odd"  # one adapter on another base, one with other target modules
    for name, edit in (("other-base", {"base_model_name_or_path": "someone-else"}),
                       ("q-only", {"target_modules": ["q_proj"]})):
        folder = odd / name
        folder.mkdir(parents=True)
        config = json.loads((tiny.adapters["tiny-lora-0"] / "adapter_config.json").read_text())
        tensors = load_file(str(tiny.adapters["tiny-lora-0"] / "adapter_model.safetensors"))
        if name == "q-only":
            tensors = {k: v for k, v in tensors.items() if "v_proj" not in k}
        (folder / "adapter_config.json").write_text(json.dumps({**config, **edit}))
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        experts[name] = experts["a0"].model_copy(update={"name": name, "adapter": Adapter(name=name, path=folder)})
    with pytest.raises(MergeError, match="different base models"):
        attempt("m", ["a0", "other-base"])
    with pytest.raises(MergeError, match="different target modules"):
        attempt("m", ["a0", "q-only"])
    not_lora = tmp_path / "not-lora"
    not_lora.mkdir()
    empty = Adapter(name="empty", path=not_lora)
    experts["empty"] = experts["a0"].model_copy(update={"name": "empty", "adapter": empty})
    with pytest.raises(MergeError, match="not a LoRA adapter folder"):
        attempt("m", ["a0", "empty"])
    assert not roots.exists() or not any(roots.iterdir()), "a failed merge wrote nothing"

    with pytest.raises(Forbidden, match="not under an adapter root"):
        plan_merge(cfg, experts, "m", ["a0", "a1"], MergeSpec("linear"), out=tmp_path / "elsewhere" / "m",
                   require_root=True)


def test_cli_prints_the_stanza_and_exits_1_on_bad_input(tiny: Any, tmp_path: Path) -> None:
    reg = {"backends": {"tiny": {"launch": {"model": str(tiny.path), "max_lora_rank": 16},
                                 "adapter_roots": [str(tmp_path / "merged")]}},
           "experts": [{"name": f"a{i}", "backend": "tiny", "model": tiny.served_name, "skills": [f"s{i}"],
                        "adapter": {"name": f"tiny-lora-{i}", "path": str(tiny.adapters[f"tiny-lora-{i}"])}}
                       for i in range(2)]}
    config = write_registry(tmp_path / "experts.yaml", reg)
    run = [sys.executable, "-m", "services.cli", "experts", "merge", "--config", str(config)]
    ok = subprocess.run([*run, "both", "--from", "a0,a1", "--method", "ties", "--density", "0.5"],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    stanza = yaml.safe_load(ok.stdout)["experts"][0]
    assert stanza["name"] == "both" and stanza["skills"] == ["s0", "s1"], ok.stdout
    assert stanza["adapter"] == {"name": "both", "path": str(tmp_path / "merged" / "both")}
    assert "reconstruction error" in ok.stderr and (tmp_path / "merged" / "both" / "coe-adapter.json").is_file()
    bad = subprocess.run([*run, "again", "--from", "a0,missing", "--method", "linear"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "error: no expert named 'missing'" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr


# -- served by vLLM, equal to transformers + peft ------------------------------------------------


def hf_greedy(model_dir: Path, adapter: Path | None, prompt: str) -> list[int]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    net: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    if adapter is not None:
        net = PeftModel.from_pretrained(net, str(adapter))
    ids = tok(prompt, return_tensors="pt").input_ids
    out: list[int] = []
    with torch.no_grad():
        for _ in range(TOKENS):
            nxt = int(net(ids).logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


@pytest.mark.vllm
async def test_api_merge_registers_an_expert_vllm_serves_like_peft(vllm_server: Any, tmp_path: Path) -> None:
    roots = tmp_path / "merged"
    roots.mkdir()
    reg = tiny_registry(vllm_server)
    reg["backends"]["tiny"]["adapter_roots"] = [str(roots)]
    reg["experts"][2]["adapter"]["path"] = str(vllm_server.adapters["tiny-lora-1"])
    config = write_registry(tmp_path / "experts.yaml", reg)
    prompt = "The capital of France is"
    async with running_coe(config) as coe, httpx.AsyncClient(base_url=coe.url, timeout=300) as http:
        body = {"name": "soup", "from": ["tiny-a0", "tiny-a1"], "method": "ties", "density": 0.5}
        r = await http.post("/v1/experts/merge", json=body)
        assert r.status_code == 201, r.text
        doc = r.json()
        assert doc["name"] == "soup" and doc["source"] == "api" and doc["merge"]["merge"]["method"] == "ties"
        assert doc["adapter"]["path"] == str(roots / "soup") and doc["categories"] == ["code"]
        listed = (await http.get("/v1/experts/soup")).json()
        assert listed["source"] == "api"
        chat = await http.post("/v1/chat/completions", json={
            "model": "soup", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4})
        assert chat.status_code == 200, chat.text
        served = await http.post(f"{vllm_server.api_url}/completions", json={
            "model": "soup", "prompt": prompt, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True,
            "logprobs": 1, "return_tokens_as_token_ids": True})
        assert served.status_code == 200, served.text
        tokens = [int(t.split(":")[1]) for t in served.json()["choices"][0]["logprobs"]["tokens"]]

        again = await http.post("/v1/experts/merge", json=body)
        assert again.status_code == 409 and again.json()["error"]["param"] == "name"
        cases = [({**body, "name": "x", "from": ["tiny-a0", "nope"]}, 404),
                 ({**body, "name": "x", "from": ["tiny-a0", "tiny-base"]}, 400),
                 ({**body, "name": "x", "method": "cat"}, 400),  # 16 > the session server's rank 8
                 ({**body, "name": "x", "seed": 2**64}, 400),
                 ({**body, "name": "x", "from": ["tiny-a0"]}, 400)]
        for bad, status in cases:
            r = await http.post("/v1/experts/merge", json=bad)
            assert r.status_code == status, (bad, r.text)
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert sorted(p.name for p in roots.iterdir()) == ["soup"], "failed merges wrote nothing"

        # The CLI merges on this machine and registers through the API; the API expert is a source too.
        cli = [sys.executable, "-m", "services.cli", "experts", "merge", "--config", str(config), "--register",
               "--base-url", f"{coe.url}/v1"]
        proc = await asyncio.create_subprocess_exec(*cli, "soup2", "--from", "soup,tiny-a0", "--method", "linear",
                                                    cwd=ROOT, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 300)
        assert proc.returncode == 0, err.decode()
        assert yaml.safe_load(out)["experts"][0]["name"] == "soup2"
        assert (await http.get("/v1/experts/soup2")).json()["source"] == "api"
        chat = await http.post("/v1/chat/completions", json={
            "model": "soup2", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4})
        assert chat.status_code == 200, chat.text
        proc = await asyncio.create_subprocess_exec(*cli, "soup2", "--from", "soup,tiny-a0", "--method", "linear",
                                                    cwd=ROOT, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 300)
        assert proc.returncode == 1 and "already exists" in err.decode() and "Traceback" not in err.decode()
        for name in ("soup2", "soup"):
            assert (await http.delete(f"/v1/experts/{name}")).status_code == 200
    assert tokens == hf_greedy(vllm_server.model_dir, roots / "soup", prompt)
    assert tokens != hf_greedy(vllm_server.model_dir, None, prompt), "the merged adapter changes the output"
