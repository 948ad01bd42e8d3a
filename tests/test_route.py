"""Routing without answering: ``coe route`` and ``POST /v1/route`` (no expert is called)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import yaml
from apphelpers import running_coe

from coe.testing.server import free_port

ROOT = Path(__file__).resolve().parent.parent


def registry(tmp_path: Path, *, launch: bool = True) -> Path:
    """Backends that cannot answer: a closed port, and (``launch``) a launch block whose model does
    not exist. Routing must neither start nor contact either."""
    cfg = tmp_path / "experts.yaml"
    local = ({"launch": {"model": str(tmp_path / "no-such-model"), "served_name": "m"}} if launch
             else {"url": f"http://127.0.0.1:{free_port()}/v1"})
    cfg.write_text(yaml.safe_dump({
        "backends": {"remote": {"url": f"http://127.0.0.1:{free_port()}/v1"}, "local": local},
        "experts": [{"name": "generalist", "backend": "remote", "model": "x"},
                    {"name": "coder", "backend": "local", "model": "m"},
                    {"name": "lawyer", "backend": "remote", "model": "x"}],
        "auth": {"client_auth": False, "admin_auth": False},
        "router": {"strategy": "default", "default_expert": "coder", "fallbacks": 2},
    }))
    return cfg


def coe_route(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "services.cli", "route", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_route_writes_one_decision_per_line_in_order(tmp_path: Path) -> None:
    inputs = tmp_path / "q.jsonl"
    inputs.write_text("\n".join([
        json.dumps({"id": "q1", "question": "How do I reverse a list in Python?", "extra": 1}),
        json.dumps({"custom_id": "b-7", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": "coe",
                             "messages": [{"role": "user", "content": "Is a verbal contract valid?"}]}}),
        "",
        json.dumps({"id": 3, "question": "2 + 2?"}),
    ]) + "\n")
    out = tmp_path / "decisions.jsonl"
    result = coe_route("--config", str(registry(tmp_path)), "--input", str(inputs), "--output", str(out))
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in lines] == ["q1", "b-7", 3]
    for r in lines:
        assert set(r) >= {"id", "category", "confidence", "fallback", "skills", "experts", "candidates", "latency_ms"}
        assert [e["name"] for e in r["experts"]] == ["coder", "generalist", "lawyer"]
        assert r["fallback"] is False and r["latency_ms"] >= 0
        assert len(r["candidates"]) <= 5
    assert "routed 3 queries" in result.stderr
    assert not (tmp_path / ".coe").exists(), "no managed backend was started (it would create its log)"


def test_route_to_stdout(tmp_path: Path) -> None:
    inputs = tmp_path / "q.jsonl"
    inputs.write_text(json.dumps({"id": "only", "question": "hello"}) + "\n")
    result = coe_route("--config", str(registry(tmp_path)), "--input", str(inputs))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["id"] == "only"


def test_bad_input_lists_every_bad_line_and_writes_nothing(tmp_path: Path) -> None:
    inputs = tmp_path / "q.jsonl"
    inputs.write_text("\n".join([
        json.dumps({"id": "ok", "question": "fine"}),
        "{not json",
        json.dumps({"id": "empty", "question": "  "}),
        json.dumps(["a", "list"]),
        json.dumps({"custom_id": "c", "body": {"messages": []}}),
        json.dumps({"id": "ok", "question": "duplicate id"}),
        json.dumps({"question": "no id"}),
        json.dumps({"custom_id": "d", "body": {"messages": [{"role": "wizard", "content": "x"}]}}),
    ]) + "\n")
    out = tmp_path / "decisions.jsonl"
    result = coe_route("--config", str(registry(tmp_path)), "--input", str(inputs), "--output", str(out))
    assert result.returncode == 1
    for number in (2, 3, 4, 5, 6, 7, 8):
        assert f"line {number}:" in result.stderr, number
    assert "line 1:" not in result.stderr
    assert "duplicate id 'ok' (also line 1)" in result.stderr
    assert not out.exists()
    assert "Traceback" not in result.stderr


def test_missing_input_file(tmp_path: Path) -> None:
    result = coe_route("--config", str(registry(tmp_path)), "--input", str(tmp_path / "nope.jsonl"))
    assert result.returncode == 1
    assert "cannot read" in result.stderr


async def test_post_v1_route_returns_the_decision_without_calling_experts(tmp_path: Path) -> None:
    async with running_coe(registry(tmp_path, launch=False)) as coe, httpx.AsyncClient(base_url=coe.url) as http:
        body = {"model": "coe", "messages": [{"role": "user", "content": "How do I sort a dict?"}]}
        response = await http.post("/v1/route", json=body, headers={"x-request-id": "route-1"})
        assert response.status_code == 200, response.text
        decision = response.json()
        assert decision["id"] == "route-1"
        assert [e["name"] for e in decision["experts"]] == ["coder", "generalist", "lawyer"]
        assert decision["router"] == "default"
        bad = await http.post("/v1/route", json={"messages": []})
        assert bad.status_code == 400
        assert bad.json()["error"]["type"] == "invalid_request_error"
