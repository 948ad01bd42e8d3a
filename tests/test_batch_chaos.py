"""Batch workers under poison input and store outages: real Redis (started, SIGKILLed and restarted by the
tests), real ``coe worker`` processes, the shared real vLLM. Nothing a batch holds and no store outage may
end a worker loop; every batch ends on its own, each ``custom_id`` exactly once.

A longer run of the same trials: ``bench/batch_chaos.py``."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path
from typing import Any

import openai
import pytest
from apphelpers import batch_input, running_coe, tiny_registry, write_registry
from redis_server import redis_factory_fixture
from test_batch_worker import output_ids, registry, start_worker, started

from coe.batch.jobs import BatchJobs
from coe.batch.queue import MemoryQueue
from coe.batch.stages import WaveRunner
from coe.batch.worker import BatchWorker
from coe.runtime import Runtime, body_checker
from coe.store import MemoryStore

redis_factory = redis_factory_fixture()


async def ended(client: openai.AsyncOpenAI, batch_id: str, timeout: float = 180) -> Any:
    """The batch once it is terminal; reads that fail while the store is down are retried."""
    deadline = time.monotonic() + timeout
    last = "never read"
    while time.monotonic() < deadline:
        with contextlib.suppress(openai.APIError):
            batch = await client.batches.retrieve(batch_id)
            last = f"{batch.status} {batch.request_counts}"
            if batch.status in ("completed", "failed", "cancelled", "expired"):
                return batch
        await asyncio.sleep(0.2)
    raise AssertionError(f"batch {batch_id} did not end within {timeout:.0f}s: {last}")


async def poison_and_good(client: openai.AsyncOpenAI, tag: str, n: int) -> tuple[str, str]:
    """A batch whose input file is deleted before any worker reads it, then a good one."""
    poison_file = await client.files.create(file=(f"{tag}-p.jsonl", batch_input(4, f"{tag}p")), purpose="batch")
    poison = await client.batches.create(input_file_id=poison_file.id, endpoint="/v1/chat/completions",
                                         completion_window="24h")
    await client.files.delete(poison_file.id)
    good_file = await client.files.create(file=(f"{tag}-g.jsonl", batch_input(n, f"{tag}g")), purpose="batch")
    good = await client.batches.create(input_file_id=good_file.id, endpoint="/v1/chat/completions",
                                       completion_window="24h")
    return poison.id, good.id


def assert_poison_failed(batch: Any) -> None:
    assert batch.status == "failed", batch
    assert batch.errors is not None and batch.errors.data, batch
    error = batch.errors.data[0]
    assert error.code == "input_file_unreadable" and "could not be read" in (error.message or "")


@pytest.mark.vllm
async def test_deleted_input_fails_its_batch_and_the_worker_goes_on(vllm_server: Any, tmp_path: Path) -> None:
    """The default setup's store and queue (in memory), one worker loop: the poison batch ends failed, the
    good one after it completes, and the loop is still running."""
    config = write_registry(tmp_path / "experts.yaml", tiny_registry(vllm_server))
    async with Runtime(config, batches=False, watch=False) as runtime:
        jobs = BatchJobs(MemoryStore(), MemoryQueue())
        registry = runtime.registry.current
        models = {"coe", *registry.experts}
        check = body_checker(registry.config, registry.experts)

        async def create(content: bytes) -> tuple[str, str]:
            file = await jobs.create_file("in.jsonl", "batch", content)
            batch = await jobs.create_batch(file["id"], "/v1/chat/completions", "24h", None, models, check)
            return file["id"], batch["id"]

        poison_file, poison = await create(batch_input(3, "p"))
        await jobs.delete_file(poison_file)
        _, good = await create(batch_input(4, "g"))
        runner = WaveRunner(runtime.dispatcher, models=runtime.pool, metrics=runtime.metrics, concurrency=2)
        worker = BatchWorker(jobs, runtime.chat.execute, runner, block_s=0.2)
        stop = asyncio.Event()
        loop = asyncio.create_task(worker.run(stop))
        try:
            deadline = time.monotonic() + 120
            while (await jobs.status(good)) != "completed" or (await jobs.status(poison)) != "failed":
                assert not loop.done(), f"the worker loop ended: {loop.exception() if loop.done() else ''}"
                assert time.monotonic() < deadline, (await jobs.get_batch(poison), await jobs.get_batch(good))
                await asyncio.sleep(0.1)
            assert not loop.done() and worker.health.state == "running"
            assert worker.health.poisoned == [poison]
            failed = await jobs.get_batch(poison)
            assert failed["errors"]["data"][0]["code"] == "input_file_unreadable"
            assert poison_file in failed["errors"]["data"][0]["message"]
            done = await jobs.get_batch(good)
            assert done["request_counts"] == {"total": 4, "completed": 4, "failed": 0}
        finally:
            stop.set()
            await asyncio.wait_for(loop, 60)


@pytest.mark.vllm
@pytest.mark.redis
async def test_poison_batch_then_a_good_one_on_coe_workers(vllm_server: Any, redis_factory: Any,
                                                           tmp_path: Path) -> None:
    redis = redis_factory(appendonly=True)
    config = registry(vllm_server, redis, tmp_path)
    async with running_coe(config) as coe:
        client = coe.client()
        poison, good = await poison_and_good(client, "w", 8)
        logs = [tmp_path / f"worker-{i}.log" for i in range(2)]
        workers = [start_worker(config, log) for log in logs]
        try:
            assert_poison_failed(await ended(client, poison))
            done = await ended(client, good)
            assert done.status == "completed" and done.request_counts is not None
            assert done.request_counts.completed == 8 and done.request_counts.failed == 0
            assert sorted(await output_ids(client, done)) == sorted(f"wg-{i}" for i in range(8))
            for worker, log in zip(workers, logs, strict=True):
                await asyncio.to_thread(started, worker, log)
                assert worker.poll() is None, log.read_text()[-2000:]
        finally:
            for worker in workers:
                worker.send_signal(signal.SIGTERM)
            codes = [worker.wait(timeout=60) for worker in workers]
        assert codes == [0, 0]


@pytest.mark.vllm
@pytest.mark.redis
async def test_redis_restart_mid_batch_every_batch_completes_on_its_own(vllm_server: Any, redis_factory: Any,
                                                                        tmp_path: Path) -> None:
    """Redis SIGKILLed mid-batch and restarted 2 s later (append-only, fsync always): the workers retry
    with backoff and re-claim what they held; the batch completes, each item exactly once."""
    redis = redis_factory(appendonly=True)
    config = registry(vllm_server, redis, tmp_path)
    n = 40
    async with running_coe(config) as coe:
        client = coe.client()
        uploaded = await client.files.create(file=("r.jsonl", batch_input(n, "r")), purpose="batch")
        batch = await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                            completion_window="24h")
        log = tmp_path / "worker.log"
        worker = start_worker(config, log)  # one loop: if it died, the batch would stall
        try:
            deadline = time.monotonic() + 120
            while True:
                counts = (await client.batches.retrieve(batch.id)).request_counts
                assert counts is not None
                if counts.completed + counts.failed >= 3:
                    break
                assert time.monotonic() < deadline, "no results before the outage"
                await asyncio.sleep(0.05)
            assert counts.completed + counts.failed < n, "the batch ended before the outage: nothing was tested"
            redis.kill()
            await asyncio.sleep(2)
            redis.restart()
            done = await ended(client, batch.id, timeout=240)
            assert done.status == "completed" and done.request_counts is not None, done
            assert done.request_counts.failed == 0, done.request_counts
            assert sorted(await output_ids(client, done)) == sorted(f"r-{i}" for i in range(n))
            after = await client.files.create(file=("a.jsonl", batch_input(4, "a")), purpose="batch")
            second = await client.batches.create(input_file_id=after.id, endpoint="/v1/chat/completions",
                                                 completion_window="24h")  # the same loop takes new work
            assert sorted(await output_ids(client, await ended(client, second.id))) == [f"a-{i}" for i in range(4)]
            assert worker.poll() is None, log.read_text()[-2000:]
        finally:
            worker.send_signal(signal.SIGTERM)
            code = worker.wait(timeout=60)
        assert code == 0
