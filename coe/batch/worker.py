"""A batch worker: claims queue entries, runs their items, records results, finalizes batches.

- Entries held by a dead worker are re-claimed after ``claim_idle_s``; an item
  whose result is already recorded (its worker died between recording and
  acknowledging) is acknowledged without running again.
- A result is recorded before its entry is acknowledged, and results are
  first-wins, so a crash at any point loses nothing and duplicates nothing in
  the output (the item may run twice: the contract of ``coe.batch.queue``).
- 502/503/504 (an expert briefly down) are retried here, a few times with
  backoff, before the item is recorded as failed.
- Entries are taken ``window`` at a time and run in waves grouped by expert
  (``coe.batch.stages``). A wave can outlast ``claim_idle_s`` (an on-demand model
  loading, a long group), so while a chunk runs the worker refreshes its claim on
  the entries it still holds (``WorkQueue.touch``) every third of ``claim_idle_s``;
  only a worker that stopped refreshing loses its entries.
- Cancel and expiry reach a chunk already running: the worker reads its
  batches' statuses every ``watch_s`` and an item of a stopped batch sends no
  further call (``WaveRunner.run(wanted=...)``); it is recorded as skipped,
  unless it already has its answer. Calls in flight finish, as OpenAI's do.
- When the queue is empty, the resident on-demand model is put down.
- Stopping (SIGTERM) lets the chunk in flight finish for up to ``drain_s``, then
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
from coe.batch.stages import Job, WaveRunner
from coe.errors import StoreError
from coe.pipeline.state import ChatCaller

log = logging.getLogger("coe.batch")

RETRY_STATUSES = frozenset({502, 503, 504})
RETRY_DELAYS_S = (1.0, 3.0)
STOPPED = frozenset({"cancelling", "cancelled", "expiring", "expired"})
"""Batch statuses whose unrun items are skipped."""


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class BatchWorker:
    def __init__(self, jobs: BatchJobs, execute: Execute, runner: WaveRunner, *, name: str | None = None,
                 window: int = 1000, claim_idle_s: float = 30.0, block_s: float = 1.0, drain_s: float = 30.0,
                 watch_s: float = 0.5) -> None:
        self.jobs = jobs
        self.execute = execute
        self.runner = runner
        self.name = name or consumer_name()
        self.window = window
        self.claim_idle_s = claim_idle_s
        self.block_s = block_s
        self.drain_s = drain_s
        self.watch_s = watch_s
        self.processed = 0
        self._items: dict[str, dict[str, BatchItem]] = {}

    async def run(self, stop: asyncio.Event) -> None:
        queue = self.jobs.queue
        recovered = await self.jobs.recover()
        if recovered:
            log.warning("re-enqueued %d batch(es) whose acceptance was interrupted", recovered)
        last_reclaim = 0.0
        try:
            while not stop.is_set():
                entries: list[Entry] = []
                if time.monotonic() - last_reclaim >= min(self.claim_idle_s / 2, 5.0):
                    last_reclaim = time.monotonic()
                    entries = await queue.reclaim(self.name, self.claim_idle_s, self.window)
                    if entries:
                        log.info("re-claimed %d batch item(s) a stopped worker held", len(entries))
                if not entries:
                    entries = await queue.take(self.name, self.window, self.block_s)
                if entries:
                    await self._chunk(entries, stop)
                else:
                    await self.runner.release()
        finally:
            with contextlib.suppress(Exception):
                await self.runner.release()

    async def _chunk(self, entries: list[Entry], stop: asyncio.Event) -> None:
        """One window of entries in waves; on stop, up to ``drain_s`` to finish, then the rest released."""
        held = dict.fromkeys(entries)  # insertion-ordered set of the entries not yet acknowledged
        for batch_id in dict.fromkeys(e.batch_id for e in entries):  # each batch's input read once, up front
            await self._item(next(e for e in entries if e.batch_id == batch_id))

        def job(entry: Entry) -> Job:
            async def run(caller: ChatCaller) -> None:
                await self._one(entry, caller)
                held.pop(entry, None)
            return run

        statuses: dict[str, str | None] = {}
        watch = asyncio.create_task(self._watch({e.batch_id for e in entries}, statuses))
        work = asyncio.create_task(self.runner.run(
            [job(e) for e in entries], wanted=lambda i: statuses.get(entries[i].batch_id) not in STOPPED))
        heartbeat = asyncio.create_task(self._heartbeat(held))
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({work, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                log.info("worker stopping: letting %d item(s) finish (up to %.0fs)", len(held), self.drain_s)
                await asyncio.wait({work}, timeout=self.drain_s)
        finally:
            stopping.cancel()
            if not work.done():
                work.cancel()
            results = await asyncio.gather(work, return_exceptions=True)
            heartbeat.cancel()
            watch.cancel()
            await asyncio.gather(heartbeat, watch, return_exceptions=True)
            if isinstance(results[0], Exception):
                log.error("batch wave failed in the worker itself", exc_info=results[0])
            if held and stop.is_set():  # not started or cut short: to the next taker at once
                with contextlib.suppress(Exception):
                    await self.jobs.queue.release(list(held))
            # else: an item whose job failed in the worker itself stays unacknowledged, re-claimed later

    async def _heartbeat(self, held: dict[Entry, None]) -> None:
        """Refresh the claim on the entries still held, so a long wave is not taken for a dead worker."""
        every = max(0.2, self.claim_idle_s / 3)
        while True:
            await asyncio.sleep(every)
            try:
                await self.jobs.queue.touch(self.name, list(held))
            except StoreError as exc:
                log.warning("could not refresh the claim on %d batch item(s): %s", len(held), exc)

    async def _watch(self, batch_ids: set[str], statuses: dict[str, str | None]) -> None:
        """Keep ``statuses`` current for the chunk's batches (a cancel or expiry stops their calls)."""
        while True:
            for batch_id in batch_ids:
                with contextlib.suppress(StoreError):
                    statuses[batch_id] = await self.jobs.status(batch_id)
            await asyncio.sleep(self.watch_s)

    async def _stopped(self, batch_id: str) -> bool:
        return await self.jobs.status(batch_id) in STOPPED

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

    async def _one(self, entry: Entry, caller: ChatCaller) -> None:
        jobs = self.jobs
        status = await jobs.status(entry.batch_id)
        item = await self._item(entry) if status is not None else None
        if status is None or item is None:
            await jobs.queue.ack([entry])  # the batch (or its input) is gone: nothing to do
            return
        request_id = f"batch-{uuid.uuid4().hex[:16]}"
        if status in STOPPED:
            await jobs.record(entry.batch_id, item, 0, {}, request_id, skipped=True)
        elif not await jobs.has_result(entry.batch_id, item.custom_id):
            code, body = await self.execute(item, request_id, caller)
            for delay in RETRY_DELAYS_S:
                if code not in RETRY_STATUSES or await self._stopped(entry.batch_id):
                    break
                await asyncio.sleep(delay)
                code, body = await self.execute(item, request_id, caller)
            # an item that failed once its batch stopped was (most likely) refused its calls: skipped
            skipped = not 200 <= code < 300 and await self._stopped(entry.batch_id)
            await jobs.record(entry.batch_id, item, 0 if skipped else code, {} if skipped else body, request_id,
                              skipped=skipped)
            self.processed += 0 if skipped else 1
        await jobs.queue.ack([entry])
        await jobs.maybe_finalize(entry.batch_id)
