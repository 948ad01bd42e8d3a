"""The batch work queue: entries a worker claims, finishes and acknowledges.

Contract (arq's, plainly): **an item may run more than once.** A worker that
dies holding entries leaves them unacknowledged; after ``claim_idle_s`` another
worker re-claims them (``XAUTOCLAIM`` on Redis). Results are therefore written
first-wins per ``custom_id`` (see ``coe.batch.jobs``), so every item appears in
the output exactly once however often it ran.

A worker holding entries for long (a wave waiting for a model to load) calls
``touch`` now and then, which restarts their idle time, so only a worker that
stopped is taken for dead.

``MemoryQueue`` serves one process (the embedded default; lost on restart).
``RedisStreamQueue`` is a Redis Stream with one consumer group, so workers on
many machines share it.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson

from coe.config import StoreConfig
from coe.errors import StoreError
from coe.store import is_durable_url, store_url

GROUP = "workers"


@dataclass(frozen=True)
class Entry:
    id: str
    batch_id: str
    custom_id: str


class WorkQueue(ABC):
    durable: ClassVar[bool]

    @abstractmethod
    async def push(self, batch_id: str, custom_ids: list[str]) -> None:
        """Enqueue one entry per item."""

    @abstractmethod
    async def take(self, consumer: str, count: int, block_s: float) -> list[Entry]:
        """Up to ``count`` new entries for ``consumer``, waiting at most ``block_s`` for the first."""

    @abstractmethod
    async def reclaim(self, consumer: str, idle_s: float, count: int) -> list[Entry]:
        """Entries another consumer has held unacknowledged for at least ``idle_s``, now ``consumer``'s."""

    @abstractmethod
    async def ack(self, entries: list[Entry]) -> None:
        """Done with these entries: they are never handed out again."""

    @abstractmethod
    async def touch(self, consumer: str, entries: list[Entry]) -> None:
        """Restart the idle time of those of ``entries`` that ``consumer`` still holds (a heartbeat);
        entries acknowledged or re-claimed by another consumer meanwhile are left alone."""

    async def release(self, entries: list[Entry]) -> None:
        """Give back entries not started (a worker stopping): they go to the next taker at once."""
        if entries:
            by_batch: dict[str, list[str]] = {}
            for e in entries:
                by_batch.setdefault(e.batch_id, []).append(e.custom_id)
            for batch_id, ids in by_batch.items():
                await self.push(batch_id, ids)
            await self.ack(entries)

    async def close(self) -> None:
        return None


PUSH_CHUNK = 5000
"""Entries enqueued per step (one Redis pipeline; the in-memory queue yields between steps)."""


class MemoryQueue(WorkQueue):
    durable = False

    def __init__(self) -> None:
        self._ready: asyncio.Queue[Entry] = asyncio.Queue()
        self._held: dict[str, tuple[Entry, str, float]] = {}
        self._ids = itertools.count(1)  # entry ids: unique in this queue, far cheaper than a uuid each

    async def push(self, batch_id: str, custom_ids: list[str]) -> None:
        for n, cid in enumerate(custom_ids, 1):
            self._ready.put_nowait(Entry(str(next(self._ids)), batch_id, cid))
            if n % PUSH_CHUNK == 0:
                await asyncio.sleep(0)  # a batch of 300k items does not hold the loop for its whole push

    async def take(self, consumer: str, count: int, block_s: float) -> list[Entry]:
        out: list[Entry] = []
        try:
            out.append(await asyncio.wait_for(self._ready.get(), timeout=block_s))
        except TimeoutError:
            return out
        while len(out) < count and not self._ready.empty():
            out.append(self._ready.get_nowait())
        now = time.monotonic()
        for e in out:
            self._held[e.id] = (e, consumer, now)
        return out

    async def reclaim(self, consumer: str, idle_s: float, count: int) -> list[Entry]:
        now = time.monotonic()
        stale = [e for e, _, since in self._held.values() if now - since >= idle_s][:count]
        for e in stale:
            self._held[e.id] = (e, consumer, now)
        return stale

    async def ack(self, entries: list[Entry]) -> None:
        for e in entries:
            self._held.pop(e.id, None)

    async def touch(self, consumer: str, entries: list[Entry]) -> None:
        now = time.monotonic()
        for e in entries:
            held = self._held.get(e.id)
            if held is not None and held[1] == consumer:
                self._held[e.id] = (held[0], consumer, now)


TOUCH_PAGE = 1000
"""Pending entries read per XPENDING call while refreshing a claim."""


class RedisStreamQueue(WorkQueue):
    """One stream ``{prefix}:batch-queue`` with consumer group ``workers``; acknowledged entries are deleted."""

    durable = True

    def __init__(self, client: Any, prefix: str = "coe") -> None:
        self._client = client
        self._key = f"{prefix}:batch-queue"
        self._group_ready = False

    @classmethod
    def from_url(cls, url: str, prefix: str = "coe") -> RedisStreamQueue:
        import redis.asyncio as aioredis

        return cls(aioredis.Redis.from_url(url, socket_connect_timeout=5), prefix)

    @asynccontextmanager
    async def _errors(self, what: str) -> AsyncIterator[None]:
        from redis.exceptions import RedisError

        try:
            yield
        except RedisError as exc:
            raise StoreError(f"batch queue: {what} failed: {exc}") from exc

    async def _group(self) -> None:
        if self._group_ready:
            return
        from redis.exceptions import ResponseError

        async with self._errors("create the consumer group"):
            try:
                await self._client.xgroup_create(self._key, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self._group_ready = True

    async def push(self, batch_id: str, custom_ids: list[str]) -> None:
        await self._group()
        async with self._errors("push"):
            for start in range(0, len(custom_ids), PUSH_CHUNK):  # bounded pipelines: memory, and the loop
                pipe = self._client.pipeline(transaction=False)
                for cid in custom_ids[start:start + PUSH_CHUNK]:
                    pipe.xadd(self._key, {"e": orjson.dumps({"b": batch_id, "c": cid})})
                await pipe.execute()

    @staticmethod
    def _entries(rows: list[Any]) -> list[Entry]:
        out = []
        for entry_id, fields in rows:
            if not fields:  # deleted while pending (XAUTOCLAIM reports those as empty)
                continue
            raw = fields.get(b"e") or fields.get("e")
            doc = orjson.loads(raw)
            eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
            out.append(Entry(eid, str(doc["b"]), str(doc["c"])))
        return out

    async def take(self, consumer: str, count: int, block_s: float) -> list[Entry]:
        await self._group()
        async with self._errors("take"):
            got = await self._client.xreadgroup(GROUP, consumer, {self._key: ">"}, count=count,
                                                block=max(1, int(block_s * 1000)))
        return self._entries(got[0][1]) if got else []

    async def reclaim(self, consumer: str, idle_s: float, count: int) -> list[Entry]:
        await self._group()
        async with self._errors("reclaim"):
            result = await self._client.xautoclaim(self._key, GROUP, consumer, min_idle_time=int(idle_s * 1000),
                                                   start_id="0-0", count=count)
        return self._entries(result[1])

    async def ack(self, entries: list[Entry]) -> None:
        if not entries:
            return
        ids = [e.id for e in entries]
        async with self._errors("ack"):
            pipe = self._client.pipeline(transaction=True)
            pipe.xack(self._key, GROUP, *ids)
            pipe.xdel(self._key, *ids)
            await pipe.execute()

    async def touch(self, consumer: str, entries: list[Entry]) -> None:
        if not entries:
            return
        await self._group()
        wanted = {e.id for e in entries}
        async with self._errors("refresh the claim"):
            # Page through everything this consumer holds (it may hold more than ``entries``: a chunk cut
            # short by a store outage leaves its entries pending until re-claimed), so none is missed.
            ids: list[str] = []
            start = "-"
            while len(ids) < len(wanted):
                pending = await self._client.xpending_range(self._key, GROUP, min=start, max="+",
                                                            count=TOUCH_PAGE, consumername=consumer)
                page = [_text(p["message_id"]) for p in pending]
                ids += [i for i in page if i in wanted]
                if len(page) < TOUCH_PAGE:
                    break
                start = f"({page[-1]}"  # exclusive: the next page starts after the last id seen
            if ids:  # XCLAIM by the holder itself, JUSTID: restarts the idle time, changes nothing else
                await self._client.xclaim(self._key, GROUP, consumer, min_idle_time=0, message_ids=ids,
                                          justid=True)

    async def close(self) -> None:
        await self._client.aclose()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def open_queue(cfg: StoreConfig, *, durable_store: bool, environ: Mapping[str, str] | None = None) -> WorkQueue:
    """The queue beside the state store: a Redis stream when the store is Redis, else in memory."""
    url = store_url(cfg, environ)
    if durable_store and url and is_durable_url(url):
        return RedisStreamQueue.from_url(url, cfg.prefix)
    return MemoryQueue()
