"""Fitting the level-1 classifier (``coe router fit``, and the automatic fit at start-up).

Training examples are the labelled JSONL lines of ``router.data`` and
``router.extra_data`` (``question``, plus a second view with the ``choices`` when
a line has them, since users send both kinds) and the registry's own words:
each category's description and examples, and each expert's description and
skills under every category it serves. Those "anchors" weigh more than one line,
so the router generalizes beyond the data's phrasing.

Hyperparameters (L2 strengths, k, ensemble weights) are chosen on held-out data
(a stratified 15% split, or 5-fold cross-validation for small data), the
temperature is fitted there too (with under 200 held-out rows it may soften but
never sharpen beyond the members' geometric mean: a few described examples are
too easy to separate to calibrate on), then every member is refitted on all data. The
report records each member's held-out top-1 and the calibration error (ECE)
before and after scaling.

The artifact is written into a temporary folder and renamed into place under a
file lock, so a crash never leaves a half-written artifact, and two processes
never fit the same one twice. ``meta.json`` carries a fingerprint of everything
the fit read; a changed data file, label or description makes it stale.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coe.config import RegistryConfig
from coe.errors import ConfigError
from coe.files import locked, publish_folder
from coe.jsonl import read_jsonl
from routers.classifier import CategoryClassifier, Knn, LexicalGate, LexicalLinear, Linear, faiss_index, log_softmax
from routers.profiles import skills_of
from routers.tfidf import Tfidf

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from coe.embed import Embedder, Matrix

    Labels = npt.NDArray[np.int64]

log = logging.getLogger("coe.routers.fit")

FIT_VERSION = 7  # 3: the linear heads fitted by scikit-learn; the held-out confusion matrix kept; 4: the lexical gate;
# 5: the heads stop after LBFGS_ITERATIONS; 6: the gate's thresholds go above 0.99;
# 7: the word model also reads runs of symbols
"""Part of the fingerprint: bump when the recipe changes, so old artifacts are refitted."""
ANCHOR_WEIGHT = 5.0
LAMBDAS = (1e-4, 3e-5, 1e-5)
TFIDF_LAMBDAS = (3e-5, 1e-5)
KNN_KS = (10, 25, 50, 100)
WEIGHT_GRID = (0.0, 0.5, 1.0, 1.5, 2.0)
ECE_BINS = 15
HOLDOUT_MIN_ROWS = 1000
CALIBRATION_MIN_ROWS = 200
GATE_AGREEMENT = 0.995
"""The lexical gate's word model must pick the ensemble's category on this share of the held-out rows it
would decide alone: at most 1 in 200 of those decisions may differ from what the embedding would give."""
GATE_MIN_ROWS = 100
"""Held-out rows the gate must decide alone at its threshold to be measured at all."""
GATE_GRID = (*(round(0.5 + 0.01 * i, 2) for i in range(50)), *(round(0.99 + 0.001 * i, 3) for i in range(1, 10)),
             0.9995, 0.9999)
"""Thresholds tried, lowest first. The tail above 0.99 is for a word model fitted with little regularization:
the MMLU example's, fitted on all its data, was sure above 0.99 of 27% of its held-out rows and still
disagreed with the ensemble on 1% of them; above 0.998 it decided 22% with 99.6% agreement. With the grid
stopping at 0.99 that fit recorded no gate at all."""
LBFGS_ITERATIONS = 30
"""Where the logistic heads stop. L-BFGS took its full 300 iterations on every head of the MMLU example
(tol 1e-6), 95% of a fit's time after the embedding. Stopped at 30, the fit's tuning and refit took 18 s
instead of 91, and the routers' first choices on the bench's held-out sets were as good (30 against 300:
MMLU questions 0.841 and 0.841, HumanEval 0.970 and 0.939, BIG-bench specialists 0.750 and 0.732; 100 and 60
iterations scored 0.832 on MMLU): stopping early regularizes as the L2 term does (bench/README.md, issue 16)."""


@dataclass
class Example:
    texts: list[str]
    label: str
    fine: str | None
    weight: float = 1.0


def _text_views(item: dict[str, Any], choices_view: bool = True) -> list[str]:
    question = item.get("question", item.get("text"))
    if not isinstance(question, str) or not question.strip():
        return []
    views = [question]
    choices = item.get("choices")
    if choices_view and isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices):
        views.append(question + "\n" + "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(choices)))
    return views


def read_labelled(path: Path, label: str, fine_label: str | None = None, *,
                  choices_view: bool = True) -> list[Example]:
    """Every line needs ``question`` (or ``text``) and a string at ``label``; every bad line is reported."""
    def parse(item: dict[str, Any], number: int) -> Example | str:
        views = _text_views(item, choices_view)
        labels = skills_of(item, label)
        fine = skills_of(item, fine_label) if fine_label else ()
        if not views:
            return "needs 'question' (or 'text'), a non-empty string"
        if len(labels) != 1:
            return f"needs one string at {label!r}"
        if fine_label and len(fine) != 1:
            return f"needs one string at {fine_label!r}"
        return Example(views, labels[0], fine[0] if fine else None)

    return read_jsonl(path, parse, consequence="nothing was fitted")


def anchors(cfg: RegistryConfig) -> list[Example]:
    """The registry's own words about each category, as weighted training examples."""
    out: list[Example] = []
    for name, cat in cfg.router.categories.items():
        out += [Example([text], name, None, ANCHOR_WEIGHT) for text in [cat.description, *cat.examples] if text]
    for expert in cfg.experts:
        texts = [t for t in (expert.description, ", ".join(expert.skills)) if t.strip()]
        for category in expert.categories:
            out += [Example([t], category, None, ANCHOR_WEIGHT) for t in texts]
    return out


def fingerprint(cfg: RegistryConfig, embedder_id: str) -> str:
    """Everything a fit reads: a change to any of it makes the artifact stale."""
    r = cfg.router
    digest = hashlib.sha256(f"fit-{FIT_VERSION}|{embedder_id}|{r.label}|{r.fine_label}|{r.choices_view}".encode())
    for where, path in [("router.data", r.data), *(("router.extra_data", p) for p in r.extra_data)]:
        if path is None:
            continue
        try:
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        except OSError as exc:
            raise ConfigError([f"{where}: cannot read {path}: {exc.strerror}"]) from exc
    for a in anchors(cfg):
        digest.update(json.dumps([a.label, a.texts]).encode())
    return digest.hexdigest()[:20]


# ----------------------------------------------------------------------------- training


def train_softmax(X: Any, y: Labels, n_out: int, lam: float, weights: npt.NDArray[np.float32],
                  max_iter: int = LBFGS_ITERATIONS) -> tuple[Matrix, Matrix]:
    """Multinomial logistic regression (scikit-learn, L-BFGS) minimising the weighted mean cross-entropy
    + lam/2 ||W||^2, the intercept unpenalised, for at most ``max_iter`` iterations (stopping there is
    intended, so scikit-learn's convergence warning is not shown); X dense or scipy sparse. Returns
    (W: d x n_out, b: n_out), with every one of the ``n_out`` classes a column, also those absent from ``y``
    (a fold may lack a fine label): they get no weight and a bias far below the others."""
    import warnings

    import numpy as np
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    sw = weights.astype(np.float64) / float(weights.sum())  # the mean, as the objective above says
    model = LogisticRegression(C=1.0 / lam, max_iter=max_iter, tol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(X, y, sample_weight=sw)
    present = model.classes_.astype(np.int64)
    coef, icpt = model.coef_, model.intercept_
    if len(present) == 2:  # scikit-learn keeps one logistic for two classes: logits (0, x.w + b)
        coef, icpt = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], icpt])
    W = np.zeros((X.shape[1], n_out), dtype=np.float32)
    b = np.full(n_out, float(icpt.min()) - 30.0 if len(icpt) else 0.0, dtype=np.float32)
    W[:, present] = coef.T
    b[present] = icpt
    return W, b


def _sparse(tfidf: Tfidf, texts: Sequence[str]) -> Any:
    import numpy as np
    from scipy.sparse import csr_matrix

    rows, cols, vals = [], [], []
    for i, t in enumerate(texts):
        idx, val = tfidf.row(t)
        rows.append(np.full(len(idx), i))
        cols.append(idx)
        vals.append(val)
    return csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                      shape=(len(texts), len(tfidf.vocab)), dtype=np.float32)


@dataclass
class Design:
    """One training set, flattened to one row per text."""

    X: Matrix
    texts: list[str]
    y: Labels
    fine: Labels | None
    weights: npt.NDArray[np.float32]


@dataclass
class Params:
    lam: float = 3e-5
    k: int = 25
    tfidf_lam: float = 1e-5
    weights: dict[str, float] | None = None


class Members:
    """The three members fitted on one Design."""

    def __init__(self, d: Design, n_cls: int, groups: list[list[int]] | None, n_fine: int) -> None:
        self.d, self.n_cls, self.groups, self.n_fine = d, n_cls, groups, n_fine
        self.tfidf = Tfidf.fit(d.texts)
        self._sparse: Any = None
        self._index: Any = None

    def linear(self, lam: float) -> Linear:
        target, n_out = (self.d.fine, self.n_fine) if self.d.fine is not None else (self.d.y, self.n_cls)
        W, b = train_softmax(self.d.X, target, n_out, lam, self.d.weights)
        return Linear(W, b, self.groups)

    def knn(self, k: int) -> Knn:
        if self._index is None:  # one index serves every k tried
            self._index = faiss_index(self.d.X)
        return Knn(self._index, self.d.y, k, self.n_cls)

    def lexical(self, lam: float) -> LexicalLinear:
        if self._sparse is None:
            self._sparse = _sparse(self.tfidf, self.d.texts)
        W, b = train_softmax(self._sparse, self.d.y, self.n_cls, lam, self.d.weights)
        return LexicalLinear(self.tfidf, W, b)


def top1(z: Matrix, y: Labels) -> float:
    return float((z.argmax(axis=1) == y).mean()) if len(y) else 0.0


def nll(z: Matrix, y: Labels) -> float:
    import numpy as np

    return float(-log_softmax(z)[np.arange(len(y)), y].mean())


def ece(z: Matrix, y: Labels, bins: int = ECE_BINS) -> float:
    """Expected calibration error of the top probability, equal-width bins."""
    import numpy as np

    p = np.exp(log_softmax(z))
    return calibration_error(p.max(axis=1), p.argmax(axis=1) == y, bins)


def calibration_error(conf: Any, correct: Any, bins: int = ECE_BINS) -> float:
    """|accuracy − confidence| per equal-width confidence bin, weighted by the bin's share of rows.
    Also what ``bench/routing.py`` reports for routing decisions on sets the fit never saw."""
    import numpy as np

    conf, correct = np.asarray(conf, dtype=float), np.asarray(correct, dtype=float)
    total = 0.0
    for lo, hi in itertools.pairwise(np.linspace(0.0, 1.0, bins + 1)):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(total)


def fit_temperature(z: Matrix, y: Labels) -> float:
    """The T minimising held-out NLL of softmax(z / T): a log-grid, then golden-section refinement."""
    import numpy as np

    grid = np.exp(np.linspace(math.log(0.02), math.log(50.0), 161))
    i = int(np.argmin([nll(z / t, y) for t in grid]))
    lo, hi = float(grid[max(i - 1, 0)]), float(grid[min(i + 1, len(grid) - 1)])
    for _ in range(30):
        a, b = lo + 0.382 * (hi - lo), lo + 0.618 * (hi - lo)
        if nll(z / a, y) < nll(z / b, y):
            hi = b
        else:
            lo = a
    return (lo + hi) / 2


def _folds(y: Labels, n_rows: int, seed: int) -> list[tuple[Labels, Labels]]:
    """Row index pairs (train, held-out): one stratified 85/15 split for large data, else 5 folds."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n_folds = 1 if n_rows >= HOLDOUT_MIN_ROWS else 5
    assign = np.zeros(n_rows, dtype=np.int64)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        if n_folds == 1:
            assign[idx] = (np.arange(len(idx)) < round(len(idx) * 0.15)).astype(np.int64) - 1  # 0 held out, -1 train
        else:
            assign[idx] = (np.arange(len(idx)) + rng.integers(n_folds)) % n_folds
    folds = range(1) if n_folds == 1 else range(n_folds)
    return [(np.flatnonzero(assign != f), np.flatnonzero(assign == f)) for f in folds]


def fit_gate(zt: Matrix, ens: Matrix, temperature: float, y: Labels) -> tuple[LexicalGate | None, dict[str, Any]]:
    """The lowest threshold on the word model's held-out confidence (``zt``: its log-probabilities) at which
    it agrees with the ensemble (``ens``: logits) on ``GATE_AGREEMENT`` of the rows it would decide, with
    at least ``GATE_MIN_ROWS`` of them; and the report of what the gated router scores on those rows."""
    import numpy as np

    conf, word, full = np.exp(zt.max(axis=1)), zt.argmax(axis=1), ens.argmax(axis=1)
    for threshold in GATE_GRID:
        accepted = conf >= threshold
        if int(accepted.sum()) < GATE_MIN_ROWS:
            break
        agreement = float((word[accepted] == full[accepted]).mean())
        if agreement < GATE_AGREEMENT:
            continue
        gate = LexicalGate(threshold, fit_temperature(zt[accepted], y[accepted]))
        mixed = np.where(accepted[:, None], log_softmax(zt / gate.temperature), log_softmax(ens / temperature))
        return gate, {"threshold": threshold, "temperature": round(gate.temperature, 4),
                      "accepted": round(float(accepted.mean()), 4), "agreement": round(agreement, 4),
                      "held_out_top1": round(top1(mixed, y), 4), "ece": round(ece(mixed, y), 4)}
    return None, {"threshold": None, "why": f"below {GATE_MIN_ROWS} held-out rows before the word model agreed "
                                            f"with the ensemble on {GATE_AGREEMENT:.1%} of them"}


# ----------------------------------------------------------------------------- the fit


@dataclass
class FitResult:
    classifier: CategoryClassifier
    report: dict[str, Any]


def embedder_id(embedder: Embedder) -> str:
    from coe.embed import model_hash, model_path

    return f"{embedder.name}:{model_hash(model_path())}"


def _rows(examples: Sequence[Example], which: Any, cls: dict[str, int], fine: dict[str, int] | None,
          X: Matrix, first_row: Labels) -> Design:
    """The Design of the examples ``which`` (indices), every view one row."""
    import numpy as np

    rows = [int(first_row[i]) + v for i in which for v in range(len(examples[i].texts))]
    exs = [examples[i] for i in which for _ in examples[i].texts]
    return Design(X[rows], [examples[i].texts[v] for i in which for v in range(len(examples[i].texts))],
                  np.array([cls[e.label] for e in exs], dtype=np.int64),
                  None if fine is None else np.array([fine[e.fine or f"category:{e.label}"] for e in exs],
                                                     dtype=np.int64),
                  np.array([e.weight for e in exs], dtype=np.float32))


def _encode_with_progress(embedder: Embedder, texts: Sequence[str], progress: Callable[[str], None],
                          chunk: int = 2048, every_s: float = 10.0) -> Matrix:
    """Embed in chunks, saying how far it is every ``every_s`` (the embedding is most of a fit's time)."""
    import numpy as np

    started = last = time.perf_counter()
    parts = []
    for start in range(0, len(texts), chunk):
        parts.append(embedder.encode(list(texts[start:start + chunk])))
        now, done = time.perf_counter(), min(start + chunk, len(texts))
        if now - last >= every_s and done < len(texts):
            last = now
            rate = done / (now - started)
            progress(f"embedded {done}/{len(texts)} texts ({rate:.0f}/s, about {(len(texts) - done) / rate:.0f}s left)")
    return np.concatenate(parts) if parts else embedder.encode([])


def confusion(z: Matrix, y: Labels, n: int) -> list[list[int]]:
    """The held-out confusion matrix of the chosen ensemble: row = true category, column = predicted
    (the order of ``classes``); kept in the artifact so that the explorer can show where routing errs."""
    import numpy as np

    m = np.zeros((n, n), dtype=np.int64)
    np.add.at(m, (y, z.argmax(axis=1)), 1)
    return [[int(v) for v in row] for row in m]


def fit(cfg: RegistryConfig, embedder: Embedder, *, seed: int = 0,
        progress: Callable[[str], None] = lambda _line: None) -> FitResult:
    """Fit the level-1 classifier on ``router.data``, ``router.extra_data`` and the registry's anchors."""
    import numpy as np

    started = time.perf_counter()
    r = cfg.router
    data = [e for path in ([r.data] if r.data is not None else []) + list(r.extra_data)
            for e in read_labelled(path, r.label, r.fine_label, choices_view=r.choices_view)]
    anc = anchors(cfg)
    classes = sorted({e.label for e in [*data, *anc]})
    if len(classes) < 2:
        raise ConfigError(["router: the classifier needs at least two categories, from router.data, "
                           "router.categories or the experts' categories"])
    cls = {c: i for i, c in enumerate(classes)}
    fine: dict[str, int] | None = None
    groups: list[list[int]] | None = None
    if r.fine_label:
        parent: dict[str, str] = {}
        for e in data:
            assert e.fine is not None
            if parent.setdefault(e.fine, e.label) != e.label:
                raise ConfigError([f"router.fine_label: {e.fine!r} falls under both {parent[e.fine]!r} and "
                                   f"{e.label!r}; a finer label must belong to one category"])
        for c in classes:  # anchors, and categories with no data, get one pseudo-fine class each
            parent.setdefault(f"category:{c}", c)
        fine = {f: i for i, f in enumerate(sorted(parent))}
        groups = [[fine[f] for f in sorted(parent) if parent[f] == c] for c in classes]

    examples = [*data, *anc]
    texts = [t for e in examples for t in e.texts]
    first_row = np.cumsum([0] + [len(e.texts) for e in examples])[:-1].astype(np.int64)
    progress(f"embedding {len(texts)} texts ({len(data)} labelled lines, {len(anc)} anchors, "
             f"{len(classes)} categories)")
    t0 = time.perf_counter()
    X = _encode_with_progress(embedder, texts, progress)
    embed_s = time.perf_counter() - t0

    # Held-out predictions for every candidate setting, gathered over the folds.
    pool = np.arange(len(data)) if len(data) >= 20 else np.arange(len(examples))
    always = np.setdiff1d(np.arange(len(examples)), pool)
    y_pool = np.array([cls[examples[i].label] for i in pool], dtype=np.int64)
    oof: dict[tuple[str, float], list[Matrix]] = {}
    y_oof: list[Labels] = []
    t0 = time.perf_counter()
    for fold, (tr, ho) in enumerate(_folds(y_pool, len(pool), seed)):
        train = _rows(examples, np.concatenate([pool[tr], always]), cls, fine, X, first_row)
        held = _rows(examples, pool[ho], cls, fine, X, first_row)
        members = Members(train, len(classes), groups, len(fine or {}))
        for lam in LAMBDAS:
            oof.setdefault(("linear", lam), []).append(members.linear(lam).log_probs(held.X))
        for k in KNN_KS:
            oof.setdefault(("knn", k), []).append(members.knn(k).log_probs(held.X))
        for lam in TFIDF_LAMBDAS:
            oof.setdefault(("tfidf", lam), []).append(members.lexical(lam).log_probs(held.texts))
        y_oof.append(held.y)
        progress(f"held-out fold {fold + 1}: {len(train.y)} training rows, {len(held.y)} held out")
    y = np.concatenate(y_oof)
    z = {key: np.concatenate(parts) for key, parts in oof.items()}
    scores = {f"{m}@{v:g}": round(top1(zz, y), 4) for (m, v), zz in z.items()}
    best = {m: max((key for key in z if key[0] == m), key=lambda key: (top1(z[key], y), -nll(z[key], y)))
            for m in ("linear", "knn", "tfidf")}
    weights, best_key = {"linear": 1.0, "knn": 0.0, "tfidf": 0.0}, (-1.0, 0.0)
    for wk, wt in itertools.product(WEIGHT_GRID, repeat=2):
        trial = z[best["linear"]] + wk * z[best["knn"]] + wt * z[best["tfidf"]]
        key = (top1(trial, y), -nll(trial / (1 + wk + wt), y))
        if key > best_key:
            best_key, weights = key, {"linear": 1.0, "knn": wk, "tfidf": wt}
    ens: Matrix = z[best["linear"]] + weights["knn"] * z[best["knn"]] + weights["tfidf"] * z[best["tfidf"]]
    temperature = fit_temperature(ens, y)
    gate: LexicalGate | None = None
    gate_report: dict[str, Any] = {"threshold": None, "why": "the ensemble has no word model"}
    if len(y) < CALIBRATION_MIN_ROWS:  # too few held-out rows to trust a sharpening temperature:
        temperature = max(temperature, sum(weights.values()))  # no sharper than the members' geometric mean
        gate_report = {"threshold": None, "why": f"fewer than {CALIBRATION_MIN_ROWS} held-out rows"}
    elif weights["tfidf"]:
        gate, gate_report = fit_gate(z[best["tfidf"]], ens, temperature, y)
    tune_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    everything = _rows(examples, np.arange(len(examples)), cls, fine, X, first_row)
    final = Members(everything, len(classes), groups, len(fine or {}))
    clf = CategoryClassifier(
        classes,
        final.linear(best["linear"][1]) if weights["linear"] else None,
        final.knn(int(best["knn"][1])) if weights["knn"] else None,
        final.lexical(best["tfidf"][1]) if weights["tfidf"] else None,
        weights, temperature, gate=gate)
    refit_s = time.perf_counter() - t0
    report = {
        "examples": len(data), "anchors": len(anc), "rows": len(texts), "classes": classes,
        "label": r.label, "fine_label": r.fine_label,
        "held_out": {"rows": len(y), "method": "15% stratified split" if len(pool) >= HOLDOUT_MIN_ROWS
                     else "5-fold cross-validation"},
        "member_top1": scores,
        "chosen": {m: f"{m}@{v:g}" for m, (_, v) in best.items()},
        "weights": weights, "temperature": round(temperature, 4),
        "held_out_top1": round(best_key[0], 4),
        "ece_before": round(ece(ens, y), 4), "ece_after": round(ece(ens / temperature, y), 4),
        "confusion": confusion(ens, y, len(classes)),
        "gate": gate_report,
        "seconds": {"embed": round(embed_s, 1), "tune": round(tune_s, 1), "refit": round(refit_s, 1),
                    "total": round(time.perf_counter() - started, 1)},
    }
    clf.meta = {"fit": report, "embedder": embedder_id(embedder), "data": str(r.data) if r.data is not None else None,
                "extra_data": [str(p) for p in r.extra_data],
                "fingerprint": fingerprint(cfg, embedder_id(embedder))}
    progress(f"held-out top-1 {report['held_out_top1']:.3f}; ECE {report['ece_before']:.3f} -> "
             f"{report['ece_after']:.3f} (T={temperature:.2f}); {time.perf_counter() - started:.0f}s")
    if gate is not None:
        progress(f"lexical gate: the word model decides {gate_report['accepted']:.0%} of held-out rows alone "
                 f"(confidence >= {gate.threshold:g}, {gate_report['agreement']:.1%} agreement); top-1 "
                 f"{gate_report['held_out_top1']:.3f}, ECE {gate_report['ece']:.3f} with the gate")
    return FitResult(clf, report)


def write_artifact(clf: CategoryClassifier, folder: Path) -> None:
    """Readers (another process's ``coe serve``) see the old artifact or the new one, never half."""
    publish_folder(folder, clf.save)


def _load(folder: Path) -> CategoryClassifier | None:
    if not (folder / "meta.json").exists():
        return None
    try:
        return CategoryClassifier.load(folder)
    except ConfigError as exc:
        log.warning("%s", exc)
        return None


def ensure_classifier(cfg: RegistryConfig, embedder: Embedder, *,
                      progress: Callable[[str], None] = lambda _line: None) -> CategoryClassifier:
    """The fitted classifier at ``router.artifact``, fitted first if missing or stale and ``auto_fit`` allows."""
    folder = cfg.router.artifact
    assert folder is not None, "the loader sets router.artifact"
    current = _load(folder)
    wanted = embedder_id(embedder)

    def expected(clf: CategoryClassifier | None) -> str:
        data = cfg.router.data
        recorded = clf.meta.get("data") if clf is not None else None
        if data is None and recorded and Path(recorded).exists():  # fitted by 'coe router fit --data'
            return fingerprint(cfg.model_copy(update={"router": cfg.router.model_copy(
                update={"data": Path(recorded)})}), wanted)
        return fingerprint(cfg, wanted)

    if current is not None and current.meta.get("fingerprint") == expected(current):
        return current
    if not cfg.router.auto_fit:
        fitted_with = current.meta.get("embedder") if current is not None else None
        if fitted_with is not None and fitted_with != wanted:
            # Not merely stale: its linear head and kNN index hold another encoder's vectors.
            raise ConfigError([f"router.artifact: {folder} was fitted on the embedder {fitted_with!r}, and "
                               f"router.embedder is now {wanted!r}; auto_fit is off: run "
                               f"'coe router fit --config FILE'"])
        if current is not None:
            log.warning("router artifact %s is stale (data or descriptions changed); auto_fit is off", folder)
            return current
        raise ConfigError([f"router.artifact: {folder} is missing and router.auto_fit is off: "
                           f"run 'coe router fit --config FILE'"])
    if cfg.router.data is None and not cfg.router.extra_data and not cfg.router.categories and \
            not any(e.categories for e in cfg.experts):
        raise ConfigError(["router: nothing to fit the classifier on: set router.data (labelled JSONL) or "
                           "describe router.categories"])
    with locked(folder.parent / f".{folder.name}-fit-lock"):
        current = _load(folder)  # another process may have fitted it while we waited
        if current is not None and current.meta.get("fingerprint") == expected(current):
            return current
        why = "missing" if current is None else "stale"
        log.warning("router artifact %s is %s: fitting it now", folder, why)

        def say(line: str) -> None:  # a server or `coe route` that fits on its own shows how far it is
            log.warning("router fit: %s", line)
            progress(line)

        result = fit(cfg, embedder, progress=say)
        write_artifact(result.classifier, folder)
        return result.classifier
