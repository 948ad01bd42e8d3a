"""What a batch keeps in the state store, and what a cancel writes (issue 13, item 5: memory that comes back).

A cancel writes one record (the batch's status), whatever the batch's size: the items nobody began are not
run, and the worker acknowledges their queue entries without a record each and without reading the input.
Once a batch has ended, the store holds nothing per item (its results are in its files, its counts in its
record). Before: a cancelled batch wrote two records per item (a skipped result and a skip mark), kept
them for good, and a cancelled batch whose input file was deleted ended ``failed``. On the in-memory
store and on a real Redis; a real ``BatchWorker`` with a stand-in ``execute`` (no model).
RSS numbers are in ``bench/big_batch.py``'s results, not here.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from redis_server import RedisServer, redis_factory_fixture

from coe.batch.jobs import BatchJobs
from coe.batch.lines import CHAT_URL, BatchItem
from coe.batch.queue import MemoryQueue, RedisStreamQueue, WorkQueue
from coe.batch.stages import WaveRunner
from coe.batch.worker import BatchWorker
from coe.pipeline.state import ChatCaller
from coe.store.base import StateStore
from coe.store.memory import MemoryStore
from coe.store.redis import RedisStore

redis_factory = redis_factory_fixture()

PER_ITEM = ("batch-started", "batch-results", "batch-failed", "batch-skipped")
OK: dict[str, Any] = {"object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant",
                                                                                        "content": "ok"}}]}
BAD: dict[str, Any] = {"error": {"message": "too long", "type": "invalid_request_error", "code": "context_length"}}


class Counting(StateStore):
    """A store that counts the documents written, by namespace family (``batch-results.<id>`` ->
    ``batch-results``)."""

    def __init__(self, inner: StateStore) -> None:
        self.inner = inner
        self.durable = inner.durable  # type: ignore[misc]
        self.writes: Counter[str] = Counter()

    async def get(self, namespace: str, key: str) -> dict[str, Any] | None:
        return await self.inner.get(namespace, key)

    async def put(self, namespace: str, key: str, doc: dict[str, Any]) -> None:
        self.writes[namespace.split(".")[0]] += 1
        await self.inner.put(namespace, key, doc)

    async def put_if_absent(self, namespace: str, key: str, doc: dict[str, Any], *,
                            given: tuple[str, str] | None = None) -> bool:
        written = await self.inner.put_if_absent(namespace, key, doc, given=given)
        self.writes[namespace.split(".")[0]] += written
        return written

    async def delete(self, namespace: str, key: str) -> bool:
        return await self.inner.delete(namespace, key)

    async def drop(self, namespace: str) -> bool:
        return await self.inner.drop(namespace)

    async def items(self, namespace: str) -> dict[str, dict[str, Any]]:
        return await self.inner.items(namespace)

    async def count(self, namespace: str) -> int:
        return await self.inner.count(namespace)

    async def add_counters(self, namespace: str, counters: Any, *, now: float | None = None) -> Any:
        return await self.inner.add_counters(namespace, counters, now=now)

    async def ping(self) -> None:
        await self.inner.ping()

    async def close(self) -> None:
        await self.inner.close()


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def jobs(request: pytest.FixtureRequest) -> AsyncIterator[BatchJobs]:
    queue: WorkQueue
    if request.param == "memory":
        store: StateStore = MemoryStore()
        queue = MemoryQueue()
    else:
        server: RedisServer = request.getfixturevalue("redis_factory")()
        prefix = f"t{uuid.uuid4().hex[:12]}"
        store, queue = RedisStore.from_url(server.url, prefix=prefix), RedisStreamQueue.from_url(server.url, prefix)
    made = BatchJobs(Counting(store), queue)
    yield made
    await queue.close()
    await store.close()


def lines(n: int, tag: str) -> bytes:
    rows = [{"custom_id": f"{tag}-{i}", "method": "POST", "url": CHAT_URL,
             "body": {"model": "m", "messages": [{"role": "user", "content": str(i)}]}} for i in range(n)]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


async def new_batch(jobs: BatchJobs, n: int, tag: str) -> tuple[str, str]:
    meta = await jobs.create_file(f"{tag}.jsonl", "batch", lines(n, tag))
    batch = await jobs.create_batch(meta["id"], CHAT_URL, "24h", None, {"m"}, None)
    return meta["id"], batch["id"]


async def queued(queue: WorkQueue) -> int:
    """Entries not yet acknowledged."""
    if isinstance(queue, MemoryQueue):
        return queue._ready.qsize() + len(queue._held)
    assert isinstance(queue, RedisStreamQueue)
    n: int = await queue._client.xlen(queue._key)
    return n


async def per_item_records(jobs: BatchJobs, batch_id: str) -> dict[str, int]:
    return {family: await jobs.store.count(f"{family}.{batch_id}") for family in PER_ITEM}


async def output_ids(jobs: BatchJobs, file_id: str | None) -> list[str]:
    if file_id is None:
        return []
    return [json.loads(x)["custom_id"] for x in (await jobs.file_text(file_id)).splitlines()]


Execute = Callable[[BatchItem, str, ChatCaller], Awaitable[tuple[int, dict[str, Any]]]]


class Dispatcher:
    async def chat(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the stand-in execute sends no expert call")


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


async def with_worker(jobs: BatchJobs, execute: Execute, body: Callable[[], Awaitable[None]], *,
                      window: int = 1000) -> None:
    stop = asyncio.Event()
    worker = BatchWorker(jobs, execute, WaveRunner(Dispatcher()), window=window, block_s=0.05, watch_s=0.05)
    task = asyncio.create_task(worker.run(stop))
    try:
        await body()
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert worker.health.errors == 0, worker.health.to_json()


@pytest.mark.parametrize("delete_input", [False, True], ids=["input-kept", "input-deleted"])
async def test_a_cancel_writes_one_record_and_the_worker_none_per_item(jobs: BatchJobs, delete_input: bool
                                                                        ) -> None:
    """3000 items cancelled before any ran (then the input file deleted, as bench/big_batch.py does): the
    batch is ``cancelled`` at once with no item counted, and working off its 3000 queue entries writes
    nothing per item, runs nothing, and does not turn it ``failed`` for a missing input. (Before: 6000
    records written and kept with the input kept; ``failed`` with it deleted.)"""
    assert isinstance(jobs.store, Counting)
    file_id, bid = await new_batch(jobs, 3000, "c")
    jobs.store.writes.clear()
    cancelled = await jobs.cancel_batch(bid)
    assert cancelled["status"] == "cancelled" and cancelled["cancelled_at"] is not None
    assert cancelled["request_counts"] == {"total": 3000, "completed": 0, "failed": 0}
    assert jobs.store.writes == Counter({"batches": 2})  # cancelling, then cancelled
    if delete_input:
        await jobs.delete_file(file_id)
    ran: list[str] = []

    async def execute(item: BatchItem, request_id: str, caller: ChatCaller) -> tuple[int, dict[str, Any]]:
        ran.append(item.custom_id)
        return 200, OK

    async def drained() -> None:
        await until(lambda: _zero(queued(jobs.queue)), "the worker acknowledged every entry")

    await with_worker(jobs, execute, drained)
    assert ran == []
    assert jobs.store.writes == Counter({"batches": 2}), "records written while skipping the cancelled items"
    assert await per_item_records(jobs, bid) == dict.fromkeys(PER_ITEM, 0)
    after = await jobs.get_batch(bid)
    assert after["status"] == "cancelled" and after["errors"] is None
    assert after["request_counts"] == {"total": 3000, "completed": 0, "failed": 0}
    assert after["output_file_id"] is None and after["error_file_id"] is None


async def _zero(n: Awaitable[int]) -> bool:
    return await n == 0


async def test_a_cancel_waits_for_the_items_running_and_counts_them(jobs: BatchJobs) -> None:
    """The worker took a window of 8 and began them (calls in flight); a cancel then leaves the batch
    ``cancelling`` until those 8 have their results, which are counted and output; the other 32 never run
    and get no record. Once it ended, nothing per item is left. (A call that fails after the cancel counts
    as skipped, not failed: the worker's rule for calls a stopped batch refused.)"""
    _, bid = await new_batch(jobs, 40, "w")
    release = asyncio.Event()
    ran: list[str] = []

    async def execute(item: BatchItem, request_id: str, caller: ChatCaller) -> tuple[int, dict[str, Any]]:
        ran.append(item.custom_id)
        await release.wait()
        return 200, OK

    async def cancel_mid_window() -> None:
        await until(lambda: _true(len(ran) == 8), "the worker began its first window")
        cancelling = await jobs.cancel_batch(bid)
        assert cancelling["status"] == "cancelling"
        assert (await per_item_records(jobs, bid))["batch-started"] == 8
        release.set()
        await until(lambda: _status_is(jobs, bid, "cancelled"), "the cancel ended once the 8 finished")
        await until(lambda: _zero(queued(jobs.queue)), "the worker acknowledged every entry")

    await with_worker(jobs, execute, cancel_mid_window, window=8)
    done = await jobs.get_batch(bid)
    assert sorted(ran) == sorted(f"w-{i}" for i in range(8))
    assert done["request_counts"] == {"total": 40, "completed": 8, "failed": 0}
    assert await output_ids(jobs, done["output_file_id"]) == [f"w-{i}" for i in range(8)]
    assert done["error_file_id"] is None
    assert await per_item_records(jobs, bid) == dict.fromkeys(PER_ITEM, 0)


async def _true(value: bool) -> bool:
    return value


async def _status_is(jobs: BatchJobs, batch_id: str, status: str) -> bool:
    return bool((await jobs.get_batch(batch_id))["status"] == status)


async def test_a_finished_batch_keeps_nothing_per_item(jobs: BatchJobs) -> None:
    """Every item once in the output or error file, in input order; the store then holds the batch record
    and the files, nothing per item; a result recorded after the end counts nothing and is not kept."""
    _, bid = await new_batch(jobs, 60, "f")

    async def execute(item: BatchItem, request_id: str, caller: ChatCaller) -> tuple[int, dict[str, Any]]:
        return (400, BAD) if int(item.custom_id.split("-")[1]) % 7 == 0 else (200, OK)

    await with_worker(jobs, execute, lambda: until(lambda: _status_is(jobs, bid, "completed"), "completed"),
                      window=16)
    done = await jobs.get_batch(bid)
    bad = [f"f-{i}" for i in range(60) if i % 7 == 0]
    assert done["request_counts"] == {"total": 60, "completed": 60 - len(bad), "failed": len(bad)}
    assert await output_ids(jobs, done["output_file_id"]) == [f"f-{i}" for i in range(60) if i % 7]
    assert await output_ids(jobs, done["error_file_id"]) == bad
    assert await per_item_records(jobs, bid) == dict.fromkeys(PER_ITEM, 0)
    item = BatchItem("f-1", {"model": "m"}, 2)
    assert not await jobs.record(bid, item, 200, OK, "late")
    assert await per_item_records(jobs, bid) == dict.fromkeys(PER_ITEM, 0)


async def test_an_item_begun_by_a_worker_that_stopped_is_skipped_when_its_entry_comes_back(jobs: BatchJobs
                                                                                          ) -> None:
    """A worker began an item and died; the batch is cancelled meanwhile. The cancel waits for that item;
    the worker that re-claims its entry records it skipped, and the batch ends ``cancelled``."""
    _, bid = await new_batch(jobs, 5, "d")
    assert await jobs.begin(bid, BatchItem("d-2", {"model": "m"}, 3)) == "in_progress"
    assert (await jobs.cancel_batch(bid))["status"] == "cancelling"
    await jobs.skip(bid, ["d-0", "d-1"])  # entries never begun: nothing to wait for, still cancelling
    assert (await jobs.get_batch(bid))["status"] == "cancelling"
    await jobs.skip(bid, ["d-2"])
    done = await jobs.get_batch(bid)
    assert done["status"] == "cancelled" and done["request_counts"] == {"total": 5, "completed": 0, "failed": 0}
    assert await per_item_records(jobs, bid) == dict.fromkeys(PER_ITEM, 0)
