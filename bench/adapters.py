#!/usr/bin/env python
"""Adapter thrash: the same requests over 8 LoRA adapters, straight to vLLM in arrival order versus
through coe, on one vLLM server that holds fewer adapters than that (``--max-loras 2 --max-cpu-loras 2``).

    .venv/bin/python bench/adapters.py                      # 512 requests, 8 adapters, client c=64 and c=16
    .venv/bin/python bench/adapters.py --requests 128 --concurrency 16

Arms, all against the same vLLM server, the same request list (adapters in a
seeded random arrival order; every request generates exactly ``--max-tokens``
tokens: ``ignore_eos``), one after another in one run:

- ``direct``: the openai SDK sends the list straight to vLLM, ``c`` requests in
  flight, in arrival order.
- ``coe``: the same client, list and ``c`` through coe's OpenAI endpoint (a ``coe serve`` process;
  ``--in-process`` runs it on this process's event loop, with the client)
  (``model`` = the adapter's expert). coe's dispatcher lets
  ``--slots`` calls in flight to the server and orders the waiting ones
  (``coe.dispatch.schedule``). With ``c <= --slots`` nothing waits in coe, so
  there is nothing to reorder: the arm then measures coe's cost, not its order.
- ``coe-batch``: the list submitted as one batch (Files + Batches API) to the same
  coe; its worker (``--slots`` items at a time) runs it grouped by expert.
  Timed from submission to the batch's completion.
- ``direct-sorted``: the list pre-sorted by adapter, straight to vLLM at ``--slots``:
  the ceiling grouping could reach.

Adapter loads are counted from vLLM's own log: with ``VLLM_LOGGING_LEVEL=DEBUG``
its LRU worker manager logs ``Adding lora`` exactly when it reads an adapter
from disk into its CPU cache (not on a cache hit). The minimum for one pass over
8 adapters is 8. Results: ``bench/results/adapters-<UTC timestamp>.json``.

CPU. Each arm also records the CPU seconds spent, per request, by the vLLM server (it and every process
under it), by ``coe serve`` and by this process (the openai SDK client), from ``psutil``. On a 2-core
machine the CPU engine runs its OpenMP threads on every core, so any other busy process (the client in
both arms; coe in one) takes time from it. ``--engine-cpus K`` starts vLLM on the last ``K`` cores only
(its process affinity, and ``VLLM_CPU_OMP_THREADS_BIND`` to the same list) and this process and coe on
the others, as a deployment would keep a gateway off the inference engine's cores; both arms then share
the same placement.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meta import git_state, versions  # noqa: E402

from coe.backends.launch import ManagedVLLM  # noqa: E402
from coe.config import LaunchConfig, LoraModule  # noqa: E402
from coe.models.tiny import build_tiny  # noqa: E402
from coe.testing.replicas import Proc, coe_command, wait_http  # noqa: E402
from coe.testing.server import free_port, serve_app  # noqa: E402
from services.api.app import create_app  # noqa: E402

LOAD_LINE = "Adding lora"


def count_loads(log: Path, start: int) -> tuple[int, int]:
    """Loads logged since byte ``start``, and the new end offset."""
    data = log.read_bytes()
    return data[start:].count(LOAD_LINE.encode()), len(data)


def tree_pids(pid: int) -> list[int]:
    """``pid`` and every process under it (a ManagedVLLM server and the engine it spawns)."""
    root = psutil.Process(pid)
    return [pid, *(p.pid for p in root.children(recursive=True))]


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of ``pids`` so far (a process that is gone counts 0)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
    return total


def requests_list(n: int, adapters: int, seed: int) -> list[int]:
    order = [i % adapters for i in range(n)]
    random.Random(seed).shuffle(order)
    return order


def body(i: int, adapter: int, max_tokens: int) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": f"Request {i}: tell me about the sea."}],
            "max_tokens": max_tokens, "temperature": 0}


async def run_clients(client: openai.AsyncOpenAI, models: list[str], order: list[int], concurrency: int,
                      max_tokens: int) -> dict[str, Any]:
    queue = list(enumerate(order))
    queue.reverse()
    tokens = 0

    async def worker() -> None:
        nonlocal tokens
        while queue:
            i, a = queue.pop()
            r = await client.chat.completions.create(model=models[a], **body(i, a, max_tokens),
                                                     extra_body={"ignore_eos": True})
            tokens += r.usage.completion_tokens if r.usage else 0

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 3), "requests_per_s": round(len(order) / seconds, 3),
            "completion_tokens": tokens, "tokens_per_s": round(tokens / seconds, 1)}


async def run_batch(client: openai.AsyncOpenAI, experts: list[str], order: list[int],
                    max_tokens: int) -> dict[str, Any]:
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": experts[a], **body(i, a, max_tokens), "ignore_eos": True}}
             for i, a in enumerate(order)]
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    started = time.perf_counter()
    file = await client.files.create(file=("bench.jsonl", data), purpose="batch")
    batch = await client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                        completion_window="24h")
    while batch.status not in ("completed", "failed", "cancelled", "expired"):
        await asyncio.sleep(0.1)
        batch = await client.batches.retrieve(batch.id)
    seconds = time.perf_counter() - started
    counts = batch.request_counts
    tokens = 0
    if batch.output_file_id:
        text = (await client.files.content(batch.output_file_id)).text
        tokens = sum(json.loads(x)["response"]["body"]["usage"]["completion_tokens"] for x in text.splitlines())
    return {"seconds": round(seconds, 3), "requests_per_s": round(len(order) / seconds, 3), "status": batch.status,
            "completed": counts.completed if counts else None, "failed": counts.failed if counts else None,
            "completion_tokens": tokens, "tokens_per_s": round(tokens / seconds, 1)}


@contextlib.asynccontextmanager
async def coe_server(work: Path, in_process: bool, pids: list[int]) -> AsyncIterator[str]:
    """coe on ``work/experts.yaml``: a ``coe serve`` process of its own (default), so that the client's CPU
    (the openai SDK parsing 64 streams of answers) does not share coe's one Python thread, as it did when
    both ran in this process (``--in-process``, the arm before 2026-12-05, which measured 0.80x)."""
    if in_process:
        async with serve_app(create_app(work / "experts.yaml", poll_interval_s=5.0)) as url:
            yield url  # coe's CPU is this process's: counted under "client"
        return
    port = free_port()
    proc = Proc("coe", [coe_command(), "serve", "--config", str(work / "experts.yaml"), "--port", str(port),
                        "--log-level", "warning"], work / "coe.log", port).start()
    assert proc.popen is not None
    pids.append(proc.popen.pid)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health/ready", proc, 300, "coe serve")
        yield url
    finally:
        proc.stop()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="coe-bench-adapters-"))
    cpus = sorted(os.sched_getaffinity(0))
    engine_cpus: set[int] = set()
    others: set[int] = set(cpus)
    engine_env: dict[str, str] = {}
    if args.engine_cpus:
        if not 0 < args.engine_cpus < len(cpus):
            raise SystemExit(f"--engine-cpus must be between 1 and {len(cpus) - 1} on this machine ({len(cpus)} cores)")
        engine_cpus = set(cpus[-args.engine_cpus:])
        others = set(cpus) - engine_cpus
        engine_env = {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, sorted(engine_cpus)))}
    tiny = build_tiny(work / "tiny", adapters=args.adapters)
    names = sorted(tiny.adapters, key=lambda n: int(n.rsplit("-", 1)[1]))
    log = work / "vllm.log"
    cfg = LaunchConfig(model=tiny.path, served_name=tiny.served_name,
                       lora_modules=[LoraModule(name=n, path=tiny.adapters[n]) for n in names],
                       max_loras=args.max_loras, max_cpu_loras=args.max_cpu_loras, max_lora_rank=8,
                       zero_base_adapter=False, args=["--dtype", "float32", "--max-model-len", "512"],
                       env={"VLLM_LOGGING_LEVEL": "DEBUG", **engine_env}, log_file=log, startup_timeout_s=900)
    vllm = ManagedVLLM("bench", cfg, python=sys.executable, health_interval_s=1.0)
    if engine_cpus:
        os.sched_setaffinity(0, engine_cpus)  # vLLM and its engine inherit the engine's cores ...
    await vllm.start()
    if engine_cpus:
        os.sched_setaffinity(0, others)  # ... and this client, and coe started below, the others
    results: dict[str, Any] = {"arms": []}
    try:
        await vllm.wait_healthy()
        experts = [f"ad{i}" for i in range(len(names))]
        registry = {
            "backends": {"v": {"url": f"{vllm.base_url}/v1", "max_concurrency": args.slots,
                               "max_loras": args.max_loras, "max_cpu_loras": args.max_cpu_loras,
                               "timeouts": {"read_s": 600, "total_s": 1800}}},
            "experts": [{"name": e, "backend": "v", "model": tiny.served_name,
                         "adapter": {"name": n, "path": str(tiny.adapters[n])}}
                        for e, n in zip(experts, names, strict=True)],
            "auth": {"client_auth": False, "admin_auth": False},
            "store": {"worker_concurrency": args.slots},
        }
        (work / "experts.yaml").write_text(yaml.safe_dump(registry, sort_keys=False))
        order = requests_list(args.requests, len(names), args.seed)
        direct = openai.AsyncOpenAI(base_url=f"{vllm.base_url}/v1", api_key="none", max_retries=0, timeout=1800)
        coe_pids: list[int] = []
        async with coe_server(work, args.in_process, coe_pids) as url:
            via = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=1800)
            await run_clients(direct, names, list(range(len(names))), 1, 2)  # warm-up: every adapter once
            offset = count_loads(log, 0)[1]
            arms: list[tuple[str, int]] = []
            for r in range(args.rounds):  # alternate which arm goes first, so neither always runs warmer
                for c in args.concurrency:
                    arms += [("direct", c), ("coe", c)] if r % 2 == 0 else [("coe", c), ("direct", c)]
            arms += [("coe-batch", args.slots), ("direct-sorted", args.slots)]
            assert vllm.pid is not None
            vllm_pids = tree_pids(vllm.pid)
            for arm, c in arms:
                await asyncio.sleep(1.0)
                offset = count_loads(log, offset)[1]
                cpu_before = [cpu_seconds(p) for p in (vllm_pids, coe_pids, [os.getpid()])]
                if arm == "direct":
                    row = await run_clients(direct, names, order, c, args.max_tokens)
                elif arm == "coe":
                    row = await run_clients(via, experts, order, c, args.max_tokens)
                elif arm == "coe-batch":
                    row = await run_batch(via, experts, order, args.max_tokens)
                else:
                    row = await run_clients(direct, names, sorted(order), c, args.max_tokens)
                cpu_after = [cpu_seconds(p) for p in (vllm_pids, coe_pids, [os.getpid()])]
                cpu_ms = [round(1000 * (a - b) / len(order), 2) for a, b in zip(cpu_after, cpu_before, strict=True)]
                await asyncio.sleep(1.0)
                loads, offset = count_loads(log, offset)
                row.update(arm=arm, concurrency=c, adapter_loads=loads,
                           cpu_ms_per_request=dict(zip(("vllm", "coe", "client"), cpu_ms, strict=True)))
                results["arms"].append(row)
                print(json.dumps(row), flush=True)
    finally:
        await vllm.stop()
    by = {(r["arm"], r["concurrency"]): r for r in results["arms"]}
    ratios = {}
    for c in args.concurrency:
        pairs = [(d["tokens_per_s"], o["tokens_per_s"]) for d, o in zip(
            [r for r in results["arms"] if r["arm"] == "direct" and r["concurrency"] == c],
            [r for r in results["arms"] if r["arm"] == "coe" and r["concurrency"] == c], strict=True)]
        per_round = sorted(o / d for d, o in pairs)
        ratios[f"coe/direct c={c}"] = round(per_round[len(per_round) // 2], 3)  # the median round
        ratios[f"coe/direct c={c} each round"] = [round(x, 3) for x in per_round]
        ratios[f"coe-batch/direct c={c}"] = round(
            by[("coe-batch", args.slots)]["tokens_per_s"] / by[("direct", c)]["tokens_per_s"], 3)
    ratios[f"direct-sorted/direct c={args.slots}"] = round(
        by[("direct-sorted", args.slots)]["tokens_per_s"] / by[("direct", args.slots)]["tokens_per_s"], 3) \
        if ("direct", args.slots) in by else None
    results.update(
        ratios=ratios, minimum_loads=len(names),
        config={k: v for k, v in vars(args).items() if k not in ("workdir", "output")},
        placement={"engine_cpus": sorted(engine_cpus) or cpus, "client_and_coe_cpus": sorted(others)},
        command=" ".join([".venv/bin/python", *sys.argv]),
        machine={"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg": os.getloadavg()},
        versions=versions("coe", "openai", "vllm-cpu", "torch"), git=git_state(),
        timestamp=dt.datetime.now(dt.UTC).isoformat())
    return results


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=512)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--max-loras", type=int, default=2)
    p.add_argument("--max-cpu-loras", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--slots", type=int, default=256,
                   help="coe's max_concurrency to the server (coe's default, 256), and the batch worker's")
    p.add_argument("--concurrency", type=int, nargs="+", default=[64, 16], help="client requests in flight")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1, help="direct and coe arms this many times each (median ratio)")
    p.add_argument("--in-process", action="store_true",
                   help="run coe inside this process, on the client's event loop (the old arm)")
    p.add_argument("--engine-cpus", type=int, default=0,
                   help="run vLLM on the last K cores, this client and coe on the rest (default 0: all share all)")
    p.add_argument("--workdir", help="keep the tiny build and logs here (default: a new temp folder)")
    p.add_argument("--output", type=Path)
    return p.parse_args(argv)


if __name__ == "__main__":
    ns = parse()
    out = asyncio.run(main(ns))
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = ns.output or ROOT / "bench" / "results" / f"adapters-{stamp}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["ratios"], indent=2))
    print(f"wrote {path}")
