"""``coe batch run``: input checked whole, results in OpenAI's line shape, failures in the error file,
and a run killed mid-way resumes without running a finished item again. The CLI runs as a real
subprocess against the shared real vLLM server."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from apphelpers import tiny_registry, write_registry

from coe.batch import BatchItem, finished_ids, grouped, read_batch
from coe.jsonl import BadLines

COE = [str(Path(sys.executable).parent / "coe")]
MODELS = {"coe", "tiny-base", "tiny-a0"}


def line(custom_id: str, model: str = "tiny-base", content: str = "Tell me about the sea.", **body: Any) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": model, "messages": [{"role": "user", "content": content}],
                                "max_tokens": 6, "temperature": 0, **body}})


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_every_bad_line_is_reported_and_nothing_runs(tmp_path: Path) -> None:
    bad = write(tmp_path / "in.jsonl", [
        line("a"),
        "{not json",
        json.dumps({"custom_id": "b", "method": "GET", "url": "/v1/chat/completions", "body": {}}),
        json.dumps({"custom_id": "c", "method": "POST", "url": "/v1/embeddings", "body": {}}),
        line("d", model="nobody"),
        line("a"),
        line("e", stream=True),
        json.dumps({"custom_id": "", "method": "POST", "url": "/v1/chat/completions", "body": {}}),
    ])
    with pytest.raises(BadLines) as info:
        read_batch(bad, MODELS)
    problems = info.value.problems
    assert [p.split(":")[0] for p in problems] == [f"line {n}" for n in range(2, 9)]
    assert "repeats line 1" in problems[4] and "nobody" in problems[3] and "stream" in problems[5]
    with pytest.raises(BadLines, match="no requests"):
        read_batch(write(tmp_path / "empty.jsonl", [""]), MODELS)


def test_torn_last_line_is_cut_and_grouping_keeps_input_order(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"custom_id": "x"}) + "\n" + '{"custom_id": "y", "resp')
    assert finished_ids(out) == {"x"}
    assert out.read_text().endswith("}\n")
    items = [BatchItem(str(i), {"model": m}, i) for i, m in enumerate(["b", "a", "b", "c", "a"])]
    assert [i.custom_id for i in grouped(items)] == ["0", "2", "1", "4", "3"]


@pytest.mark.vllm
def test_batch_run_writes_results_and_errors(vllm_server: Any, tmp_path: Path) -> None:
    config = write_registry(tmp_path / "experts.yaml", tiny_registry(vllm_server))
    source = write(tmp_path / "in.jsonl", [
        line("base-1"), line("lora-1", model="tiny-a0"), line("base-2", content="Name a colour."),
        line("routed-1", model="coe", coe={"experts": ["tiny-a0", "tiny-a1"], "strategy": "best"}),
        line("too-long", content="word " * 2000),
    ])
    out = tmp_path / "out.jsonl"
    proc = subprocess.run([*COE, "batch", "run", str(source), "--output", str(out), "--config", str(config)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr  # one item failed
    summary = json.loads(proc.stdout)
    assert summary["completed"] == 4 and summary["failed"] == 1 and summary["resumed"] == 0
    results = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(results) == {"base-1", "lora-1", "base-2", "routed-1"}
    for r in results.values():
        assert r["id"].startswith("batch_req_") and r["error"] is None
        assert r["response"]["status_code"] == 200 and r["response"]["request_id"].startswith("batch-")
        assert r["response"]["body"]["choices"][0]["message"]["content"]
    assert results["lora-1"]["response"]["body"]["model"] == "tiny-a0"
    assert results["routed-1"]["response"]["body"]["coe"]["answered_by"] == "tiny-a0"
    errors = [json.loads(x) for x in (tmp_path / "out.errors.jsonl").read_text().splitlines()]
    assert [e["custom_id"] for e in errors] == ["too-long"]
    assert errors[0]["response"]["status_code"] == 400 and errors[0]["error"]["message"]
    # bad input: exit 1, every bad line named, nothing written
    bad = write(tmp_path / "bad.jsonl", [line("a"), "{", line("b", model="nobody")])
    proc = subprocess.run([*COE, "batch", "run", str(bad), "--output", str(tmp_path / "bad-out.jsonl"),
                           "--config", str(config)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "line 2" in proc.stderr and "line 3" in proc.stderr
    assert not (tmp_path / "bad-out.jsonl").exists()


@pytest.mark.vllm
def test_a_killed_run_resumes_without_rerunning_finished_items(vllm_server: Any, tmp_path: Path) -> None:
    config = write_registry(tmp_path / "experts.yaml", tiny_registry(vllm_server))
    n = 40
    source = write(tmp_path / "in.jsonl", [line(f"q{i}", model=("tiny-base", "tiny-a0")[i % 2],
                                                content=f"Question number {i}?") for i in range(n)])
    out = tmp_path / "out.jsonl"
    cmd = [*COE, "batch", "run", str(source), "--output", str(out), "--config", str(config), "--concurrency", "1"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out.exists() and len(out.read_text().splitlines()) >= 5):
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline, "the first run wrote no results"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    before = finished_ids(out)
    assert 5 <= len(before) < n
    with out.open("a") as f:
        f.write('{"custom_id": "q39", "response": {"stat')  # a line torn by the crash
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    summary = json.loads(second.stdout)
    assert summary["resumed"] == len(before) and summary["completed"] == n - len(before)
    ids = [json.loads(x)["custom_id"] for x in out.read_text().splitlines()]
    assert sorted(ids) == sorted(f"q{i}" for i in range(n))  # every item exactly once


def test_a_fully_resumed_run_starts_and_waits_for_no_backend(tmp_path: Path) -> None:
    """Every item already has a result: the re-run makes no call and brings no backend up. Its one backend
    is a managed vLLM that cannot start (a model folder that does not exist): waiting for it, or launching
    it, would fail the run."""
    config = tmp_path / "experts.yaml"
    config.write_text(json.dumps({
        "backends": {"never": {"launch": {"model": str(tmp_path / "no-model"), "startup_timeout_s": 5}}},
        "experts": [{"name": "e", "backend": "never", "model": "no-model"}],
        "auth": {"client_auth": False, "admin_auth": False},
    }))
    source = write(tmp_path / "in.jsonl", [line(f"q{i}", model="e") for i in range(3)])
    out = tmp_path / "out.jsonl"
    out.write_text("".join(json.dumps({"custom_id": f"q{i}", "response": {"status_code": 200}}) + "\n"
                           for i in range(3)))
    started = time.monotonic()
    run = subprocess.run([*COE, "batch", "run", str(source), "--output", str(out), "--config", str(config)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["resumed"] == 3 and summary["completed"] == 0 and summary["failed"] == 0
    assert "waiting for" not in run.stderr and "never" not in run.stderr
    assert time.monotonic() - started < 60
