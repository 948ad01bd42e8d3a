"""The routing explorer's live data: recent routed decisions and each replica's load, kept in the state store.

The page (``/ui``) must show every replica, so nothing it reads lives only in one
process. Each replica keeps its own bounded ring of decision slots in the store
(``<replica>.<n mod decisions>``) and one load document; both are written by a
background loop every ``explorer.publish_interval_s``, never on the request's own
path (a request pays one ``deque.append``). A replica that stops leaves at most one
ring behind; readers drop entries older than ``explorer.retention_s`` and delete them.

Why slots and not a list: the ``StateStore`` protocol has documents, not lists, so a
ring of fixed keys is what bounds the space with memory and Redis alike, without a
read before each write.

Query text is kept only when ``explorer.keep_queries`` is on (truncated), like
prompts in traces.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from coe.config import ExplorerConfig
from coe.errors import CoeError
from coe.store.base import StateStore

log = logging.getLogger("coe.explorer")

DECISIONS = "explorer.decisions"
REPLICAS = "explorer.replicas"

Snapshot = Callable[[], Mapping[str, Any]]
"""This replica's load as plain JSON (experts, backends, adapters), taken at each publish."""


def last_user_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """The text of the last user message (the part of a conversation a router mostly decides on)."""
    for m in reversed(messages):
        if m.get("role") == "user":
            content = m.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
    return ""


def decision_entry(field: Mapping[str, Any], *, query: str | None, latency_ms: float, stream: bool) -> dict[str, Any]:
    """One routed request as the page lists it, from its ``coe`` response field."""
    decision = field.get("decision") or {}
    trace = {s.get("step"): s for s in field.get("trace", []) if isinstance(s, Mapping)}
    aggregate = trace.get("aggregate", {})
    return {
        "ts": time.time(),
        "request_id": field.get("request_id"),
        "query": query,
        "category": decision.get("category"),
        "confidence": decision.get("confidence"),
        "fallback": decision.get("fallback", False),
        "skills": list(decision.get("skills", []))[:8],
        "experts": [{"name": e.get("name"), "score": e.get("score")} for e in decision.get("experts", [])],
        "k": decision.get("recruit") or len(decision.get("experts", [])),
        "strategy": aggregate.get("strategy", "single"),
        "consensus": bool(aggregate.get("consensus")) and not field.get("aggregator_called", False),
        "aggregator_called": bool(field.get("aggregator_called", False)),
        "rounds": field.get("rounds", 0),
        "answered_by": field.get("answered_by"),
        "calls": [{"name": c.get("name"), "outcome": c.get("outcome")} for c in field.get("experts", [])],
        "cost": field.get("cost"),
        "latency_ms": round(latency_ms, 1),
        "stream": stream,
    }


class Explorer:
    """Records this replica's decisions and publishes its load; reads everyone's for the page.

    ``snapshot``: returns this replica's load (injected by the ``Runtime``, which owns the parts
    it reads); ``replica``: this process's id in the store (random per process by default)."""

    def __init__(self, store: StateStore, config: ExplorerConfig, snapshot: Snapshot, *,
                 replica: str | None = None) -> None:
        self.store = store
        self.config = config
        self.snapshot = snapshot
        self.replica = replica or secrets.token_hex(4)
        self.started = time.time()
        self._pending: deque[dict[str, Any]] = deque(maxlen=config.decisions)
        self._seq = 0
        self._task: asyncio.Task[None] | None = None

    # -- the request path: cheap, never fails the request ----------------------------------

    def record(self, field: Mapping[str, Any], messages: Sequence[Mapping[str, Any]], *, started: float,
               stream: bool = False) -> None:
        """Keep one routed request's decision (``started``: its ``time.perf_counter()`` at arrival)."""
        if not self.config.enabled:
            return
        try:
            query = last_user_text(messages)[: self.config.query_chars] if self.config.keep_queries else None
            entry = decision_entry(field, query=query, latency_ms=(time.perf_counter() - started) * 1000,
                                   stream=stream)
        except Exception:  # a malformed field must not cost the request its answer
            log.exception("explorer: could not record a decision")
            return
        entry["replica"] = self.replica
        self._pending.append(entry)

    # -- the background publisher ----------------------------------------------------------

    def start(self) -> None:
        if self.config.enabled and self._task is None:
            self._task = asyncio.create_task(self._loop(), name="coe-explorer")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):  # last decisions out; a store that is down loses only these
            await self.publish()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.publish_interval_s)
            try:
                await self.publish()
            except (CoeError, OSError) as exc:  # the store is down: the page is stale, serving goes on
                log.warning("explorer: could not publish to the state store: %s", exc)

    async def publish(self) -> None:
        """Write the decisions recorded since the last publish into this replica's ring, then its load."""
        while self._pending:
            entry, slot = self._pending.popleft(), self._seq % self.config.decisions
            self._seq += 1  # taken before the await: a concurrent publish (a page's read) gets the next slot
            await self.store.put(DECISIONS, f"{self.replica}.{slot}", entry)
        load = {"replica": self.replica, "ts": time.time(), "started": self.started, **self.snapshot()}
        await self.store.put(REPLICAS, self.replica, load)

    # -- reading, for the page ------------------------------------------------------------

    async def _fresh(self, namespace: str) -> list[dict[str, Any]]:
        """Every entry of ``namespace`` not older than ``retention_s``; the stale ones are deleted."""
        cutoff = time.time() - self.config.retention_s
        fresh = []
        for key, doc in (await self.store.items(namespace)).items():
            if float(doc.get("ts", 0)) >= cutoff:
                fresh.append(doc)
            else:
                await self.store.delete(namespace, key)
        return fresh

    async def recent(self, limit: int = 50) -> list[dict[str, Any]]:
        """The newest decisions across every replica, newest first."""
        return sorted(await self._fresh(DECISIONS), key=lambda d: -float(d.get("ts", 0)))[:limit]

    async def replicas(self, *, live_s: float | None = None) -> list[dict[str, Any]]:
        """Every replica that published within ``live_s`` (default: 5 publish intervals), by id."""
        window = live_s if live_s is not None else max(5 * self.config.publish_interval_s, 5.0)
        cutoff = time.time() - window
        return sorted((r for r in await self._fresh(REPLICAS) if float(r.get("ts", 0)) >= cutoff),
                      key=lambda r: str(r.get("replica")))


def _samples(metric: Any) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, dict(s.labels), float(s.value)) for family in metric.collect() for s in family.samples]


def load_snapshot(metrics: Any, backends: Mapping[str, Any], lanes: Mapping[str, Any],
                  experts: Sequence[str]) -> dict[str, Any]:
    """One replica's load, from what it already counts (its Prometheus metrics) and its backends:
    per expert: calls by outcome, errors, mean call latency, queue depth; per backend: state and the
    adapters this replica has loaded there."""
    per: dict[str, dict[str, Any]] = {name: {"calls": 0, "errors": 0, "queue": 0, "latency_sum_s": 0.0,
                                             "latency_count": 0} for name in experts}
    for name, labels, value in _samples(metrics.expert_calls):
        if name.endswith("_total") and labels.get("expert") in per:
            row = per[labels["expert"]]
            row["calls"] += int(value)
            if labels.get("outcome") != "ok":
                row["errors"] += int(value)
    for _name, labels, value in _samples(metrics.queue_depth):
        if labels.get("expert") in per:
            per[labels["expert"]]["queue"] = int(value)
    for name, labels, value in _samples(metrics.expert_latency):
        if labels.get("expert") in per:
            if name.endswith("_sum"):
                per[labels["expert"]]["latency_sum_s"] = value
            elif name.endswith("_count"):
                per[labels["expert"]]["latency_count"] = int(value)
    return {
        "experts": per,
        "backends": {name: {**b.describe(), "adapters": sorted(lanes[name].residency.loaded())
                            if name in lanes else []} for name, b in backends.items()},
    }
