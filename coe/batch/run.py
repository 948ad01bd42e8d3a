"""Running a batch in one process, resumably.

Contract:
- Results are appended to the output file (2xx) or the error file (anything
  else), one line per item, flushed and fsynced as each item finishes.
- Re-running the same input with the same files resumes: items whose
  ``custom_id`` already has a line in either file are not run again. A line torn
  by a crash (no final newline) is cut off first, and its item runs again.
- Items run in waves (``coe.batch.stages``): every expert call of a window of
  items is parked, then each expert's calls go out together (the aggregators'
  in the next wave), so an adapter stays busy and an on-demand model loads once
  per wave. Windows of ``window`` items follow ``grouped`` order, so a batch
  larger than one window still meets each model in as few windows as it can.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import orjson

from coe.batch.lines import BatchItem, output_line
from coe.batch.stages import Job, WaveRunner

if TYPE_CHECKING:
    from coe.pipeline.state import ChatCaller

Execute = Callable[[BatchItem, str, "ChatCaller"], Awaitable[tuple[int, dict[str, Any]]]]
"""(item, request id, the caller its expert calls go through) -> (HTTP status, response body);
failures are statuses, never exceptions."""

DEFAULT_WINDOW = 1000
"""Items staged together: their calls are grouped across the whole window."""


@dataclass
class Progress:
    total: int
    resumed: int
    completed: int = 0
    failed: int = 0
    started: float = field(default_factory=time.perf_counter)

    @property
    def done(self) -> int:
        return self.resumed + self.completed + self.failed

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.started
        return (self.completed + self.failed) / elapsed if elapsed > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"total": self.total, "resumed": self.resumed, "completed": self.completed, "failed": self.failed,
                "seconds": round(time.perf_counter() - self.started, 3)}


def finished_ids(path: Path) -> set[str]:
    """The custom_ids with a result line in ``path``; a torn last line (a crash mid-write) is cut off."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with path.open("r+b") as f:
            f.truncate(keep)
        data = data[:keep]
    ids = set()
    for line in data.splitlines():
        if line.strip():
            ids.add(str(orjson.loads(line)["custom_id"]))
    return ids


class _Appender:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[bytes] = path.open("ab")

    def write(self, obj: dict[str, Any]) -> None:
        self._file.write(orjson.dumps(obj) + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def grouped(items: list[BatchItem]) -> list[BatchItem]:
    """Items ordered by model, models in order of first appearance, items in input order within one."""
    first: dict[str, int] = {}
    for i, item in enumerate(items):
        first.setdefault(item.model, i)
    return sorted(items, key=lambda it: first[it.model])


async def run_batch(items: list[BatchItem], execute: Execute, runner: WaveRunner, *, output: Path, errors: Path,
                    window: int = DEFAULT_WINDOW, on_progress: Callable[[Progress], None] | None = None) -> Progress:
    """Every item without a result line, through ``runner``'s waves, ``window`` items at a time
    (in input order when the runner does not group: the arrival-order baseline)."""
    done = finished_ids(output) | finished_ids(errors)
    todo = [i for i in items if i.custom_id not in done]
    if runner.group:
        todo = grouped(todo)
    progress = Progress(total=len(items), resumed=len(items) - len(todo))
    out, err = _Appender(output), _Appender(errors)

    def job(item: BatchItem) -> Job:
        async def run(caller: ChatCaller) -> None:
            request_id = f"batch-{uuid.uuid4().hex[:16]}"
            status, body = await execute(item, request_id, caller)
            if 200 <= status < 300:
                out.write(output_line(item.custom_id, request_id, status, body))
                progress.completed += 1
            else:
                found = body.get("error")
                error: dict[str, Any] = found if isinstance(found, dict) else {}
                summary = {"code": error.get("code") or error.get("type"), "message": error.get("message")}
                err.write(output_line(item.custom_id, request_id, status, body, summary))
                progress.failed += 1
            if on_progress is not None:
                on_progress(progress)
        return run

    try:
        for start in range(0, len(todo), max(1, window)):
            await runner.run([job(item) for item in todo[start:start + max(1, window)]])
    finally:
        out.close()
        err.close()
    return progress
