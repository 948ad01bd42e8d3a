"""Adapter residency and grouped admission against the shared real vLLM server.

The adapters loaded here are extra names for the tiny adapters built by the
session fixture; each test unloads what it loaded so the shared server is left
as it was found.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from coe.backends.pool import BackendPool
from coe.config import Adapter, BackendConfig, DispatchConfig, ExpertConfig
from coe.dispatch import Dispatcher
from coe.metrics import Metrics
from coe.testing.recording import RecordingTransport

pytestmark = pytest.mark.vllm

ASK = {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 3, "temperature": 0}


def expert(server: Any, name: str, adapter: str, source: str = "tiny-lora-3") -> ExpertConfig:
    return ExpertConfig(name=name, backend="tiny", model=server.served_name,
                        adapter=Adapter(name=adapter, path=server.adapters[source]))


def sample(metrics: Metrics, name: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"backend": "tiny"})


async def served(dispatcher: Dispatcher) -> set[str]:
    return {str(m["id"]) for m in await dispatcher.pool.get("tiny").api.list_models() if m.get("parent")}


@pytest_asyncio.fixture
async def pool(vllm_server: Any) -> AsyncIterator[tuple[BackendPool, RecordingTransport]]:
    recording = RecordingTransport()
    pool = BackendPool(transport_factory=lambda name: recording)
    yield pool, recording
    await pool.aclose()


async def make(pool: BackendPool, server: Any, **backend: Any) -> Dispatcher:
    await pool.reconcile({"tiny": BackendConfig(url=server.api_url, base_adapter=server.managed.base_adapter,
                                                **backend)})
    return Dispatcher(pool, DispatchConfig(retries=0, max_wait_s=30), Metrics())


async def test_least_recently_used_idle_adapter_is_evicted(vllm_server: Any, pool: Any) -> None:
    bpool, _ = pool
    probe = await make(bpool, vllm_server)
    before = await served(probe)
    names = ["res-a", "res-b", "res-c"]
    dispatcher = await make(bpool, vllm_server, max_loras=2, max_cpu_loras=len(before) + 2)
    a, b, c = (expert(vllm_server, f"e-{n}", n) for n in names)
    metrics = dispatcher.metrics
    try:
        await dispatcher.chat([a], ASK, request_id="r1")
        await dispatcher.chat([b], ASK, request_id="r2")
        assert {"res-a", "res-b"} <= await served(dispatcher)
        assert sample(metrics, "coe_adapter_loads_total") == 2

        await dispatcher.chat([c], ASK, request_id="r3")  # full: res-a is the least recently used
        now = await served(dispatcher)
        assert "res-a" not in now and {"res-b", "res-c"} <= now
        assert sample(metrics, "coe_adapter_evictions_total") == 1

        stream = await dispatcher.open_stream([b], ASK, request_id="r4")  # res-b busy (and least recent)
        try:
            await dispatcher.chat([a], ASK, request_id="r5")
        finally:
            async for _ in stream.chunks:
                pass
            await stream.aclose()
        now = await served(dispatcher)
        assert {"res-a", "res-b"} <= now and "res-c" not in now  # the busy res-b stayed, res-c went
        assert sample(metrics, "coe_adapter_loads_total") == 4
        assert sample(metrics, "coe_adapter_evictions_total") == 2
        assert dispatcher.lane(bpool.get("tiny")).residency.loaded()[-2:] == ["res-b", "res-a"]
    finally:
        api = bpool.get("tiny").api
        for n in names:
            await api.unload_adapter(n)


async def test_an_adapter_unloaded_behind_coes_back_is_loaded_again(vllm_server: Any, pool: Any) -> None:
    bpool, _ = pool
    dispatcher = await make(bpool, vllm_server)
    x = expert(vllm_server, "e-x", "res-x")
    try:
        await dispatcher.chat([x], ASK, request_id="r1")
        await bpool.get("tiny").api.unload_adapter("res-x")  # e.g. the server restarted
        response, _, _ = await dispatcher.chat([x], ASK, request_id="r2")
        assert response["choices"][0]["message"]["content"] is not None
        assert "res-x" in await served(dispatcher)
    finally:
        await bpool.get("tiny").api.unload_adapter("res-x")


def switches(models: list[str]) -> int:
    return sum(1 for x, y in itertools.pairwise(models) if x != y)


@pytest.mark.parametrize("group", [True, False])
async def test_a_full_backend_sends_waiting_calls_grouped_by_adapter(vllm_server: Any, pool: Any,
                                                                     group: bool) -> None:
    bpool, recording = pool
    await make(bpool, vllm_server, max_concurrency=2, max_loras=1)
    dispatcher = Dispatcher(bpool, DispatchConfig(retries=0, max_wait_s=60, group_adapters=group), Metrics())
    e0 = ExpertConfig(name="a0", backend="tiny", model=vllm_server.served_name, adapter=Adapter(name="tiny-lora-0"))
    e1 = ExpertConfig(name="a1", backend="tiny", model=vllm_server.served_name, adapter=Adapter(name="tiny-lora-1"))
    recording.clear()
    tasks = []
    for i in range(12):  # arrival order alternates between the two adapters
        tasks.append(asyncio.create_task(dispatcher.chat([(e0, e1)[i % 2]], ASK, request_id=f"g{i}")))
        await asyncio.sleep(0)
    results = await asyncio.gather(*tasks)
    assert all(r[0]["choices"] for r in results)
    order = [str(x.body["model"]) for x in recording.chats()]
    assert len(order) == 12
    if group:
        assert switches(order) <= 2, order
    else:
        assert switches(order) >= 8, order


async def test_a_remote_servers_max_loras_is_read_from_its_metrics_once_it_is_full(vllm_server: Any,
                                                                                   pool: Any) -> None:
    """No ``max_loras`` in the config of a remote backend: coe reads vLLM's own gauge
    (``vllm:lora_requests_info{max_lora=...}`` in ``/metrics``) when the backend fills up, for the
    grouped order (tested above with a configured ``max_loras``)."""
    bpool, _ = pool
    dispatcher = await make(bpool, vllm_server, max_concurrency=1)
    lane = dispatcher.lane(bpool.get("tiny"))
    assert lane.probe and lane.schedule.max_loras is None
    e0 = ExpertConfig(name="a0", backend="tiny", model=vllm_server.served_name, adapter=Adapter(name="tiny-lora-0"))
    e1 = ExpertConfig(name="a1", backend="tiny", model=vllm_server.served_name, adapter=Adapter(name="tiny-lora-1"))
    await dispatcher.chat([e0], ASK, request_id="p0")  # one scheduled request: vLLM's gauge exists from now on
    assert lane.schedule.max_loras is None  # never full yet: nothing read
    await asyncio.gather(*(dispatcher.chat([(e0, e1)[i % 2]], ASK, request_id=f"p{i}") for i in range(1, 4)))
    for _ in range(100):
        if lane.schedule.max_loras is not None:
            break
        await asyncio.sleep(0.05)
    assert lane.schedule.max_loras == vllm_server.managed.cfg.max_loras == 2 and not lane.probe
    grouped = Dispatcher(bpool, DispatchConfig(retries=0, group_adapters=False), Metrics()).lane(bpool.get("tiny"))
    assert not grouped.probe  # grouping off: nothing to read
