#!/usr/bin/env python
"""What a big batch file does to a running server: how long the event loop stalls while the file is
uploaded and its batch created, and whether the memory comes back after cancel and delete.

    .venv/bin/python bench/big_batch.py                       # 64 MiB input, this checkout
    .venv/bin/python bench/big_batch.py --coe-src /tmp/old    # the same against another checkout
    .venv/bin/python bench/big_batch.py --mib 200 --rounds 2

What it does
- Starts ``coe serve`` (a separate process; from ``--coe-src`` when given) on a one-expert registry whose
  backend is a port nothing listens on: no item can run, so what is measured is the server's handling
  of the file, not inference. ``store.max_file_bytes`` is raised to fit the file.
- Builds an input of ``--mib`` MiB of valid batch lines.
- While a pinger sends ``GET /health/live`` every 20 ms and records each latency, each round uploads the
  file, creates the batch, cancels it and deletes the file.
- Records: the worst and p99 ping latency during upload and during create, the create call's time, and
  the server's RSS (from ``/proc``) before, after each round and every 5 s for ``--settle-s`` after the last.

Results: ``bench/results/big-batch-<UTC timestamp>.json`` and a summary on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from meta import git_state, pct

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return -1.0


def build_input(path: Path, mib: int) -> int:
    line = {"method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "e1", "max_tokens": 8, "messages": [{"role": "user", "content": "x" * 120}]}}
    n = 0
    with path.open("w") as f:
        while f.tell() < mib * 1024 * 1024:
            f.write(json.dumps({"custom_id": f"r{n}", **line}) + "\n")
            n += 1
    return n


class Pinger:
    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http
        self.samples: list[tuple[float, float]] = []

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            with contextlib.suppress(httpx.HTTPError):
                await self.http.get("/health/live", timeout=60)
            self.samples.append((t0, (time.perf_counter() - t0) * 1000))
            await asyncio.sleep(0.02)

    def during(self, start: float, end: float) -> dict[str, float]:
        xs = sorted(ms for t, ms in self.samples if start <= t <= end)
        if not xs:
            return {"pings": 0, "max_ms": 0.0, "p99_ms": 0.0}
        return {"pings": len(xs), "max_ms": round(xs[-1], 1), "p99_ms": round(pct(xs, 99), 1)}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="coe-big-batch-"))
    src = Path(args.coe_src).resolve() if args.coe_src else ROOT
    module = "services.cli" if (src / "services" / "cli.py").exists() else "coe.cli"
    config = tmp / "experts.yaml"
    config.write_text(f"backends: {{dead: {{url: 'http://127.0.0.1:{free_port()}/v1'}}}}\n"
                      "experts: [{name: e1, backend: dead, model: m}]\n"
                      "auth: {client_auth: false, admin_auth: false}\n"
                      f"store: {{max_file_bytes: {(args.mib + 8) * 1024 * 1024}}}\n")
    source = tmp / "in.jsonl"
    lines = build_input(source, args.mib)
    data = source.read_bytes()
    port = free_port()
    log = (tmp / "coe.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", module, "serve", "--config", str(config), "--port", str(port),
                             "--log-level", "warning"], cwd=src, stdout=log, stderr=subprocess.STDOUT)
    rounds: list[dict[str, Any]] = []
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600) as http:
            for _ in range(300):
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get("/health/live")).status_code == 200:
                        break
                await asyncio.sleep(0.2)
            await asyncio.sleep(1)
            rss_start = rss_mib(proc.pid)
            pinger = Pinger(httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}"))
            stop = asyncio.Event()
            ping_task = asyncio.create_task(pinger.run(stop))
            for r in range(args.rounds):
                t0 = time.perf_counter()
                uploaded = (await http.post("/v1/files", files={"file": ("in.jsonl", data)},
                                            data={"purpose": "batch"})).json()
                t1 = time.perf_counter()
                created = await http.post("/v1/batches", json={"input_file_id": uploaded["id"],
                                                               "endpoint": "/v1/chat/completions",
                                                               "completion_window": "24h"})
                t2 = time.perf_counter()
                batch = created.json()
                await http.post(f"/v1/batches/{batch['id']}/cancel")
                await http.delete(f"/v1/files/{uploaded['id']}")
                await asyncio.sleep(1)
                rounds.append({"round": r + 1, "create_status": created.status_code,
                               "upload_s": round(t1 - t0, 2), "create_s": round(t2 - t1, 2),
                               "ping_during_upload": pinger.during(t0, t1),
                               "ping_during_create": pinger.during(t1, t2), "rss_after_mib": rss_mib(proc.pid)})
                print(f"round {r + 1}: create {created.status_code} in {t2 - t1:.1f}s; worst ping during create "
                      f"{rounds[-1]['ping_during_create']['max_ms']} ms; RSS {rounds[-1]['rss_after_mib']} MiB",
                      flush=True)
            settle: list[dict[str, float]] = []
            for waited in range(0, args.settle_s + 1, 5):  # RSS while the worker works off the cancelled items
                settle.append({"s": waited, "rss_mib": rss_mib(proc.pid)})
                if waited < args.settle_s:
                    await asyncio.sleep(5)
            rss_end = settle[-1]["rss_mib"]
            stop.set()
            await ping_task
            await pinger.http.aclose()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return {"bench": "big-batch", "timestamp": stamp, "command": " ".join([sys.executable, *sys.argv]),
            "coe_src": str(src), "git": git_state(), "cpu_count": os.cpu_count(),
            "input": {"mib": args.mib, "lines": lines}, "rss_start_mib": rss_start, "rss_end_mib": rss_end,
            "rss_after_last_round": settle,
            "rounds": rounds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--mib", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--settle-s", type=int, default=5, help="seconds to follow RSS after the last round")
    p.add_argument("--coe-src", default=None, help="run coe serve from this checkout (e.g. a worktree)")
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    result = asyncio.run(main_async(args))
    out = Path(args.output) if args.output else RESULTS / f"big-batch-{result['timestamp']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"RSS {result['rss_start_mib']} -> {result['rss_end_mib']} MiB ({args.settle_s} s after the last round): "
          f"{[x['rss_mib'] for x in result['rss_after_last_round']]}\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
