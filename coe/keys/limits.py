"""Per-key limits counted in the state store (one atomic ``add_counters`` step per check), so every
replica on one Redis shares one count; nothing is counted in a process's memory.

- **Requests per minute: a sliding window** (a log of admission times, the last 60 s count). Exactly
  ``rpm`` requests are admitted in any 60 s span, however they are spread over replicas and minute
  boundaries (a fixed window would let 2 x rpm through around a boundary). ``Retry-After``: until the
  oldest admission leaves the window.
- **Tokens per minute: a fixed 60 s window** that starts at the first request after the previous one
  ended. Before the call the request *reserves* an estimate (``estimate_tokens``: the messages' UTF-8
  bytes, plus 8 per message for the chat template, plus ``max_tokens`` or ``default_completion``); after
  it the counter is corrected to the real usage. Admission needs ``used + reserved + estimate <= tpm``.
- **Budget: spend in the experts' cost unit**, per period (total, UTC day, UTC month), reserved the
  same way (the estimate at the expert's prices) and corrected to the real cost after the call.

**Leases** keep a busy key off the store's round trip (about 0.3 ms of a request's 1.2 on loopback Redis).
A key with ``rpm >= LEASE_MIN_RPM`` whose window was at least half free at its last store step takes, in
that step, a lease of extra slots (up to ``LEASE_SHARE`` of the limit; the size doubles while leases are
used up and halves while they are not). They are counted in the window at once, so other replicas see
them, and this replica admits from them with no store step for ``LEASE_S``; what is left then is taken
back (a negative add: the newest events go). So the count never passes ``rpm`` in the moment, and a key
near its limit is counted exactly, request by request. The one inexactness: an event admitted from a lease
is logged at the lease's time, up to ``LEASE_S`` before it happened, so it leaves the window up to that
much early; a replica holds one lease at a time, so over any 60 s the surplus is at most what leases
admitted in one ``LEASE_S``: ``R x LEASE_SHARE x rpm`` for ``R`` replicas, and only for a key that was
under half its limit 60 s before. Smaller limits (the usual per-user ones) never lease.

Overshoot bound: a request is admitted only when its reservation fits, so the count can pass the limit
only by what requests in flight use *beyond* their reservations: at most ``C x max(actual - reserved)``
for ``C`` concurrent requests. A direct request with ``max_tokens`` reserves at least what it can use
(byte-level tokenizers make at most one token per byte), so there the bound is 0; a routed request
(``model: "coe"``, several expert calls) reserves one call and can use one per expert it recruits.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from coe.errors import CoeError, RateLimited
from coe.keys.model import VirtualKey
from coe.store.base import Counted, Counter, StateStore

log = logging.getLogger("coe.keys")

USAGE_NS = "vkey-usage"
MINUTE_S = 60.0
DEFAULT_COMPLETION = 1024
"""Tokens reserved for the answer when a request gives no ``max_tokens``."""
LEASE_MIN_RPM = 600
"""Smaller request limits are counted exactly, each request in the store."""
LEASE_SHARE = 0.01
"""The largest lease, as a share of the key's ``rpm``."""
LEASE_S = 0.5
"""How long a replica admits from a lease before it gives the rest back."""
LEASE_FIRST = 4
"""A key's first lease; later ones double or halve from there."""


def estimate_tokens(messages: Iterable[Any], max_tokens: int | None, default_completion: int = DEFAULT_COMPLETION
                    ) -> tuple[int, int]:
    """(prompt, completion) tokens to reserve: an upper bound of the prompt for byte-level tokenizers."""
    prompt = 0
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else getattr(m, "content", None)
        prompt += 8 + len(str(content or "").encode())
    return prompt, max_tokens if max_tokens is not None else default_completion


def period_end(period: str, now: float) -> float | None:
    """When the budget period that holds ``now`` ends (UTC); None for a total budget."""
    t = time.gmtime(now)
    if period == "daily":
        return float(calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0)) + 86400)
    if period == "monthly":
        year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
        return float(calendar.timegm((year, month, 1, 0, 0, 0)))
    return None


def _spend_key(key: VirtualKey, now: float) -> str:
    t = time.gmtime(now)
    tag = {"daily": time.strftime("%Y%m%d", t), "monthly": time.strftime("%Y%m", t)}.get(key.budget_period, "all")
    return f"{key.id}:spend:{tag}"


@dataclass
class _Lease:
    """Request slots this process took in one store step and admits from without one."""

    left: int
    size: int
    until: float  # time.monotonic()
    limit: int
    count: int  # the window's count at the grant, for the headers
    headers: dict[str, str]


@dataclass
class Admission:
    """A request let through: what it reserved (handed back to ``settle``) and the ``x-ratelimit-*``
    headers for its response."""

    key: VirtualKey
    tokens: int = 0
    cost: float = 0.0
    at: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


class KeyLimiter:
    """Limits of virtual keys, and their lifetime usage.

    A key with a token limit or a budget is settled after each call (one store step: the next request's
    admission depends on it). The lifetime totals of a key without either (what ``usage`` reports) are
    kept here for a moment instead and ride along with the key's next admission, or are written within
    ``flush_s`` by themselves: so such a key costs one store step per request, the admission. A process
    that is killed loses at most its last ``flush_s`` of those totals; no limit depends on them.
    """

    def __init__(self, store: StateStore, *, flush_s: float = 1.0) -> None:
        self.store = store
        self.flush_s = flush_s
        self._pending: dict[str, dict[str, float]] = {}  # key id -> {requests, tokens, cost} not yet stored
        self._flusher: asyncio.Task[None] | None = None
        self._leases: dict[str, _Lease] = {}  # key id -> its lease (live, or spent and not yet given back)
        self._next_size: dict[str, int] = {}  # key id -> the next lease's size
        self._free: dict[str, float] = {}  # key id -> its window's free room at its last store step
        self._owed: list[Counter] = []  # lease remainders not yet given back (the store was down)
        self._owed_now: dict[str, int] = {}  # key id -> a lease remainder handed to its next step
        self._settling: set[asyncio.Task[None]] = set()  # settles running on their own (a strong reference)
        self.store_steps = 0
        """Admissions that went to the store (the rest came from a lease): what the benchmark reports."""

    def _take_pending(self, key_id: str) -> list[Counter]:
        return [Counter(f"{key_id}:{what}", n) for what, n in self._pending.pop(key_id, {}).items() if n]

    def _add_pending(self, key_id: str, what: str, n: float) -> None:
        pending = self._pending.setdefault(key_id, {})
        pending[what] = pending.get(what, 0.0) + n
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_later())

    def _put_back(self, counters: list[Counter]) -> None:
        for c in counters:
            key_id, _, what = c.key.rpartition(":")
            self._add_pending(key_id, what, c.add)

    def _returns_due(self, mono: float, *, everything: bool = False) -> list[Counter]:
        """Counters that give back what is left of leases that ran out (all of them on ``everything``)."""
        out = []
        for key_id, lease in list(self._leases.items()):
            if everything or mono >= lease.until:
                del self._leases[key_id]
                self._resize(key_id, lease, mono)
                if lease.left:
                    out.append(Counter(f"{key_id}:req", -lease.left, sliding_s=MINUTE_S))
        return out

    def _resize(self, key_id: str, lease: _Lease, mono: float) -> None:
        """Double the next lease when this one was used up in time, halve it when it was not."""
        used_up = lease.left == 0 and mono < lease.until
        cap = max(1, int(lease.limit * LEASE_SHARE))
        self._next_size[key_id] = min(cap, lease.size * 2) if used_up else max(1, lease.size // 2)

    async def flush(self, *, everything: bool = False) -> None:
        """Write the pending lifetime totals and give back what leases left (one store step for all keys)."""
        counters = [c for key_id in list(self._pending) for c in self._take_pending(key_id)]
        returns = self._returns_due(time.monotonic(), everything=everything)
        if counters or returns:
            try:
                await self.store.add_counters(USAGE_NS, counters + returns)
            except CoeError:
                self._put_back(counters)  # the store is down: kept for the next try
                self._owed.extend(returns)
                raise
        if self._owed:
            owed, self._owed = self._owed, []
            try:
                await self.store.add_counters(USAGE_NS, owed)
            except CoeError:
                self._owed = owed + self._owed
                raise

    async def close(self) -> None:
        """On shutdown: write what is pending and give every lease back (best effort: the store may be gone
        already)."""
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        if self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)
        with contextlib.suppress(CoeError):
            await self.flush(everything=True)

    async def _flush_later(self) -> None:
        await asyncio.sleep(self.flush_s)
        while True:
            with contextlib.suppress(CoeError):
                await self.flush()
            if not self._leases and not self._owed:
                return
            due = min((lease.until for lease in self._leases.values()), default=time.monotonic() + self.flush_s)
            await asyncio.sleep(max(0.0, due - time.monotonic()) + 0.01)

    def _counters(self, key: VirtualKey, tokens: int, cost: float, now: float, requests: int) -> list[Counter]:
        counters = [Counter(f"{key.id}:req", requests, key.rpm, sliding_s=MINUTE_S)] if key.rpm else []
        if key.tpm:
            counters.append(Counter(f"{key.id}:tok", tokens, key.tpm, ttl_s=MINUTE_S))
        if key.budget is not None:
            end = period_end(key.budget_period, now)
            counters.append(Counter(_spend_key(key, now), cost, key.budget,
                                    ttl_s=None if end is None else end - now + 3600))
        return counters

    def _from_lease(self, key: VirtualKey, counters: list[Counter], requests: int, mono: float
                    ) -> Admission | None:
        """One request admitted from this process's live lease, with no store step; None when there is none."""
        lease = self._leases.get(key.id)
        if (lease is None or requests != 1 or lease.left <= 0 or mono >= lease.until
                or any(c.add for c in counters[1:])):
            return None
        lease.left -= 1
        self._add_pending(key.id, "requests", 1)
        headers = dict(lease.headers)
        headers["x-ratelimit-remaining-requests"] = str(max(0, lease.limit - lease.count + lease.left))
        return Admission(key, 0, 0.0, time.time(), headers)

    def _lease_size(self, key: VirtualKey, requests: int, mono: float) -> int:
        """Slots to lease in this step: none for a small limit, a busy window, or a step that is not the
        auth check."""
        if requests != 1 or not key.rpm or key.rpm < LEASE_MIN_RPM or self._free.get(key.id, 0) < key.rpm / 2:
            return 0
        lease = self._leases.get(key.id)
        if lease is not None:  # spent (or out of time): given back in this same step
            del self._leases[key.id]
            self._resize(key.id, lease, mono)
            if lease.left:
                self._owed_now[key.id] = lease.left
        return self._next_size.get(key.id, LEASE_FIRST)

    async def admit(self, key: VirtualKey, *, tokens: int = 0, cost: float | None = None, requests: int = 1,
                    now: float | None = None) -> Admission:
        """Count ``requests`` (the auth check: 1) and reserve ``tokens`` and ``cost`` (the chat path, after
        the auth check: ``requests=0``) in one atomic step, or raise ``RateLimited`` (429). ``cost=None``:
        the budget is not checked (the auth check: a key whose budget is spent can still read its files
        and batches); a spent budget refuses even a request that reserves nothing. The auth check of a
        busy key with a large ``rpm`` is mostly admitted from a lease (the module says how)."""
        now = time.time() if now is None else now
        spend = cost is not None and key.budget is not None
        counters = self._counters(key, tokens if key.tpm else 0, max(cost or 0.0, 1e-12), now, requests)
        if not spend:
            counters = [c for c in counters if ":spend:" not in c.key]
        if not requests:
            counters = [c for c in counters if not c.key.endswith(":req")]
        if not counters:  # a key without limits: nothing to check, no store step
            self._add_pending(key.id, "requests", requests)
            return Admission(key, 0, 0.0, now, {})
        mono = time.monotonic()
        leased = self._from_lease(key, counters, requests, mono)
        if leased is not None:
            return leased
        grant = self._lease_size(key, requests, mono)
        back = self._owed_now.pop(key.id, 0)
        try:
            done, grant = await self._step(key, counters, requests, grant, back, now)
        except BaseException:
            if back:
                self._owed.append(Counter(f"{key.id}:req", -back, sliding_s=MINUTE_S))
            raise
        values = dict(zip((c.key for c in counters), done.values, strict=False))
        headers = self._headers(key, values, counters, done.retry_after_s)
        if key.rpm and requests:
            count = values[counters[0].key]
            self._free[key.id] = key.rpm - count
            if done.admitted and grant:
                self._leases[key.id] = _Lease(grant, grant, mono + LEASE_S, key.rpm, int(count), headers)
                headers = dict(headers)
                headers["x-ratelimit-remaining-requests"] = str(max(0, int(key.rpm - count + grant)))
        if not done.admitted:
            if back:
                self._owed.append(Counter(f"{key.id}:req", -back, sliding_s=MINUTE_S))
            over = [c for c in counters if c.limit is not None and c.add > 0 and values[c.key] + c.add > c.limit]
            what = over[0].key.split(":")[1] if over else "req"
            retry: float | None = done.retry_after_s
            if what == "spend":
                end = period_end(key.budget_period, now)
                retry = None if end is None else end - now
                raise RateLimited(f"key {key.name} has spent its {key.budget_period} budget of {key.budget}",
                                  retry_after=retry, limit_headers=headers, code="insufficient_quota")
            label = {"req": f"{key.rpm} requests", "tok": f"{key.tpm} tokens"}[what]
            raise RateLimited(f"key {key.name} is over its limit of {label} per minute", retry_after=retry,
                              limit_headers=headers)
        return Admission(key, tokens, max(cost or 0.0, 1e-12) if spend else 0.0, now, headers)

    async def _step(self, key: VirtualKey, counters: list[Counter], requests: int, grant: int, back: int,
                    now: float) -> tuple[Counted, int]:
        """The store step: the counters, with this process's lifetime totals riding along, the request
        counter also taking ``grant`` slots for a lease and giving back ``back`` from the last one. A
        step refused only for want of room for the lease is tried again without it."""
        riding = self._take_pending(key.id)
        while True:
            sent = list(counters)
            if grant or back:
                first = sent[0]
                sent[0] = Counter(first.key, first.add + grant - back, first.limit, first.ttl_s, first.sliding_s)
            try:
                done = await self.store.add_counters(USAGE_NS, sent + riding, now=now)
            except CoeError:
                self._put_back(riding)
                raise
            self.store_steps += 1
            if done.admitted or not grant:
                break
            grant = 0  # no room for the lease: the request alone
        if not done.admitted:
            self._put_back(riding)  # a refused step adds nothing
        elif requests:
            self._add_pending(key.id, "requests", requests)  # lifetime usage: rides with the next step
        return done, grant

    async def settle(self, admission: Admission, tokens: int, cost: float) -> None:
        """Replace the reservation by the real usage (never refused: the call has happened)."""
        key = admission.key
        if not key.tpm and key.budget is None:
            self._add_pending(key.id, "tokens", tokens)
            self._add_pending(key.id, "cost", cost)
            return
        counters = [Counter(f"{key.id}:tokens", tokens), Counter(f"{key.id}:cost", cost)]
        if key.tpm:
            counters.append(Counter(f"{key.id}:tok", tokens - admission.tokens, ttl_s=MINUTE_S))
        if key.budget is not None:
            end = period_end(key.budget_period, admission.at)
            counters.append(Counter(_spend_key(key, admission.at), cost - admission.cost,
                                    ttl_s=None if end is None else end - admission.at + 3600))
        await self.store.add_counters(USAGE_NS, counters)

    def settle_soon(self, admission: Admission, tokens: int, cost: float) -> None:
        """``settle`` as a task of its own, for a caller that cannot wait (a stream's end); a failure is
        logged (the reservation then stands: the count errs high)."""
        task = asyncio.get_running_loop().create_task(self.settle(admission, tokens, cost))
        self._settling.add(task)
        task.add_done_callback(self._settled)

    def _settled(self, task: asyncio.Task[None]) -> None:
        self._settling.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("could not settle a key's usage: %s", task.exception())

    async def usage(self, key: VirtualKey, now: float | None = None) -> dict[str, Any]:
        """Lifetime requests, tokens and cost, and where each limit stands now."""
        now = time.time() if now is None else now
        await self.flush()  # this process's part at least is up to date
        counters = [Counter(f"{key.id}:{n}", 0) for n in ("requests", "tokens", "cost")]
        limits = self._counters(key, 0, 0.0, now, 0)
        done = await self.store.add_counters(USAGE_NS, counters + limits, now=now)
        v = done.values
        out: dict[str, Any] = {"object": "key.usage", "id": key.id, "name": key.name, "requests": int(v[0]),
                               "tokens": int(v[1]), "cost": round(v[2], 10)}
        for c, value in zip(limits, v[3:], strict=True):
            part = c.key.split(":")[1]
            name = {"req": "requests_last_minute", "tok": "tokens_this_minute", "spend": "spend_this_period"}[part]
            out[name] = round(value, 10) if part == "spend" else int(value)
        return out

    @staticmethod
    def _headers(key: VirtualKey, values: dict[str, float], counters: list[Counter], retry: float | None
                 ) -> dict[str, str]:
        """OpenAI's names: ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``."""
        out: dict[str, str] = {}
        for c in counters:
            part = c.key.split(":")[1]
            if part not in ("req", "tok") or c.limit is None:
                continue
            kind = "requests" if part == "req" else "tokens"
            out[f"x-ratelimit-limit-{kind}"] = str(int(c.limit))
            out[f"x-ratelimit-remaining-{kind}"] = str(max(0, int(c.limit - values[c.key])))
            if retry is not None:
                out[f"x-ratelimit-reset-{kind}"] = f"{math.ceil(retry)}s"
        return out
