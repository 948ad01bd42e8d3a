"""OpenTelemetry traces, end to end: coe exports over OTLP/HTTP to a real receiver in the test.

The receiver is a small HTTP server (its own thread, so the exporter's blocking flush cannot stall the
event loop coe runs in) that decodes what coe posts to ``/v1/traces`` with the OpenTelemetry proto
package (``ExportTraceServiceRequest``). coe runs in-loop on a real port and is called with the
official openai SDK; the experts are the session's real tiny vLLM server, wrapped in a recording
transport that keeps the headers coe sent (``traceparent``). The tests check the span tree, names,
attributes and propagation of a direct request, a composed k = 3 request with an escalation, one with a
consensus skip, a streaming direct and a streaming composed request, a batch, and the off switch;
the stub upstream (``coe.testing.stub_upstream``) stands in where only the headers matter.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from apphelpers import RunningCoe, running_coe, tiny_registry, write_registry
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from coe.config import LaunchConfig, TelemetryConfig
from coe.errors import ConfigError
from coe.telemetry import OFF, Telemetry, inject
from coe.telemetry.setup import open_telemetry, resolve
from coe.testing.recording import RecordingTransport
from coe.testing.stub_upstream import StubRecord

MAX_CONTENT = 40
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 8}
KINDS = {1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}


# -- the OTLP/HTTP receiver ----------------------------------------------------------------------


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


@dataclass
class Received:
    """One span as the collector got it."""

    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: str
    attrs: dict[str, Any]
    status: str
    service: str
    start: int
    links: list[tuple[str, str]] = field(default_factory=list)
    events: list[str] = field(default_factory=list)

    def gen_ai(self) -> dict[str, Any]:
        return {k: v for k, v in self.attrs.items() if k.startswith("gen_ai.")}


class OtlpReceiver:
    """An OTLP/HTTP trace collector: ``POST /v1/traces`` with a protobuf ``ExportTraceServiceRequest``."""

    def __init__(self) -> None:
        self.spans: list[Received] = []
        self.posts = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                ok = self.path == "/v1/traces" and self.headers.get("content-type") == "application/x-protobuf"
                if ok:
                    receiver.take(ExportTraceServiceRequest.FromString(body))
                self.send_response(200 if ok else 404)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-receiver", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def take(self, request: ExportTraceServiceRequest) -> None:
        out = []
        for rs in request.resource_spans:
            resource = {kv.key: _value(kv.value) for kv in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    out.append(Received(
                        name=s.name, trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                        parent_id=s.parent_span_id.hex(), kind=KINDS.get(s.kind, str(s.kind)),
                        attrs={kv.key: _value(kv.value) for kv in s.attributes},
                        status={0: "UNSET", 1: "OK", 2: "ERROR"}[s.status.code], service=str(resource["service.name"]),
                        start=s.start_time_unix_nano,
                        links=[(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                        events=[e.name for e in s.events]))
        with self._lock:
            self.posts += 1
            self.spans.extend(out)

    def trace(self, trace_id: str) -> list[Received]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def find(self, **attrs: Any) -> list[Received]:
        with self._lock:
            return [s for s in self.spans if all(s.attrs.get(k) == v for k, v in attrs.items())]

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


def telemetry_section(receiver: OtlpReceiver, **extra: Any) -> dict[str, Any]:
    return {"enabled": True, "endpoint": receiver.url, "service_name": "coe-test", "capture_content": True,
            "max_content_chars": MAX_CONTENT, **extra}


async def request_trace(coe: RunningCoe, receiver: OtlpReceiver, request_id: str,
                        timeout: float = 30.0) -> list[Received]:
    """Every span of the trace whose server span carries ``request_id``, once that span has arrived (it
    ends last; spans are exported in the order they end, so its children came before it)."""
    deadline = time.monotonic() + timeout
    while True:
        await asyncio.to_thread(coe.state.telemetry.flush)
        servers = [s for s in receiver.find(**{"coe.request_id": request_id}) if s.kind == "SERVER"]
        if servers:
            return receiver.trace(servers[0].trace_id)
        assert time.monotonic() < deadline, f"no server span for request {request_id}"
        await asyncio.sleep(0.2)


def tree(spans: list[Received]) -> list[str]:
    """The trace as indented names, each span's children in the order they started."""
    ids = {s.span_id for s in spans}
    ordered = sorted(spans, key=lambda s: s.start)
    lines: list[str] = []

    def walk(parent: Received | None, depth: int) -> None:
        for s in ordered:
            if (parent is None and s.parent_id not in ids) or (parent is not None and s.parent_id == parent.span_id):
                lines.append("  " * depth + s.name)
                walk(s, depth + 1)

    walk(None, 0)
    return lines


def one(spans: list[Received], name: str) -> Received:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, f"{len(found)} spans named {name!r}: {tree(spans)}"
    return found[0]


def children(spans: list[Received], parent: Received) -> list[Received]:
    return sorted((s for s in spans if s.parent_id == parent.span_id), key=lambda s: s.start)


def traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def assert_traceparent(header: str, trace_id: str, span_id: str) -> None:
    """``header`` names this trace and span, sampled (the SDK may set more flags: 03 = sampled + random)."""
    version, tid, sid, flags = header.split("-")
    assert (version, tid, sid) == ("00", trace_id, span_id) and int(flags, 16) & 1, header


def coe_of(reply: Any) -> dict[str, Any]:
    return dict((reply.model_extra or {})["coe"])


def assert_genai_call(span: Received, *, model: str, usage: dict[str, int]) -> None:
    """A model-call span: CLIENT kind, named and attributed by the GenAI conventions."""
    assert span.kind == "CLIENT" and span.name == f"chat {model}"
    assert span.attrs["gen_ai.operation.name"] == "chat"
    assert span.attrs["gen_ai.request.model"] == model
    assert span.attrs["gen_ai.response.model"] == model  # vLLM answers under the name it was asked for
    assert span.attrs["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert span.attrs["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert span.attrs["gen_ai.provider.name"] == "vllm"


# -- coe on the real tiny vLLM, traced ---------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def traced(vllm_server: Any, receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory
                 ) -> AsyncIterator[tuple[RunningCoe, RecordingTransport]]:
    reg = tiny_registry(vllm_server, router={"strategy": "default", "default_expert": "tiny-base", "fallbacks": 0},
                        pipeline={"consensus_similarity": None, "escalate_below": 0.9, "max_rounds": 2},
                        telemetry=telemetry_section(receiver))
    reg["experts"] += [
        {"name": "tiny-a2", "backend": "tiny", "model": vllm_server.served_name, "adapter": {"name": "tiny-lora-2"},
         "tier": "strong", "cost": {"input_per_mtok": 1}},
        {"name": "tiny-twin", "backend": "tiny", "model": vllm_server.served_name, "cost": {"input_per_mtok": 1}},
    ]
    transport = RecordingTransport()
    path = write_registry(tmp_path_factory.mktemp("telemetry") / "experts.yaml", reg)
    async with running_coe(path, transport_factory=lambda name: transport) as running:
        yield running, transport


@pytest.fixture
def coe(traced: tuple[RunningCoe, RecordingTransport]) -> RunningCoe:
    return traced[0]


@pytest.fixture
def record(traced: tuple[RunningCoe, RecordingTransport]) -> RecordingTransport:
    traced[1].clear()
    return traced[1]


@pytest.mark.vllm
async def test_direct_request(coe: RunningCoe, record: RecordingTransport, receiver: OtlpReceiver) -> None:
    trace_id, parent_id, header = traceparent()
    rid = f"direct-{secrets.token_hex(4)}"
    prompt = "Tell me a long story about the sea and the ships on it, please."
    reply = await coe.client().chat.completions.create(
        model="tiny-a0", messages=[{"role": "user", "content": prompt}], top_p=0.9, seed=7, **GREEDY,
        extra_headers={"traceparent": header, "x-request-id": rid})
    spans = await request_trace(coe, receiver, rid)
    assert tree(spans) == ["POST /v1/chat/completions", "  chat tiny-lora-0"]
    server, call = one(spans, "POST /v1/chat/completions"), one(spans, "chat tiny-lora-0")
    # the client's trace is continued: same trace, the client's span is the server span's parent
    assert (server.trace_id, server.parent_id) == (trace_id, parent_id)
    assert server.kind == "SERVER" and server.service == "coe-test"
    assert server.attrs["http.request.method"] == "POST" and server.attrs["http.route"] == "/v1/chat/completions"
    assert server.attrs["http.response.status_code"] == 200 and server.status == "UNSET"
    field = coe_of(reply)
    assert server.attrs["coe.request_id"] == rid == field["request_id"]
    assert server.attrs["coe.route"] == "direct" and server.attrs["coe.experts"] == ["tiny-a0"]
    assert server.attrs["coe.cost"] == pytest.approx(field["cost"])
    assert not server.gen_ai(), "GenAI attributes belong on the span that calls the model only"
    # the model call
    assert reply.usage is not None
    assert_genai_call(call, model="tiny-lora-0", usage=reply.usage.model_dump())
    assert call.parent_id == server.span_id
    assert call.attrs["gen_ai.request.temperature"] == 0 and call.attrs["gen_ai.request.max_tokens"] == 8
    assert call.attrs["gen_ai.request.top_p"] == 0.9 and call.attrs["gen_ai.request.seed"] == 7
    assert call.attrs["gen_ai.response.finish_reasons"] == [reply.choices[0].finish_reason]
    assert call.attrs["gen_ai.response.id"]
    assert call.attrs["coe.expert"] == "tiny-a0" and call.attrs["coe.backend"] == "tiny"
    assert call.attrs["coe.request_id"] == rid and call.attrs["coe.attempts"] == 1
    assert call.attrs["coe.cost"] == pytest.approx(field["experts"][0]["cost"])
    assert call.attrs["server.address"] == "127.0.0.1" and isinstance(call.attrs["server.port"], int)
    # prompts and completions, asked for, cut to max_content_chars
    sent = json.loads(call.attrs["gen_ai.input.messages"])
    assert sent[0]["role"] == "user" and sent[0]["parts"][0]["type"] == "text"
    assert sent[0]["parts"][0]["content"].startswith(prompt[:MAX_CONTENT] + "[...")
    answered = json.loads(call.attrs["gen_ai.output.messages"])
    assert answered[0]["role"] == "assistant"
    assert answered[0]["parts"][0]["content"][:MAX_CONTENT] == (reply.choices[0].message.content or "")[:MAX_CONTENT]
    # traceparent reached vLLM, naming the call's span
    [exchange] = record.chats()
    assert_traceparent(exchange.headers["traceparent"], trace_id, call.span_id)
    assert exchange.headers["x-request-id"] == rid


@pytest.mark.vllm
async def test_composed_k3_with_escalation(coe: RunningCoe, record: RecordingTransport,
                                           receiver: OtlpReceiver) -> None:
    rid = f"k3-{secrets.token_hex(4)}"
    reply = await coe.client().chat.completions.create(
        model="coe", messages=[{"role": "user", "content": "Tell me about the sea."}], **GREEDY,
        extra_body={"coe": {"k": 3}}, extra_headers={"x-request-id": rid})
    field = coe_of(reply)
    steps = [s["step"] for s in field["trace"]]
    assert steps == ["classify", "recruit", "fanout", "assess", "escalate", "fanout", "assess", "aggregate",
                     "answer"], "the three answers should disagree, so the strong expert is added"
    spans = await request_trace(coe, receiver, rid)
    base = coe.state.pool.get("tiny").base_adapter
    assert tree(spans) == [
        "POST /v1/chat/completions",
        "  classify", "  recruit",
        "  fanout", f"    chat {base}", "    chat tiny-lora-0", "    chat tiny-lora-1", "  assess",
        "  escalate",
        "  fanout", "    chat tiny-lora-2", "  assess",
        "  aggregate",
        f"  chat {base}",
    ]
    server = one(spans, "POST /v1/chat/completions")
    classify, recruit, aggregate = one(spans, "classify"), one(spans, "recruit"), one(spans, "aggregate")
    assert classify.attrs["coe.router"] == "default" and classify.attrs["coe.experts"] == ["tiny-base"]
    assert classify.attrs["coe.expert_scores"] == [1.0]
    assert recruit.attrs["coe.k"] == 3 and recruit.attrs["coe.requested_k"] == 3
    assert recruit.attrs["coe.experts"] == ["tiny-base", "tiny-a0", "tiny-a1"]
    rounds = [s for s in spans if s.name == "fanout"]
    assert [r.attrs["coe.round"] for r in rounds] == [1, 2]
    assert [sorted(c.attrs["coe.expert"] for c in children(spans, r)) for r in rounds] == [
        ["tiny-a0", "tiny-a1", "tiny-base"], ["tiny-a2"]]
    for r in rounds:
        for call in children(spans, r):
            assert call.attrs["coe.role"] == "expert" and call.attrs["coe.round"] == r.attrs["coe.round"]
    escalate = one(spans, "escalate")
    assert escalate.attrs["coe.escalation.round"] == 2 and escalate.attrs["coe.experts"] == ["tiny-a2"]
    assert "escalate_below" in escalate.attrs["coe.escalation.reason"]
    assessed = [s for s in spans if s.name == "assess"]
    assert [a.attrs["coe.reliability"] for a in assessed] == [
        s["reliability"] for s in field["trace"] if s["step"] == "assess"]
    assert aggregate.attrs["coe.strategy"] == "synthesize" and aggregate.attrs["coe.aggregator_called"] is True
    assert aggregate.attrs["coe.reliability"] == field["reliability"]
    final = [c for c in children(spans, server) if c.kind == "CLIENT"]
    assert [(c.attrs["coe.role"], c.attrs["coe.expert"]) for c in final] == [("aggregator", "tiny-base")]
    # every call is a GenAI span; their tokens add up to what the client was billed
    calls = [s for s in spans if s.kind == "CLIENT"]
    assert len(calls) == len(record.chats()) == 5
    for call, exchange in zip(sorted(calls, key=lambda c: c.span_id), sorted(
            record.chats(), key=lambda e: e.headers["traceparent"].split("-")[2]), strict=True):
        assert_traceparent(exchange.headers["traceparent"], server.trace_id, call.span_id)
        assert exchange.response is not None
        assert_genai_call(call, model=exchange.body["model"], usage=exchange.response["usage"])
    assert reply.usage is not None
    assert sum(c.attrs["gen_ai.usage.input_tokens"] for c in calls) == reply.usage.prompt_tokens
    assert sum(c.attrs["gen_ai.usage.output_tokens"] for c in calls) == reply.usage.completion_tokens
    # the request's outcome on the server span, and no GenAI there or on the steps
    assert server.attrs["coe.route"] == "routed" and server.attrs["coe.rounds"] == 2
    assert server.attrs["coe.answered_by"] == "tiny-base" and server.attrs["coe.aggregator_called"] is True
    assert server.attrs["coe.cost"] == pytest.approx(field["cost"])
    assert not [s.name for s in spans if s.kind != "CLIENT" and s.gen_ai()]


@pytest.mark.vllm
async def test_consensus_skip(coe: RunningCoe, record: RecordingTransport, receiver: OtlpReceiver) -> None:
    rid = f"consensus-{secrets.token_hex(4)}"
    reply = await coe.client().chat.completions.create(
        model="coe", messages=[{"role": "user", "content": "Tell me about the sea."}], **GREEDY,
        extra_body={"coe": {"experts": ["tiny-base", "tiny-twin"]}}, extra_headers={"x-request-id": rid})
    spans = await request_trace(coe, receiver, rid)
    aggregate = one(spans, "aggregate")
    assert aggregate.attrs["coe.consensus"] is True and aggregate.attrs["coe.aggregator_called"] is False
    assert aggregate.attrs["coe.reliability"] == 1.0
    server = one(spans, "POST /v1/chat/completions")
    assert not [c for c in children(spans, server) if c.kind == "CLIENT"], "no aggregator call on a consensus"
    assert len([s for s in spans if s.kind == "CLIENT"]) == len(record.chats()) == 2
    assert "escalate" not in [s.name for s in spans]
    assert server.attrs["coe.answered_by"] == coe_of(reply)["answered_by"]


@pytest.mark.vllm
async def test_streaming(coe: RunningCoe, record: RecordingTransport, receiver: OtlpReceiver) -> None:
    client = coe.client()
    for model, expected in (("tiny-a1", ["POST /v1/chat/completions", "  chat tiny-lora-1"]),
                            ("coe", None)):
        rid = f"stream-{model}-{secrets.token_hex(4)}"
        record.clear()
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Say hello to the sea."}], stream=True,
            stream_options={"include_usage": True}, extra_headers={"x-request-id": rid}, **GREEDY)
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage is not None:
                usage = chunk.usage
        assert usage is not None
        spans = await request_trace(coe, receiver, rid)
        server = one(spans, "POST /v1/chat/completions")
        [call] = [s for s in spans if s.kind == "CLIENT"]
        assert call.parent_id == server.span_id
        if expected is not None:
            assert tree(spans) == expected
        else:  # routed, k = 1: the router's steps, then the one expert streams as the final stage
            assert [s.name for s in children(spans, server)] == ["classify", "recruit", call.name]
            assert call.attrs["coe.role"] == "final" and call.attrs["coe.round"] == 1
        assert call.attrs["coe.stream"] is True and call.attrs["coe.ttft_ms"] > 0
        [exchange] = record.chats()
        assert_genai_call(call, model=exchange.body["model"], usage=usage.model_dump())
        assert call.attrs["gen_ai.response.finish_reasons"]
        answered = json.loads(call.attrs["gen_ai.output.messages"])
        assert answered[0]["parts"][0]["content"][:MAX_CONTENT] == text[:MAX_CONTENT]
        assert_traceparent(exchange.headers["traceparent"], server.trace_id, call.span_id)
        assert server.attrs["http.response.status_code"] == 200


# -- against the stub upstream: propagation, the off switch, batches ----------------------------


def stub_registry(url: str, telemetry: dict[str, Any]) -> dict[str, Any]:
    return {"backends": {"up": {"url": f"{url}/v1"}},
            "experts": [{"name": "e1", "backend": "up", "model": "stub", "cost": {"input_per_mtok": 1}},
                        {"name": "e2", "backend": "up", "model": "stub"}],
            "router": {"strategy": "default", "default_expert": "e1"},
            "pipeline": {"consensus_similarity": None},
            "auth": {"client_auth": False, "admin_auth": False}, "telemetry": telemetry}


async def test_traceparent_continued_and_sent_upstream(stub: tuple[str, StubRecord], receiver: OtlpReceiver,
                                                       tmp_path: Path) -> None:
    url, rec = stub
    path = write_registry(tmp_path / "experts.yaml", stub_registry(url, telemetry_section(receiver)))
    async with running_coe(path) as coe:
        trace_id, parent_id, header = traceparent()
        rid = f"stub-{secrets.token_hex(4)}"
        async with coe.client() as client:
            await client.chat.completions.create(model="e1", messages=[{"role": "user", "content": "hi"}],
                                                 extra_headers={"traceparent": header, "x-request-id": rid})
        spans = await request_trace(coe, receiver, rid)
    server, call = one(spans, "POST /v1/chat/completions"), one(spans, "chat stub")
    assert (server.trace_id, server.parent_id) == (trace_id, parent_id)
    assert call.parent_id == server.span_id
    assert_traceparent(rec.headers[-1]["traceparent"], trace_id, call.span_id)


async def test_off_sends_nothing(stub: tuple[str, StubRecord], receiver: OtlpReceiver, tmp_path: Path) -> None:
    url, rec = stub
    path = write_registry(tmp_path / "experts.yaml", stub_registry(url, {"enabled": False, "endpoint": receiver.url}))
    posts = receiver.posts
    async with running_coe(path) as coe:
        assert coe.state.telemetry is OFF
        _, _, header = traceparent()
        async with coe.client() as client:
            await client.chat.completions.create(model="e1", messages=[{"role": "user", "content": "hi"}],
                                                 extra_headers={"traceparent": header})
            await client.chat.completions.create(model="coe", messages=[{"role": "user", "content": "hi"}])
    assert "traceparent" not in rec.headers[-1] and "traceparent" not in rec.headers[-2]
    assert receiver.posts == posts


async def test_batch_items(stub: tuple[str, StubRecord], receiver: OtlpReceiver, tmp_path: Path) -> None:
    url, _ = stub
    path = write_registry(tmp_path / "experts.yaml", stub_registry(url, telemetry_section(receiver)))
    lines = [{"custom_id": f"item-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": model, "messages": [{"role": "user", "content": f"Item {i}?"}], "max_tokens": 4,
                       **({"coe": {"k": 2}} if model == "coe" else {})}}
             for i, model in enumerate(["e1", "coe"])]
    async with running_coe(path) as coe:
        async with coe.client() as client:
            uploaded = await client.files.create(
                file=("in.jsonl", "".join(json.dumps(x) + "\n" for x in lines).encode()), purpose="batch")
            batch = await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                                completion_window="24h")
            deadline = time.monotonic() + 60
            while (batch := await client.batches.retrieve(batch.id)).status != "completed":
                assert time.monotonic() < deadline and batch.status not in ("failed", "cancelled"), batch.status
                await asyncio.sleep(0.2)
        items: dict[str, Received] = {}
        deadline = time.monotonic() + 30
        while len(items) < 2:
            await asyncio.to_thread(coe.state.telemetry.flush)
            items = {s.attrs["coe.batch.custom_id"]: s for s in receiver.spans if s.name == "batch item"
                     and s.attrs.get("coe.batch.custom_id", "").startswith("item-")}
            assert time.monotonic() < deadline, f"batch item spans: {list(items)}"
            await asyncio.sleep(0.2)
    direct, routed = items["item-0"], items["item-1"]
    # each item is its own trace, linked to the span of the request that created the batch
    [created] = [s for s in receiver.spans if s.kind == "SERVER" and s.attrs.get("http.route") == "/v1/batches"
                 and s.attrs.get("http.request.method") == "POST"]
    for item in (direct, routed):
        assert item.parent_id == "" and item.attrs["coe.status_code"] == 200 and item.attrs["coe.staged"] is True
        assert item.links == [(created.trace_id, created.span_id)] and item.trace_id != created.trace_id
        assert item.attrs["coe.batch.id"] == batch.id
    # the calls a wave ran for the item, outside its task, are still its children
    [call] = [s for s in receiver.trace(direct.trace_id) if s.kind == "CLIENT"]
    assert call.parent_id == direct.span_id and call.attrs["coe.expert"] == "e1"
    assert direct.attrs["coe.route"] == "direct"
    routed_spans = receiver.trace(routed.trace_id)
    assert {"classify", "recruit", "fanout", "assess", "aggregate"} <= {s.name for s in routed_spans}
    assert len([s for s in routed_spans if s.kind == "CLIENT"]) >= 2
    assert routed.attrs["coe.route"] == "routed"


# -- settings, the off path, the vLLM launch ---------------------------------------------------


def test_settings_from_yaml_and_environment() -> None:
    off = TelemetryConfig()
    assert resolve(off, {}) is None
    assert resolve(off, {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}) is None
    on = resolve(off, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/", "OTEL_SERVICE_NAME": "gw"})
    assert on is not None and (on.endpoint, on.protocol, on.service_name) == ("http://c:4318/v1/traces",
                                                                            "http/protobuf", "gw")
    grpc = resolve(off, {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    assert grpc is not None and grpc.endpoint == "http://localhost:4317" and grpc.service_name == "coe"
    exact = resolve(off, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:9/x"})
    assert exact is not None and exact.endpoint == "http://c:9/x"
    yaml = TelemetryConfig(enabled=True, endpoint="http://y:4318", service_name="y")
    chosen = resolve(yaml, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SERVICE_NAME": "gw"})
    assert chosen is not None and (chosen.endpoint, chosen.service_name) == ("http://y:4318/v1/traces", "y")
    assert resolve(yaml, {"OTEL_SDK_DISABLED": "true"}) is None
    assert resolve(TelemetryConfig(enabled=False), {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}) is None
    with pytest.raises(ConfigError):
        resolve(off, {"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(ConfigError):
        resolve(yaml, {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})
    assert open_telemetry(off, {}) is OFF


def test_off_is_a_no_op() -> None:
    with OFF.span("x") as span:
        assert not span.is_recording()
        headers: dict[str, str] = {}
        inject(headers)
        assert headers == {}
    assert not OFF.start("y").is_recording()
    with OFF.labels({"coe.role": "expert"}):
        assert OFF.call_labels() == {}


def test_managed_vllm_started_with_tracing(tmp_path: Path) -> None:
    launch = LaunchConfig(model=tmp_path / "m", args=["--dtype", "float32"], env={"A": "1"})
    tracing = open_telemetry(TelemetryConfig(enabled=True, endpoint="http://c:4318", headers={"k": "v"}), {})
    try:
        started = tracing.launch("gpu", launch)
        assert started.args == ["--dtype", "float32", "--otlp-traces-endpoint", "http://c:4318/v1/traces"]
        assert started.env == {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf", "OTEL_SERVICE_NAME": "vllm-gpu",
                               "A": "1", "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "k=v"}
        own = launch.model_copy(update={"args": ["--otlp-traces-endpoint=http://elsewhere"]})
        assert tracing.launch("gpu", own) is own
        assert Telemetry(None).launch("gpu", launch) is launch
    finally:
        tracing.shutdown()



@pytest.mark.vllm
@pytest.mark.timeout(900)
async def test_managed_vllm_joins_the_trace(vllm_server: Any, receiver: OtlpReceiver, tmp_path: Path) -> None:
    """A managed backend is started with vLLM's own tracing, pointed at coe's collector: vLLM's span of
    the request continues coe's trace, under the call span whose traceparent coe sent."""
    reg = {
        "backends": {"local": {
            "launch": {"model": str(vllm_server.model_dir), "served_name": vllm_server.served_name,
                       "runtime_lora_updating": False, "startup_timeout_s": 600,
                       "args": ["--dtype", "float32", "--max-model-len", "512", "--enforce-eager"],
                       "env": {"OTEL_BSP_SCHEDULE_DELAY": "200"}, "log_file": str(tmp_path / "local.log")},
            "timeouts": {"read_s": 60, "total_s": 120}}},
        "experts": [{"name": "local-base", "backend": "local", "model": vllm_server.served_name}],
        "auth": {"client_auth": False, "admin_auth": False},
        "telemetry": telemetry_section(receiver),
    }
    path = write_registry(tmp_path / "experts.yaml", reg)
    async with running_coe(path) as coe:
        managed = coe.state.pool.get("local").managed
        assert managed is not None
        command = managed.command()
        assert command[command.index("--otlp-traces-endpoint") + 1] == f"{receiver.url}/v1/traces"
        assert managed.env()["OTEL_SERVICE_NAME"] == "vllm-local"
        await coe.state.wait_ready(["local"], 600)
        rid = f"managed-{secrets.token_hex(4)}"
        async with coe.client() as client:
            await client.chat.completions.create(model="local-base", messages=[{"role": "user", "content": "Hi."}],
                                                 extra_headers={"x-request-id": rid}, **GREEDY)
        spans = await request_trace(coe, receiver, rid)
        call = one(spans, f"chat {vllm_server.served_name}")
        deadline = time.monotonic() + 60
        while not (theirs := [s for s in receiver.trace(call.trace_id) if s.service == "vllm-local"]):
            assert time.monotonic() < deadline, f"no span from vLLM in the trace: {tree(receiver.trace(call.trace_id))}"
            await asyncio.sleep(0.5)
    assert [(s.kind, s.parent_id) for s in theirs] == [("SERVER", call.span_id)], tree(receiver.trace(call.trace_id))
    assert theirs[0].gen_ai()  # vLLM's own GenAI attributes
