"""Level 1: which category a conversation is about (Composition of Experts).

The fitted ``routers.classifier`` gives calibrated P(category | text). A router
classifies the conversation, not only its last message: the last user message
and the few before it (newest first) are embedded together, and their
log-probabilities are averaged, so "and in Python?" stays with the coding
expert while a confident new question ("what is the capital of Peru?") moves
on. ``Sessions`` remembers which experts served a session (the request's
``user`` field or the ``x-coe-session`` header) and keeps them until a new
category is confident enough (``router.topic_change``).

With ``router.lexical_gate: true`` (off by default), a conversation whose every
text the fitted word model alone is sure of (``CategoryClassifier.lexical_gate``)
is classified without embedding: the embedding is most of a decision's cost, and
above the gate's threshold the full ensemble agreed with the words on 99.5% of
held-out rows. Off by default because that agreement holds on text like the
training data only: on pasted code, before the MMLU example had code in its data,
the words were sure and wrong (``bench/README.md``). Such a result has no vector, so level 2 matches no
skills for it; a router whose level 2 weighs measured profiles asks for vectors,
and then every conversation is embedded.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from coe.config import RegistryConfig
from coe.embed import Embedder
from routers.fit import ensure_classifier

if TYPE_CHECKING:
    from coe.embed import Matrix
    from routers.classifier import CategoryClassifier

CONTEXT_TURNS = 3
"""User turns (the last one included) that make up a conversation's context text."""
MAX_SESSIONS = 100_000


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: keep the text ones
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping) and p.get("type") == "text")
    return ""


def conversation_texts(messages: Sequence[Mapping[str, Any]]) -> tuple[str, str | None]:
    """(last user message, context) where context joins the last few user turns, newest first,
    or None for a one-turn conversation. Newest first, because the embedder truncates the end."""
    users = [t for t in (_content_text(m.get("content")) for m in messages if m.get("role") == "user") if t.strip()]
    if not users:  # no user text (a system prompt alone): classify whatever text there is
        users = [t for t in (_content_text(m.get("content")) for m in messages) if t.strip()] or [""]
    last = users[-1]
    recent = users[-CONTEXT_TURNS:]
    if len(recent) < 2:
        return last, None
    return last, "\n".join(reversed(recent))


@dataclass
class Level1Result:
    log_probs: Matrix  # (C,) calibrated log P(category | conversation)
    vector: Matrix | None  # (D,) the last message's embedding (level 2 reuses it); None: the words decided

    def top(self, classes: Sequence[str]) -> tuple[str, float]:
        i = int(self.log_probs.argmax())
        return classes[i], float(self.probs()[i])

    def probs(self) -> Matrix:
        import numpy as np

        p: Matrix = np.exp(self.log_probs)
        return p


class Level1:
    def __init__(self, cfg: RegistryConfig, embedder: Embedder) -> None:
        self.embedder = embedder
        self.classifier: CategoryClassifier = ensure_classifier(cfg, embedder)
        self.classes = self.classifier.classes
        self.gate = cfg.router.lexical_gate

    def classify(self, conversations: Sequence[Sequence[Mapping[str, Any]]], *,
                 need_vectors: bool = False) -> list[Level1Result]:
        """Every conversation's texts embedded in one batch, except those the lexical gate decides
        (unless ``need_vectors``)."""
        import numpy as np

        pairs = [conversation_texts(m) for m in conversations]
        texts: list[str] = []
        where: list[tuple[int, int | None]] = []
        for last, context in pairs:
            texts.append(last)
            i = len(texts) - 1
            if context is not None:
                texts.append(context)
            where.append((i, len(texts) - 1 if context is not None else None))
        gated = self.classifier.lexical_gate(texts) if self.gate and not need_vectors else None
        alone = [gated is not None and bool(gated[0][i]) and (j is None or bool(gated[0][j])) for i, j in where]
        embed = [r for (i, j), a in zip(where, alone, strict=True) if not a for r in (i, j) if r is not None]
        X = self.embedder.encode([texts[r] for r in embed])
        lp = self.classifier.log_probs(X, [texts[r] for r in embed])
        at = {r: n for n, r in enumerate(embed)}
        out = []
        for (i, j), a in zip(where, alone, strict=True):
            if a:
                assert gated is not None
                rows, vector = gated[1], None
                ri, rj = i, j
            else:
                rows, vector = lp, X[at[i]]
                ri, rj = at[i], None if j is None else at[j]
            row = rows[ri] if rj is None else _mean_log_probs(rows[ri], rows[rj])
            out.append(Level1Result(np.asarray(row), vector))
        return out


def _mean_log_probs(a: Matrix, b: Matrix) -> Matrix:
    """Geometric mean of two distributions, renormalised: a confident one outvotes a flat one."""
    import numpy as np

    m = (a + b) / 2
    out: Matrix = m - np.logaddexp.reduce(m)
    return out


@dataclass
class SessionEntry:
    category: str | None
    experts: list[str]
    expires: float


log = logging.getLogger("coe.routers")

SESSIONS_NAMESPACE = "sessions"


class SharedSessions(Protocol):
    """Where replicas share sessions: a ``coe.store.StateStore`` (routers do not import the store)."""

    async def put_expiring(self, namespace: str, key: str, doc: dict[str, Any], ttl_s: float) -> None: ...

    async def get_expiring(self, namespace: str, key: str) -> dict[str, Any] | None: ...


class Sessions:
    """Which experts each session was given: an LRU with a time-to-live, safe across threads.

    With ``shared`` (the state store, set by the runtime through ``share``), ``aget``/``aput`` keep a
    session in the store with the same time-to-live, so any replica routing the conversation's next turn
    keeps its experts: no sticky balancing needed. The session key is hashed (a ``user`` field is any
    string). A store that fails is logged and the in-process copy answers, so routing never fails on it.
    """

    def __init__(self, ttl_s: float, max_entries: int = MAX_SESSIONS) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: OrderedDict[str, SessionEntry] = OrderedDict()
        self._lock = threading.Lock()
        self.shared: SharedSessions | None = None

    def share(self, shared: SharedSessions | None) -> None:
        self.shared = shared

    @staticmethod
    def _store_key(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()

    async def aget(self, key: str) -> SessionEntry | None:
        if self.shared is None:
            return self.get(key)
        try:
            doc = await self.shared.get_expiring(SESSIONS_NAMESPACE, self._store_key(key))
        except Exception as exc:  # the store's errors, or a store without expiring documents
            log.warning("sessions: the shared store did not answer (%s); using this replica's copy", exc)
            return self.get(key)
        if doc is None:
            return None
        category = doc.get("category")
        return SessionEntry(category if isinstance(category, str) else None,
                            [str(e) for e in doc.get("experts") or []], time.monotonic() + self.ttl_s)

    async def aput(self, key: str, category: str | None, experts: list[str]) -> None:
        self.put(key, category, experts)
        if self.shared is None:
            return
        try:
            await self.shared.put_expiring(SESSIONS_NAMESPACE, self._store_key(key),
                                           {"category": category, "experts": experts}, self.ttl_s)
        except Exception as exc:
            log.warning("sessions: could not share session state (%s); kept in this replica only", exc)

    def get(self, key: str) -> SessionEntry | None:
        now = time.monotonic()
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.expires < now:
                self._entries.pop(key, None)
                return None
            return entry

    def put(self, key: str, category: str | None, experts: list[str]) -> None:
        with self._lock:
            self._entries[key] = SessionEntry(category, experts, time.monotonic() + self.ttl_s)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
