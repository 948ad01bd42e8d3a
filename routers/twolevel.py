"""The two-level router: level 1 (category) narrows, level 2 (skills) ranks and recruits.

For each request:

1. Level 1 gives calibrated P(category | conversation). Each expert's level-1
   score ``P1(m)`` is the probability of the best category it serves.
2. When level 1 is confident (``confidence >= router.threshold``) the candidates
   are the top category's experts; otherwise every specialist is a candidate.
3. Level 2 scores candidates by ``w_m = S_m(q) × γ_m``; an expert's score is
   ``(1 − β)·P1(m) + β·share(w_m)`` with ``β = router.level2_weight`` once some
   expert has a measured profile (``coe profile``), and ``β = 0`` while every
   profile is synthetic: those restate the declarations level 1 was fitted on.
4. k adapts to difficulty, from ``k_min`` (confident level 1, strong skill match)
   to ``k_max`` (level 1 at or below its threshold, no skill match).
5. When level 1 is unsure, the generalist joins the recruited specialists
   (``fallback: true``), ranked by its own score like them: first where level 1's
   best guess is the generalist's category, after the likelier specialists
   otherwise. The list is always best first. A session keeps its experts until a
   new category reaches ``router.topic_change``.

Where level 1's lexical gate decides a conversation from its words alone (no
embedding, ``routers.level1``), level 2 has no vector to match skills with, so k
follows level 1's confidence only. While profiles are measured (β > 0), level 2
can change the decision, so every conversation is embedded.

``embedding`` (level 1 only, β = 0) and ``symbolic`` (level 2 only, every expert
a candidate) are the same router with one level switched off.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from coe.config import ExpertConfig, RegistryConfig
from coe.embed import shared_embedder
from coe.errors import BackendUnavailable
from routers.base import Completer, ExpertChoice, Router, RouteRequest, RoutingDecision
from routers.level1 import Level1, Level1Result, Sessions, conversation_texts
from routers.recruiter import Recruiter, positive_shares

log = logging.getLogger("coe.routers")

CANDIDATES = 5


class TwoLevelRouter(Router):
    name = "two-level"
    use_level1 = True
    use_level2 = True

    def __init__(self, config: RegistryConfig, complete: Completer | None = None) -> None:
        self.config = config.router
        embedder = shared_embedder(self.config.embedder)
        self.level1 = Level1(config, embedder) if self.use_level1 else None
        self.recruiter = Recruiter(self.config, embedder, complete)
        self.sessions = Sessions(self.config.session_ttl_s)
        self.embedder = embedder
        if self.level1 is not None:
            known = set(self.level1.classes)
            for e in config.experts:
                unknown = [c for c in e.categories if c not in known]
                if unknown:
                    log.warning("expert %s lists categories the classifier does not know: %s (known: %s)",
                                e.name, ", ".join(unknown), ", ".join(sorted(known)))

    async def route(self, request: RouteRequest, experts: Sequence[ExpertConfig]) -> RoutingDecision:
        return (await self.route_many([request], experts))[0]

    async def route_many(self, requests: Sequence[RouteRequest],
                         experts: Sequence[ExpertConfig]) -> list[RoutingDecision]:
        if not experts:
            raise BackendUnavailable("no experts are registered", retry_after=30)
        # Embedding is CPU work of a few ms: off the event loop, so other requests keep flowing.
        need_vectors = self.use_level2 and self.recruiter.profiles(experts).measured
        results = await asyncio.to_thread(self._level1, requests, need_vectors)
        decisions = []
        for request, result in zip(requests, results, strict=True):
            skills_override = None
            if self.config.skills.mode == "annotator":
                skills_override = await self._annotate(request, experts)
            decisions.append(await self._decide(request, result, experts, skills_override))
        return decisions

    # -- steps --------------------------------------------------------------------------

    def _level1(self, requests: Sequence[RouteRequest], need_vectors: bool) -> list[Level1Result | None]:
        if self.level1 is not None:
            return list(self.level1.classify([r.messages for r in requests], need_vectors=need_vectors))
        import numpy as np

        vectors = self.embedder.encode([conversation_texts(r.messages)[0] for r in requests])
        return [Level1Result(np.zeros(0, dtype=np.float32), v) for v in vectors]

    async def _annotate(self, request: RouteRequest, experts: Sequence[ExpertConfig]) -> list[tuple[str, float]] | None:
        profiles = self.recruiter.profiles(experts)
        try:
            return await self.recruiter.annotate(conversation_texts(request.messages)[0], experts, profiles)
        except Exception as exc:  # the annotator is an LLM call: never let it lose the request
            log.warning("annotator failed, using embedding skills instead: %s", exc)
            return None

    async def _decide(self, request: RouteRequest, result: Level1Result | None, experts: Sequence[ExpertConfig],
                      skills_override: list[tuple[str, float]] | None) -> RoutingDecision:
        rc = self.config
        generalist = rc.generalist if any(e.name == rc.generalist for e in experts) else None
        specialists = [e for e in experts if e.name != generalist]
        category, confidence, p1 = None, None, {}
        top_categories: list[ExpertChoice] = []
        if self.level1 is not None and result is not None:
            probs = result.probs()
            index = {c: i for i, c in enumerate(self.level1.classes)}
            category, confidence = result.top(self.level1.classes)
            top_categories = [ExpertChoice(name=self.level1.classes[int(i)], score=round(float(probs[int(i)]), 4))
                              for i in probs.argsort()[::-1][:CANDIDATES]]
            p1 = {e.name: max((float(probs[index[c]]) for c in e.categories if c in index), default=0.0)
                  for e in experts}
        confident = confidence is None or confidence >= rc.threshold
        # Level 1 narrows: the top category's experts, or every specialist when unsure.
        if self.level1 is not None and confident:
            pool = [e for e in experts if category in e.categories] or specialists or list(experts)
        else:
            pool = specialists or list(experts)
        # Level 2 ranks (unless the request turned it off, to compare).
        use_level2 = self.use_level2 and request.level2
        profiles = self.recruiter.profiles(experts)
        matched: list[tuple[str, float]] = []
        words_alone = result is not None and result.vector is None
        if use_level2 and result is not None:  # the annotator's skills, else the embedding's nearest ones
            if skills_override is not None:
                matched = skills_override
            elif result.vector is not None:
                matched = self.recruiter.nearest_skills(result.vector, profiles)
        skills = [s for s, _ in matched]
        # Synthetic profiles restate the declared skills and categories, which level 1 was already
        # fitted on; mixing them in again moved more MMLU first choices for the worse than for the
        # better (bench/README.md, issue 16). So beside level 1, level 2 counts only on evidence.
        measured = profiles.measured
        beta = 0.0 if not use_level2 else (1.0 if self.level1 is None else (rc.level2_weight if measured else 0.0))
        names = [e.name for e in experts]
        # No skill matched: S_m(q) is 0 for everyone, so global strength alone ranks (not file order).
        w = positive_shares(self.recruiter.fit_scores(skills, profiles, names) if skills
                            else self.recruiter.strengths(profiles, names))
        score = {n: (1 - beta) * p1.get(n, 0.0) + beta * w[n] for n in names}
        order = {n: i for i, n in enumerate(names)}  # ties keep the registry's order

        def ranked(group: Sequence[ExpertConfig]) -> list[tuple[str, float]]:
            return sorted(((e.name, score[e.name]) for e in group), key=lambda t: (-t[1], order[t[0]]))

        k = self._k(confidence, matched, use_level2 and (not words_alone or skills_override is not None))
        in_pool = ranked(pool)
        recruited = self.recruiter.select(in_pool, k)
        if len(recruited) < k:  # the category has fewer experts than k: next best specialists
            recruited += [n for n, _ in ranked(specialists) if n not in recruited][: k - len(recruited)]
        fallback = not confident and generalist is not None
        if fallback and generalist not in recruited:
            recruited.append(str(generalist))
        # Who is recruited is decided (the category's experts first, top-k or sampled); the list is best first by
        # score, the generalist included: it leads where level 1's best guess is its category (first on 14% of
        # BIG-bench's generalist questions, against 6% when it was appended last; bench/README.md, issue 16).
        recruited.sort(key=lambda n: (-score[n], order[n]))
        reason = self._reason(category, confidence, confident, skills, k, beta, use_level2, measured)
        if words_alone:
            reason = f"{reason}; decided from the words alone (lexical gate)"
        recruited, category, reason = await self._session(request, recruited, category, confidence, reason,
                                                          names)
        candidates = ranked(experts)[:CANDIDATES]
        return RoutingDecision(
            router=self.name,
            experts=[ExpertChoice(name=n, score=round(score.get(n, 0.0), 4)) for n in recruited],
            category=category, confidence=None if confidence is None else round(confidence, 4),
            skills=skills, candidates=[ExpertChoice(name=n, score=round(s, 4)) for n, s in candidates],
            fallback=fallback, reason=reason, lexical_gate=words_alone,
            aggregator=self.recruiter.aggregator(profiles, experts, recruited),
            level1=[ExpertChoice(name=n, score=round(p1.get(n, 0.0), 4)) for n, _ in
                    sorted(p1.items(), key=lambda t: (-t[1], order[t[0]]))[:CANDIDATES]] if p1 else [],
            categories=top_categories,
            skill_matches=[ExpertChoice(name=s, score=round(float(v), 4)) for s, v in matched])

    def describe(self, experts: Sequence[ExpertConfig]) -> dict[str, Any]:
        """The classifier's last fit (held-out scores, confusion matrix) and every expert's skill profile."""
        profiles = self.recruiter.profiles(experts)
        fit = self.level1.classifier.meta.get("fit") if self.level1 is not None else None
        return {
            "router": self.name,
            "categories": list(self.level1.classes) if self.level1 is not None else [],
            "fit": fit,
            "profiles": {name: {"skills": dict(p.skills), "answered": p.answered, "accuracy": p.accuracy,
                                "synthetic": p.synthetic} for name, p in profiles.experts.items()},
            "profile_source": profiles.source,
        }

    def _k(self, confidence: float | None, matched: Sequence[tuple[str, float]], use_level2: bool) -> int:
        """k_min when level 1 is sure; towards k_max as its confidence falls to the threshold, more so
        when no skill matches strongly. Level 2 alone: by the skill match only."""
        rc = self.config
        if rc.k_max == rc.k_min:
            return rc.k_min
        weak1 = 0.0 if confidence is None else min(1.0, max(0.0, (1 - confidence) / max(1 - rc.threshold, 1e-9)))
        sc = rc.skills
        best = max((s for _, s in matched), default=sc.min_similarity)
        strength = (best - sc.min_similarity) / max(sc.strong_similarity - sc.min_similarity, 1e-9)
        weak2 = 1 - min(1.0, max(0.0, strength)) if use_level2 else weak1
        difficulty = weak1 * (0.5 + 0.5 * weak2) if self.level1 is not None else weak2
        return rc.k_min + round((rc.k_max - rc.k_min) * difficulty)

    def _reason(self, category: str | None, confidence: float | None, confident: bool, skills: list[str],
                k: int, beta: float, use_level2: bool, measured: bool) -> str:
        parts = []
        if category is not None and confidence is not None:
            parts.append(f"category {category!r} at {confidence:.3f} "
                         f"({'confident' if confident else f'below {self.config.threshold:g}: generalist joins'})")
        if skills:
            parts.append(f"skills {', '.join(skills)}")
        parts.append(f"k={k}")
        if use_level2 and self.level1 is not None:
            parts.append(f"level-2 weight {beta:.2f}" + ("" if measured else " (no measured profiles)"))
        elif self.use_level2:
            parts.append("level 2 off for this request")
        return "; ".join(parts)

    async def _session(self, request: RouteRequest, recruited: list[str], category: str | None,
                       confidence: float | None, reason: str, names: list[str]
                       ) -> tuple[list[str], str | None, str]:
        """Keep a session on its experts unless the topic clearly changed (shared by replicas when the
        runtime gave ``sessions`` the store)."""
        if not request.session:
            return recruited, category, reason
        previous = await self.sessions.aget(request.session)
        if previous is not None and previous.category != category:
            strong = confidence is not None and confidence >= self.config.topic_change
            kept = [n for n in previous.experts if n in names]
            if not strong and kept:
                await self.sessions.aput(request.session, previous.category, kept)
                return kept, previous.category, (f"session kept its experts (new category {category!r} at "
                                                 f"{confidence or 0:.3f} < topic_change "
                                                 f"{self.config.topic_change:g}); {reason}")
        await self.sessions.aput(request.session, category, recruited)
        return recruited, category, reason


class EmbeddingRouter(TwoLevelRouter):
    """Level 1 only: the category's experts, by classifier probability."""

    name = "embedding"
    use_level2 = False


class SymbolicRouter(TwoLevelRouter):
    """Level 2 only: every expert ranked by skills × profiles (no classifier to fit)."""

    name = "symbolic"
    use_level1 = False
