"""One fan-out round: ask the recruited experts at once, stop at the quorum or the deadline.

Every expert gets the same conversation and sampling parameters. An expert that
fails is recorded and skipped; one still running when the quorum is reached or
the round's deadline passes is cancelled (closing the connection makes vLLM
abort it) and recorded as ``late``. Cancelling the round (client disconnect)
cancels every call in it.

A staged batch run (``Context.staged``) has no round deadline: its calls wait for
their wave, and that wait is not the experts' slowness.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from coe.aggregate import Answer, strip_think
from coe.config import ExpertConfig
from coe.dispatch import ExpertCall
from coe.errors import CoeError
from coe.pipeline.state import CallRecord, Context

Result = tuple[dict[str, Any], ExpertConfig, ExpertCall]


def content_of(response: dict[str, Any]) -> str:
    choices = response.get("choices") or [{}]
    return str((choices[0].get("message") or {}).get("content") or "")


def quorum_of(n: int, share: float) -> int:
    """Answers needed out of ``n``: ``share`` of them rounded up, at least one."""
    return max(1, min(n, math.ceil(share * n - 1e-9)))


async def fan_out(ctx: Context, experts: list[ExpertConfig], messages: list[dict[str, Any]],
                  round_no: int) -> tuple[list[Answer], list[CallRecord], list[CoeError]]:
    body = {**ctx.params, "messages": messages}
    started = time.perf_counter()
    with ctx.telemetry.labels({"coe.role": "expert", "coe.round": round_no}):  # the tasks copy the labels
        tasks = [asyncio.create_task(ctx.dispatcher.chat([e], body, request_id=ctx.request_id), name=f"coe-{e.name}")
                 for e in experts]
    need = quorum_of(len(tasks), ctx.config.quorum)
    deadline = math.inf if ctx.staged else started + ctx.config.expert_deadline_s
    pending = set(tasks)
    answered = 0
    try:
        while pending and answered < need:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            done, pending = await asyncio.wait(pending, timeout=None if math.isinf(remaining) else remaining,
                                               return_when=asyncio.FIRST_COMPLETED)
            answered += sum(1 for t in done if t.exception() is None)
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    answers: list[Answer] = []
    records: list[CallRecord] = []
    errors: list[CoeError] = []
    elapsed_ms = (time.perf_counter() - started) * 1000
    for expert, task in zip(experts, tasks, strict=True):
        if task.cancelled():  # a call that finished as the round ended still counts
            reason = "the quorum was reached first" if answered >= need else \
                f"no answer within expert_deadline_s ({ctx.config.expert_deadline_s:g}s)"
            records.append(CallRecord(expert.name, "expert", round_no, "late", latency_ms=elapsed_ms, error=reason))
            ctx.metrics.pipeline_late.labels(expert.name).inc()
            continue
        exc = task.exception()
        if exc is not None:
            if not isinstance(exc, CoeError):
                raise exc
            records.append(CallRecord(expert.name, "expert", round_no, "failed", latency_ms=elapsed_ms,
                                      error=exc.message))
            errors.append(exc)
            continue
        response, _, call = task.result()
        answers.append(Answer(expert.name, strip_think(content_of(response)), response, round_no))
        records.append(CallRecord(expert.name, "expert", round_no, "ok", call.usage, call.cost, call.latency_ms))
    return answers, records, errors
