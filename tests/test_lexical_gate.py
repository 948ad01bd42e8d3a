"""The lexical gate (``router.lexical_gate``, off by default): where the fitted word model alone is sure,
level 1 decides without embedding.

The rule (``routers.fit.fit_gate``) is checked on held-out scores built to make each case; the router on
the real parts: the packaged MiniLM (ONNX), real FAISS, the MMLU fixture of ``test_twolevel`` at 180 questions
per category (a gate needs enough held-out rows to be measured; at 40 the fit records none), with an
embedder that counts what it is asked to embed (the real one underneath)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from test_twolevel import write_fixture

from coe.config import RegistryConfig
from coe.embed import Embedder, shared_embedder
from coe.loader import load_registry
from routers import RouteRequest
from routers.classifier import CategoryClassifier, log_softmax
from routers.fit import GATE_AGREEMENT, GATE_MIN_ROWS, ensure_classifier, fit_gate
from routers.twolevel import TwoLevelRouter

if TYPE_CHECKING:
    from coe.embed import Matrix


def _logits(labels: Sequence[int], sure: Sequence[float], n: int = 3) -> Any:
    """Log-probabilities whose top class is ``labels[i]`` with probability ``sure[i]``."""
    p = np.full((len(labels), n), 0.0)
    for i, (c, s) in enumerate(zip(labels, sure, strict=True)):
        p[i] = (1 - s) / (n - 1)
        p[i, c] = s
    return np.log(p).astype(np.float32)


def test_the_gate_is_the_lowest_threshold_where_the_words_agree_with_the_ensemble() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 600)
    ens = _logits(y, [0.99] * 600)  # the ensemble is right everywhere, and about as sure
    # the word model: right and sure (0.95) on 300 rows, unsure (0.55) and wrong on the other 300
    word = np.where(np.arange(600) < 300, y, (y + 1) % 3)
    zt = _logits(word, np.where(np.arange(600) < 300, 0.95, 0.55))
    gate, report = fit_gate(zt, ens, 1.0, y)
    assert gate is not None and 0.55 < gate.threshold <= 0.95
    assert report["accepted"] == 0.5 and report["agreement"] == 1.0 and report["held_out_top1"] == 1.0
    # calibrated on the rows it decides: all right, so sharper than the 0.95 it said
    assert gate.temperature < 1.0 and report["ece"] < 0.02


def test_no_gate_where_the_sure_words_disagree_or_too_few_rows_are_sure() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 600)
    ens = _logits(y, [0.9] * 600)
    wrong = rng.random(600) < 2 * (1 - GATE_AGREEMENT)  # 1% of sure rows disagree: twice the allowance
    zt = _logits(np.where(wrong, (y + 1) % 3, y), [0.99] * 600)
    gate, report = fit_gate(zt, ens, 1.0, y)
    assert gate is None and report["threshold"] is None
    few = np.arange(600) < GATE_MIN_ROWS - 1  # right, but sure on too few rows to measure it
    gate, _ = fit_gate(_logits(y, np.where(few, 0.99, 0.4)), ens, 1.0, y)
    assert gate is None


def test_an_overconfident_word_model_is_gated_above_099() -> None:
    """A word model fitted with little regularization is sure of many rows, and still wrong on some at 0.99 (the
    MMLU example's, fitted on all its data): the threshold is then looked for above 0.99 too."""
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 600)
    ens = _logits(y, [0.9] * 600)
    surest = np.arange(600) < 200  # right on every one of these
    wrong = ~surest & (rng.random(600) < 0.05)  # about 20 of the other 400: 3% of the rows sure at 0.992
    zt = _logits(np.where(wrong, (y + 1) % 3, y), np.where(surest, 0.9995, 0.992))
    gate, report = fit_gate(zt, ens, 1.0, y)
    assert gate is not None and 0.99 < gate.threshold <= 0.9995
    assert report["accepted"] == pytest.approx(200 / 600, abs=1e-3) and report["agreement"] == 1.0


def test_coe_routes_summary_counts_the_decisions_the_words_made_alone() -> None:
    from routers.decisions import summary

    def rec(gated: bool) -> dict[str, Any]:
        return {"experts": [{"name": "law", "score": 0.9}], "latency_ms": 1.0, "fallback": False,
                "lexical_gate": gated}

    assert "decided by the words alone 2;" in summary([rec(True), rec(False), rec(True)], 1.0)
    assert "words alone" not in summary([rec(False), rec(False)], 1.0)  # the gate off, or it decided nothing


class CountingEmbedder(Embedder):
    """The real embedder, counting the texts it is asked to embed (to see which ones the gate skipped)."""

    def __init__(self, inner: Embedder) -> None:
        self.inner, self.name, self.dim = inner, inner.name, inner.dim
        self.texts: list[str] = []

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> Matrix:
        self.texts += list(texts)
        return self.inner.encode(texts, batch_size)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[RegistryConfig, list[str]]:
    folder = tmp_path_factory.mktemp("gate")
    cfg = load_registry(write_fixture(folder, per_category=180))  # under 1,000 rows: 5 folds, all held out
    clf = ensure_classifier(cfg, shared_embedder("onnx"))
    assert clf.gate is not None, clf.meta["fit"]["gate"]
    rows = [json.loads(line) for line in (folder / "data.jsonl").read_text().splitlines()]
    return cfg, [r["question"] for r in rows]


def _router(cfg: RegistryConfig, complete: Any = None, **router: Any) -> tuple[TwoLevelRouter, CountingEmbedder]:
    cfg = cfg.model_copy(update={"router": cfg.router.model_copy(update=router)})
    r = TwoLevelRouter(cfg, complete)
    assert r.level1 is not None
    counting = CountingEmbedder(r.level1.embedder)  # level 1's only: the recruiter embeds skill names
    r.level1.embedder = counting
    return r, counting


def _route(router: TwoLevelRouter, cfg: RegistryConfig, texts: Sequence[str]) -> list[Any]:
    requests = [RouteRequest(messages=[{"role": "user", "content": t}]) for t in texts]
    return asyncio.run(router.route_many(requests, cfg.experts))


def test_the_artifact_keeps_the_gate_and_the_fit_reports_it(fitted: tuple[RegistryConfig, list[str]]) -> None:
    cfg, _ = fitted
    assert cfg.router.artifact is not None
    loaded = CategoryClassifier.load(cfg.router.artifact)
    meta = json.loads((cfg.router.artifact / "meta.json").read_text())
    assert loaded.gate is not None and meta["gate"]["threshold"] == loaded.gate.threshold
    report = meta["fit"]["gate"]
    assert report["threshold"] == loaded.gate.threshold and report["agreement"] >= GATE_AGREEMENT
    assert 0 < report["accepted"] <= 1


def test_gated_questions_are_not_embedded_and_get_the_full_classifiers_category(
        fitted: tuple[RegistryConfig, list[str]]) -> None:
    cfg, questions = fitted
    gated, seen = _router(cfg, lexical_gate=True)
    full, seen_full = _router(cfg)  # the default: off
    with_gate, without = _route(gated, cfg, questions), _route(full, cfg, questions)
    alone = [d for d in with_gate if d.lexical_gate]
    assert alone and len(alone) < len(questions)  # the words decide some, not all
    assert all("lexical gate" in d.reason for d in alone) and not any(d.lexical_gate for d in without)
    assert all("lexical gate" not in d.reason for d in with_gate if not d.lexical_gate)
    assert len(seen.texts) == len(questions) - len(alone) and len(seen_full.texts) == len(questions)
    assert not set(seen.texts) & {q for q, d in zip(questions, with_gate, strict=True) if d.lexical_gate}
    agree = sum(a.category == b.category for a, b in zip(with_gate, without, strict=True) if a.lexical_gate)
    assert agree >= GATE_AGREEMENT * len(alone) - 1  # the fit's promise, on rows it trained on: at most one off
    for d in alone:  # no vector, so no skills; still a calibrated probability and a normal decision
        assert d.skills == [] and d.confidence is not None and 0 < d.confidence <= 1 and d.experts


def test_a_conversation_is_gated_only_when_every_turn_is(fitted: tuple[RegistryConfig, list[str]]) -> None:
    cfg, questions = fitted
    router, seen = _router(cfg, lexical_gate=True)
    sure = next(q for q, d in zip(questions, _route(router, cfg, questions), strict=True) if d.lexical_gate)
    seen.texts.clear()
    messages = [{"role": "user", "content": "Hmm, and what about that?"}, {"role": "assistant", "content": "..."},
                {"role": "user", "content": sure}]
    d = asyncio.run(router.route(RouteRequest(messages=messages), cfg.experts))
    if d.lexical_gate:  # the vague turn could be sure too; then nothing was embedded
        assert seen.texts == []
    else:
        assert sure in seen.texts


def test_measured_profiles_need_the_vector_so_nothing_is_gated(
        fitted: tuple[RegistryConfig, list[str]], tmp_path: Path) -> None:
    from routers.profiles import ExpertProfile, ProfileSet

    cfg, questions = fitted
    ProfileSet(experts={"math": ExpertProfile(expert="math", skills={"calculus": 8}, answered=10, correct=9)}).save(
        tmp_path / "profiles.json")
    router, seen = _router(cfg, lexical_gate=True, profiles=tmp_path / "profiles.json")
    decisions = _route(router, cfg, questions[:40])
    assert len(seen.texts) == 40 and not any(d.lexical_gate for d in decisions)
    assert any(d.skills for d in decisions)


def test_the_gate_calibrates_what_it_decides(fitted: tuple[RegistryConfig, list[str]]) -> None:
    """The gated log-probabilities are the word model's, divided by the gate's own temperature."""
    cfg, questions = fitted
    assert cfg.router.artifact is not None
    clf = CategoryClassifier.load(cfg.router.artifact)
    assert clf.gate is not None and clf.tfidf is not None
    result = clf.lexical_gate(questions)
    assert result is not None
    accepted, lp = result
    raw = clf.tfidf.log_probs(questions)
    np.testing.assert_allclose(lp, log_softmax(raw / clf.gate.temperature), rtol=1e-5, atol=1e-5)
    assert (np.exp(raw.max(axis=1))[accepted] >= clf.gate.threshold).all()
    assert (np.exp(raw.max(axis=1))[~accepted] < clf.gate.threshold).all()


def test_with_the_annotator_a_gated_decision_still_gets_its_skills(fitted: tuple[RegistryConfig, list[str]]) -> None:
    """The annotator (an LLM; a scripted one here, named for what it is) needs no vector: a decision the words
    made alone keeps the skills it names."""
    cfg, questions = fitted

    async def scripted_annotator(expert: Any, messages: list[dict[str, Any]], params: dict[str, Any]) -> str:
        return "calculus, algebra"

    skills = cfg.router.skills.model_copy(update={"mode": "annotator", "annotator": "math", "samples": 1,
                                                  "min_count": 1})
    router, _ = _router(cfg, scripted_annotator, lexical_gate=True, skills=skills)
    alone = [d for d in _route(router, cfg, questions[::15]) if d.lexical_gate]
    assert alone and all(set(d.skills) == {"calculus", "algebra"} for d in alone)
