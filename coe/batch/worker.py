"""A batch worker: claims queue entries, runs their items, records results, finalizes batches.

- Entries held by a dead worker are re-claimed after ``claim_idle_s``; an item
  whose result is already recorded (its worker died between recording and
  acknowledging) is acknowledged without running again.
- A result is recorded before its entry is acknowledged, and results are
  first-wins, so a crash at any point loses nothing and duplicates nothing in
  the output (the item may run twice: the contract of ``coe.batch.queue``).
- 502/503/504 (an expert briefly down) are retried here, a few times with
  backoff, before the item is recorded as failed.
- Stopping (SIGTERM) lets items in flight finish for up to ``drain_s``, then
  releases what is left so another worker takes it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid

from coe.batch.jobs import BatchJobs
from coe.batch.lines import BatchItem
from coe.batch.queue import Entry
from coe.batch.run import Execute

log = logging.getLogger("coe.batch")

RETRY_STATUSES = frozenset({502, 503, 504})
RETRY_DELAYS_S = (1.0, 3.0)


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class BatchWorker:
    def __init__(self, jobs: BatchJobs, execute: Execute, *, name: str | None = None, concurrency: int = 8,
                 claim_idle_s: float = 30.0, block_s: float = 1.0, drain_s: float = 30.0) -> None:
        self.jobs = jobs
        self.execute = execute
        self.name = name or consumer_name()
        self.concurrency = concurrency
        self.claim_idle_s = claim_idle_s
        self.block_s = block_s
        self.drain_s = drain_s
        self.processed = 0
        self._items: dict[str, dict[str, BatchItem]] = {}

    async def run(self, stop: asyncio.Event) -> None:
        queue = self.jobs.queue
        recovered = await self.jobs.recover()
        if recovered:
            log.warning("re-enqueued %d batch(es) whose acceptance was interrupted", recovered)
        running: dict[asyncio.Task[None], Entry] = {}
        last_reclaim = 0.0
        try:
            while not stop.is_set():
                room = self.concurrency - len(running)
                if room <= 0:
                    await asyncio.wait(list(running), return_when=asyncio.FIRST_COMPLETED)
                    self._reap(running)
                    continue
                entries: list[Entry] = []
                if time.monotonic() - last_reclaim >= min(self.claim_idle_s / 2, 5.0):
                    last_reclaim = time.monotonic()
                    entries = await queue.reclaim(self.name, self.claim_idle_s, room)
                    if entries:
                        log.info("re-claimed %d batch item(s) a stopped worker held", len(entries))
                if not entries:
                    entries = await queue.take(self.name, room, self.block_s)
                for entry in await self._grouped(entries):
                    running[asyncio.create_task(self._one(entry))] = entry
                self._reap(running)
        finally:
            await self._stop(running)

    def _reap(self, running: dict[asyncio.Task[None], Entry]) -> None:
        for task in [t for t in running if t.done()]:
            running.pop(task)
            if not task.cancelled() and task.exception() is not None:
                log.error("batch item failed in the worker itself", exc_info=task.exception())

    async def _stop(self, running: dict[asyncio.Task[None], Entry]) -> None:
        if running:
            log.info("worker stopping: letting %d item(s) finish (up to %.0fs)", len(running), self.drain_s)
            _, pending = await asyncio.wait(list(running), timeout=self.drain_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
                with contextlib.suppress(Exception):
                    await self.jobs.queue.release([running[t] for t in pending])

    async def _grouped(self, entries: list[Entry]) -> list[Entry]:
        """Entries ordered by the item's model, so one expert's work goes out together."""
        keyed = []
        for e in entries:
            item = await self._item(e)
            keyed.append((item.model if item is not None else "", e))
        first: dict[str, int] = {}
        for i, (model, _) in enumerate(keyed):
            first.setdefault(model, i)
        return [e for _, e in sorted(keyed, key=lambda t: first[t[0]])]

    async def _item(self, entry: Entry) -> BatchItem | None:
        items = self._items.get(entry.batch_id)
        if items is None:
            try:
                batch = await self.jobs.get_batch(entry.batch_id)
            except Exception:
                return None
            items = {i.custom_id: i for i in await self.jobs.items_of(batch)}
            if len(self._items) > 64:
                self._items.pop(next(iter(self._items)))
            self._items[entry.batch_id] = items
        return items.get(entry.custom_id)

    async def _one(self, entry: Entry) -> None:
        jobs = self.jobs
        status = await jobs.status(entry.batch_id)
        item = await self._item(entry) if status is not None else None
        if status is None or item is None:
            await jobs.queue.ack([entry])  # the batch (or its input) is gone: nothing to do
            return
        request_id = f"batch-{uuid.uuid4().hex[:16]}"
        if status in ("cancelling", "cancelled"):
            await jobs.record(entry.batch_id, item, 0, {}, request_id, skipped=True)
        elif not await jobs.has_result(entry.batch_id, item.custom_id):
            code, body = await self.execute(item, request_id)
            for delay in RETRY_DELAYS_S:
                if code not in RETRY_STATUSES:
                    break
                await asyncio.sleep(delay)
                code, body = await self.execute(item, request_id)
            await jobs.record(entry.batch_id, item, code, body, request_id)
            self.processed += 1
        await jobs.queue.ack([entry])
        await jobs.maybe_finalize(entry.batch_id)
