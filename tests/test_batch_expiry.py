"""Batch expiry (OpenAI's semantics): past ``expires_at`` an unfinished batch ends ``expired``; items
not yet run are not run, results already recorded are kept in the output, and several readers and
workers ending it at once agree. On the in-memory store and a real Redis; end to end through the
official ``openai`` SDK against coe on the shared real vLLM (``store.batch_expiry_s`` shortens the
24 h window)."""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import openai
import pytest
from apphelpers import running_coe, tiny_registry, write_registry
from redis_server import RedisServer, redis_factory_fixture

from coe.batch.jobs import BatchJobs
from coe.batch.lines import CHAT_URL, BatchItem
from coe.batch.queue import MemoryQueue, RedisStreamQueue
from coe.errors import Conflict
from coe.store.memory import MemoryStore
from coe.store.redis import RedisStore
from coe.testing.recording import RecordingTransport

redis_factory = redis_factory_fixture()

WINDOW_S = 3.0
"""Long enough that a batch is surely still in progress right after creation on a loaded machine."""
OK_BODY: dict[str, Any] = {"object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant",
                                                                                             "content": "hi"}}]}
BAD_BODY: dict[str, Any] = {"error": {"message": "too long", "type": "invalid_request_error",
                                      "code": "context_length_exceeded"}}

MakeJobs = Callable[[], BatchJobs]


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def make_jobs(request: pytest.FixtureRequest) -> AsyncIterator[MakeJobs]:
    """``make()`` -> a BatchJobs on the store under test; on Redis each has its own connections, as
    separate workers and API replicas do."""
    made: list[BatchJobs] = []
    if request.param == "memory":
        store, queue = MemoryStore(), MemoryQueue()

        def make() -> BatchJobs:
            made.append(BatchJobs(store, queue))
            return made[-1]
    else:
        server: RedisServer = request.getfixturevalue("redis_factory")()
        prefix = f"t{uuid.uuid4().hex[:12]}"

        def make() -> BatchJobs:
            made.append(BatchJobs(RedisStore.from_url(server.url, prefix=prefix),
                                  RedisStreamQueue.from_url(server.url, prefix)))
            return made[-1]

    yield make
    for jobs in made:
        await jobs.queue.close()
        await jobs.store.close()


def lines(n: int, tag: str) -> bytes:
    rows = [{"custom_id": f"{tag}-{i}", "method": "POST", "url": CHAT_URL,
             "body": {"model": "m", "messages": [{"role": "user", "content": str(i)}]}} for i in range(n)]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


async def new_batch(jobs: BatchJobs, n: int, tag: str, expiry_s: float = WINDOW_S) -> tuple[str, list[BatchItem]]:
    meta = await jobs.create_file(f"{tag}.jsonl", "batch", lines(n, tag))
    batch = await jobs.create_batch(meta["id"], CHAT_URL, "24h", None, {"m"}, None, expiry_s=expiry_s)
    return batch["id"], await jobs.items_of(batch)


async def past(expires_at: int) -> None:
    """Sleep until the clock is past ``expires_at`` (whole seconds, as OpenAI has it)."""
    await asyncio.sleep(max(0.0, expires_at - time.time()) + 0.05)


async def output_ids(jobs: BatchJobs, file_id: str | None) -> list[str]:
    if file_id is None:
        return []
    return [json.loads(x)["custom_id"] for x in (await jobs.file_text(file_id)).splitlines()]


async def test_expired_batch_keeps_what_ran_and_skips_the_rest(make_jobs: MakeJobs) -> None:
    jobs = make_jobs()
    bid, items = await new_batch(jobs, 6, "e")
    finished_id, finished_items = await new_batch(jobs, 2, "f")
    for item in finished_items:  # this one completes inside its window
        assert await jobs.record(finished_id, item, 200, OK_BODY, "r")
    assert await jobs.maybe_finalize(finished_id)
    assert await jobs.record(bid, items[0], 200, OK_BODY, "r0")
    assert await jobs.record(bid, items[1], 200, OK_BODY, "r1")
    assert await jobs.record(bid, items[2], 400, BAD_BODY, "r2")
    before = await jobs.get_batch(bid)
    assert before["status"] == "in_progress" and before["expired_at"] is None
    assert before["expires_at"] - before["created_at"] in (3, 4)
    assert await jobs.status(bid) == "in_progress"

    await past(before["expires_at"])
    assert await jobs.status(bid) == "expiring"  # what workers see: derived from the clock, nothing written
    assert (await jobs.store.get("batches", bid) or {})["status"] == "in_progress"

    done = await jobs.get_batch(bid)  # the lazy check on read ends it, with no worker running
    assert done["status"] == "expired" and done["expired_at"] >= done["expires_at"]
    assert done["completed_at"] is None and done["cancelled_at"] is None
    assert done["request_counts"] == {"total": 6, "completed": 2, "failed": 1}  # 3 unrun: in neither count
    assert await output_ids(jobs, done["output_file_id"]) == ["e-0", "e-1"]
    assert await output_ids(jobs, done["error_file_id"]) == ["e-2"]

    assert not await jobs.record(bid, items[4], 200, OK_BODY, "late")  # a worker finishing late counts nothing
    assert not await jobs.maybe_finalize(bid)
    again = await jobs.get_batch(bid)
    assert again["status"] == "expired" and again["request_counts"] == done["request_counts"]
    assert await output_ids(jobs, again["output_file_id"]) == ["e-0", "e-1"]
    assert await jobs.status(bid) == "expired"
    with pytest.raises(Conflict):
        await jobs.cancel_batch(bid)

    finished = await jobs.get_batch(finished_id)  # past its window too, but it had already completed
    assert finished["status"] == "completed" and finished["expired_at"] is None


async def test_expiring_batch_cannot_be_cancelled_it_ends_expired(make_jobs: MakeJobs) -> None:
    jobs = make_jobs()
    bid, items = await new_batch(jobs, 3, "c", expiry_s=1.0)
    await jobs.record(bid, items[0], 200, OK_BODY, "r0")
    await past((await jobs.get_batch(bid))["expires_at"])
    with pytest.raises(Conflict, match="expired"):
        await jobs.cancel_batch(bid)
    assert (await jobs.get_batch(bid))["request_counts"] == {"total": 3, "completed": 1, "failed": 0}


async def test_a_cancel_no_worker_takes_up_ends_on_a_read_after_the_grace(make_jobs: MakeJobs) -> None:
    """A worker began an item and stopped (or is stuck): the cancelling batch waits for it within
    ``cancel_grace_s``, then the first read past the grace sweeps it (by any number of readers at once)
    and ends it ``cancelled``, keeping what ran. Items nobody began need nothing."""
    jobs = make_jobs()
    jobs.cancel_grace_s = 1.0
    bid, items = await new_batch(jobs, 5, "g", expiry_s=3600)
    assert await jobs.record(bid, items[0], 200, OK_BODY, "r0")  # ran before the cancel
    assert await jobs.begin(bid, items[1]) == "in_progress"  # begun by a worker that then stopped
    assert (await jobs.cancel_batch(bid))["status"] == "cancelling"
    assert (await jobs.get_batch(bid))["status"] == "cancelling"  # within the grace its worker may still come
    await asyncio.sleep(1.2)
    readers = [make_jobs() for _ in range(3)]
    for reader in readers:
        reader.cancel_grace_s = 1.0
    ended = await asyncio.gather(*(r.get_batch(bid) for r in readers))
    for batch in ended:
        assert batch["status"] == "cancelled" and batch["cancelled_at"] is not None, batch
        assert batch["request_counts"] == {"total": 5, "completed": 1, "failed": 0}
        assert batch["output_file_id"] == ended[0]["output_file_id"]
    assert await output_ids(jobs, ended[0]["output_file_id"]) == ["g-0"]
    assert not await jobs.record(bid, items[1], 200, OK_BODY, "late")  # its worker coming late counts nothing
    assert await jobs.status(bid) == "cancelled"
    with pytest.raises(Conflict, match="cancelled"):
        await jobs.cancel_batch(bid)


async def test_a_cancel_with_nothing_running_ends_at_once(make_jobs: MakeJobs) -> None:
    jobs = make_jobs()
    bid, items = await new_batch(jobs, 4, "n", expiry_s=3600)
    assert await jobs.record(bid, items[2], 400, BAD_BODY, "r2")
    done = await jobs.cancel_batch(bid)
    assert done["status"] == "cancelled" and done["request_counts"] == {"total": 4, "completed": 0, "failed": 1}
    assert await output_ids(jobs, done["error_file_id"]) == ["n-2"]
    assert not await jobs.record(bid, items[0], 200, OK_BODY, "late")


async def test_expiring_batch_without_its_input_file_still_ends(make_jobs: MakeJobs) -> None:
    """Ending an expired batch needs only what was begun, not its input: it ends ``expired`` all the same."""
    jobs = make_jobs()
    bid, items = await new_batch(jobs, 2, "d", expiry_s=1.0)
    await jobs.record(bid, items[0], 200, OK_BODY, "r0")
    batch = await jobs.get_batch(bid)
    await jobs.delete_file(batch["input_file_id"])
    await past(batch["expires_at"])
    seen = await jobs.get_batch(bid)
    assert seen["status"] == "expired"
    assert seen["request_counts"] == {"total": 2, "completed": 1, "failed": 0}
    assert await output_ids(jobs, seen["output_file_id"]) == ["d-0"]


async def test_readers_and_workers_ending_it_at_once_agree(make_jobs: MakeJobs) -> None:
    """Workers began 14 items before the window ended; four readers sweep while those workers record
    their late results: the output holds exactly the late results whose ``record`` said they counted,
    every item at most once, and once ended the store holds no record per item."""
    readers = [make_jobs() for _ in range(4)]
    bid, items = await new_batch(readers[0], 40, "x")
    late = items[::3]
    for item in late:
        assert await readers[0].begin(bid, item) == "in_progress"
    await past((await readers[0].get_batch(bid))["expires_at"])
    outcomes = await asyncio.gather(
        *(r.get_batch(bid) for r in readers),
        *(readers[k % 4].record(bid, item, 200, OK_BODY, f"r{k}", begun=True) for k, item in enumerate(late)),
        *(r.end_overdue(bid) for r in readers))
    seen, counted = outcomes[:4], outcomes[4:4 + len(late)]
    assert [b["status"] for b in seen] == ["expired"] * 4
    final = await readers[1].get_batch(bid)
    kept = [item.custom_id for item, c in zip(late, counted, strict=True) if c]
    assert final["status"] == "expired"
    assert final["request_counts"] == {"total": 40, "completed": len(kept), "failed": 0}
    assert await output_ids(readers[2], final["output_file_id"]) == kept
    for family in ("batch-started", "batch-results", "batch-failed", "batch-skipped"):
        assert await readers[3].store.count(f"{family}.{bid}") == 0, family


def request_line(custom_id: str, model: str) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "max_tokens": 6, "temperature": 0,
                     "messages": [{"role": "user", "content": f"Say {custom_id}."}]}}


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(x) + "\n" for x in rows).encode()


@pytest.mark.vllm
async def test_worker_stops_running_an_expired_batch(vllm_server: Any, tmp_path: Any) -> None:
    """The embedded worker runs a slow batch (1 s per request, taken 2 at a time) that expires after
    about a second: it ends ``expired`` through the worker alone, and what was not run never reached vLLM.
    A worker checks a batch's status as it starts each item of the entries it took, so the window is small."""
    transport = RecordingTransport()
    transport.delay_s["tiny-lora-1"] = 1.0
    reg = tiny_registry(vllm_server, store={"worker_concurrency": 2, "batch_window": 2, "batch_expiry_s": 1.0})
    config = write_registry(tmp_path / "experts.yaml", reg)
    async with running_coe(config, transport_factory=lambda name: transport) as coe:
        client = coe.client()
        uploaded = await client.files.create(file=("slow.jsonl", jsonl([request_line(f"s-{i}", "tiny-a1")
                                                                          for i in range(12)])), purpose="batch")
        batch = await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                            completion_window="24h")
        assert batch.expires_at is not None and batch.expires_at - batch.created_at in (1, 2)
        jobs = coe.state.jobs
        assert jobs is not None
        deadline = time.monotonic() + 60
        while (await jobs.store.get("batches", batch.id) or {}).get("status") != "expired":  # no GET: the worker
            assert time.monotonic() < deadline, (
                f"the worker did not end the expired batch: {await jobs.store.get('batches', batch.id)}, "
                f"{await jobs.store.count(f'batch-results.{batch.id}')} results, {len(transport.chats())} chats")
            await asyncio.sleep(0.1)
        done = await client.batches.retrieve(batch.id)
        assert done.status == "expired" and done.expired_at is not None and done.completed_at is None
        counts = done.request_counts
        assert counts is not None and counts.total == 12 and counts.failed == 0
        assert 0 < counts.completed < 12
        assert len(transport.chats()) == counts.completed  # unrun items were never sent to the expert
        assert done.output_file_id
        ids = [json.loads(x)["custom_id"] for x in (await client.files.content(done.output_file_id)).text.splitlines()]
        assert len(ids) == len(set(ids)) == counts.completed and set(ids) <= {f"s-{i}" for i in range(12)}
        await asyncio.sleep(1.5)  # nothing more runs afterwards
        assert len(transport.chats()) == counts.completed
        with pytest.raises(openai.ConflictError):
            await client.batches.cancel(batch.id)


@pytest.mark.vllm
@pytest.mark.redis
async def test_get_shows_expiry_with_no_worker_running(vllm_server: Any, redis_factory: Any, tmp_path: Any) -> None:
    redis = redis_factory()
    reg = tiny_registry(vllm_server, store={"redis_url": redis.url, "embedded_worker": False,
                                            "batch_expiry_s": WINDOW_S, "prefix": f"t{random.randrange(10**6)}"})
    config = write_registry(tmp_path / "experts.yaml", reg)
    async with running_coe(config) as coe:
        client = coe.client()
        uploaded = await client.files.create(file=("idle.jsonl", jsonl([request_line(f"i-{i}", "tiny-base")
                                                                          for i in range(3)])), purpose="batch")
        batch = await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                            completion_window="24h")
        assert (await client.batches.retrieve(batch.id)).status == "in_progress"
        assert batch.expires_at is not None
        await past(batch.expires_at)
        done = await client.batches.retrieve(batch.id)
        assert done.status == "expired" and done.expired_at is not None
        assert done.request_counts is not None
        assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (3, 0, 0)
        assert done.output_file_id is None and done.error_file_id is None
        assert batch.id in [b.id for b in (await client.batches.list()).data if b.status == "expired"]
