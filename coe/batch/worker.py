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
- Entries of a batch that has stopped or ended are acknowledged as a chunk is
  taken, without reading the batch's input and without a record per item
  (``BatchJobs.skip``): working off a cancelled 330k-item batch is a few hundred
  acknowledgements, not 330k records. An item is run only after ``BatchJobs.begin``
  marked it and saw its batch still running.
- When the queue is empty, the resident on-demand model is put down.
- Stopping (SIGTERM) lets the chunk in flight finish for up to ``drain_s``, then
  releases what is left so another worker takes it at once.
- Nothing a batch holds ends the loop. A batch whose input cannot be read (its
  file was deleted, or is not batch lines any more) ends ``failed`` with the
  reason, keeping the results it has, and its entries are acknowledged; an item
  whose job fails in the worker itself (not in its request path) is recorded as
  a 500 and acknowledged. A store that fails (Redis down or restarting) is
  retried with jittered exponential backoff, and the entries held meanwhile are
  re-claimed once it is back; ``health`` says how the loop is doing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
import uuid
from dataclasses import dataclass, field

from coe.batch.jobs import BIG_BATCH, STOPPING, TERMINAL, BatchJobs
from coe.batch.lines import BatchItem
from coe.batch.queue import Entry
from coe.batch.run import Execute
from coe.batch.stages import Job, WaveRunner
from coe.errors import CoeError, StoreError
from coe.heap import trim_soon
from coe.pipeline.state import ChatCaller
from coe.telemetry import batch_scope

log = logging.getLogger("coe.batch")

RETRY_STATUSES = frozenset({502, 503, 504})
RETRY_DELAYS_S = (1.0, 3.0)
MAX_CACHED_ITEMS = 100_000
"""Parsed items the worker keeps between chunks (at most 64 batches too): enough for a window, bounded
so that big batches do not pin memory after they end."""
STOPPED = STOPPING | {"cancelled", "expired"}
"""Batch statuses whose unrun items are skipped."""


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def backoff_s(failures: int, base_s: float = 0.5, cap_s: float = 15.0) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**(failures - 1))], so that
    workers that failed together (one Redis restart) do not retry in step."""
    return random.uniform(0, min(cap_s, base_s * 2 ** max(0, failures - 1)))


@dataclass
class WorkerHealth:
    """How a batch worker loop is doing (``/health/ready`` and the metrics show it)."""

    state: str = "starting"
    """``starting``, ``running``, ``retrying`` (the store failed; backing off) or ``stopped``."""
    errors: int = 0
    """Loop iterations that failed since start (each one retried)."""
    consecutive: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    poisoned: list[str] = field(default_factory=list)
    """Batches ended ``failed`` because their input could not be read (the last 20)."""

    def failed(self, exc: BaseException) -> float:
        self.errors += 1
        self.consecutive += 1
        self.state = "retrying"
        self.last_error = f"{type(exc).__name__}: {getattr(exc, 'message', None) or exc}"[:500]
        self.last_error_at = time.time()
        return backoff_s(self.consecutive)

    def ok(self) -> None:
        self.state, self.consecutive = "running", 0

    def to_json(self) -> dict[str, object]:
        return {"state": self.state, "errors": self.errors, "last_error": self.last_error,
                "last_error_at": self.last_error_at, "poisoned_batches": list(self.poisoned)}


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
        self.health = WorkerHealth()
        self._items: dict[str, dict[str, BatchItem] | None] = {}  # None: the batch's input is poison
        self._traces: dict[str, dict[str, str]] = {}  # per batch: the traceparent its items link to

    async def run(self, stop: asyncio.Event) -> None:
        """Take and run work until ``stop`` is set. Returns only then: a failing store is retried with
        backoff (``health`` says so), and no entry, item or batch can end the loop."""
        recovered = False
        last_reclaim = 0.0
        try:
            while not stop.is_set():
                try:
                    if not recovered:
                        n = await self.jobs.recover()
                        recovered = True
                        if n:
                            log.warning("re-enqueued %d batch(es) whose acceptance was interrupted", n)
                    entries: list[Entry] = []
                    if time.monotonic() - last_reclaim >= min(self.claim_idle_s / 2, 5.0):
                        entries = await self.jobs.queue.reclaim(self.name, self.claim_idle_s, self.window)
                        last_reclaim = time.monotonic()
                        if entries:
                            log.info("re-claimed %d batch item(s) a stopped worker held", len(entries))
                    if not entries:
                        entries = await self.jobs.queue.take(self.name, self.window, self.block_s)
                    self.health.ok()
                    if entries:
                        await self._chunk(entries, stop)
                    else:
                        await self.runner.release()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    delay = self.health.failed(exc)
                    log.warning("batch worker: %s; retrying in %.1fs (failure %d in a row)", self.health.last_error,
                                delay, self.health.consecutive, exc_info=not isinstance(exc, CoeError))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
        finally:
            self.health.state = "stopped"
            with contextlib.suppress(Exception):
                await self.runner.release()

    async def _chunk(self, entries: list[Entry], stop: asyncio.Event) -> None:
        """One window of entries in waves; on stop, up to ``drain_s`` to finish, then the rest released."""
        entries = await self._settle(entries)
        if not entries:
            return
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

    async def _settle(self, entries: list[Entry]) -> list[Entry]:
        """The entries to run. Those of batches gone, ended or stopping are acknowledged here, in one call per
        batch, without reading the batch's input (a stopping batch's items begun elsewhere are recorded
        skipped first: ``BatchJobs.skip``), and the batch's cached items are let go."""
        run: list[Entry] = []
        for batch_id in dict.fromkeys(e.batch_id for e in entries):
            mine = [e for e in entries if e.batch_id == batch_id]
            status = await self.jobs.status(batch_id)
            if status is not None and status not in STOPPED:
                run += mine
                continue
            self._traces.pop(batch_id, None)
            if len(self._items.pop(batch_id, None) or ()) >= BIG_BATCH:
                await trim_soon()
            if status in STOPPING:
                await self.jobs.skip(batch_id, [e.custom_id for e in mine])
            await self.jobs.queue.ack(mine)
        return run

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
        """The entry's item; None when its batch is gone or its input is poison (the batch is then ended
        ``failed`` here). A store failure raises (``StoreError``): the loop retries, nothing is decided."""
        if entry.batch_id not in self._items:
            try:
                batch = await self.jobs.get_batch(entry.batch_id)
            except StoreError:
                raise
            except CoeError:
                return None  # the batch is gone (deleted store data): the entry is acknowledged
            try:
                items: dict[str, BatchItem] | None = {i.custom_id: i for i in await self.jobs.items_of(batch)}
            except StoreError:
                raise
            except Exception as exc:
                items = None
                await self._poison(entry.batch_id, batch, exc)
            self._items[entry.batch_id] = items
            self._traces[entry.batch_id] = await self.jobs.trace_of(entry.batch_id)
            while len(self._items) > 1 and (len(self._items) > 64 or sum(
                    len(v or ()) for v in self._items.values()) > MAX_CACHED_ITEMS):
                oldest = next(iter(self._items))  # the oldest batch's items: read again if needed
                self._items.pop(oldest)
                self._traces.pop(oldest, None)
        items = self._items[entry.batch_id]
        return None if items is None else items.get(entry.custom_id)

    async def _poison(self, batch_id: str, batch: dict[str, object], exc: Exception) -> None:
        reason = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
        message = f"the batch's input file {batch.get('input_file_id')} could not be read: {reason}"[:1000]
        if await self.jobs.fail_batch(batch_id, "input_file_unreadable", message):
            log.error("batch %s failed: %s", batch_id, message)
        self.health.poisoned = [*self.health.poisoned, batch_id][-20:]

    async def _one(self, entry: Entry, caller: ChatCaller) -> None:
        """One entry to its result and acknowledgement. A store failure propagates (the entry stays held and
        is re-claimed once the store is back); anything else is recorded as the item's 500 and acknowledged,
        so no entry comes back forever."""
        try:
            await self._run_entry(entry, caller)
        except (StoreError, asyncio.CancelledError):
            raise
        except Exception as exc:
            log.exception("batch item %s/%s failed in the worker itself", entry.batch_id, entry.custom_id)
            item = await self._item(entry)
            if item is not None:
                body = {"error": {"message": f"the batch worker failed on this item: {type(exc).__name__}",
                                  "type": "internal_error", "param": None, "code": None}}
                await self.jobs.record(entry.batch_id, item, 500, body, f"batch-{uuid.uuid4().hex[:16]}")
            await self.jobs.queue.ack([entry])
            await self.jobs.maybe_finalize(entry.batch_id)

    async def _run_entry(self, entry: Entry, caller: ChatCaller) -> None:
        jobs = self.jobs
        status = await jobs.status(entry.batch_id)
        if status is None or status in TERMINAL:
            await jobs.queue.ack([entry])  # the batch is gone or has ended: nothing to do
            return
        if status in STOPPING:  # not begun here: nothing to run, and no record unless begun elsewhere
            await jobs.skip(entry.batch_id, [entry.custom_id])
            await jobs.queue.ack([entry])
            return
        item = await self._item(entry)
        if item is None:  # its input is gone: the batch was ended failed (or ends cancelled or expired)
            await jobs.queue.ack([entry])
            await jobs.maybe_finalize(entry.batch_id)
            return
        request_id = f"batch-{uuid.uuid4().hex[:16]}"
        status = await jobs.begin(entry.batch_id, item)  # marked, then the status: see coe.batch.jobs
        if status is None or status in TERMINAL:
            await jobs.queue.ack([entry])
            return
        if status in STOPPING:
            await jobs.record(entry.batch_id, item, 0, {}, request_id, skipped=True, begun=True)
        elif not await jobs.has_result(entry.batch_id, item.custom_id):
            with batch_scope(entry.batch_id, self._traces.get(entry.batch_id, {})):
                code, body = await self.execute(item, request_id, caller)
                for delay in RETRY_DELAYS_S:
                    if code not in RETRY_STATUSES or await self._stopped(entry.batch_id):
                        break
                    await asyncio.sleep(delay)
                    code, body = await self.execute(item, request_id, caller)
            # an item that failed once its batch stopped was (most likely) refused its calls: skipped
            skipped = not 200 <= code < 300 and await self._stopped(entry.batch_id)
            await jobs.record(entry.batch_id, item, 0 if skipped else code, {} if skipped else body, request_id,
                              skipped=skipped, begun=True)
            self.processed += 0 if skipped else 1
        await jobs.queue.ack([entry])
        if await jobs.maybe_finalize(entry.batch_id):
            self._items.pop(entry.batch_id, None)  # ended: its items are not needed again
            self._traces.pop(entry.batch_id, None)
