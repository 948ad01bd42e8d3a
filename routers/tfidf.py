"""Word 1–2-gram TF-IDF features: the lexical member of the level-1 ensemble.

Embeddings blur rare but decisive words ("warfarin", "tort", "stoichiometry");
a sparse lexical model keeps them. Runs of two or more symbols (a docstring's triple
quotes, ``>>>``, ``->``, ``):``) are terms too: pasted code is told by its punctuation more than by
its words, which may be a maths question's; single marks stay out, prose is full
of them. Sublinear term frequency, smoothed IDF, L2 rows. Stored as JSON
(vocabulary) plus a NumPy IDF vector.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

TOKEN_RE = re.compile(r"[a-z0-9]+|[^\sa-z0-9]{2,}")


def ngrams(text: str) -> list[str]:
    tokens = TOKEN_RE.findall(text.lower())
    return tokens + [f"{a} {b}" for a, b in itertools.pairwise(tokens)]


class Tfidf:
    def __init__(self, vocab: dict[str, int], idf: npt.NDArray[np.float32]) -> None:
        self.vocab = vocab
        self.idf = idf

    @classmethod
    def fit(cls, texts: Sequence[str], min_df: int = 2) -> Tfidf:
        import numpy as np

        df: Counter[str] = Counter()
        for t in texts:
            df.update(set(ngrams(t)))
        terms = sorted(g for g, n in df.items() if n >= min_df)
        n = len(texts)
        idf = np.array([math.log((1 + n) / (1 + df[g])) + 1 for g in terms], dtype=np.float32)
        return cls({g: i for i, g in enumerate(terms)}, idf)

    def row(self, text: str) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """Column indices and L2-normalized values of one text (empty when no term is known)."""
        import numpy as np

        counts = Counter(g for g in ngrams(text) if g in self.vocab)
        if not counts:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        idx = np.fromiter((self.vocab[g] for g in counts), dtype=np.int64, count=len(counts))
        tf = np.fromiter((1.0 + math.log(v) for v in counts.values()), dtype=np.float32, count=len(counts))
        val = tf * self.idf[idx]
        return idx, (val / np.linalg.norm(val)).astype(np.float32)

    def scores(self, texts: Sequence[str], W: npt.NDArray[np.float32],
               b: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Logits of a linear model over these features, one row per text."""
        import numpy as np

        out = np.empty((len(texts), W.shape[1]), dtype=np.float32)
        for i, t in enumerate(texts):
            idx, val = self.row(t)
            out[i] = val @ W[idx] + b
        return out

    def save(self, folder: Path) -> None:
        import numpy as np

        terms = sorted(self.vocab, key=self.vocab.__getitem__)
        (folder / "tfidf_vocab.json").write_text(json.dumps(terms, ensure_ascii=False), encoding="utf-8")
        np.save(folder / "tfidf_idf.npy", self.idf)

    @classmethod
    def load(cls, folder: Path) -> Tfidf:
        import numpy as np

        terms = json.loads((folder / "tfidf_vocab.json").read_text(encoding="utf-8"))
        return cls({g: i for i, g in enumerate(terms)}, np.load(folder / "tfidf_idf.npy"))
