"""Replicas that behave as one service: 3 ``coe serve`` and 2 ``coe worker`` processes on one real Redis,
behind a real haproxy with health checks, on a STUB upstream (``coe.testing.stub_upstream``, its own
process). Everything is started here (``coe.testing.replicas``).

- an expert registered or deleted through one replica is served or refused by every replica within 1 s;
- a batch created through one replica is read, downloaded and cancelled through others;
- one replica SIGKILLed under load (concurrency 32, 10 s): at least 99.9% of requests succeed through
  the balancer, and a batch running meanwhile loses no item;
- a rolling restart (SIGTERM to each replica in turn, under load): no failed request.

The 30 s kill run and throughput against the number of replicas: ``bench/replicas.py``.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from apphelpers import write_registry
from redis_server import RedisServer, redis_server_fixture

from coe.testing.replicas import HAPROXY_HINT, Fleet, Proc, fleet_registry, haproxy_binary, load, start_stub

pytestmark = pytest.mark.redis

redis_server = redis_server_fixture(scope="module", appendonly=True)

KILL_LOAD_S = 10.0
CONCURRENCY = 32


@pytest.fixture(scope="module")
def fleet(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    if haproxy_binary() is None:
        pytest.skip(HAPROXY_HINT)
    workdir = tmp_path_factory.mktemp("fleet")
    stub, stub_url = start_stub(workdir)
    reg = fleet_registry(stub_url, redis_server.url, f"rep{random.randrange(10**6)}")
    config = write_registry(workdir / "experts.yaml", reg)
    running = Fleet(workdir, config, replicas=3, workers=2)
    try:
        running.start()
        yield running
    finally:
        running.stop()
        stub.stop()


def chat_body(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


async def served_everywhere(urls: list[str], model: str) -> list[int]:
    """The status of one chat request for ``model`` sent straight to each replica (not the balancer)."""
    async with httpx.AsyncClient(timeout=10) as http:
        rs = await asyncio.gather(*(http.post(f"{u}/v1/chat/completions", json=chat_body(model)) for u in urls))
    return [r.status_code for r in rs]


async def until_all(urls: list[str], model: str, status: int, limit_s: float) -> float:
    """Seconds until every replica answers ``status`` for ``model``; fails after ``limit_s``."""
    t0 = time.monotonic()
    while True:
        seen = await served_everywhere(urls, model)
        elapsed = time.monotonic() - t0
        if all(s == status for s in seen):
            return elapsed
        assert elapsed < limit_s, f"after {elapsed:.2f}s the replicas answer {seen} for {model}, want {status}"
        await asyncio.sleep(0.02)


async def test_registration_and_deletion_reach_every_replica_within_1s(fleet: Fleet) -> None:
    urls = fleet.replica_urls()
    async with httpx.AsyncClient(timeout=10) as http:
        for trial in range(3):
            name = f"api-expert-{trial}"
            via, other = urls[trial % 3], urls[(trial + 1) % 3]
            assert await served_everywhere(urls, name) == [404, 404, 404]
            r = await http.post(f"{via}/v1/experts", json={"name": name, "backend": "stub", "model": "stub"})
            assert r.status_code == 201, r.text
            took = await until_all(urls, name, 200, limit_s=1.0)
            listed = (await http.get(f"{other}/v1/experts/{name}")).json()
            assert listed["source"] == "api", listed
            r = await http.delete(f"{other}/v1/experts/{name}")  # deleted through another replica
            assert r.status_code in (200, 204), r.text
            gone = await until_all(urls, name, 404, limit_s=1.0)
            print(f"{name}: served everywhere after {took:.3f}s, refused everywhere {gone:.3f}s after delete")


def batch_lines(n: int, tag: str) -> bytes:
    return "".join(json.dumps({"custom_id": f"{tag}-{i}", "method": "POST", "url": "/v1/chat/completions",
                               "body": chat_body("fast")}) + "\n" for i in range(n)).encode()


def client_for(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=30)


async def ended(client: openai.AsyncOpenAI, batch_id: str, timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        batch = await client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "cancelled", "expired"):
            return batch
        assert time.monotonic() < deadline, f"batch {batch_id} still {batch.status}: {batch.request_counts}"
        await asyncio.sleep(0.1)


async def output_ids(client: openai.AsyncOpenAI, batch: Any) -> list[str]:
    assert batch.output_file_id, batch
    text = (await client.files.content(batch.output_file_id)).text
    return [json.loads(line)["custom_id"] for line in text.splitlines()]


async def test_a_batch_crosses_replicas(fleet: Fleet) -> None:
    a, b, c = (client_for(u) for u in fleet.replica_urls())
    uploaded = await a.files.create(file=("cross.jsonl", batch_lines(40, "cross")), purpose="batch")
    assert (await b.files.retrieve(uploaded.id)).id == uploaded.id
    batch = await a.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                   completion_window="24h")
    assert (await b.batches.retrieve(batch.id)).id == batch.id
    done = await ended(c, batch.id)
    assert done.status == "completed", done
    ids = await output_ids(b, done)
    assert sorted(ids) == sorted(f"cross-{i}" for i in range(40))

    # Cancelled through another replica than the one that created it.
    big = await c.files.create(file=("big.jsonl", batch_lines(2000, "big")), purpose="batch")
    second = await c.batches.create(input_file_id=big.id, endpoint="/v1/chat/completions", completion_window="24h")
    cancelling = await a.batches.cancel(second.id)
    assert cancelling.status in ("cancelling", "cancelled"), cancelling
    final = await ended(b, second.id)
    assert final.status == "cancelled", final


async def test_a_sigkilled_replica_under_load_loses_almost_nothing(fleet: Fleet) -> None:
    client = client_for(fleet.url)  # everything through the balancer
    uploaded = await client.files.create(file=("kill.jsonl", batch_lines(300, "kill")), purpose="batch")
    batch = await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                        completion_window="24h")
    victim = fleet.serve[1]

    async def kill_midway() -> None:
        await asyncio.sleep(KILL_LOAD_S / 3)
        victim.signal(signal.SIGKILL)

    result, _ = await asyncio.gather(load(fleet.url, concurrency=CONCURRENCY, duration_s=KILL_LOAD_S),
                                     kill_midway())
    print("SIGKILL under load:", result.summary())
    assert not victim.alive
    assert result.total > 200, result.summary()
    # A response whose headers left the replica just before the SIGKILL and whose body never did cannot be
    # resent by any balancer (the client already has the headers): seen about once in 2,000 requests here.
    # On a slow run (under 1,000 requests) that one response alone would be 0.1%, so it is allowed as such.
    cut = sum(n for e, n in result.errors.items() if "without sending complete message body" in e)
    assert result.success_rate >= 0.999 or (result.failed == cut == 1), result.summary()
    done = await ended(client, batch.id)
    assert done.status == "completed", done
    ids = await output_ids(client, done)
    assert sorted(ids) == sorted(f"kill-{i}" for i in range(300)), "batch items lost or duplicated"
    await asyncio.to_thread(fleet.restart, 1)


async def test_a_rolling_restart_under_load_fails_no_request(fleet: Fleet) -> None:
    stop = asyncio.Event()
    restarted: list[tuple[str, int | None]] = []

    def roll() -> None:
        for i in range(len(fleet.serve)):
            proc: Proc = fleet.serve[i]
            proc.signal(signal.SIGTERM)
            restarted.append((proc.name, proc.wait(fleet.drain_timeout_s + 10)))
            fleet.restart(i)

    async def roller() -> None:
        try:
            await asyncio.sleep(1.0)
            await asyncio.to_thread(roll)
            await asyncio.sleep(1.0)
        finally:
            stop.set()

    result, _ = await asyncio.gather(load(fleet.url, concurrency=CONCURRENCY, duration_s=300, stop=stop), roller())
    print("rolling restart under load:", result.summary(), restarted)
    assert [code for _, code in restarted] == [0, 0, 0], restarted  # each drained and exited cleanly
    assert result.total > 200, result.summary()
    assert result.failed == 0, result.summary()

