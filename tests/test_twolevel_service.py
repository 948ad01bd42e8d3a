"""The two-level router behind the CLI and the API: ``coe router fit``, ``coe route``, ``POST /v1/route``
and ``model="coe"`` chat through the official openai SDK to the shared real vLLM server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import yaml
from apphelpers import running_coe, tiny_registry, write_registry
from test_twolevel import write_fixture

ROOT = Path(__file__).resolve().parent.parent


def coe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_router_fit_cli_writes_the_artifact_that_coe_route_then_loads(tmp_path: Path) -> None:
    cfg = write_fixture(tmp_path)
    data = yaml.safe_load(cfg.read_text())
    del data["router"]["data"]  # the labelled data comes from the command line only
    cfg.write_text(yaml.safe_dump(data))
    fit = coe("router", "fit", "--config", str(cfg), "--data", str(tmp_path / "data.jsonl"),
              "--label", "labels.subcategory")
    assert fit.returncode == 0, fit.stderr
    report = json.loads(fit.stdout)
    assert report["examples"] == 200 and report["label"] == "labels.subcategory"
    assert {"held_out_top1", "ece_before", "ece_after", "member_top1", "weights", "temperature"} <= set(report)
    assert (tmp_path / ".coe/router/meta.json").exists()

    queries = tmp_path / "q.jsonl"
    queries.write_text(json.dumps({"id": 1, "question": "Who won the Battle of Hastings?"}) + "\n"
                       + json.dumps({"id": 2, "question": "Can you explain that more simply?"}) + "\n")
    out = tmp_path / "decisions.jsonl"
    routed = coe("route", "--config", str(cfg), "--input", str(queries), "--output", str(out))
    assert routed.returncode == 0, routed.stderr
    assert "fitting" not in routed.stderr  # the CLI's artifact was loaded, not refitted
    first, second = (json.loads(line) for line in out.read_text().splitlines())
    assert first["category"] == "history" and first["experts"][0]["name"] == "history"
    assert first["fallback"] is False and 0.6 <= first["confidence"] <= 1
    assert second["fallback"] is True and second["experts"][-1]["name"] == "generalist"
    for r in (first, second):
        assert set(r) >= {"id", "category", "confidence", "fallback", "skills", "experts", "candidates",
                          "latency_ms"}
        assert all(set(e) == {"name", "score"} for e in r["experts"] + r["candidates"])
        assert len(r["candidates"]) == 5
    assert "routed 2 queries" in routed.stderr and "fallback 1" in routed.stderr


def test_router_fit_cli_rejects_bad_data_with_line_numbers(tmp_path: Path) -> None:
    cfg = write_fixture(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x", "labels": {"subcategory": "math"}}\n{"question": "y"}\n[1]\n')
    result = coe("router", "fit", "--config", str(cfg), "--data", str(bad), "--label", "labels.subcategory")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "line 2: needs one string at 'labels.subcategory'" in result.stderr and "line 3:" in result.stderr
    assert not (tmp_path / ".coe/router").exists()


def described_categories(server: Any) -> dict[str, Any]:
    """Tiny-model experts with categories described by example queries only (no labelled file)."""
    reg = tiny_registry(server)
    reg["router"] = {
        "strategy": "two-level", "generalist": "tiny-a1", "threshold": 0.5, "k_min": 1, "k_max": 1,
        "categories": {
            "code": {"description": "Programming: writing and debugging source code.",
                     "examples": ["Write a Python function that reverses a string.", "Fix this JavaScript bug.",
                                  "How do I read a file line by line in Java?", "What does a segfault mean in C?",
                                  "Explain recursion with a code example.", "How do I use git rebase?"]},
            "general": {"description": "General knowledge: geography, history, everyday facts.",
                        "examples": ["What is the capital of France?", "Who painted the Mona Lisa?",
                                     "How many continents are there?", "When did World War II end?",
                                     "What is the tallest mountain on Earth?", "Which river flows through Cairo?"]},
        },
    }
    return reg


async def test_model_coe_chat_and_v1_route_use_the_two_level_router(vllm_server: Any, tmp_path: Path) -> None:
    path = write_registry(tmp_path / "experts.yaml", described_categories(vllm_server))
    async with running_coe(path) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=60) as http:
            r = await http.post("/v1/route", json={"model": "coe", "messages": [
                {"role": "user", "content": "Write a Python function that sorts a list of numbers."}]})
            assert r.status_code == 200, r.text
            decision = r.json()
            assert decision["router"] == "two-level" and decision["category"] == "code"
            assert decision["experts"][0]["name"] == "tiny-a0"
        client = running.client()
        reply = await client.chat.completions.create(
            model="coe", max_tokens=4, temperature=0, user="session-7",
            messages=[{"role": "user", "content": "What is the capital of Italy?"}])
        extra: dict[str, Any] = reply.model_extra or {}
        routed = extra["coe"]["decision"]
        assert routed["router"] == "two-level" and routed["category"] == "general"
        assert routed["experts"][0]["name"] == "tiny-base"
        assert reply.choices[0].message.content is not None and reply.usage is not None
