"""Files and batch jobs on the state store, in OpenAI's shapes.

Namespaces: ``files`` (metadata), ``file-data`` (content), ``batches``, and per
batch ``batch-results.<id>`` (one record per item, FIRST WRITE WINS, so an item
that ran twice is counted and output once) with ``batch-failed.<id>`` and
``batch-skipped.<id>`` beside it for the live counts. A batch is finalized (its
output and error files written, status ``completed``, ``cancelled`` or
``expired``) once every item has a record; finalizing is deterministic and
idempotent, so any worker may do it, and doing it twice writes the same files.

Expiry (OpenAI's): an ``in_progress`` batch past ``expires_at`` is ``expiring``.
That status is derived from the clock, never written, so no read-modify-write
of the batch record can race another one over it. Workers skip an expiring
batch's items as they do a cancelled one's; reading the batch (``get_batch``,
so ``GET /v1/batches/{id}`` with no worker running) records every item still
without a result as skipped (first-wins, so any number of readers and workers
may do it at once) and finalizes it ``expired``, keeping the results it has.
As for ``cancelled``, skipped items count as neither completed nor failed.

Cancel: workers skip a cancelling batch's items as they come to them. So that a
cancel also ends when no worker comes (none running, or all busy with other
windows), reading a batch that has been cancelling for ``cancel_grace_s`` sweeps
it the same way and ends it ``cancelled``. A call still running after the grace
(longer than ``claim_idle_s`` by default) then loses its result to the skip.

Acceptance order, so that a crash never loses an accepted batch: the batch
record is written (``enqueued: false``), then its queue entries, then
``enqueued: true``, then the client hears 200. ``recover`` re-enqueues any batch
left at ``enqueued: false``.
"""

from __future__ import annotations

import asyncio
import base64
import math
import time
import uuid
from collections.abc import Collection
from typing import Any

import orjson

from coe.batch.lines import CHAT_URL, BatchItem, BodyCheck, output_line, parse_batch
from coe.batch.queue import WorkQueue
from coe.errors import Conflict, InvalidRequest, NotFound, PayloadTooLarge, clip
from coe.store.base import StateStore

FILES, DATA, BATCHES = "files", "file-data", "batches"
OFF_LOOP = 1024 * 1024
"""Files above this many bytes (or characters) are decoded and parsed in a worker thread."""

TERMINAL = frozenset({"completed", "failed", "cancelled", "expired"})
WINDOW_S = 24 * 3600
SWEEP_CONCURRENCY = 64


def _results(bid: str) -> str:
    return f"batch-results.{bid}"


def _failed(bid: str) -> str:
    return f"batch-failed.{bid}"


def _skipped(bid: str) -> str:
    return f"batch-skipped.{bid}"


class BatchJobs:
    def __init__(self, store: StateStore, queue: WorkQueue, *, max_file_bytes: int = 200 * 1024 * 1024,
                 cancel_grace_s: float = 30.0) -> None:
        self.store = store
        self.queue = queue
        self.max_file_bytes = max_file_bytes
        self.cancel_grace_s = cancel_grace_s

    # -- files -------------------------------------------------------------------------

    async def create_file(self, filename: str, purpose: str, content: bytes, *, file_id: str | None = None
                          ) -> dict[str, Any]:
        if len(content) > self.max_file_bytes:
            raise PayloadTooLarge(f"the file has {len(content)} bytes; the limit is {self.max_file_bytes} "
                                  "(store.max_file_bytes)", param="file")
        fid = file_id or f"file-{uuid.uuid4().hex}"
        meta: dict[str, Any] = {"id": fid, "object": "file", "bytes": len(content),
                "created_at": int(time.time()), "filename": filename, "purpose": purpose, "status": "processed"}
        try:
            text = content.decode("utf-8") if len(content) < OFF_LOOP else await asyncio.to_thread(content.decode)
            data: dict[str, Any] = {"text": text}
        except UnicodeDecodeError as exc:  # kept as sent (as OpenAI does); a batch made from it is refused
            data = {"b64": base64.b64encode(content).decode(), "not_utf8": f"{exc.reason} at byte {exc.start}"}
        await self.store.put(DATA, fid, data)
        await self.store.put(FILES, fid, meta)
        return meta

    async def get_file(self, file_id: str) -> dict[str, Any]:
        meta = await self.store.get(FILES, file_id)
        if meta is None:
            raise NotFound(f"no file with id {clip(file_id)}", param="file_id", code="file_not_found")
        return meta

    async def file_text(self, file_id: str) -> str:
        """The file as text; a file that is not UTF-8 cannot be batch lines (400 naming why)."""
        await self.get_file(file_id)
        data = await self.store.get(DATA, file_id) or {}
        if "not_utf8" in data:
            raise InvalidRequest(f"file {clip(file_id)} is not UTF-8 text ({data['not_utf8']}), so not batch lines",
                                 param="input_file_id")
        return str(data.get("text", ""))

    async def file_bytes(self, file_id: str) -> bytes:
        """The file's content exactly as uploaded."""
        await self.get_file(file_id)
        data = await self.store.get(DATA, file_id) or {}
        if "b64" in data:
            return base64.b64decode(data["b64"])
        return str(data.get("text", "")).encode()

    async def delete_file(self, file_id: str) -> dict[str, Any]:
        await self.get_file(file_id)
        await self.store.delete(FILES, file_id)
        await self.store.delete(DATA, file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    async def list_files(self, purpose: str | None = None) -> list[dict[str, Any]]:
        files = [f for f in (await self.store.items(FILES)).values() if purpose in (None, f.get("purpose"))]
        return sorted(files, key=lambda f: (-int(f["created_at"]), str(f["id"])))

    # -- batches -----------------------------------------------------------------------

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
        # A big file is parsed and checked in a thread: the event loop keeps serving (200 MiB took seconds).
        items = (parse_batch(text, f"file {input_file_id}", models, check) if len(text) < OFF_LOOP else
                 await asyncio.to_thread(parse_batch, text, f"file {input_file_id}", models, check))
        clock = time.time()
        now = int(clock)
        batch: dict[str, Any] = {
            "id": f"batch_{uuid.uuid4().hex}", "object": "batch", "endpoint": endpoint, "errors": None,
            "input_file_id": input_file_id, "completion_window": completion_window, "status": "in_progress",
            "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": now,
            "expires_at": math.ceil(clock + (WINDOW_S if expiry_s is None else expiry_s)),
            "finalizing_at": None, "completed_at": None, "failed_at": None,
            "expired_at": None, "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": len(items), "completed": 0, "failed": 0},
            "metadata": metadata or None, "enqueued": False,
        }
        await self.store.put(BATCHES, batch["id"], batch)
        await self.queue.push(batch["id"], [i.custom_id for i in items])
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
        """Cancelling for longer than the grace: no worker skipped its items (see the module docstring)."""
        return (batch["status"] == "cancelling"
                and time.time() > float(batch["cancelling_at"] or 0) + self.cancel_grace_s)

    async def end_overdue(self, batch_id: str) -> bool:
        """End an expiring batch (or an overdue cancel) now: skip every item without a result, then
        finalize it ``expired`` (``cancelled``).

        Safe to run from any number of readers and workers at once: skips are
        first-wins records, and finalizing is deterministic.
        """
        batch = await self._batch(batch_id)
        if not (self._expiring(batch) or self._overdue_cancel(batch)):
            return False
        done = await self.store.items(_results(batch_id))
        try:
            items = await self.items_of(batch)
        except NotFound:  # its input file was deleted: it stays expiring, as it would stay in progress
            return False
        todo = [i for i in items if i.custom_id not in done]
        for start in range(0, len(todo), SWEEP_CONCURRENCY):
            await asyncio.gather(*(self.record(batch_id, item, 0, {}, "", skipped=True)
                                   for item in todo[start:start + SWEEP_CONCURRENCY]))
        return await self.maybe_finalize(batch_id)

    async def get_batch(self, batch_id: str) -> dict[str, Any]:
        """The batch as OpenAI shows it, with live request counts; an expiring batch (or an overdue
        cancel) is ended first."""
        batch = await self._batch(batch_id)
        if self._expiring(batch) or self._overdue_cancel(batch):
            await self.end_overdue(batch_id)
            batch = await self._batch(batch_id)
        if batch["status"] not in TERMINAL:
            if self._expiring(batch):  # its input file is gone, so there was nothing to sweep
                batch["status"] = "expiring"
            done = await self.store.count(_results(batch_id))
            failed = await self.store.count(_failed(batch_id))
            skipped = await self.store.count(_skipped(batch_id))
            batch["request_counts"] = {"total": batch["request_counts"]["total"],
                                       "completed": done - failed - skipped, "failed": failed}
        batch.pop("enqueued", None)
        return batch

    async def list_batches(self, limit: int = 20, after: str | None = None) -> tuple[list[dict[str, Any]], bool]:
        ids = sorted((await self.store.items(BATCHES)).values(), key=lambda b: (-int(b["created_at"]), b["id"]))
        if after is not None:
            keys = [b["id"] for b in ids]
            ids = ids[keys.index(after) + 1:] if after in keys else []
        page = ids[:limit]
        return [await self.get_batch(b["id"]) for b in page], len(ids) > limit

    async def cancel_batch(self, batch_id: str) -> dict[str, Any]:
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

    async def record(self, batch_id: str, item: BatchItem, status: int, body: dict[str, Any], request_id: str,
                     *, skipped: bool = False) -> bool:
        """Store an item's result unless it already has one; True when this call's result counts."""
        doc = {"line": item.line, "status": status, "request_id": request_id, "body": body, "skipped": skipped}
        if not await self.store.put_if_absent(_results(batch_id), item.custom_id, doc):
            return False
        if skipped:
            await self.store.put(_skipped(batch_id), item.custom_id, {})
        elif not 200 <= status < 300:
            await self.store.put(_failed(batch_id), item.custom_id, {})
        return True

    async def has_result(self, batch_id: str, custom_id: str) -> bool:
        return await self.store.get(_results(batch_id), custom_id) is not None

    async def maybe_finalize(self, batch_id: str) -> bool:
        """Write the output and error files and end the batch once every item has a record."""
        batch = await self._batch(batch_id)
        if batch["status"] in TERMINAL:
            return False
        total = int(batch["request_counts"]["total"])
        if await self.store.count(_results(batch_id)) < total:  # cheap check before reading every result
            return False
        results = await self.store.items(_results(batch_id))
        cancelling = batch["status"] == "cancelling"  # workers skip its remaining items as they come
        if len(results) < total:
            return False
        # Items are skipped only for a cancel or for expiry, so skips without a cancel mean it expired.
        expired = not cancelling and any(r.get("skipped") for r in results.values())
        now = await self._write_results(batch_id, batch, results)
        if cancelling:
            batch["status"], batch["cancelled_at"] = "cancelled", now
        elif expired:
            batch["status"], batch["expired_at"] = "expired", now
        else:
            batch["status"], batch["completed_at"] = "completed", now
        await self.store.put(BATCHES, batch_id, batch)
        return True

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
        so nothing done is lost. Idempotent: a batch already ended is left as it is. True when this call
        ended it."""
        batch = await self.store.get(BATCHES, batch_id)
        if batch is None or batch["status"] in TERMINAL:
            return False
        results = await self.store.items(_results(batch_id))
        now = await self._write_results(batch_id, batch, results)
        batch["status"], batch["failed_at"] = "failed", now
        batch["errors"] = {"object": "list", "data": [{"code": code, "message": message, "param": None,
                                                       "line": None}]}
        await self.store.put(BATCHES, batch_id, batch)
        return True

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
