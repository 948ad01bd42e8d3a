#!/usr/bin/env python
"""Does fine-tuning the router's encoder pay? MiniLM-L6 as packaged against MiniLM-L6 fine-tuned on MMLU.

    .venv/bin/python bench/encoder_tune_study.py              # ~15 min on 2 cores (the fine-tune ~9)
    .venv/bin/python bench/encoder_tune_study.py --epochs 2

Issue 16 lists "the current encoder fine-tuned" among the approaches to measure. This study measures it
before anything is built into ``coe router fit``:

1. The split of ``bench/routing.py`` (``examples/mmlu/mmlu_dev.jsonl``, 85/15 stratified by subcategory,
   seed 0). The encoder is fine-tuned on the *train* split only: mean-pooled MiniLM, a cosine-softmax
   head over the 57 MMLU subjects (scale 20), AdamW (encoder 3e-5, head 3e-3, 10% warm-up, linear
   decay), batches of 32, at most 128 tokens, ``--epochs`` passes, seeded.
2. Each encoder embeds the train split with the example's anchors, the held-out MMLU questions (question
   alone) and the ``dev`` half of ``bench/other_sources.py`` (real BIG-bench questions).
3. The level-1 ensemble of ``routers.fit`` (linear on subjects, kNN-100, TF-IDF; ``routers.fit.Members``)
   is trained on the train split and scored on both sets, with two choices of member weights:
   ``shipped``: the weights the fit chooses for the packaged encoder (on its internal 15% split), used
   for both encoders; ``own``: each encoder's weights chosen the same way. For the tuned encoder ``own``
   is biased: the internal split's rows were in its fine-tuning data, so its kNN looks better there
   than on new text.

Top-1 is the ensemble's first category against the gold category (MMLU's ``other`` is the generalist's;
for BIG-bench, the category of the labelled expert). Results: ``bench/results/encoder-tune-<stamp>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import other_sources  # noqa: E402
from meta import git_state, versions  # noqa: E402
from routing import CONFIG, MMLU, read_jsonl, stratified_split  # noqa: E402

from coe.embed import load_embedder, model_path  # noqa: E402
from coe.loader import load_registry  # noqa: E402
from routers import fit as F  # noqa: E402

WEIGHT_GRID = F.WEIGHT_GRID


def fine_tune(texts: list[str], labels: list[int], n_labels: int, out: Path, epochs: int, seed: int) -> float:
    """Fine-tune the packaged MiniLM on (text, subject) pairs; save it to ``out``; return the seconds."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_path())
    model = AutoModel.from_pretrained(model_path())
    head = torch.nn.Linear(model.config.hidden_size, n_labels)
    opt = torch.optim.AdamW([{"params": model.parameters(), "lr": 3e-5}, {"params": head.parameters(), "lr": 3e-3}],
                            weight_decay=0.01)
    batch = 32
    steps = epochs * ((len(texts) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / (0.1 * steps)) * max(0.0, 1 - s / steps))
    started, step = time.perf_counter(), 0
    model.train()
    for epoch in range(epochs):
        order = np.random.default_rng(seed + epoch).permutation(len(texts))
        for b in range(0, len(texts), batch):
            idx = order[b:b + batch]
            enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=128, return_tensors="pt")
            e = _pool(model(**enc).last_hidden_state, enc["attention_mask"])
            logits = 20.0 * e @ torch.nn.functional.normalize(head.weight, dim=-1).T
            loss = torch.nn.functional.cross_entropy(logits, torch.tensor([labels[i] for i in idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 25 == 0:
                print(f"  fine-tune step {step}/{steps}, loss {loss.item():.3f}, "
                      f"{time.perf_counter() - started:.0f}s", flush=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return time.perf_counter() - started


def _pool(hidden: Any, mask: Any) -> Any:
    import torch

    m = mask.unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)


def encode_torch(path: Path, texts: list[str]) -> np.ndarray:
    """Mean-pooled, normalized rows (what sentence-transformers and coe.embed compute), 256 tokens."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    order = np.argsort([len(t) for t in texts])
    with torch.inference_mode():
        for b in range(0, len(texts), 64):
            idx = order[b:b + 64]
            enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=256, return_tensors="pt")
            out[idx] = _pool(model(**enc).last_hidden_state, enc["attention_mask"]).numpy()
    return out


def top1(z: np.ndarray, y: np.ndarray) -> float:
    return round(F.top1(z, y), 4)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/coe-bench-encoder-tune"))
    args = ap.parse_args()
    started = time.perf_counter()
    cfg = load_registry(CONFIG)
    rows = read_jsonl(MMLU)
    tr_idx, ho_idx = stratified_split([r["labels"]["subcategory"] for r in rows], 0.15, args.seed)
    data = [F.Example([rows[i]["question"]], rows[i]["labels"]["subcategory"], rows[i]["labels"]["subject"])
            for i in tr_idx]
    examples = data + F.anchors(cfg)
    classes = sorted({e.label for e in examples})
    cls = {c: i for i, c in enumerate(classes)}
    parent = {str(e.fine): e.label for e in data} | {f"category:{c}": c for c in classes}
    fine = {f: i for i, f in enumerate(sorted(parent))}
    groups = [[fine[f] for f in sorted(parent) if parent[f] == c] for c in classes]
    texts = [e.texts[0] for e in examples]
    held = [rows[i]["question"] for i in ho_idx]
    y_held = np.array([cls[rows[i]["labels"]["subcategory"]] for i in ho_idx])
    cat_of = {e.name: e.categories[0] for e in cfg.experts}
    others = [r for r in other_sources.load() if r["split"] == "dev"]
    y_oth = np.array([cls[cat_of[r["gold"]]] for r in others])
    spec = np.array([r["gold"] != other_sources.GENERALIST for r in others])
    queries = held + [r["text"] for r in others]

    one_text_each = np.arange(len(examples))  # every example here is one text: row i is example i

    def design(idx: np.ndarray, X: np.ndarray) -> F.Design:
        return F._rows(examples, idx, cls, fine, X, one_text_each)

    def members(D: F.Design, Xq: np.ndarray, tq: list[str]) -> dict[str, np.ndarray]:
        m = F.Members(D, len(classes), groups, len(fine))
        return {"linear": m.linear(3e-5).log_probs(Xq), "knn": m.knn(100).log_probs(Xq),
                "tfidf": m.lexical(1e-5).log_probs(tq)}

    y_pool = np.array([cls[e.label] for e in data])
    (tr, ho), = F._folds(y_pool, len(data), args.seed)
    always = np.arange(len(data), len(examples))

    def choose_weights(X: np.ndarray) -> dict[str, float]:
        z = members(design(np.concatenate([tr, always]), X), X[ho], [texts[i] for i in ho])
        best: tuple[float, dict[str, float]] = (-1.0, {})
        for wk, wt in itertools.product(WEIGHT_GRID, repeat=2):
            w = {"linear": 1.0, "knn": wk, "tfidf": wt}
            score = top1(sum(w[n] * z[n] for n in z), y_pool[ho])
            if score > best[0]:
                best = (score, w)
        return best[1]

    def score(X: np.ndarray, Q: np.ndarray, w: dict[str, float]) -> dict[str, Any]:
        z = members(design(np.arange(len(examples)), X), Q, queries)
        ens = sum(w[n] * z[n] for n in z)
        n = len(held)
        return {"weights": w, "mmlu_held_out_top1": top1(ens[:n], y_held),
                "members_mmlu_top1": {k: top1(v[:n], y_held) for k, v in z.items()},
                "other_sources_dev_top1": top1(ens[n:], y_oth),
                "other_sources_dev_specialists_top1": top1(ens[n:][spec], y_oth[spec])}

    encoders: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    t0 = time.perf_counter()
    base = load_embedder("onnx")
    encoders["packaged"] = (base.encode(texts), base.encode(queries))
    base_embed_s = time.perf_counter() - t0
    tuned_dir = args.workdir / f"tuned-e{args.epochs}-s{args.seed}"
    args.workdir.mkdir(parents=True, exist_ok=True)
    tune_s = fine_tune([rows[i]["question"] for i in tr_idx], [fine[rows[i]["labels"]["subject"]] for i in tr_idx],
                       len(fine), tuned_dir, args.epochs, args.seed)
    t0 = time.perf_counter()
    encoders["fine-tuned"] = (encode_torch(tuned_dir, texts), encode_torch(tuned_dir, queries))
    tuned_embed_s = time.perf_counter() - t0
    shipped = choose_weights(encoders["packaged"][0])
    arms = {}
    for name, (X, Q) in encoders.items():
        arms[name] = {"shipped_weights": score(X, Q, shipped), "own_weights": score(X, Q, choose_weights(X))}
        print(name, json.dumps(arms[name]), flush=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    result = {
        "bench": "encoder_tune_study", "command": " ".join([".venv/bin/python", *sys.argv]),
        "arms": arms, "n": {"mmlu_held_out": len(held), "other_sources_dev": len(others),
                            "other_sources_dev_specialists": int(spec.sum()), "train_rows": len(texts)},
        "seconds": {"fine_tune": round(tune_s, 1), "embed_packaged_onnx": round(base_embed_s, 1),
                    "embed_tuned_torch": round(tuned_embed_s, 1), "total": round(time.perf_counter() - started, 1)},
        "config": vars(args) | {"workdir": str(args.workdir)}, "load_avg": [round(x, 2) for x in os.getloadavg()],
        "versions": versions("torch", "transformers", "scikit-learn", "onnxruntime"), "git": git_state(),
    }
    out = ROOT / "bench" / "results" / f"encoder-tune-{stamp}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
