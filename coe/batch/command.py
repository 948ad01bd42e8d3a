"""``coe batch run INPUT --output OUT``: a batch in this process, through the same request paths as
the API server (its backends started and stopped here), resumable after a crash. Items run in waves
grouped by expert (``coe.batch.stages``); on-demand backends come up one at a time for their group.

Exit status: 0 every item succeeded; 2 some items failed (they are in the error
file); 1 the input or the registry is invalid (nothing ran).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from coe.batch.lines import BatchItem, read_batch
from coe.batch.run import DEFAULT_WINDOW, Progress, finished_ids, run_batch
from coe.batch.stages import WaveRunner
from coe.config import ROUTED_MODEL, RegistryConfig
from coe.loader import load_registry


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
                       routing=ROUTED_MODEL in models) as runtime:
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
    from coe.runtime import check_body

    configure(args.log_level)
    cfg = load_registry(args.config)
    items = read_batch(Path(args.input), {ROUTED_MODEL, *(e.name for e in cfg.experts)}, check_body)
    output = Path(args.output)
    errors = Path(args.errors) if args.errors else errors_path(output)
    progress, runner = asyncio.run(_run(args, cfg, items, output, errors))
    print(json.dumps({**progress.to_json(), **runner.stats.to_json(), "output": str(output), "errors": str(errors)}))
    return 0 if progress.failed == 0 else 2


def add_commands(sub: Any, command: Any) -> None:
    """``coe batch ...`` on the CLI's subparsers (``command`` adds --config and the handler)."""
    batch = sub.add_parser("batch", help="batch jobs: OpenAI batch lines in, results out").add_subparsers(
        dest="batch_command", required=True, metavar="SUBCOMMAND")
    from coe.batch.client import add_commands as add_client_commands

    add_client_commands(sub, batch, command)
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
