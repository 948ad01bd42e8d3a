"""Batch jobs on the state store, in OpenAI's shapes (their files: ``coe.batch.files``).

Namespaces: ``batches`` (one record per batch) and, per batch while it runs,
``batch-started.<id>`` (the items a worker has begun, with their line),
``batch-results.<id>`` (one record per item, FIRST WRITE WINS, so an item that
ran twice is counted and output once) with ``batch-failed.<id>`` and
``batch-skipped.<id>`` beside it for the live counts. A batch is finalized (its
output and error files written, status ``completed``, ``cancelled`` or
``expired``) once every item has a result or, once it is stopped (cancelled or
past its window), once every item begun has one; finalizing is deterministic and
idempotent, so any worker may do it, and doing it twice writes the same files.
Then its per-item records are dropped (``StateStore.drop``): its results live on
in its files and its counts in its record, so the store keeps nothing per item
of a batch that has ended (a 330k-item batch kept 2.6 GiB of them in memory).

Stopping costs one record, not one per item. Items nobody has begun are simply
not run: workers acknowledge their queue entries without a record. An item is
begun by writing its mark and *then* reading the batch's status (``begin``); a
finalizer reads the status, then the count of results, then the count of marks.
So a mark it did not count was written after it saw the batch stopped, and that
item's worker sees the stop too and records it skipped; every mark it counted
has its result, and no result comes later (results are only written for items
marked first). The marks bound the work of ending a batch by what was begun,
not by its size.

Expiry (OpenAI's): an ``in_progress`` batch past ``expires_at`` is ``expiring``.
That status is derived from the clock, never written, so no read-modify-write
of the batch record can race another one over it. Workers skip an expiring
batch's items as they do a cancelled one's; reading the batch (``get_batch``,
so ``GET /v1/batches/{id}`` with no worker running) records every item begun
but without a result as skipped (first-wins, so any number of readers and
workers may do it at once) and finalizes it ``expired``, keeping the results it
has. As for ``cancelled``, skipped items count as neither completed nor failed.

A worker ends an expiring batch as it ends a cancelling one (below), once the
calls it had in flight have finished, so every call sent is counted.

Cancel: a cancelling batch ends ``cancelled`` as soon as every item begun has
its result (at once when none is running). Calls already sent finish, as
OpenAI's do, and parked ones are not sent (``coe.batch.worker``). So that a
cancel also ends when a worker that began items stopped, reading a batch that
has been cancelling for ``cancel_grace_s`` sweeps it the same way and ends it
``cancelled``. A call still running after the grace (longer than
``claim_idle_s`` by default) then loses its result to the skip.

Acceptance order, so that a crash never loses an accepted batch: the batch
record is written (``enqueued: false``), then its queue entries, then
``enqueued: true``, then the client hears 200. ``recover`` re-enqueues any batch
left at ``enqueued: false``.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Collection
from typing import Any

import orjson

from coe.batch.files import DATA, FILES, OFF_LOOP, BatchFiles
from coe.batch.lines import CHAT_URL, BatchItem, BodyCheck, batch_ids, output_line, parse_batch
from coe.batch.queue import WorkQueue
from coe.errors import Conflict, InvalidRequest, NotFound, clip
from coe.heap import trim_soon
from coe.store.base import StateStore
from coe.telemetry import carrier

__all__ = ["BATCHES", "DATA", "FILES", "STOPPING", "TERMINAL", "BatchJobs"]

BATCHES = "batches"
TERMINAL = frozenset({"completed", "failed", "cancelled", "expired"})
STOPPING = frozenset({"cancelling", "expiring"})
"""Stopped but not ended: items not yet begun are not run, those begun are waited for (or swept)."""
WINDOW_S = 24 * 3600
SWEEP_CONCURRENCY = 64
BIG_BATCH = 10_000
"""Items from which what a batch frees (its parsed input, its records) is handed back to the OS."""


def _started(bid: str) -> str:
    return f"batch-started.{bid}"


def _results(bid: str) -> str:
    return f"batch-results.{bid}"


def _failed(bid: str) -> str:
    return f"batch-failed.{bid}"


def _skipped(bid: str) -> str:
    return f"batch-skipped.{bid}"


PER_ITEM = (_started, _results, _failed, _skipped)
"""A batch's per-item namespaces, dropped once it has ended; the marks first, so that from then on no
result is written (``record`` writes one only while its item's mark is there)."""


class BatchJobs(BatchFiles):
    def __init__(self, store: StateStore, queue: WorkQueue, *, max_file_bytes: int = 200 * 1024 * 1024,
                 cancel_grace_s: float = 30.0) -> None:
        super().__init__(store, max_file_bytes=max_file_bytes)
        self.queue = queue
        self.cancel_grace_s = cancel_grace_s

    async def items_of(self, batch: dict[str, Any]) -> list[BatchItem]:
        """The batch's items, parsed from its input file (checked when the batch was created)."""
        text = await self.file_text(batch["input_file_id"])
        if len(text) < OFF_LOOP:
            return parse_batch(text, batch["input_file_id"], models=None)
        return await asyncio.to_thread(parse_batch, text, batch["input_file_id"], models=None)

    async def create_batch(self, input_file_id: str, endpoint: str, completion_window: str,
                           metadata: dict[str, str] | None, models: Collection[str], check: BodyCheck | None,
                           *, expiry_s: float | None = None) -> dict[str, Any]:
        """Accept a batch; ``expiry_s`` overrides the 24 h window (``store.batch_expiry_s``, for tests)."""
        if endpoint != CHAT_URL:
            raise InvalidRequest(f"endpoint must be {CHAT_URL!r} (the only one coe batches)", param="endpoint")
        if completion_window != "24h":
            raise InvalidRequest("completion_window must be '24h'", param="completion_window")
        meta = await self.get_file(input_file_id)
        if meta.get("purpose") != "batch":
            raise InvalidRequest(f"file {clip(input_file_id)} has purpose {meta.get('purpose')!r}, not 'batch'",
                                 param="input_file_id")
        text = await self.file_text(input_file_id)
        # A big file is checked in a thread: the event loop keeps serving (200 MiB took seconds). Only the
        # ids are kept (``batch_ids``): the workers parse the items they run.
        custom_ids = (batch_ids(text, f"file {input_file_id}", models, check) if len(text) < OFF_LOOP else
                      await asyncio.to_thread(batch_ids, text, f"file {input_file_id}", models, check))
        del text
        if len(custom_ids) >= BIG_BATCH:
            await trim_soon()
        clock = time.time()
        now = int(clock)
        batch: dict[str, Any] = {
            "id": f"batch_{uuid.uuid4().hex}", "object": "batch", "endpoint": endpoint, "errors": None,
            "input_file_id": input_file_id, "completion_window": completion_window, "status": "in_progress",
            "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": now,
            "expires_at": math.ceil(clock + (WINDOW_S if expiry_s is None else expiry_s)),
            "finalizing_at": None, "completed_at": None, "failed_at": None,
            "expired_at": None, "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": len(custom_ids), "completed": 0, "failed": 0},
            "metadata": metadata or None, "enqueued": False, "trace": carrier(),
        }
        await self.store.put(BATCHES, batch["id"], batch)
        await self.queue.push(batch["id"], custom_ids)
        batch["enqueued"] = True
        await self.store.put(BATCHES, batch["id"], batch)
        return await self.get_batch(batch["id"])

    async def _batch(self, batch_id: str) -> dict[str, Any]:
        batch = await self.store.get(BATCHES, batch_id)
        if batch is None:
            raise NotFound(f"no batch with id {clip(batch_id)}", param="batch_id", code="batch_not_found")
        return batch

    @staticmethod
    def _expiring(batch: dict[str, Any]) -> bool:
        """In progress past its window (a cancelling batch ends cancelled instead)."""
        return batch["status"] == "in_progress" and time.time() > float(batch["expires_at"])

    def _overdue_cancel(self, batch: dict[str, Any]) -> bool:
        """Cancelling for longer than the grace: a worker that began items did not finish them."""
        return (batch["status"] == "cancelling"
                and time.time() > float(batch["cancelling_at"] or 0) + self.cancel_grace_s)

    async def end_overdue(self, batch_id: str) -> bool:
        """End an expiring batch (or an overdue cancel) now: record every item begun but without a result
        as skipped (items never begun need nothing), then finalize it ``expired`` (``cancelled``).

        Safe to run from any number of readers and workers at once: skips are first-wins records, and
        finalizing is deterministic. Needs neither the input file nor a read of every item.
        """
        batch = await self._batch(batch_id)
        if not (self._expiring(batch) or self._overdue_cancel(batch)):
            return False
        done = await self.store.items(_results(batch_id))
        begun = await self.store.items(_started(batch_id))
        todo = [BatchItem(cid, {}, int(mark.get("line", 0))) for cid, mark in begun.items() if cid not in done]
        for start in range(0, len(todo), SWEEP_CONCURRENCY):
            await asyncio.gather(*(self.record(batch_id, item, 0, {}, "", skipped=True, begun=True)
                                   for item in todo[start:start + SWEEP_CONCURRENCY]))
        return await self._finish(batch_id, await self.store.items(_results(batch_id)))

    async def get_batch(self, batch_id: str) -> dict[str, Any]:
        """The batch as OpenAI shows it, with live request counts; an expiring batch (or an overdue
        cancel) is ended first."""
        batch = await self._batch(batch_id)
        if self._expiring(batch) or self._overdue_cancel(batch):
            await self.end_overdue(batch_id)
            batch = await self._batch(batch_id)
        if batch["status"] not in TERMINAL:
            if self._expiring(batch):  # another reader is ending it right now
                batch["status"] = "expiring"
            done = await self.store.count(_results(batch_id))
            failed = await self.store.count(_failed(batch_id))
            skipped = await self.store.count(_skipped(batch_id))
            batch["request_counts"] = {"total": batch["request_counts"]["total"],
                                       "completed": done - failed - skipped, "failed": failed}
        batch.pop("enqueued", None)
        batch.pop("trace", None)
        return batch

    async def trace_of(self, batch_id: str) -> dict[str, str]:
        """The ``traceparent`` of the request that created the batch (empty when it was not traced): its
        items' spans link to it."""
        batch = await self.store.get(BATCHES, batch_id)
        return dict((batch or {}).get("trace") or {})

    async def list_batches(self, limit: int = 20, after: str | None = None, *, only: Collection[str] | None = None
                           ) -> tuple[list[dict[str, Any]], bool]:
        """``only``: list just these batch ids (a key's own), before paging."""
        ids = sorted((b for b in (await self.store.items(BATCHES)).values() if only is None or b["id"] in only),
                     key=lambda b: (-int(b["created_at"]), b["id"]))
        if after is not None:
            keys = [b["id"] for b in ids]
            ids = ids[keys.index(after) + 1:] if after in keys else []
        page = ids[:limit]
        return [await self.get_batch(b["id"]) for b in page], len(ids) > limit

    async def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        """One record written: the status. The batch ends ``cancelled`` here when no item is running."""
        await self.end_overdue(batch_id)  # past its window it ends expired, and cannot be cancelled
        batch = await self._batch(batch_id)
        if batch["status"] in TERMINAL:
            raise Conflict(f"batch {batch_id} is already {batch['status']}")
        if batch["status"] != "cancelling":
            batch["status"], batch["cancelling_at"] = "cancelling", int(time.time())
            await self.store.put(BATCHES, batch_id, batch)
        await self.maybe_finalize(batch_id)
        return await self.get_batch(batch_id)

    # -- results (workers) -------------------------------------------------------------

    async def status(self, batch_id: str) -> str | None:
        """The stored status, or ``expiring`` past the window (cheap: workers ask before every item)."""
        batch = await self.store.get(BATCHES, batch_id)
        if batch is None:
            return None
        return "expiring" if self._expiring(batch) else str(batch["status"])

    async def begin(self, batch_id: str, item: BatchItem) -> str | None:
        """Mark ``item`` begun, then read its batch's status, in this order (see the module docstring).
        A status in ``STOPPING`` means: do not run it, record it skipped; in ``TERMINAL`` (or None): nothing."""
        await self.store.put_if_absent(_started(batch_id), item.custom_id, {"line": item.line})
        status = await self.status(batch_id)
        if status in TERMINAL:  # ended meanwhile: the mark must not outlive the batch's other records
            await self._drop(batch_id)
        return status

    async def record(self, batch_id: str, item: BatchItem, status: int, body: dict[str, Any], request_id: str,
                     *, skipped: bool = False, begun: bool = False) -> bool:
        """Store an item's result unless it already has one; True when this call's result counts (it will be
        in the batch's files).

        ``begun``: the caller ``begin``-ed the item and then saw its batch still running (workers do). Otherwise
        it is begun here: a result for a batch that has ended counts nothing, and one for an item of a stopping
        batch that nobody had begun is recorded skipped (it should not have run) and counts nothing.
        """
        counts = not skipped
        if not begun:
            state = await self.status(batch_id)
            if state is None or state in TERMINAL:
                return False
            fresh = await self.store.put_if_absent(_started(batch_id), item.custom_id, {"line": item.line})
            if fresh and (state in STOPPING or (await self.status(batch_id)) in STOPPING | TERMINAL):
                skipped, counts = True, False
        doc = {"line": item.line, "status": 0 if skipped else status, "request_id": request_id,
               "body": {} if skipped else body, "skipped": skipped}
        mark = (_started(batch_id), item.custom_id)  # gone once the batch has ended: nothing is written then
        if not await self.store.put_if_absent(_results(batch_id), item.custom_id, doc, given=mark):
            return False
        if skipped:
            await self.store.put_if_absent(_skipped(batch_id), item.custom_id, {}, given=mark)
        elif not 200 <= status < 300:
            await self.store.put_if_absent(_failed(batch_id), item.custom_id, {}, given=mark)
        return counts

    async def skip(self, batch_id: str, custom_ids: Collection[str]) -> None:
        """Queue entries of a stopping batch that a worker took: an item never begun needs nothing (no record);
        one begun by a worker that stopped (its entry re-claimed) is recorded skipped. Then the batch ends if
        it can. Reads no input file, and per entry only while some begun item lacks its result."""
        if await self.store.count(_results(batch_id)) < await self.store.count(_started(batch_id)):
            for custom_id in custom_ids:
                mark = await self.store.get(_started(batch_id), custom_id)
                if mark is not None:
                    await self.record(batch_id, BatchItem(custom_id, {}, int(mark.get("line", 0))), 0, {}, "",
                                      skipped=True, begun=True)
        await self.maybe_finalize(batch_id)

    async def has_result(self, batch_id: str, custom_id: str) -> bool:
        return await self.store.get(_results(batch_id), custom_id) is not None

    async def maybe_finalize(self, batch_id: str) -> bool:
        """End the batch (its output and error files, its status) once every item has a result, or, when it
        is stopping (cancelling or expiring), once every item begun has one: calls in flight finish and
        count (a reader past the window, ``get_batch``, does not wait: ``end_overdue``). An overdue cancel
        is swept."""
        batch = await self._batch(batch_id)
        if batch["status"] in TERMINAL:
            return False
        if self._overdue_cancel(batch):
            return await self.end_overdue(batch_id)
        total = int(batch["request_counts"]["total"])
        stopping = batch["status"] == "cancelling" or self._expiring(batch)
        # Cheap checks before reading every result; the results are counted before the marks (module docstring).
        done = await self.store.count(_results(batch_id))
        if done < total and not (stopping and done >= await self.store.count(_started(batch_id))):
            return False
        results = await self.store.items(_results(batch_id))
        if len(results) < done:  # dropped meanwhile: another finalizer has ended it
            return False
        return await self._finish(batch_id, results)

    async def _finish(self, batch_id: str, results: dict[str, Any], failure: dict[str, Any] | None = None) -> bool:
        """End the batch with ``results`` (read once it could end): its files, its status, then its per-item
        records dropped. The batch is read again after ``results``: if no other finalizer had ended it by
        then, none had dropped its records before they were read, so ``results`` is whole."""
        batch = await self._batch(batch_id)
        if batch["status"] in TERMINAL:
            return False
        total = int(batch["request_counts"]["total"])
        now = await self._write_results(batch_id, batch, results)
        if failure is not None:
            batch["status"], batch["failed_at"], batch["errors"] = "failed", now, failure
        elif batch["status"] == "cancelling":
            batch["status"], batch["cancelled_at"] = "cancelled", now
        elif len(results) < total or any(r.get("skipped") for r in results.values()):  # skipped: expired
            batch["status"], batch["expired_at"] = "expired", now
        else:
            batch["status"], batch["completed_at"] = "completed", now
        await self.store.put(BATCHES, batch_id, batch)
        await self._drop(batch_id)
        if total >= BIG_BATCH:
            await trim_soon()
        return True

    async def _drop(self, batch_id: str) -> None:
        for namespace in PER_ITEM:
            await self.store.drop(namespace(batch_id))

    async def _write_results(self, batch_id: str, batch: dict[str, Any], results: dict[str, Any]) -> int:
        """The output and error files of the recorded results (in input order) and the counts, on ``batch``;
        deterministic, so two workers finalizing at once write the same files. Returns the time."""
        ordered = sorted(results.items(), key=lambda kv: int(kv[1]["line"]))
        ok, bad = [], []
        for custom_id, r in ordered:
            if r.get("skipped"):
                continue
            if 200 <= int(r["status"]) < 300:
                ok.append(output_line(custom_id, r["request_id"], r["status"], r["body"]))
            else:
                error = r["body"].get("error") if isinstance(r["body"].get("error"), dict) else {}
                bad.append(output_line(custom_id, r["request_id"], r["status"], r["body"],
                                       {"code": error.get("code") or error.get("type"),
                                        "message": error.get("message")}))
        now = int(time.time())
        batch["finalizing_at"] = batch["finalizing_at"] or now
        if ok:
            batch["output_file_id"] = (await self._result_file(f"file-{batch_id}-output", ok))["id"]
        if bad:
            batch["error_file_id"] = (await self._result_file(f"file-{batch_id}-errors", bad))["id"]
        batch["request_counts"] = {"total": int(batch["request_counts"]["total"]), "completed": len(ok),
                                   "failed": len(bad)}
        return now

    async def fail_batch(self, batch_id: str, code: str, message: str) -> bool:
        """End a batch that cannot run (its input file was deleted or is unreadable) as ``failed``, with the
        reason in ``errors`` (OpenAI's shape) and the results it already has in its output and error files,
        so nothing done is lost. A batch already ended, or stopping (it ends cancelled or expired without its
        input), is left as it is. True when this call ended it."""
        batch = await self.store.get(BATCHES, batch_id)
        if batch is None or batch["status"] != "in_progress" or self._expiring(batch):
            return False
        results = await self.store.items(_results(batch_id))
        errors = {"object": "list", "data": [{"code": code, "message": message, "param": None, "line": None}]}
        return await self._finish(batch_id, results, failure=errors)

    async def _result_file(self, file_id: str, lines: list[dict[str, Any]]) -> dict[str, Any]:
        content = b"".join(orjson.dumps(x) + b"\n" for x in lines)
        return await self.create_file(f"{file_id}.jsonl", "batch_output", content, file_id=file_id)

    async def recover(self) -> int:
        """Re-enqueue batches accepted but not fully enqueued (a crash mid-accept); finalize finished ones."""
        n = 0
        for batch in (await self.store.items(BATCHES)).values():
            if batch["status"] in TERMINAL:
                continue
            if not batch.get("enqueued", True):
                results = await self.store.items(_results(batch["id"]))
                todo = [i.custom_id for i in await self.items_of(batch) if i.custom_id not in results]
                await self.queue.push(batch["id"], todo)
                batch["enqueued"] = True
                await self.store.put(BATCHES, batch["id"], batch)
                n += 1
            await self.maybe_finalize(batch["id"])
        return n
