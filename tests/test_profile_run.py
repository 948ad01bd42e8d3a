"""``coe profile`` against the real tiny vLLM: every expert answers every question through the
dispatcher, and the profile's numbers are the scored answers' sums (the tiny model's accuracy
itself is meaningless)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from apphelpers import tiny_registry, write_registry

from routers.profiles import ProfileSet

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parent.parent
ITEMS = [
    {"id": "q1", "question": "2+2?", "choices": ["3", "4", "5", "6"], "answer": "B",
     "labels": {"subject": "arithmetic"}},
    {"id": "q2", "question": "Capital of France?", "choices": ["Paris", "Rome", "Oslo", "Bern"], "answer": "A",
     "labels": {"subject": "geography"}},
    {"id": "q3", "question": "H2O is?", "choices": ["salt", "water", "air", "gold"], "answer": "water",
     "labels": {"subject": "chemistry"}},
    {"id": "q4", "question": "Say yes.", "answer": ["yes"], "labels": {"subject": "arithmetic"}},
]


def test_coe_profile_end_to_end(vllm_server: Any, tmp_path: Path) -> None:
    config = write_registry(tmp_path / "experts.yaml", tiny_registry(vllm_server))
    data = tmp_path / "validation.jsonl"
    data.write_text("".join(json.dumps(i) + "\n" for i in ITEMS))
    out = tmp_path / "out" / "profiles.json"
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "profile", "--config", str(config), "--data", str(data),
         "--experts", "tiny-base,tiny-a0", "--output", str(out), "--max-tokens", "4"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "profiling 2 expert(s) on 4 question(s)" in result.stderr
    assert "(chance 0.188)" in result.stdout  # (0.25 * 3 + 0) / 4

    profiles = ProfileSet.load(out)
    answers = [json.loads(line) for line in out.with_name("profiles-answers.jsonl").read_text().splitlines()]
    assert len(answers) == 8 and all("error" not in a for a in answers)
    assert [a["expert"] for a in answers] == ["tiny-base"] * 4 + ["tiny-a0"] * 4, "grouped per expert"
    assert profiles.skills_field == "labels.subject"
    for name in ("tiny-base", "tiny-a0"):
        p = profiles.experts[name]
        mine = [a for a in answers if a["expert"] == name]
        assert p.answered == 4 and p.correct == sum(a["correct"] for a in mine)
        expected: dict[str, int] = {}
        for a in mine:
            for s in a["skills"]:
                expected[s] = expected.get(s, 0) + (1 if a["correct"] else -1)
        assert p.skills == expected
        assert set(p.skills) == {"arithmetic", "geography", "chemistry"}
        assert not p.synthetic
        assert p.aggregation_score is not None and 0.0 <= p.aggregation_score <= 1.0  # judged on the others' answers
    assert "AGGREGATION" in result.stdout

    # A newly registered expert is profiled on the same validation set and merged in: the others' stay as measured.
    merged = subprocess.run(
        [sys.executable, "-m", "services.cli", "profile", "--config", str(config), "--data", str(data),
         "--experts", "tiny-a1", "--output", str(out), "--max-tokens", "4", "--merge"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert merged.returncode == 0, merged.stderr
    after = ProfileSet.load(out)
    assert set(after.experts) == {"tiny-base", "tiny-a0", "tiny-a1"}
    assert after.experts["tiny-base"] == profiles.experts["tiny-base"]
    assert after.experts["tiny-a1"].answered == 4


def test_profile_rejects_bad_data_lines(vllm_server: Any, tmp_path: Path) -> None:
    config = write_registry(tmp_path / "experts.yaml", tiny_registry(vllm_server))
    data = tmp_path / "bad.jsonl"
    data.write_text('{"question": "ok?", "answer": "A", "choices": ["x"]}\nnot json\n{"question": 3}\n')
    result = subprocess.run([sys.executable, "-m", "services.cli", "profile", "--config", str(config),
                             "--data", str(data)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "line 2: not valid JSON" in result.stderr and "line 3:" in result.stderr
    assert "line 1:" not in result.stderr
