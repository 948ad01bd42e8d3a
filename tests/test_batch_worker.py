"""Durable batches on a real Redis (started by the tests) with real ``coe worker`` processes and the
shared real vLLM: a worker SIGKILLed mid-batch loses nothing and duplicates nothing; an accepted batch
survives Redis being SIGKILLed and restarted (append-only, appendfsync always)."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import openai
import pytest
from apphelpers import batch_input, running_coe, tiny_registry, write_registry
from redis_server import RedisServer, redis_factory_fixture

COE = [str(Path(sys.executable).parent / "coe")]
TRIALS = 5
ITEMS = 20
READY = "coe worker: taking batch items"

redis_factory = redis_factory_fixture()


def registry(server: Any, redis: RedisServer, tmp: Path) -> Path:
    reg = tiny_registry(server, store={"redis_url": redis.url, "claim_idle_s": 2, "embedded_worker": False,
                                       "worker_concurrency": 2, "prefix": f"t{random.randrange(10**6)}"})
    return write_registry(tmp / "experts.yaml", reg)


def start_worker(config: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*COE, "worker", "--config", str(config)], stdout=log.open("ab"), stderr=subprocess.STDOUT)


def started(worker: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    """Wait for the worker's ready line, so a SIGTERM tests its graceful stop, not Python's start-up."""
    deadline = time.monotonic() + timeout
    while READY not in log.read_text(errors="replace"):
        assert worker.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-2000:]
        time.sleep(0.1)


async def finished(client: openai.AsyncOpenAI, batch_id: str, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        batch = await client.batches.retrieve(batch_id)
        if batch.status == "completed":
            return batch
        assert time.monotonic() < deadline, f"batch {batch_id} still {batch.status}: {batch.request_counts}"
        await asyncio.sleep(0.2)


async def output_ids(client: openai.AsyncOpenAI, batch: Any) -> list[str]:
    assert batch.output_file_id
    text = (await client.files.content(batch.output_file_id)).text
    return [json.loads(x)["custom_id"] for x in text.splitlines()]


def test_worker_without_redis_is_a_clear_error(tmp_path: Path) -> None:
    config = write_registry(tmp_path / "experts.yaml", {"experts": [], "auth": {"client_auth": False,
                                                                             "admin_auth": False}})
    proc = subprocess.run([*COE, "worker", "--config", str(config)], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 1 and "needs Redis" in proc.stderr


@pytest.mark.vllm
@pytest.mark.redis
async def test_sigkilled_worker_loses_and_duplicates_nothing(vllm_server: Any, redis_factory: Any,
                                                             tmp_path: Path) -> None:
    redis = redis_factory(appendonly=True)
    config = registry(vllm_server, redis, tmp_path)
    rng = random.Random(7)
    async with running_coe(config) as coe:
        client = coe.client()
        for trial in range(TRIALS):
            uploaded = await client.files.create(file=(f"t{trial}.jsonl", batch_input(ITEMS, f"t{trial}")),
                                                 purpose="batch")
            batch = await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                                completion_window="24h")
            kill_after = rng.randrange(0, ITEMS - 2)
            first_log = tmp_path / f"t{trial}-first.log"
            first = start_worker(config, first_log)
            deadline = time.monotonic() + 60
            while True:  # SIGKILL at a random point: after `kill_after` results
                counts = (await client.batches.retrieve(batch.id)).request_counts
                assert counts is not None
                if counts.completed + counts.failed >= kill_after:
                    break
                assert first.poll() is None and time.monotonic() < deadline, first_log.read_text()[-2000:]
                await asyncio.sleep(0.02)
            first.send_signal(signal.SIGKILL)
            first.wait()
            log = tmp_path / f"t{trial}-second.log"
            second = start_worker(config, log)  # takes new items, and re-claims the dead one's after 2 s
            try:
                done = await finished(client, batch.id)
                await asyncio.to_thread(started, second, log)  # the first may have done it all before it is up
            finally:
                second.send_signal(signal.SIGTERM)
                assert second.wait(timeout=60) == 0
            ids = await output_ids(client, done)
            assert done.request_counts is not None and done.request_counts.failed == 0
            assert sorted(ids) == sorted(f"t{trial}-{i}" for i in range(ITEMS)), f"trial {trial}"


@pytest.mark.vllm
@pytest.mark.redis
async def test_accepted_batch_survives_redis_sigkill(vllm_server: Any, redis_factory: Any, tmp_path: Path) -> None:
    redis = redis_factory(appendonly=True)
    config = registry(vllm_server, redis, tmp_path)
    async with running_coe(config) as coe:
        client = coe.client()
        uploaded = await client.files.create(file=("r.jsonl", batch_input(8, "r")), purpose="batch")
        batch = await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                            completion_window="24h")  # accepted; no worker runs yet
        redis.kill()
        redis.restart()
        worker = start_worker(config, tmp_path / "worker.log")
        try:
            done = await finished(client, batch.id)
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(timeout=60)
        assert sorted(await output_ids(client, done)) == sorted(f"r-{i}" for i in range(8))
