"""The command line of batch jobs: ``coe batch run | submit | status | download`` and ``coe worker``.

- ``coe batch run INPUT --output OUT``: a batch in this process, through the same request paths as the
  API server, on a ``Runtime`` of its own that starts only the backends its unfinished items use;
  resumable after a crash. Items run in waves grouped by expert (``coe.batch.stages``); on-demand
  backends come up one at a time for their group. Exit status: 0 every item succeeded; 2 some items
  failed (they are in the error file); 1 the input or the registry is invalid (nothing ran).
- ``coe worker`` opens the same ``Runtime`` as the API server (backends, store, a batch worker) without
  serving HTTP; it needs Redis, since only a shared queue lets a separate process take work.
- ``submit | status | download`` talk to a running coe (or any OpenAI-compatible server) over HTTP;
  the API key comes from ``--api-key`` or ``COE_API_KEY``.

It sits beside ``coe.cli``, above ``coe.batch`` and ``coe.runtime``, so that the batch machinery never
imports the runtime that opens it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from coe.batch.lines import BatchItem, read_batch
from coe.batch.run import DEFAULT_WINDOW, Progress, finished_ids, run_batch
from coe.batch.stages import WaveRunner
from coe.config import ROUTED_MODEL, RegistryConfig
from coe.errors import InvalidRequest
from coe.loader import load_registry
from coe.store import is_durable_url, store_url


def errors_path(output: Path) -> Path:
    """The error file's default: ``out.jsonl`` -> ``out.errors.jsonl``."""
    return output.with_name(f"{output.stem}.errors{output.suffix or '.jsonl'}")


class Reporter:
    """Progress on stderr: one updating line on a terminal, else a plain line every 5% or 10 s."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self._last_line = 0.0
        self._last_done = 0

    def event(self, text: str) -> None:
        """A wave starting or a model coming up: its own line (a terminal's progress line continues below)."""
        print(("\n" if self.tty else "") + f"batch: {text}", file=sys.stderr, flush=True)

    def __call__(self, p: Progress, final: bool = False) -> None:
        text = (f"batch: {p.done}/{p.total} done ({p.completed} ok, {p.failed} failed, {p.resumed} from an "
                f"earlier run), {p.rate():.1f} items/s")
        if self.tty:
            print("\r" + text, end="\n" if final else "", file=sys.stderr, flush=True)
            return
        now = time.monotonic()
        if final or p.done - self._last_done >= max(1, p.total // 20) or now - self._last_line >= 10:
            print(text, file=sys.stderr, flush=True)
            self._last_line, self._last_done = now, p.done


async def _run(args: argparse.Namespace, cfg: RegistryConfig, items: list[BatchItem], output: Path,
               errors: Path) -> tuple[Progress, WaveRunner]:
    """The batch on a ``Runtime`` of its own: only the backends its unfinished items can use are started
    (none when a re-run finds everything done), no batch jobs, no file watch."""
    from coe.runtime import Runtime

    done = finished_ids(output) | finished_ids(errors)
    models = {i.model for i in items if i.custom_id not in done}
    experts = {e.name: e for e in cfg.experts}
    used = ({e.backend for e in experts.values()} if ROUTED_MODEL in models
            else {experts[m].backend for m in models if m in experts})
    async with Runtime(args.config, config=cfg, backends=used, batches=False, watch=False,
                       routing=ROUTED_MODEL in models, log_tag="batch-run") as runtime:
        waiting = {b for b in used if not runtime.pool.is_on_demand(b)}  # those come up for their wave
        if waiting:
            print(f"batch: waiting for {', '.join(sorted(waiting))} ...", file=sys.stderr, flush=True)
        await runtime.wait_ready(waiting, runtime.startup_timeout_s())
        report = Reporter()
        runner = WaveRunner(runtime.dispatcher, models=runtime.pool, metrics=runtime.metrics,
                            concurrency=args.concurrency, on_event=report.event)
        progress = await run_batch(items, runtime.chat.execute, runner, output=output, errors=errors,
                                   window=args.window, on_progress=report)
        report(progress, final=True)
        return progress, runner


def cmd_batch_run(args: argparse.Namespace) -> int:
    from coe.logs import configure
    from coe.runtime import body_checker

    configure(args.log_level)
    cfg = load_registry(args.config)
    items = read_batch(Path(args.input), {ROUTED_MODEL, *(e.name for e in cfg.experts)},
                       body_checker(cfg, {e.name: e for e in cfg.experts}))
    output = Path(args.output)
    errors = Path(args.errors) if args.errors else errors_path(output)
    progress, runner = asyncio.run(_run(args, cfg, items, output, errors))
    print(json.dumps({**progress.to_json(), **runner.stats.to_json(), "output": str(output), "errors": str(errors)}))
    return 0 if progress.failed == 0 else 2


def add_commands(sub: Any, command: Any) -> None:
    """``coe batch ...`` on the CLI's subparsers (``command`` adds --config and the handler)."""
    batch = sub.add_parser("batch", help="batch jobs: OpenAI batch lines in, results out").add_subparsers(
        dest="batch_command", required=True, metavar="SUBCOMMAND")
    _add_client_commands(sub, batch, command)
    run = command(batch.add_parser("run", help="run a batch in this process (re-run resumes after a crash)"),
                  cmd_batch_run)
    run.add_argument("input", help="JSONL: {custom_id, method: POST, url: /v1/chat/completions, body}")
    run.add_argument("--output", required=True, help="results, one OpenAI batch output line per succeeded item")
    run.add_argument("--errors", help="failed items (default: OUTPUT with .errors before the suffix)")
    run.add_argument("--concurrency", type=int, default=8,
                     help="expert calls in flight per backend at once (default 8)")
    run.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                     help=f"items staged together, their calls grouped by expert (default {DEFAULT_WINDOW})")
    run.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])


def _stop_before_start(signum: int, frame: object) -> None:
    """SIGTERM before the worker takes anything: nothing is held, so stop at once, cleanly (exit 0)."""
    raise SystemExit(0)


def cmd_worker(args: argparse.Namespace) -> int:
    from coe.logs import configure

    signal.signal(signal.SIGTERM, _stop_before_start)  # until the event loop's handler replaces it in _work
    configure(args.log_level)
    cfg = load_registry(args.config)
    if not is_durable_url(store_url(cfg.store)):
        raise InvalidRequest("coe worker needs Redis: set store.redis_url in the registry or COE_REDIS_URL "
                             "(without Redis, the API server runs batches itself)")
    asyncio.run(_work(args.config, cfg))
    return 0


async def _work(config: str, cfg: RegistryConfig) -> None:
    from coe.runtime import Runtime

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with Runtime(config, config=cfg, batch_worker=True, poll_interval_s=5.0, log_tag=f"worker-{os.getpid()}"):
        print("coe worker: taking batch items (SIGTERM finishes or releases what it holds)", file=sys.stderr,
              flush=True)
        await stop.wait()


class _Remote:
    """A running coe's OpenAI API over HTTP; every failure is one clear line (``InvalidRequest``), never a
    traceback: a server that does not answer, an error status (with a hint when ``--base-url`` lacks
    ``/v1``)."""

    def __init__(self, args: argparse.Namespace) -> None:
        import httpx

        key = args.api_key or os.environ.get("COE_API_KEY")
        self.base_url = args.base_url.rstrip("/")
        self.http = httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {key}"} if key else {},
                                 timeout=120)

    def __enter__(self) -> _Remote:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise InvalidRequest(f"cannot reach {self.base_url}{path}: {exc or type(exc).__name__} "
                                 "(is coe running there?)") from exc
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except Exception:
                message = response.text[:500]
            hint = ""
            if response.status_code == 404 and not self.base_url.endswith("/v1"):
                hint = f" (--base-url is usually the server's OpenAI base URL, e.g. {self.base_url}/v1)"
            raise InvalidRequest(f"HTTP {response.status_code}: {message}{hint}")
        return response


def cmd_submit(args: argparse.Namespace) -> int:
    path = Path(args.input)
    with _Remote(args) as remote:
        with path.open("rb") as f:
            uploaded = remote.call("POST", "/files", files={"file": (path.name, f)}, data={"purpose": "batch"}).json()
        try:
            batch = remote.call("POST", "/batches", json={"input_file_id": uploaded["id"],
                                                          "endpoint": "/v1/chat/completions",
                                                          "completion_window": "24h"}).json()
        except InvalidRequest:
            with contextlib.suppress(InvalidRequest):  # a refused batch leaves no file behind
                remote.call("DELETE", f"/files/{uploaded['id']}")
            raise
    print(json.dumps(batch, indent=2))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with _Remote(args) as remote:
        batch = remote.call("GET", f"/batches/{args.batch_id}").json()
    print(json.dumps(batch, indent=2))
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    with _Remote(args) as remote:
        batch = remote.call("GET", f"/batches/{args.batch_id}").json()
        if batch["status"] not in ("completed", "cancelled", "expired", "failed"):
            counts = batch.get("request_counts") or {}
            raise InvalidRequest(f"batch {args.batch_id} is {batch['status']} ({counts.get('completed', 0)} "
                                 f"completed, {counts.get('failed', 0)} failed of {counts.get('total', '?')}); "
                                 "download it once it has ended")
        written = {}
        output = Path(args.output)
        errors = Path(args.errors) if args.errors else output.with_name(f"{output.stem}.errors{output.suffix}")
        for key, name, path in (("output_file_id", "output", output), ("error_file_id", "errors", errors)):
            if batch.get(key):
                path.write_bytes(remote.call("GET", f"/files/{batch[key]}/content").content)
                written[name] = str(path)
    print(json.dumps({"status": batch["status"], "request_counts": batch.get("request_counts"), **written}))
    return 0


def _add_client_commands(sub: Any, batch: Any, command: Any) -> None:
    """``coe worker`` on the top-level subparsers; submit/status/download under ``coe batch``."""
    worker = command(sub.add_parser("worker", help="take batch items from the Redis queue (needs Redis)"),
                     cmd_worker)
    worker.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    def remote(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--base-url", required=True, help="the server's OpenAI base URL, e.g. http://host:8080/v1")
        p.add_argument("--api-key", help="client key (default: COE_API_KEY)")
        return p

    submit = remote(command(batch.add_parser("submit", help="upload INPUT and create a batch on a server"),
                            cmd_submit))
    submit.add_argument("input")
    status = remote(command(batch.add_parser("status", help="a batch's status and counts"), cmd_status))
    status.add_argument("batch_id")
    download = remote(command(batch.add_parser("download", help="a finished batch's output (and error) file"),
                              cmd_download))
    download.add_argument("batch_id")
    download.add_argument("--output", required=True)
    download.add_argument("--errors", help="default: OUTPUT with .errors before the suffix")
