"""The reference ``StateStore``: a dict in this process, lost when coe stops.

It still round-trips every document through the same JSON envelope as Redis,
so a caller that works here (no shared mutable state, JSON-only values) works
against Redis too. The read-or-write of each method runs without awaiting (a big
record is encoded or decoded in a thread before or after it), so on one event
loop every operation, ``put_if_absent`` included, is atomic. Records are kept as exact-size
copies (``encode(keep=True)``): what orjson hands back is over-allocated.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from coe.store.base import (
    Counted,
    Counter,
    StateStore,
    check_key,
    check_namespace,
    decode,
    decode_async,
    encode,
    encode_async,
)

EXPIRING_SWEEP_AT = 100_000
"""Expired ``put_expiring`` records are dropped when this many are held; the next sweep waits until twice
as many as survived are held, so the cost per write stays constant (amortised)."""


class MemoryStore(StateStore):
    """In-process store: the default when no Redis URL is configured."""

    durable = False

    def __init__(self) -> None:
        self._data: dict[str, dict[str, bytes]] = {}
        self._sums: dict[str, tuple[float, float | None]] = {}  # counter -> (value, expires at)
        self._logs: dict[str, deque[float]] = {}  # sliding counter -> event times, oldest first
        self._leases: dict[str, tuple[str, float]] = {}  # lease -> (owner, expires at, monotonic)
        self._fences: dict[str, int] = {}
        self._expiring: dict[tuple[str, str], tuple[bytes, float]] = {}  # -> (record, expires at, monotonic)
        self._sweep_at = EXPIRING_SWEEP_AT

    async def get(self, namespace: str, key: str) -> dict[str, Any] | None:
        raw = self._data.get(check_namespace(namespace), {}).get(check_key(key))
        return None if raw is None else await decode_async(namespace, key, raw)

    async def put(self, namespace: str, key: str, doc: dict[str, Any]) -> None:
        raw = await encode_async(check_namespace(namespace), check_key(key), doc, keep=True)
        self._data.setdefault(namespace, {})[key] = raw

    async def put_if_absent(self, namespace: str, key: str, doc: dict[str, Any], *,
                            given: tuple[str, str] | None = None) -> bool:
        raw = encode(check_namespace(namespace), check_key(key), doc, keep=True)
        if given is not None and check_key(given[1]) not in self._data.get(check_namespace(given[0]), {}):
            return False
        bucket = self._data.setdefault(namespace, {})
        if key in bucket:
            return False
        bucket[key] = raw
        return True

    async def delete(self, namespace: str, key: str) -> bool:
        bucket = self._data.get(check_namespace(namespace))
        if bucket is None or check_key(key) not in bucket:
            return False
        del bucket[key]
        if not bucket:
            del self._data[namespace]
        return True

    async def drop(self, namespace: str) -> bool:
        return bool(self._data.pop(check_namespace(namespace), None))

    async def items(self, namespace: str) -> dict[str, dict[str, Any]]:
        bucket = self._data.get(check_namespace(namespace), {})
        return {key: decode(namespace, key, raw) for key, raw in bucket.items()}

    async def count(self, namespace: str) -> int:
        return len(self._data.get(check_namespace(namespace), {}))

    async def add_counters(self, namespace: str, counters: Sequence[Counter], *, now: float | None = None
                           ) -> Counted:
        """No await inside: atomic on the event loop, as the Redis script is on the server."""
        now = time.time() if now is None else now
        names = [f"{check_namespace(namespace)}:{check_key(c.key)}" for c in counters]
        current: list[float] = []
        waits: list[float | None] = []
        for name, c in zip(names, counters, strict=True):
            if c.sliding_s is not None:
                log = self._logs.setdefault(name, deque())
                while log and log[0] <= now - c.sliding_s:
                    log.popleft()
                current.append(float(len(log)))
                wait: float | None = (log[0] + c.sliding_s - now) if log else c.sliding_s
            else:
                value, expires = self._sums.get(name, (0.0, None))
                if expires is not None and expires <= now:
                    value, expires = 0.0, None
                current.append(value)
                wait = None if expires is None else expires - now
            if c.limit is not None and c.add > 0 and current[-1] + c.add > c.limit:
                waits.append(wait)
        if waits:
            return Counted(False, current, None if None in waits else max(w for w in waits if w is not None))
        for i, (name, c) in enumerate(zip(names, counters, strict=True)):
            if c.sliding_s is not None:
                log = self._logs[name]
                if c.add >= 0:
                    log.extend([now] * int(c.add))
                else:
                    for _ in range(min(len(log), -int(c.add))):
                        log.pop()  # the newest events
                current[i] = float(len(log))
            elif c.add:
                value, expires = self._sums.get(name, (0.0, None))
                if expires is not None and expires <= now:
                    value, expires = 0.0, None
                if expires is None and c.ttl_s is not None:
                    expires = now + c.ttl_s
                current[i] = value + c.add
                self._sums[name] = (current[i], expires)
        return Counted(True, current)

    async def put_expiring(self, namespace: str, key: str, doc: dict[str, Any], ttl_s: float) -> None:
        raw = encode(check_namespace(namespace), check_key(key), doc, keep=True)
        now = time.monotonic()
        if len(self._expiring) >= self._sweep_at:  # one process, no server to expire them: sweep here
            self._expiring = {k: v for k, v in self._expiring.items() if v[1] > now}
            self._sweep_at = max(EXPIRING_SWEEP_AT, 2 * len(self._expiring))
        self._expiring[(namespace, key)] = (raw, now + ttl_s)

    async def get_expiring(self, namespace: str, key: str) -> dict[str, Any] | None:
        held = self._expiring.get((check_namespace(namespace), check_key(key)))
        if held is None or held[1] <= time.monotonic():
            return None
        return decode(namespace, key, held[0])

    async def acquire_lease(self, name: str, owner: str, ttl_s: float) -> int | None:
        """No await inside: atomic on the event loop (one process is all this store serves)."""
        now = time.monotonic()
        held = self._leases.get(check_key(name))
        if held is not None and held[1] > now:
            return None
        self._leases[name] = (owner, now + ttl_s)
        self._fences[name] = self._fences.get(name, 0) + 1
        return self._fences[name]

    async def release_lease(self, name: str, owner: str) -> bool:
        held = self._leases.get(check_key(name))
        if held is None or held[0] != owner or held[1] <= time.monotonic():
            return False
        del self._leases[name]
        return True

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None

