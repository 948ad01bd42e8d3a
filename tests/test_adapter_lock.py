"""The adapter load lock across processes (``coe.backends.adapter_lock``): two coe processes that share one
Redis and one vLLM server never load or unload one adapter at the same time. Each ``RedisStore`` here has
its own connection pool to a real ``redis-server``, which is all Redis sees of a process."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator

import pytest
from redis_server import RedisServer, redis_server_fixture

from coe.backends.adapter_lock import AdapterLock
from coe.store import MemoryStore
from coe.store.redis import RedisStore

redis_server = redis_server_fixture(scope="module")

SERVER = "http://127.0.0.1:8000"


@pytest.fixture
async def two_processes(redis_server: RedisServer) -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    prefix = f"lock{time.monotonic_ns()}"
    a, b = RedisStore.from_url(redis_server.url, prefix=prefix), RedisStore.from_url(redis_server.url, prefix=prefix)
    yield a, b
    await a.close()
    await b.close()


async def held_spans(locks: list[AdapterLock], hold_s: float) -> list[tuple[float, float, int | None]]:
    """Every lock taken at once, each held ``hold_s`` (a slow load): (entered, left, fencing token)."""
    spans: list[tuple[float, float, int | None]] = []

    async def use(lock: AdapterLock) -> None:
        async with lock:
            entered = time.monotonic()
            await asyncio.sleep(hold_s)
            spans.append((entered, time.monotonic(), lock.token))

    await asyncio.gather(*(use(lock) for lock in locks))
    return sorted(spans)


@pytest.mark.redis
async def test_two_processes_never_hold_one_adapter_at_once(two_processes: tuple[RedisStore, RedisStore]) -> None:
    a, b = two_processes
    locks = [AdapterLock(SERVER, "lora-1", store) for store in (a, b, a, b)]  # 2 per "process"
    spans = await held_spans(locks, 0.2)
    for (_, left, _), (entered, _, _) in itertools.pairwise(spans):
        assert entered >= left, f"two holders overlapped: {spans}"
    tokens = [t for _, _, t in spans]
    assert tokens == sorted(tokens) and len(set(tokens)) == 4, tokens  # each holder fenced, in order


@pytest.mark.redis
async def test_other_adapters_and_servers_do_not_wait(two_processes: tuple[RedisStore, RedisStore]) -> None:
    a, b = two_processes
    locks = [AdapterLock(SERVER, "lora-1", a), AdapterLock(SERVER, "lora-2", b),
             AdapterLock("http://other:8000", "lora-1", b)]
    t0 = time.monotonic()
    await held_spans(locks, 0.3)
    assert time.monotonic() - t0 < 0.55


@pytest.mark.redis
async def test_a_crashed_holder_blocks_only_until_its_lease_expires(
        two_processes: tuple[RedisStore, RedisStore]) -> None:
    a, b = two_processes
    crashed = AdapterLock(SERVER, "lora-1", a, ttl_s=0.5)
    await crashed.__aenter__()  # then its process dies: it never releases
    t0 = time.monotonic()
    async with AdapterLock(SERVER, "lora-1", b):
        waited = time.monotonic() - t0
    assert 0.3 < waited < 2.0, waited


async def test_without_a_shared_store_the_lock_is_per_process() -> None:
    store = MemoryStore()
    lock = AdapterLock(SERVER, "lora-1", store)
    spans = await held_spans([lock, lock], 0.05)
    assert spans[1][0] >= spans[0][1]
    unshared = AdapterLock(SERVER, "lora-1", None)  # no store at all
    async with unshared:
        assert unshared.token is None and unshared.locked()
