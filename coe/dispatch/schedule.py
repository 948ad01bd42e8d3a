"""Admission to one backend: at most ``max_concurrency`` calls in flight, the rest wait in per-model queues.

Why: vLLM batches whatever it receives, but runs at most ``--max-loras``
adapters in one batch and keeps only ``--max-cpu-loras`` loaded, so a busy
server fed in arrival order swaps adapters again and again. What coe controls
is the *order* in which waiting calls go out. A call whose model has nobody
waiting and that finds a free slot goes at once; only when the backend is full
does anything wait, and when a slot frees the next call is chosen so:

1. a call for a model that is running on the server now (its adapter is in the
   batch), unless that model's run has lasted ``max_wait_s`` while a call for
   another model has waited ``max_wait_s``: then the run takes no new calls
   and drains (bounded waiting: no expert starves, and under a backlog the
   server switches adapters about once per ``max_wait_s`` instead of on every call);
2. else a call that has waited ``max_wait_s``, oldest first;
3. else, while fewer than ``max_loras`` adapters are running, a call whose
   adapter was used most recently (``resident``: likely still in the server's
   memory), then the oldest call; a model that is not an adapter never waits for
   an adapter slot;
4. else the oldest call: a slot never sits idle while calls wait. vLLM keeps a
   call whose adapter finds no free adapter slot in its own queue, which costs
   nothing; an idle slot costs throughput (``bench/adapters.py`` measured a
   version that held slots free for grouping: it drained the server at every
   switch and was slower than sending in arrival order).

Without a known ``max_loras`` (or with ``dispatch.group_adapters: false``) the
order is plain first-come first-served.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from coe.metrics import Metrics


@dataclass(eq=False)
class _Waiter:
    key: str
    expert: str
    adapter: bool
    since: float
    future: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class BackendSchedule:
    def __init__(self, *, capacity: int, max_loras: int | None, max_wait_s: float, group: bool, metrics: Metrics,
                 resident: Callable[[str], bool] = lambda key: False) -> None:
        self.capacity = capacity
        self.max_loras = max_loras if group else None
        self.max_wait_s = max_wait_s
        self.metrics = metrics
        self.resident = resident
        self.in_flight = 0
        self.running: dict[str, int] = {}
        self._adapters: set[str] = set()
        self._waiting: dict[str, deque[_Waiter]] = {}
        self._run_since: dict[str, float] = {}

    def waiting(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    def running_adapters(self) -> int:
        return sum(1 for k, n in self.running.items() if n > 0 and k in self._adapters)

    async def acquire(self, key: str, *, expert: str, adapter: bool) -> None:
        """Wait for a slot for a call to ``key`` (the model name sent upstream)."""
        if adapter:
            self._adapters.add(key)
        if self.in_flight < self.capacity and not self._waiting.get(key):
            self._take(key)
            self.metrics.queue_wait.labels(expert).observe(0.0)
            return
        waiter = _Waiter(key, expert, adapter, time.monotonic())
        self._waiting.setdefault(key, deque()).append(waiter)
        self.metrics.queue_depth.labels(expert).inc()
        try:
            self._pump()
            await waiter.future
        except BaseException:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release(key)  # admitted just as the caller went away: give the slot back
            else:
                waiter.future.cancel()
                self._drop(waiter)
            raise

    def release(self, key: str) -> None:
        self.in_flight -= 1
        left = self.running.get(key, 1) - 1
        if left > 0:
            self.running[key] = left
        else:
            self.running.pop(key, None)
            self._run_since.pop(key, None)
        self._pump()

    def _take(self, key: str) -> None:
        self.in_flight += 1
        self.running[key] = self.running.get(key, 0) + 1
        self._run_since.setdefault(key, time.monotonic())

    def _drop(self, waiter: _Waiter) -> None:
        queue = self._waiting.get(waiter.key)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            self.metrics.queue_depth.labels(waiter.expert).dec()
            if not queue:
                del self._waiting[waiter.key]

    def _pump(self) -> None:
        while self.in_flight < self.capacity:
            waiter = self._pick()
            if waiter is None:
                return
            queue = self._waiting[waiter.key]
            queue.popleft()
            if not queue:
                del self._waiting[waiter.key]
            self.metrics.queue_depth.labels(waiter.expert).dec()
            if waiter.future.done():
                continue  # cancelled, its task not yet resumed to remove it
            self.metrics.queue_wait.labels(waiter.expert).observe(time.monotonic() - waiter.since)
            self._take(waiter.key)
            waiter.future.set_result(None)

    def _pick(self) -> _Waiter | None:
        heads = [q[0] for q in self._waiting.values() if q]
        if not heads:
            return None
        if self.max_loras is None:
            return min(heads, key=lambda w: w.since)
        now = time.monotonic()
        idle = [w for w in heads if self.running.get(w.key, 0) == 0]
        overdue = any(now - w.since >= self.max_wait_s for w in idle)
        going = [w for w in heads if self.running.get(w.key, 0) > 0
                 and not (overdue and now - self._run_since[w.key] >= self.max_wait_s)]
        if going:
            return min(going, key=lambda w: w.since)
        late = [w for w in idle if now - w.since >= self.max_wait_s]
        if late:
            return min(late, key=lambda w: w.since)
        candidates = [w for w in idle if not w.adapter]
        if self.running_adapters() < self.max_loras:
            new = [w for w in idle if w.adapter]
            candidates += [w for w in new if self.resident(w.key)] or new
        # work-conserving: a slot never sits free while calls wait (vLLM holds a call whose adapter
        # finds no free adapter slot in its own queue, which costs nothing; an idle slot costs throughput)
        return min(candidates or heads, key=lambda w: w.since)
