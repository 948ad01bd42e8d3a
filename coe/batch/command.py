"""``coe batch run INPUT --output OUT``: a batch in this process, through the same request paths as
the API server (its backends started and stopped here), resumable after a crash.

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

from coe.batch.lines import read_batch
from coe.batch.run import Progress, run_batch
from coe.config import ROUTED_MODEL
from coe.errors import BackendUnavailable
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


async def _wait_ready(state: Any, backends: set[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        down = [n for n in sorted(backends) if not state.pool.get(n).is_healthy]
        if not down:
            return
        if time.monotonic() > deadline:
            raise BackendUnavailable(f"backends not healthy after {timeout_s:.0f}s: {', '.join(down)}")
        await asyncio.sleep(0.5)


async def _run(args: argparse.Namespace, items: list[Any], output: Path, errors: Path) -> Progress:
    from services.api import create_app
    from services.api.app import state_of
    from services.api.chat.execute import execute

    app = create_app(args.config, poll_interval_s=3600)
    async with app.router.lifespan_context(app):
        state = state_of(app)
        config = state.registry.current.config
        experts = state.registry.current.experts
        models = {i.model for i in items}
        backends = ({e.backend for e in experts.values()} if ROUTED_MODEL in models
                    else {experts[m].backend for m in models})
        timeout = max([b.launch.startup_timeout_s for b in config.backends.values() if b.launch] + [60.0])
        print(f"batch: waiting for {', '.join(sorted(backends))} ...", file=sys.stderr, flush=True)
        await _wait_ready(state, backends, timeout)
        report = Reporter()

        async def run_one(item: Any, request_id: str) -> tuple[int, dict[str, Any]]:
            return await execute(state, item, request_id)

        progress = await run_batch(items, run_one, output=output, errors=errors, concurrency=args.concurrency,
                                   on_progress=report)
        report(progress, final=True)
        return progress


def cmd_batch_run(args: argparse.Namespace) -> int:
    from coe.logs import configure
    from services.api.chat.execute import check_body

    configure(args.log_level)
    cfg = load_registry(args.config)
    items = read_batch(Path(args.input), {ROUTED_MODEL, *(e.name for e in cfg.experts)}, check_body)
    output = Path(args.output)
    errors = Path(args.errors) if args.errors else errors_path(output)
    progress = asyncio.run(_run(args, items, output, errors))
    print(json.dumps({**progress.to_json(), "output": str(output), "errors": str(errors)}))
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
    run.add_argument("--concurrency", type=int, default=8, help="items in flight at once (default 8)")
    run.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
