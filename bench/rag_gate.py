#!/usr/bin/env python
"""The retrieval gate on a small corpus: precision and recall of "retrieve", and what it saves.

    .venv/bin/python bench/rag_gate.py

The corpus is ``bench/data/rag-corpus/`` (five short Markdown pages of a made-up company, Orbit
Ltd). The 40 queries below are half answerable from it and half unrelated (general knowledge,
coding, maths). The threshold is calibrated (``coe.rag.calibrate``, best F1) on the even-numbered
queries of each half and evaluated on the odd ones, then the other way round; both folds are
reported. "Saved versus always retrieving": the share of queries that send no passages to the
experts, and the prompt words those passages would have cost. The gate's search itself always runs
(it is how the gate measures similarity: one FAISS search, no model call).
Results: ``bench/results/rag-gate-<UTC stamp>.json``.
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from coe.embed import shared_embedder
from coe.rag import RagIndex, RetrievalGate, calibrate

ROOT = Path(__file__).resolve().parent
CORPUS = ROOT / "data" / "rag-corpus"
ANSWERABLE = [
    "Can I get my money back for an annual Orbit plan?", "How long do Orbit refunds take to arrive?",
    "Are monthly Orbit subscriptions refundable?", "Can I return an unused Orbit Dock?",
    "When is Orbit support available?", "Is there 24/7 phone support at Orbit?",
    "What happens if my support ticket gets no answer for a day?",
    "Where do I report a security incident to Orbit?",
    "How much does the Orbit Team plan cost?", "How many users does the Starter plan include?",
    "What happens when my workspace runs out of storage?",
    "Does Orbit delete files automatically when I exceed storage?",
    "How does Orbit encrypt my files?", "In which countries does Orbit store data?",
    "How long are deleted files kept in the trash?", "How long are audit logs retained on Enterprise?",
    "What is the rate limit of the Orbit API?", "How are Orbit webhooks signed?",
    "How long does Orbit retry a failed webhook?", "How do I authenticate to the Orbit REST API?",
]
UNRELATED = [
    "What is the capital of Canada?", "Who wrote War and Peace?", "How do I reverse a list in Python?",
    "What is the derivative of sin(x)?", "Why is the sky blue?", "How many planets are in the solar system?",
    "What is a good recipe for pancakes?", "Explain the difference between TCP and UDP.",
    "Who won the 2018 FIFA World Cup?", "What is 17 times 23?", "How does photosynthesis work?",
    "What causes inflation?", "Translate 'good morning' into Spanish.", "What is the boiling point of water in Kelvin?",
    "Summarize the plot of Hamlet.", "How do vaccines train the immune system?", "What is a binary search tree?",
    "Which is larger, a mole or a gram?", "Who painted the Mona Lisa?", "How do I center a div with CSS?",
]


def evaluate(scores_pos: list[float], scores_neg: list[float], threshold: float) -> dict[str, float]:
    tp = sum(s >= threshold for s in scores_pos)
    fp = sum(s >= threshold for s in scores_neg)
    return {"precision": round(tp / (tp + fp), 4) if tp + fp else 0.0, "recall": round(tp / len(scores_pos), 4),
            "retrieved_share": round((tp + fp) / (len(scores_pos) + len(scores_neg)), 4)}


def main() -> int:
    started = time.perf_counter()
    embedder = shared_embedder("onnx")
    with tempfile.TemporaryDirectory() as tmp:
        index = RagIndex.open(Path(tmp) / "orbit", embedder)
        report = index.ingest(sorted(CORPUS.glob("*.md")), chunk_words=120, overlap_words=20)
        gate = RetrievalGate(index, threshold=0.0, top_k=3)
        pos = [gate.decide(q) for q in ANSWERABLE]
        neg = [gate.decide(q) for q in UNRELATED]
    s_pos, s_neg = [d.similarity for d in pos], [d.similarity for d in neg]
    folds = []
    for fit_part in (0, 1):
        c = calibrate(s_pos[fit_part::2], s_neg[fit_part::2])
        ev = evaluate(s_pos[1 - fit_part::2], s_neg[1 - fit_part::2], c.threshold)
        words_always = sum(len(p.text.split()) for d in pos[1 - fit_part::2] + neg[1 - fit_part::2]
                           for p in d.passages)
        kept = [d for d in pos[1 - fit_part::2] + neg[1 - fit_part::2] if d.similarity >= c.threshold]
        words_gated = sum(len(p.text.split()) for d in kept for p in d.passages)
        folds.append({"calibrated_on": "even" if fit_part == 0 else "odd", "threshold": round(c.threshold, 4),
                      "calibration_f1": round(c.f1, 4), "held_out": ev,
                      "queries_without_retrieval": round(1 - ev["retrieved_share"], 4),
                      "passage_words_sent": {"always": words_always, "gated": words_gated,
                                             "saved_share": round(1 - words_gated / words_always, 4)}})
    result: dict[str, Any] = {
        "bench": "rag-gate", "command": "python bench/rag_gate.py", "corpus": str(CORPUS.relative_to(ROOT.parent)),
        "ingest": report, "queries": {"answerable": len(ANSWERABLE), "unrelated": len(UNRELATED)},
        "similarity": {"answerable_min": min(s_pos), "answerable_median": sorted(s_pos)[len(s_pos) // 2],
                       "unrelated_max": max(s_neg), "unrelated_median": sorted(s_neg)[len(s_neg) // 2]},
        "folds": folds, "seconds": round(time.perf_counter() - started, 1),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "per_query": [{"query": q, "answerable": i < len(ANSWERABLE), "similarity": d.similarity,
                       "nearest": d.passages[0].id if d.passages else None}
                      for i, (q, d) in enumerate(zip(ANSWERABLE + UNRELATED, pos + neg, strict=True))],
    }
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = ROOT / "results" / f"rag-gate-{stamp}.json"
    out.write_text(json.dumps(result, indent=2))
    for f in folds:
        print(f"calibrated on {f['calibrated_on']}: threshold {f['threshold']:.3f}; held-out precision "
              f"{f['held_out']['precision']:.2f} recall {f['held_out']['recall']:.2f}; no retrieval for "
              f"{f['queries_without_retrieval']:.0%} of queries; "
              f"passage words saved {f['passage_words_sent']['saved_share']:.0%}")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
