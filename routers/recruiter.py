"""Level 2: recruit the k experts whose validated skills fit the query (Symbolic-MoE).

- A query's skills come from the profile vocabulary: by default the skills whose
  embeddings are nearest the query's (no LLM call); or, as in the paper, an
  annotator expert is asked for keywords several times, the keywords seen at
  least ``min_count`` times are kept and each is mapped to its nearest profile skill.
- Each expert's fit is ``w_m = S_m(q) × γ_m``: local suitability (the sum of its
  per-skill profile scores over the query's skills) times global strength
  (``γ_m ∝ accuracy^(1/τ)``). See ``routers.profiles``.
- Profiles come from ``coe profile`` (``router.profiles``), re-read when the file
  changes; an expert without a measured profile (say, one just registered) gets
  a synthetic one from its declared skills and categories until it is profiled.
- The aggregator is the expert with the best measured aggregation score, else the top recruit.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coe.config import ExpertConfig, RouterConfig
from coe.embed import Embedder
from coe.errors import BackendUnavailable
from routers.base import Completer
from routers.profiles import ExpertProfile, ProfileSet, synthetic_profiles

if TYPE_CHECKING:
    from coe.embed import Matrix

log = logging.getLogger("coe.routers.recruiter")


ANNOTATOR_PROMPT = (
    "Name the skills or knowledge areas needed to answer the question below, as 1 to 3 short keywords "
    "separated by commas (for example: algebra, probability). Answer with the keywords only.\n\nQuestion: {q}"
)
KEYWORD_SPLIT = re.compile(r"[,;\n]+")


class Recruiter:
    def __init__(self, config: RouterConfig, embedder: Embedder, complete: Completer | None = None) -> None:
        self.config = config
        self.embedder = embedder
        self.complete = complete
        self._rng = random.Random(config.seed)
        self._lock = threading.Lock()
        self._vectors: dict[str, Any] = {}
        self._measured: ProfileSet | None = None
        self._measured_stamp: tuple[int, int] | None = None
        self._cache: tuple[Any, ProfileSet] | None = None
        self._derived: tuple[list[str], Matrix, dict[str, float]] | None = None

    # -- profiles -----------------------------------------------------------------------

    def _load_measured(self) -> ProfileSet | None:
        path: Path | None = self.config.profiles
        if path is None:
            return None
        try:
            st = path.stat()
        except OSError:
            return None
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._measured_stamp:
            try:
                self._measured = ProfileSet.load(path)
            except (OSError, ValueError) as exc:
                log.error("profiles %s are unreadable, keeping the previous ones: %s", path, exc)
            self._measured_stamp = stamp
        return self._measured

    def profiles(self, experts: Sequence[ExpertConfig]) -> ProfileSet:
        """Measured profiles for the experts that have one, synthetic ones for the rest; rebuilt only
        when the experts or the profiles file change (this runs for every request)."""
        measured = self._load_measured()
        key = (self._measured_stamp, tuple((e.name, tuple(e.skills), tuple(e.categories)) for e in experts))
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        profiles = synthetic_profiles(experts, tau=self.config.tau)
        if measured is not None:
            merged: dict[str, ExpertProfile] = {
                e.name: measured.experts.get(e.name) or profiles.experts[e.name] for e in experts}
            profiles = ProfileSet(tau=self.config.tau, source=measured.source, skills_field=measured.skills_field,
                                  experts=merged)
        vocabulary = profiles.vocabulary()
        self._derived = (vocabulary, self._skill_matrix(vocabulary), profiles.global_strength())
        self._cache = (key, profiles)
        return profiles

    # -- skills -------------------------------------------------------------------------

    def _skill_matrix(self, vocabulary: Sequence[str]) -> Matrix:
        import numpy as np

        with self._lock:
            missing = [s for s in vocabulary if s not in self._vectors]
        if missing:
            vectors = self.embedder.encode(missing)
            with self._lock:
                self._vectors.update(zip(missing, vectors, strict=True))
        with self._lock:
            rows = [self._vectors[s] for s in vocabulary]
        return np.stack(rows) if rows else np.zeros((0, self.embedder.dim), dtype=np.float32)

    def nearest_skills(self, vector: Matrix, profiles: ProfileSet, top: int | None = None,
                       min_similarity: float | None = None) -> list[tuple[str, float]]:
        """The profile skills nearest a query embedding, best first, with their cosine similarity."""
        import numpy as np

        vocabulary, matrix, _ = self._view(profiles)
        if not vocabulary:
            return []
        sims = matrix @ vector
        floor = self.config.skills.min_similarity if min_similarity is None else min_similarity
        order = np.argsort(-sims)[: top or self.config.skills.top]
        return [(vocabulary[i], round(float(sims[i]), 4)) for i in order if sims[i] >= floor]

    async def annotate(self, question: str, experts: Sequence[ExpertConfig],
                       profiles: ProfileSet) -> list[tuple[str, float]]:
        """Symbolic-MoE's way: sample the annotator's keywords, keep the repeated ones, map each to
        its nearest profile skill."""
        sc = self.config.skills
        annotator = next((e for e in experts if e.name == sc.annotator), None)
        if annotator is None or self.complete is None:
            raise BackendUnavailable(f"router.skills.annotator: expert {sc.annotator!r} is not available",
                                     retry_after=5)
        messages = [{"role": "user", "content": ANNOTATOR_PROMPT.format(q=question[:2000])}]
        params = {"temperature": 0.7, "max_tokens": 32}
        answers = await asyncio.gather(*(self.complete(annotator, messages, params) for _ in range(sc.samples)))
        counts: Counter[str] = Counter()
        for text in answers:
            counts.update({k.strip(" .-*\"'").lower() for k in KEYWORD_SPLIT.split(text) if k.strip(" .-*\"'")})
        kept = [k for k, n in counts.most_common() if n >= sc.min_count][: sc.top]
        if not kept:
            return []
        vectors = self.embedder.encode(kept)
        found: dict[str, float] = {}
        for v in vectors:
            for skill, sim in self.nearest_skills(v, profiles, top=1, min_similarity=-1.0):
                found[skill] = max(sim, found.get(skill, -1.0))
        return sorted(found.items(), key=lambda kv: -kv[1])

    # -- recruiting ---------------------------------------------------------------------

    def fit_scores(self, skills: Sequence[str], profiles: ProfileSet,
                   names: Sequence[str]) -> dict[str, float]:
        """w_m = S_m(q) × γ_m for each named expert."""
        gamma = self._view(profiles)[2]
        return {n: profiles.suitability(n, skills) * gamma.get(n, 0.0) for n in names}

    def strengths(self, profiles: ProfileSet, names: Sequence[str]) -> dict[str, float]:
        """γ_m for each named expert."""
        gamma = self._view(profiles)[2]
        return {n: gamma.get(n, 0.0) for n in names}

    def _view(self, profiles: ProfileSet) -> tuple[list[str], Matrix, dict[str, float]]:
        """Vocabulary, its embeddings and γ: cached for the current profiles, computed for any other."""
        if self._cache is not None and profiles is self._cache[1] and self._derived is not None:
            return self._derived
        vocabulary = profiles.vocabulary()
        return vocabulary, self._skill_matrix(vocabulary), profiles.global_strength()

    def select(self, ranked: Sequence[tuple[str, float]], k: int) -> list[str]:
        """Top-k (deterministic, the default), or k drawn without replacement in proportion to score."""
        if self.config.selection == "top-k" or k >= len(ranked):
            return [n for n, _ in ranked[:k]]
        pool = list(ranked)
        chosen: list[str] = []
        with self._lock:
            while pool and len(chosen) < k:
                weights = [max(s, 0.0) + 1e-9 for _, s in pool]
                i = self._rng.choices(range(len(pool)), weights=weights)[0]
                chosen.append(pool.pop(i)[0])
        return chosen

    def aggregator(self, profiles: ProfileSet, experts: Sequence[ExpertConfig], recruited: Sequence[str]) -> str | None:
        names = {e.name for e in experts}
        if self.config.aggregator in names:
            return self.config.aggregator
        scored = [(p.aggregation_score, n) for n, p in profiles.experts.items()
                  if n in names and p.aggregation_score is not None]
        if scored:
            return max(scored)[1]
        return recruited[0] if recruited else None


def positive_shares(scores: dict[str, float]) -> dict[str, float]:
    """Scores clipped at 0 and divided by their sum (all 0 when nobody fits)."""
    total = sum(max(v, 0.0) for v in scores.values())
    return {n: (max(v, 0.0) / total if total > 0 else 0.0) for n, v in scores.items()}

