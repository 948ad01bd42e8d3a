"""The pipeline runs its straight steps (classify, recruit, retrieve, and a single expert's path) without
LangGraph, and only the rounds in it (``coe.pipeline.graph.run``). Here every request shape is run both
ways over a real stub upstream: through that split, and through the whole graph compiled as one
(``build_graph``, the reference). The final state (the response, the ``coe`` field's trace and calls),
the spans and the counters must be the same.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from apphelpers import write_registry
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from coe.metrics import Metrics
from coe.pipeline import Options, graph
from coe.pipeline.response import coe_field, completion
from coe.runtime import Runtime
from coe.telemetry import Telemetry
from coe.testing.server import serve_app
from coe.testing.stub_upstream import StubRecord, create_stub_app

TIMING = re.compile(r"(_ms|latency_ms|ms)$")


@pytest_asyncio.fixture(loop_scope="session")
async def runtime(tmp_path: Path) -> AsyncIterator[Runtime]:
    async with serve_app(create_stub_app(record=StubRecord())) as url:
        reg = {"backends": {"up": {"url": f"{url}/v1"}},
               "experts": [{"name": n, "backend": "up", "model": m, "cost": {"input_per_mtok": 1.0}}
                           for n, m in (("e1", "stub"), ("e2", "stub"), ("e3", "stub+fail"), ("e4", "stub"))],
               "router": {"strategy": "default", "default_expert": "e1", "fallbacks": 1},
               "pipeline": {"consensus_similarity": None, "escalate_below": 0.9, "max_rounds": 2},
               "auth": {"client_auth": False, "admin_auth": False}}
        async with Runtime(write_registry(tmp_path / "experts.yaml", reg), batches=False) as rt:
            yield rt


def scrub(value: Any) -> Any:
    """The state as JSON, without what differs between two runs of one request (times, ids)."""
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items() if not TIMING.search(k) and k not in ("id", "created")}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value


def counters(metrics: Metrics) -> list[str]:
    return sorted(line for line in metrics.render().decode().splitlines()
                  if line and not line.startswith("#") and not re.search(r"_(bucket|sum|count|created)\b", line)
                  and "duration" not in line and "wait" not in line)


async def run_both(rt: Runtime, options: Options, *, stream: bool = False) -> list[tuple[Any, list[Any], list[str]]]:
    out = []
    for split in (True, False):
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        telemetry = Telemetry(provider.get_tracer("test"), provider=provider)
        metrics = Metrics()
        ctx = rt.pipeline.context(rt.registry.current, metrics=metrics,
                                  messages=[{"role": "user", "content": "Name a sea."}],
                                  params={"max_tokens": 4}, request_id="same-id", options=options, stream=stream)
        ctx = type(ctx)(**{**ctx.__dict__, "telemetry": telemetry})
        with telemetry.span("request"):
            state = await (graph.run(rt.pipeline.rounds, ctx) if split
                           else graph.build_graph().ainvoke({}, context=ctx, config={"recursion_limit": 64}))
        spans = {s.context.span_id: s for s in exporter.get_finished_spans()}
        tree = sorted((s.name, spans[s.parent.span_id].name if s.parent and s.parent.span_id in spans else None)
                      for s in spans.values())
        field = coe_field(state, "same-id")
        body = None if stream else completion(state, "same-id")
        final = [type(state.get("final")).__name__,
                 dataclasses.asdict(state["final"]) if "final" in state else None]
        out.append((scrub({"field": field, "body": body, "final": final}), tree, counters(metrics)))
        provider.shutdown()
    return out


@pytest.mark.parametrize(("options", "stream", "steps"), [
    (Options(), False, ["classify", "recruit", "single"]),
    (Options(), True, ["classify", "recruit", "single"]),
    (Options(k=2), False, ["classify", "recruit", "fanout", "aggregate"]),
    (Options(k=3, strategy="vote"), False, ["classify", "recruit", "fanout", "escalate", "fanout", "aggregate"]),
    (Options(experts=["e3", "e2"], k=2, rag=False), False, ["classify", "recruit", "fanout"]),
], ids=["k1", "k1-stream", "k2-consensus", "k3-failing-escalates-vote", "listed"])
async def test_the_split_run_is_the_whole_graph(runtime: Runtime, options: Options, stream: bool,
                                                steps: list[str]) -> None:
    (split, split_tree, split_counts), (whole, whole_tree, whole_counts) = await run_both(runtime, options,
                                                                                       stream=stream)
    assert split == whole
    assert split_tree == whole_tree
    assert split_counts == whole_counts
    taken = [s["step"] for s in split["field"]["trace"]]
    assert [s for s in taken if s in steps] == steps[: len([s for s in taken if s in steps])]
    assert set(steps) <= set(taken), taken
