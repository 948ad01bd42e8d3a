"""Batch items run in waves (``coe.batch.stages``) against the shared real vLLM: every expert call of a
batch goes out before any aggregator call and one expert's calls are contiguous, with the same answers
as running each item alone; a shuffled batch through the Batches API (the embedded worker) reaches vLLM
grouped by expert; on-demand whole-model backends are each brought up once for their group. What vLLM
received is read from a RECORDING transport (every request really went to vLLM and back). And the
queue's heartbeat (``touch``), which keeps a long wave's entries from being re-claimed, on memory and
a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from apphelpers import running_coe, tiny_registry, write_registry
from redis_server import redis_factory_fixture

from coe.backends.machine_lock import MachineLock
from coe.backends.pool import BackendPool
from coe.batch import BatchItem, run_batch
from coe.batch.queue import MemoryQueue, RedisStreamQueue, WorkQueue
from coe.batch.stages import WaveRunner
from coe.config import BackendConfig, LaunchConfig
from coe.runtime import Runtime
from coe.testing.recording import Exchange, RecordingTransport
from services.api import create_app
from services.api.state import runtime_of

redis_factory = redis_factory_fixture()

QUESTIONS = ["Name a colour.", "What is two plus two?", "Where is Paris?", "Why is the sky blue?",
             "Say hello.", "Count to three."]


def item(custom_id: str, model: str, content: str, **body: Any) -> BatchItem:
    return BatchItem(custom_id, {"model": model, "messages": [{"role": "user", "content": content}],
                                 "max_tokens": 6, "temperature": 0, **body}, 0)


def runs(values: list[str]) -> list[str]:
    """The values with consecutive repeats collapsed: ``a a b a`` -> ``a b a``."""
    return [v for i, v in enumerate(values) if i == 0 or values[i - 1] != v]


def last_user(exchange: Exchange) -> str:
    return str([m for m in exchange.body["messages"] if m["role"] == "user"][-1]["content"])


@contextlib.asynccontextmanager
async def app_state(config: Path, transport: RecordingTransport | None = None) -> AsyncIterator[Runtime]:
    """A runtime as ``coe batch run`` opens one (no batch jobs, no file watch)."""
    factory = (lambda name: transport) if transport is not None else None
    async with Runtime(config, transport_factory=factory, batches=False, watch=False) as runtime:
        yield runtime


async def staged_run(state: Runtime, items: list[BatchItem], out: Path, **runner_kw: Any
                     ) -> tuple[dict[str, dict[str, Any]], WaveRunner]:
    """``run_batch`` as ``coe batch run`` does it; the result lines by custom_id."""
    runner = WaveRunner(state.dispatcher, models=state.pool, metrics=state.metrics, **runner_kw)

    errors = out.with_suffix(".errors.jsonl")
    await run_batch(items, state.chat.execute, runner, output=out, errors=errors)
    lines = [json.loads(x) for p in (out, errors) if p.exists() for x in p.read_text().splitlines()]
    return {r["custom_id"]: r["response"] for r in lines}, runner


@pytest.mark.vllm
async def test_coe_items_call_every_expert_before_any_aggregator(vllm_server: Any, tmp_path: Path) -> None:
    reg = tiny_registry(vllm_server, pipeline={"consensus_similarity": None, "max_rounds": 1})
    config = write_registry(tmp_path / "experts.yaml", reg)
    panels = [["tiny-base", "tiny-a0"], ["tiny-a1", "tiny-a0", "tiny-base"], ["tiny-a0", "tiny-a1"],
              ["tiny-base", "tiny-a1"], ["tiny-a1", "tiny-base", "tiny-a0"]]
    items = [item(f"c{i}", "coe", QUESTIONS[i], coe={"experts": panel, "strategy": "synthesize"})
             for i, panel in enumerate(panels)]
    transport = RecordingTransport()
    async with app_state(config, transport) as state:
        solo = {i.custom_id: await state.chat.execute(i, f"solo-{i.custom_id}") for i in items}  # one at a time
        transport.clear()
        results, runner = await staged_run(state, items, tmp_path / "out.jsonl", concurrency=4)
    chats = transport.chats()
    expert_calls = sum(len(p) for p in panels)
    kinds = ["expert" if last_user(x) in QUESTIONS else "aggregator" for x in chats]
    assert kinds.count("aggregator") >= 1, "every item's answers agreed: nothing was aggregated"
    assert kinds == ["expert"] * expert_calls + ["aggregator"] * (len(chats) - expert_calls)
    expert_models = [str(x.body["model"]) for x in chats[:expert_calls]]
    assert len(runs(expert_models)) == len(set(expert_models)) == 3, expert_models  # one run per expert
    assert runner.stats.waves == 2 and runner.stats.loads == []
    for custom_id, (status, body) in solo.items():
        assert status == 200 and results[custom_id]["status_code"] == 200
        staged = results[custom_id]["body"]
        assert staged["choices"][0]["message"]["content"] == body["choices"][0]["message"]["content"]
        assert staged["coe"]["answered_by"] == body["coe"]["answered_by"]
        assert [e["name"] for e in staged["coe"]["experts"]] == [e["name"] for e in body["coe"]["experts"]]


@pytest.mark.vllm
async def test_shuffled_batch_through_the_worker_reaches_vllm_grouped(vllm_server: Any, tmp_path: Path) -> None:
    config = write_registry(tmp_path / "experts.yaml", tiny_registry(vllm_server, store={"worker_concurrency": 3}))
    experts = ["tiny-base", "tiny-a0", "tiny-a1"]
    order = [experts[i % 3] for i in range(15)]
    random.Random(5).shuffle(order)
    lines = [{"custom_id": f"s{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": m, "messages": [{"role": "user", "content": f"Item {i}?"}], "max_tokens": 4}}
             for i, m in enumerate(order)]
    transport = RecordingTransport()
    async with running_coe(config, transport_factory=lambda name: transport) as coe:
        client = coe.client()
        uploaded = await client.files.create(file=("s.jsonl", "".join(json.dumps(x) + "\n" for x in lines).encode()),
                                             purpose="batch")
        batch = await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                            completion_window="24h")
        deadline = time.monotonic() + 180
        while (batch := await client.batches.retrieve(batch.id)).status != "completed":
            assert time.monotonic() < deadline, batch.request_counts
            await asyncio.sleep(0.3)
        output = (await client.files.content(batch.output_file_id or "")).text.splitlines()
    assert sorted(json.loads(x)["custom_id"] for x in output) == sorted(x["custom_id"] for x in lines)
    models = [str(x.body["model"]) for x in transport.chats()]
    assert len(models) == 15 and len(runs(models)) == 3, models
    assert [str(json.loads(x)["response"]["body"]["model"]) for x in output] == order  # output in input order
    upstream = {"tiny-base": vllm_server.managed.base_adapter or vllm_server.served_name,
                "tiny-a0": "tiny-lora-0", "tiny-a1": "tiny-lora-1"}
    assert runs(models) == [upstream[e] for e in dict.fromkeys(order)]  # experts in order of first appearance


@pytest.mark.vllm
@pytest.mark.timeout(1200)
async def test_on_demand_models_load_once_per_expert(vllm_server: Any, tmp_path: Path) -> None:
    names = ["od-1", "od-2"]
    logs = {n: tmp_path / "logs" / f"{n}.log" for n in names}
    reg = {
        "backends": {n: {"launch": {"model": str(vllm_server.model_dir), "served_name": vllm_server.served_name,
                                    "runtime_lora_updating": False, "on_demand": True, "startup_timeout_s": 300,
                                    "args": ["--dtype", "float32", "--max-model-len", "512"],
                                    "log_file": str(logs[n])},
                         "timeouts": {"read_s": 60, "total_s": 120}} for n in names},
        "experts": [{"name": f"{n}-x", "backend": n, "model": vllm_server.served_name} for n in names],
        "auth": {"client_auth": False, "admin_auth": False},
        "dispatch": {"retries": 1, "backoff_s": 0.05},
    }
    config = write_registry(tmp_path / "experts.yaml", reg)
    order = ["od-2-x", "od-1-x", "od-2-x", "od-2-x", "od-1-x", "od-1-x", "od-2-x", "od-1-x"]
    items = [item(f"o{i}", m, f"Question {i}?") for i, m in enumerate(order)]
    async with app_state(config) as state:
        managed = {n: state.pool.get(n).managed for n in names}
        assert all(m is not None and m.state == "stopped" and m.spawns == 0 for m in managed.values())
        status, body = await state.chat.execute(items[0], "online")  # not staged: an online request
        assert status == 503 and "stopped" in body["error"]["message"]
        results, runner = await staged_run(state, items, tmp_path / "out.jsonl", concurrency=4)
        assert {cid: r["status_code"] for cid, r in results.items()} == {i.custom_id: 200 for i in items}, results
        assert {cid: r["body"]["model"] for cid, r in results.items()} == {i.custom_id: i.model for i in items}
        assert runner.stats.loads == ["od-2", "od-1"]  # first appearance order, once each
        for n in names:
            assert state.metrics.registry.get_sample_value("coe_model_loads_total", {"backend": n}) == 1.0
            assert managed[n].spawns == 1  # type: ignore[union-attr]
        assert state.pool.resident == "od-1"
        assert managed["od-2"].state == "stopped" and managed["od-1"].state == "healthy"  # type: ignore[union-attr]
    for n in names:  # the processes really started once each: coe's own start marker in each log
        assert logs[n].read_text().count(f"starting vLLM '{n}'") == 1


@pytest.mark.vllm
async def test_on_demand_backend_that_cannot_start_fails_its_items_and_nothing_hangs(vllm_server: Any,
                                                                                   tmp_path: Path) -> None:
    """An operator's typo in ``launch.args``: the real vLLM exits at start-up. The server with only
    on-demand backends is still ready; a batch's items for it end as 503 error lines naming the cause;
    the pool holds nothing afterwards."""
    log_file = tmp_path / "logs" / "od-bad.log"
    reg = {
        "backends": {"od-bad": {"launch": {"model": str(vllm_server.model_dir), "served_name": vllm_server.served_name,
                                           "runtime_lora_updating": False, "on_demand": True, "max_restarts": 0,
                                           "startup_timeout_s": 300, "args": ["--no-such-vllm-flag"],
                                           "log_file": str(log_file)}}},
        "experts": [{"name": "bad-x", "backend": "od-bad", "model": vllm_server.served_name}],
        "auth": {"client_auth": False, "admin_auth": False},
    }
    config = write_registry(tmp_path / "experts.yaml", reg)
    app = create_app(config, poll_interval_s=3600)
    async with app.router.lifespan_context(app):
        state = runtime_of(app)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://coe") as http:
            ready = await http.get("/health/ready")
        assert ready.status_code == 200 and ready.json()["status"] == "ready", ready.text
        assert ready.json()["backends"]["od-bad"]["state"] == "stopped"
        items = [item(f"b{i}", "bad-x", f"Question {i}?") for i in range(3)]
        results, runner = await asyncio.wait_for(staged_run(state, items, tmp_path / "out.jsonl"), 300)
        assert {cid: r["status_code"] for cid, r in results.items()} == {i.custom_id: 503 for i in items}, results
        message = results["b0"]["body"]["error"]["message"]
        assert "od-bad" in message and "exited during startup" in message, message
        managed = state.pool.get("od-bad").managed
        assert managed is not None and managed.spawns == 1  # one attempt for the whole group, not one per item
        assert state.pool.resident is None and runner.stats.loads == []
    assert "no-such-vllm-flag" in log_file.read_text()  # vLLM itself refused it


@pytest.mark.vllm
async def test_on_demand_models_are_one_up_per_machine_across_processes(vllm_server: Any, tmp_path: Path) -> None:
    """Two pools stand for two coe processes (an API server's embedded worker and a ``coe worker``):
    separate opens of the lock file conflict as separate processes do. The second waits, without
    starting its model, until the first puts its model down."""
    lock = tmp_path / "on-demand.lock"
    pools = [BackendPool(on_demand_lock=lock), BackendPool(on_demand_lock=lock)]
    names = ["od-a", "od-b"]
    try:
        for pool, name in zip(pools, names, strict=True):
            await pool.reconcile({name: BackendConfig(launch=LaunchConfig(
                model=vllm_server.model_dir, served_name=vllm_server.served_name, runtime_lora_updating=False,
                on_demand=True, startup_timeout_s=300, args=["--dtype", "float32", "--max-model-len", "512"],
                log_file=tmp_path / f"{name}.log"))})
        assert await pools[0].bring_up("od-a") is True
        second = asyncio.create_task(pools[1].bring_up("od-b"))
        await asyncio.sleep(3)
        b = pools[1].get("od-b").managed
        assert b is not None and not second.done() and b.spawns == 0  # waiting, model not started
        await pools[0].put_down()
        assert await asyncio.wait_for(second, 300) is True
        a = pools[0].get("od-a").managed
        assert a is not None and a.state == "stopped" and b.state == "healthy" and b.spawns == 1
        await pools[1].put_down()
        free = MachineLock(lock)  # released again: taken at once
        await asyncio.wait_for(free.acquire("test"), 5)
        free.release()
    finally:
        for pool in pools:
            await pool.aclose()


@pytest.mark.parametrize("kind", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def test_touch_keeps_the_holders_entries_and_only_its_own(kind: str, request: pytest.FixtureRequest) -> None:
    queue: WorkQueue
    if kind == "memory":
        queue = MemoryQueue()
    else:
        server = request.getfixturevalue("redis_factory")()
        queue = RedisStreamQueue.from_url(server.url, f"t{uuid.uuid4().hex[:10]}")
    try:
        await queue.push("b1", ["x", "y"])
        held = await queue.take("a", 10, 1.0)
        assert sorted(e.custom_id for e in held) == ["x", "y"]
        for _ in range(4):  # held 1 s in all, touched every 0.25 s: never idle for 0.5 s
            await asyncio.sleep(0.25)
            await queue.touch("a", held)
        assert await queue.reclaim("b", 0.5, 10) == []
        await asyncio.sleep(0.6)
        await queue.touch("c", held)  # not c's entries: nothing changes
        taken = await queue.reclaim("b", 0.5, 10)
        assert sorted(e.custom_id for e in taken) == ["x", "y"]  # a stopped touching: b takes them
        await asyncio.sleep(0.6)
        await queue.touch("a", held)  # a lost them: its heartbeat neither refreshes nor takes them back
        assert sorted(e.custom_id for e in await queue.reclaim("d", 0.5, 10)) == ["x", "y"]
    finally:
        await queue.close()


@pytest.mark.redis
async def test_touch_finds_held_entries_behind_a_long_pending_list(request: pytest.FixtureRequest,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The heartbeat pages through everything the worker holds: 2,500 older entries it still holds (a chunk
    cut short) do not hide the newest ones from it (it used to read only len + 1024 pending entries)."""
    from coe.batch import queue as queue_mod

    monkeypatch.setattr(queue_mod, "TOUCH_PAGE", 1000)
    server = request.getfixturevalue("redis_factory")()
    queue = RedisStreamQueue.from_url(server.url, f"t{uuid.uuid4().hex[:10]}")
    try:
        await queue.push("old", [f"o{i}" for i in range(2500)])
        assert len(await queue.take("a", 2500, 1.0)) == 2500  # held, never acknowledged
        await queue.push("new", ["n1", "n2"])
        held = await queue.take("a", 10, 1.0)
        assert sorted(e.custom_id for e in held) == ["n1", "n2"]
        for _ in range(4):
            await asyncio.sleep(0.25)
            await queue.touch("a", held)
        taken = {e.custom_id for e in await queue.reclaim("b", 0.5, 5000)}
        assert "n1" not in taken and "n2" not in taken and len(taken) == 2500
    finally:
        await queue.close()
