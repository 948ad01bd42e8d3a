#!/usr/bin/env python
"""Replicas as one service, the longer runs of ``tests/test_replicas.py``: throughput against the number of
``coe serve`` replicas behind haproxy, side by side in one run, and one replica SIGKILLed under load.

    .venv/bin/python bench/replicas.py                          # 1, 2, 3 replicas x 15 s; 30 s kill run
    .venv/bin/python bench/replicas.py --seconds 5 --kill-seconds 10   # quicker

What it does (everything started here, as in the test: ``coe.testing.replicas``)
- a private ``redis-server`` (append-only), the STUB upstream in its own process;
- for N in ``--replicas`` (default 1 2 3): N ``coe serve`` processes (no batch worker) behind haproxy,
  closed-loop load at ``--concurrency`` for ``--seconds`` through the balancer; for N = 1 also straight to
  the replica (what the balancer costs);
- for N in ``--workers`` (default 1 2): one ``coe serve --workers N``, load straight to it (no balancer);
- the kill run: 3 replicas and 2 ``coe worker``s, a batch of ``--batch-items`` created through the balancer,
  load for ``--kill-seconds`` with one replica SIGKILLed a third of the way in; records the success rate
  and whether every batch item came back exactly once.

Caveat: the load generator is one Python process (httpx) on the same 2 cores as the replicas, haproxy,
the stub and Redis; it takes a large share of the CPU, so the numbers are what this machine sustains as a
whole, not a replica's ceiling.

Results: ``bench/results/replicas-<UTC timestamp>.json`` and a summary on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "tests"))  # the tests' real-server helpers

import httpx  # noqa: E402
from apphelpers import write_registry  # noqa: E402
from meta import git_state, versions  # noqa: E402
from redis_server import RedisServer  # noqa: E402

from coe.testing.replicas import Fleet, Proc, coe_command, fleet_registry, load, start_stub, wait_http  # noqa: E402
from coe.testing.server import free_port  # noqa: E402


def registry(stub_url: str, redis: RedisServer) -> dict[str, Any]:
    return fleet_registry(stub_url, redis.url, f"bench{random.randrange(10**6)}")


def batch_lines(n: int, tag: str) -> bytes:
    body = {"model": "fast", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    return "".join(json.dumps({"custom_id": f"{tag}-{i}", "method": "POST", "url": "/v1/chat/completions",
                               "body": body}) + "\n" for i in range(n)).encode()


async def throughput(workdir: Path, config: Path, n: int, args: argparse.Namespace) -> dict[str, Any]:
    fleet = Fleet(workdir / f"n{n}", config, replicas=n, workers=0)
    fleet.workdir.mkdir()
    fleet.start()
    try:
        await load(fleet.url, concurrency=args.concurrency, duration_s=2)  # warm-up
        row: dict[str, Any] = {"replicas": n, "balanced": (await load(fleet.url, concurrency=args.concurrency,
                                                                      duration_s=args.seconds)).summary()}
        if n == 1:
            row["direct"] = (await load(fleet.replica_urls()[0], concurrency=args.concurrency,
                                        duration_s=args.seconds)).summary()
        return row
    finally:
        fleet.stop()


async def workers_throughput(workdir: Path, config: Path, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """One ``coe serve --workers n`` on its own port, no balancer: what more processes on one machine buy."""
    port = free_port()
    folder = Path(tempfile.mkdtemp(prefix=f"w{n}-", dir=workdir))
    serve = Proc(f"workers{n}", [coe_command(), "serve", "--config", str(config), "--port", str(port), "--workers",
                                 str(n), "--log-level", "warning"], folder / "serve.log", port).start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health/ready", serve, 120, f"coe serve --workers {n}")
        await load(url, concurrency=args.concurrency, duration_s=2)  # warm-up
        return {"workers": n, "direct": (await load(url, concurrency=args.concurrency,
                                                    duration_s=args.seconds)).summary()}
    finally:
        serve.stop()


async def kill_run(workdir: Path, config: Path, args: argparse.Namespace) -> dict[str, Any]:
    fleet = Fleet(workdir / "kill", config, replicas=3, workers=2)
    fleet.workdir.mkdir()
    fleet.start()
    try:
        async with httpx.AsyncClient(base_url=f"{fleet.url}/v1", timeout=30) as http:
            file_id = (await http.post("/files", files={"file": ("k.jsonl", batch_lines(args.batch_items, "k"))},
                                       data={"purpose": "batch"})).json()["id"]
            batch_id = (await http.post("/batches", json={"input_file_id": file_id, "completion_window": "24h",
                                                          "endpoint": "/v1/chat/completions"})).json()["id"]
            victim: Proc = fleet.serve[1]

            async def kill() -> None:
                await asyncio.sleep(args.kill_seconds / 3)
                victim.signal(signal.SIGKILL)

            result, _ = await asyncio.gather(load(fleet.url, concurrency=args.concurrency,
                                                  duration_s=args.kill_seconds), kill())
            deadline = time.monotonic() + 300
            while True:
                batch = (await http.get(f"/batches/{batch_id}")).json()
                if batch["status"] in ("completed", "failed", "cancelled", "expired") or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            ids: list[str] = []
            if batch.get("output_file_id"):
                text = (await http.get(f"/files/{batch['output_file_id']}/content")).text
                ids = [json.loads(line)["custom_id"] for line in text.splitlines()]
        want = {f"k-{i}" for i in range(args.batch_items)}
        return {"seconds": args.kill_seconds, "concurrency": args.concurrency, "load": result.summary(),
                "batch": {"status": batch["status"], "items": args.batch_items, "returned": len(ids),
                          "missing": len(want - set(ids)), "duplicates": len(ids) - len(set(ids))}}
    finally:
        fleet.stop()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="coe-replicas-") as tmp:
        workdir = Path(tmp)
        with RedisServer(workdir / "redis", appendonly=True) as redis:
            stub, stub_url = start_stub(workdir)
            try:
                config = write_registry(workdir / "experts.yaml", registry(stub_url, redis))
                workers = [await workers_throughput(workdir, config, n, args) for n in args.workers]
                rows = [await throughput(workdir, config, n, args) for n in args.replicas]
                killed = await kill_run(workdir, config, args) if args.kill_seconds > 0 else None
            finally:
                stub.stop()
    return {"workers": workers, "throughput": rows, "kill": killed}


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, nargs="*", default=[1, 2, 3])
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2],
                        help="also one 'coe serve --workers N' per N, straight (no balancer)")
    parser.add_argument("--seconds", type=float, default=15.0, help="load per throughput cell")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--kill-seconds", type=float, default=30.0, help="0 skips the kill run")
    parser.add_argument("--batch-items", type=int, default=1000)
    parser.add_argument("--output", help="results file (default bench/results/replicas-<UTC timestamp>.json)")
    args = parser.parse_args()
    started = dt.datetime.now(dt.UTC)
    load0 = os.getloadavg()
    measured = asyncio.run(main(args))
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    result = {"bench": "replicas", "timestamp": stamp, "command": shlex.join([sys.executable, *sys.argv]),
              "cpus": os.cpu_count(), "loadavg_start": load0, "loadavg_end": os.getloadavg(),
              "versions": versions("uvicorn", "httpx", "redis"), "git": git_state(), **measured}
    out = Path(args.output) if args.output else RESULTS / f"replicas-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    for row in result["workers"]:
        print(f"coe serve --workers {row['workers']}: {row['direct']}")
    for row in result["throughput"]:
        extra = f"; direct {row['direct']}" if "direct" in row else ""
        print(f"{row['replicas']} replica(s) behind haproxy: {row['balanced']}{extra}")
    if result["kill"]:
        print(f"kill run: {result['kill']}")
    print(f"results: {out}")


if __name__ == "__main__":
    cli()
