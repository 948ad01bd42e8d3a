"""The retrieval gate: retrieve only when the query needs the corpus (ExpertRAG, TAGS).

The signal is the cosine similarity of the query to its nearest passage. A
category can force the gate (``always``/``never``); otherwise the gate opens at
``threshold``, which ``calibrate`` picks from labelled queries (those the corpus
answers, and unrelated ones) to maximise F1 of "retrieve".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from coe.rag.store import Passage, RagIndex


@dataclass(frozen=True)
class GateDecision:
    retrieve: bool
    similarity: float
    reason: str
    passages: list[Passage] = field(default_factory=list)


class RetrievalGate:
    def __init__(self, index: RagIndex, threshold: float, *, top_k: int = 3,
                 categories: Mapping[str, str] | None = None) -> None:
        self.index = index
        self.threshold = threshold
        self.top_k = top_k
        self.categories = dict(categories or {})

    def decide(self, query: str, category: str | None = None) -> GateDecision:
        """Search once; keep the passages only when the gate opens."""
        rule = self.categories.get(category or "", "auto")
        if rule == "never":
            return GateDecision(False, 0.0, f"category {category!r} never retrieves")
        passages = self.index.search(query, self.top_k)
        best = passages[0].score if passages else 0.0
        if rule == "always":
            return GateDecision(bool(passages), best, f"category {category!r} always retrieves", passages)
        if best >= self.threshold:
            return GateDecision(True, best, f"nearest passage at {best:.3f} >= {self.threshold:.3f}", passages)
        return GateDecision(False, best, f"nearest passage at {best:.3f} < {self.threshold:.3f}")


@dataclass(frozen=True)
class Calibration:
    threshold: float
    precision: float
    recall: float
    f1: float


def calibrate(answerable: Sequence[float], unrelated: Sequence[float]) -> Calibration:
    """The cut with the best F1 of "retrieve" (ties go to the higher one: fewer needless retrievals),
    placed midway between the observed similarity it keeps and the next lower one, so a query a
    little less similar than the weakest answerable one still retrieves."""
    if not answerable or not unrelated:
        raise ValueError("calibrate() needs similarities of both answerable and unrelated queries")
    best: Calibration | None = None
    observed = sorted({*answerable, *unrelated})
    below = dict(zip(observed[1:], observed[:-1], strict=True))
    for t in observed:
        tp = sum(s >= t for s in answerable)
        fp = sum(s >= t for s in unrelated)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / len(answerable)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        if best is None or f1 >= best.f1:
            best = Calibration(t, precision, recall, f1)
    assert best is not None
    lower = below.get(best.threshold)
    if lower is None:
        return best
    return Calibration((best.threshold + lower) / 2, best.precision, best.recall, best.f1)
