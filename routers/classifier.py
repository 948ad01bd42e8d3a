"""The level-1 category classifier and its artifact on disk.

A log-linear ensemble over one query's MiniLM embedding and its words:

- ``linear``: multinomial logistic regression on the embedding (over a finer
  label when the data has one, e.g. MMLU subjects, summed back to categories);
- ``knn``: a vote of the nearest labelled examples, found in a FAISS
  inner-product index, weighted by a sharp softmax of their similarity;
- ``tfidf``: logistic regression on word 1–2-grams.

Each member gives log-probabilities; the ensemble adds them with weights chosen
on held-out data, then divides by a temperature fitted on that held-out data, so
the top probability is a calibrated confidence and the fallback threshold means
what it says. ``routers.fit`` builds it.

The lexical gate: the word model costs microseconds, the embedding milliseconds,
and where the word model alone is very sure the ensemble almost never disagrees
(on the MMLU example: a sixth to a fifth of the questions, the long ones). So the fit
records the lowest word-model confidence at which its held-out choices agree
with the ensemble's at least ``routers.fit.GATE_AGREEMENT`` of the time, and a
temperature for those rows; above it, ``lexical_gate`` decides without embedding
(``routers.level1``; off unless ``router.lexical_gate``, because on text unlike
the training data the words can be sure and wrong). A fit with too few held-out
rows to measure that has no gate.

The artifact is one folder: ``meta.json`` (format version, classes, weights,
temperature, fit metadata), ``knn.faiss`` + ``knn_labels.npy``, ``linear_W.npy``,
``linear_b.npy``, ``tfidf_*``. JSON, NumPy and FAISS files: nothing is pickled.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coe.errors import ConfigError
from coe.files import read_published
from routers.tfidf import Tfidf

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from coe.embed import Matrix

ARTIFACT_FORMAT = 1
MEMBERS = ("linear", "knn", "tfidf")
KNN_SHARPNESS = 0.05
"""Neighbour weight = exp((similarity − best similarity) / KNN_SHARPNESS): close neighbours dominate."""
KNN_SMOOTHING = 0.05


def log_softmax(z: Matrix) -> Matrix:
    import numpy as np

    z = z - z.max(axis=1, keepdims=True)
    out: Matrix = (z - np.log(np.exp(z).sum(axis=1, keepdims=True))).astype(np.float32)
    return out


@dataclass
class Linear:
    W: Matrix
    b: Matrix
    groups: list[list[int]] | None = None
    """Finer-label columns of each category, when the head was trained on a finer label."""

    def log_probs(self, X: Matrix) -> Matrix:
        import numpy as np

        ls = log_softmax(X @ self.W + self.b)
        if self.groups is None:
            return ls
        return np.stack([np.logaddexp.reduce(ls[:, g], axis=1) for g in self.groups], axis=1).astype(np.float32)


@dataclass
class Knn:
    index: Any  # faiss.IndexFlatIP over unit vectors
    labels: npt.NDArray[np.int64]
    k: int
    n_classes: int

    def log_probs(self, X: Matrix) -> Matrix:
        import numpy as np

        k = min(self.k, int(self.index.ntotal))
        sims, idx = self.index.search(np.ascontiguousarray(X, dtype=np.float32), k)
        w = np.exp((sims - sims[:, :1]) / KNN_SHARPNESS)  # faiss returns best first
        votes = np.zeros((X.shape[0], self.n_classes), dtype=np.float64)
        rows = np.repeat(np.arange(X.shape[0]), k)
        np.add.at(votes, (rows, self.labels[idx].ravel()), w.ravel())
        p = votes / np.maximum(votes.sum(axis=1, keepdims=True), 1e-12)
        out: Matrix = np.log((1 - KNN_SMOOTHING) * p + KNN_SMOOTHING / self.n_classes).astype(np.float32)
        return out


@dataclass
class LexicalLinear:
    tfidf: Tfidf
    W: Matrix
    b: Matrix

    def log_probs(self, texts: Sequence[str]) -> Matrix:
        return log_softmax(self.tfidf.scores(texts, self.W, self.b))


def faiss_index(vectors: Matrix) -> Any:
    """An exact inner-product index (cosine on unit rows): small enough that exact search is fastest."""
    import faiss
    import numpy as np

    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


@dataclass
class LexicalGate:
    """Where the word model decides alone: its top probability at least ``threshold``, and then its
    log-probabilities divided by ``temperature`` (fitted on the held-out rows above the threshold)."""

    threshold: float
    temperature: float


@dataclass
class CategoryClassifier:
    classes: list[str]
    linear: Linear | None
    knn: Knn | None
    tfidf: LexicalLinear | None
    weights: dict[str, float]
    temperature: float
    meta: dict[str, Any] = field(default_factory=dict)
    gate: LexicalGate | None = None

    def logits(self, X: Matrix, texts: Sequence[str]) -> Matrix:
        """Uncalibrated ensemble scores: Σ weight × member log-probabilities."""
        import numpy as np

        z = np.zeros((X.shape[0], len(self.classes)), dtype=np.float32)
        if self.linear is not None and self.weights.get("linear"):
            z += self.weights["linear"] * self.linear.log_probs(X)
        if self.knn is not None and self.weights.get("knn"):
            z += self.weights["knn"] * self.knn.log_probs(X)
        if self.tfidf is not None and self.weights.get("tfidf"):
            z += self.weights["tfidf"] * self.tfidf.log_probs(texts)
        return z

    def log_probs(self, X: Matrix, texts: Sequence[str]) -> Matrix:
        """Calibrated log P(category | text), one row per text."""
        return log_softmax(self.logits(X, texts) / self.temperature)

    def lexical_gate(self, texts: Sequence[str]) -> tuple[npt.NDArray[np.bool_], Matrix] | None:
        """(which texts the word model decides alone, its calibrated log-probabilities for every text),
        or None when the fit recorded no gate. Needs no embedding."""
        import numpy as np

        if self.gate is None or self.tfidf is None:
            return None
        lp = self.tfidf.log_probs(texts)
        accepted = np.exp(lp.max(axis=1)) >= self.gate.threshold
        return accepted, log_softmax(lp / self.gate.temperature)

    # -- the artifact -----------------------------------------------------------------

    def save(self, folder: Path) -> None:
        """Write every file into ``folder`` (which must exist and be empty; ``routers.fit`` renames it in)."""
        import faiss
        import numpy as np

        members: dict[str, Any] = {}
        if self.linear is not None:
            np.save(folder / "linear_W.npy", self.linear.W)
            np.save(folder / "linear_b.npy", self.linear.b)
            members["linear"] = {"groups": self.linear.groups}
        if self.knn is not None:
            faiss.write_index(self.knn.index, str(folder / "knn.faiss"))
            np.save(folder / "knn_labels.npy", self.knn.labels)
            members["knn"] = {"k": self.knn.k, "size": int(self.knn.index.ntotal)}
        if self.tfidf is not None:
            self.tfidf.tfidf.save(folder)
            np.save(folder / "tfidf_W.npy", self.tfidf.W)
            np.save(folder / "tfidf_b.npy", self.tfidf.b)
            members["tfidf"] = {"vocabulary": len(self.tfidf.tfidf.vocab)}
        meta = {**self.meta, "format": ARTIFACT_FORMAT, "classes": self.classes, "weights": self.weights,
                "temperature": self.temperature, "members": members,
                "gate": None if self.gate is None else {"threshold": self.gate.threshold,
                                                        "temperature": self.gate.temperature}}
        (folder / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> CategoryClassifier:
        import faiss
        import numpy as np

        def read(source: Path) -> tuple[dict[str, Any], Linear | None, Knn | None, LexicalLinear | None]:
            meta: dict[str, Any] = json.loads((source / "meta.json").read_text(encoding="utf-8"))
            if meta.get("format") != ARTIFACT_FORMAT:
                return meta, None, None, None
            members = meta.get("members", {})
            linear = knn = tfidf = None
            if "linear" in members:
                linear = Linear(np.load(source / "linear_W.npy"), np.load(source / "linear_b.npy"),
                                members["linear"].get("groups"))
            if "knn" in members:
                knn = Knn(faiss.read_index(str(source / "knn.faiss")), np.load(source / "knn_labels.npy"),
                          int(members["knn"]["k"]), len(meta["classes"]))
            if "tfidf" in members:
                tfidf = LexicalLinear(Tfidf.load(source), np.load(source / "tfidf_W.npy"),
                                      np.load(source / "tfidf_b.npy"))
            return meta, linear, knn, tfidf

        try:  # every file from one version, whatever a refit does meanwhile
            loaded = read_published(folder, read)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
            raise ConfigError([f"{folder}: not a router artifact, or a damaged one ({exc}); "
                               "fit it again with 'coe router fit'"]) from exc
        if loaded is None:
            raise ConfigError([f"{folder}: not a router artifact (no such folder); fit one with 'coe router fit'"])
        meta, linear, knn, tfidf = loaded
        if meta.get("format") != ARTIFACT_FORMAT:
            raise ConfigError([f"{folder}: router artifact format {meta.get('format')!r}, this coe reads "
                               f"{ARTIFACT_FORMAT}: refit it with 'coe router fit'"])
        classes = list(meta["classes"])
        gate = meta.get("gate")
        return cls(classes, linear, knn, tfidf, {k: float(v) for k, v in meta["weights"].items()},
                   float(meta["temperature"]), meta,
                   LexicalGate(float(gate["threshold"]), float(gate["temperature"])) if gate else None)
