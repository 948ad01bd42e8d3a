#!/usr/bin/env python
"""What tracing adds to one request in CPU, in-process and without the network: a bound that machine
noise cannot blur, beside the end-to-end ``overhead_ab.py --candidate-args=--tracing`` runs.

    .venv/bin/python bench/tracing_cost.py

Off: everything a direct request runs in addition because of tracing (the server-span middleware
passing through, the call span, making it current, ``traceparent`` injection, the request's summary),
against the same ASGI app called without the middleware. On: the same with an SDK tracer whose
processor drops the spans (span creation and attributes; export is a background thread, measured end
to end). Best of ``--repeat`` runs of ``--number`` loops, in microseconds per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from coe.telemetry import OFF, Telemetry, current_span, inject
from coe.telemetry import genai as genai_spans
from services.api.middleware import TracingMiddleware

PAYLOAD: dict[str, Any] = {"model": "stub", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
                           "temperature": 0}
RESPONSE: dict[str, Any] = {"id": "x", "model": "stub", "choices": [{"finish_reason": "stop", "message": {
    "role": "assistant", "content": "hello"}}], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}
FIELD: dict[str, Any] = {"decision": {"category": None}, "experts": [{"name": "e1", "cost": 0.0}],
                         "usage": {"prompt_tokens": 3, "completion_tokens": 4}, "cost": 0.0}


class _State:
    def __init__(self, telemetry: Telemetry) -> None:
        self.coe = type("S", (), {"runtime": type("R", (), {"telemetry": telemetry})()})()


class _App:
    def __init__(self, telemetry: Telemetry) -> None:
        self.state = _State(telemetry)


def request_work(telemetry: Telemetry) -> None:
    """The tracing calls of one direct request below the middleware (dispatcher, backend, chat path)."""
    span = genai_spans.start_call(telemetry, PAYLOAD, expert="e1", backend="up", server="http://127.0.0.1:1",
                                  request_id="r")
    with telemetry.use(span, end=True):
        headers = {"content-type": "application/json"}
        inject(headers)
        if span.is_recording():
            genai_spans.record_response(span, telemetry, RESPONSE)
    if current_span().is_recording():
        pass


def measure(telemetry: Telemetry, number: int, repeat: int) -> dict[str, float]:
    async def inner(scope: Any, receive: Any, send: Any) -> None:
        request_work(telemetry)
        await send({"type": "http.response.start", "status": 200, "headers": []})

    middleware = TracingMiddleware(inner)

    async def noop_send(message: Any) -> None:
        return None

    async def receive() -> Any:
        return {"type": "http.request"}

    def scope() -> dict[str, Any]:
        return {"type": "http", "path": "/v1/chat/completions", "method": "POST", "headers": [],
                "app": _App(telemetry), "state": {"request_id": "r"}}

    async def loop(app: Any) -> float:
        loop = asyncio.get_running_loop()
        best = float("inf")
        for _ in range(repeat):
            started = loop.time()
            for _ in range(number):
                await app(scope(), receive, noop_send)
            best = min(best, (loop.time() - started) / number)
        return best * 1e6

    async def bare(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})

    base = asyncio.run(loop(bare))
    traced = asyncio.run(loop(middleware))
    return {"without_tracing_code_us": base, "with_tracing_code_us": traced, "added_us": traced - base}


def dropping_telemetry() -> Telemetry:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    class Drop(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(Drop()))
    return Telemetry(provider.get_tracer("bench"), provider=provider)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--number", type=int, default=20000)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--out", help="results file (default: bench/results/tracing-cost-<UTC stamp>.json)")
    args = p.parse_args(argv)
    off = measure(OFF, args.number, args.repeat)
    on = measure(dropping_telemetry(), args.number // 10, args.repeat)
    print(f"tracing off: +{off['added_us']:.2f} us per direct request "
          f"({off['without_tracing_code_us']:.2f} -> {off['with_tracing_code_us']:.2f} us)")
    print(f"tracing on:  +{on['added_us']:.2f} us per direct request (2 spans made and dropped, no export)")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = Path(args.out or Path(__file__).parent / "results" / f"tracing-cost-{stamp}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"bench": "tracing-cost", "started_utc": stamp, "command": " ".join(sys.argv),
                               "number": args.number, "repeat": args.repeat, "off": off, "on": on}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
