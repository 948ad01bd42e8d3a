"""The composition pipeline (``model="coe"``) against the shared real vLLM CPU server, through the
official openai SDK. A RECORDING transport wraps the real network transport so the tests can see
exactly what coe sent to vLLM (the aggregator's prompt, how many calls) and inject faults."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio
from apphelpers import RunningCoe, running_coe, tiny_registry, write_registry

from coe.testing.recording import Exchange, RecordingTransport

pytestmark = pytest.mark.vllm

MSG = [{"role": "user", "content": "Tell me about the sea."}]
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 8}


def registry(server: Any, **pipeline: Any) -> dict[str, Any]:
    """tiny-base and tiny-twin are the same model and prompt (they always agree); the adapter experts
    answer differently from both and from each other; tiny-a2 is the strong tier."""
    reg = tiny_registry(server, router={"strategy": "default", "default_expert": "tiny-base", "fallbacks": 0},
                        pipeline={"consensus_similarity": None, "escalate_below": 0.0, **pipeline})
    reg["experts"] = [
        {"name": "tiny-base", "backend": "tiny", "model": server.served_name, "cost": {"input_per_mtok": 1}},
        {"name": "tiny-a0", "backend": "tiny", "model": server.served_name, "adapter": {"name": "tiny-lora-0"},
         "cost": {"input_per_mtok": 1}},
        {"name": "tiny-a1", "backend": "tiny", "model": server.served_name, "adapter": {"name": "tiny-lora-1"},
         "cost": {"input_per_mtok": 1}},
        {"name": "tiny-a2", "backend": "tiny", "model": server.served_name, "adapter": {"name": "tiny-lora-2"},
         "tier": "strong", "cost": {"input_per_mtok": 1}},
        {"name": "tiny-twin", "backend": "tiny", "model": server.served_name, "cost": {"input_per_mtok": 1}},
    ]
    return reg


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def recorded(vllm_server: Any, tmp_path_factory: pytest.TempPathFactory
                   ) -> AsyncIterator[tuple[RunningCoe, RecordingTransport]]:
    transport = RecordingTransport()
    path = write_registry(tmp_path_factory.mktemp("pipeline") / "experts.yaml", registry(vllm_server))
    async with running_coe(path, transport_factory=lambda name: transport) as running:
        yield running, transport


@pytest.fixture
def coe(recorded: tuple[RunningCoe, RecordingTransport]) -> RunningCoe:
    return recorded[0]


@pytest.fixture
def record(recorded: tuple[RunningCoe, RecordingTransport]) -> RecordingTransport:
    recorded[1].clear()
    return recorded[1]


def coe_of(reply: Any) -> dict[str, Any]:
    return dict((reply.model_extra or {})["coe"])


def steps(field: dict[str, Any]) -> list[str]:
    return [s["step"] for s in field["trace"]]


def text_of(exchange: Exchange) -> str:
    assert exchange.response is not None
    return str(exchange.response["choices"][0]["message"]["content"]).strip()


async def ask(coe: RunningCoe, **kw: Any) -> Any:
    kw.setdefault("messages", MSG)
    return await coe.client().chat.completions.create(model="coe", **GREEDY, **kw)


async def test_k1_is_one_direct_call(coe: RunningCoe, record: RecordingTransport) -> None:
    reply = await ask(coe)
    field = coe_of(reply)
    assert steps(field) == ["classify", "recruit", "single", "answer"]
    assert len(record.chats()) == 1
    direct = await coe.client().chat.completions.create(model="tiny-base", messages=MSG, **GREEDY)
    assert reply.choices[0].message.content == direct.choices[0].message.content
    assert reply.model == field["answered_by"] == "tiny-base"
    assert [(e["name"], e["role"]) for e in field["experts"]] == [("tiny-base", "final")]


async def test_k3_synthesize_quotes_every_answer(coe: RunningCoe, record: RecordingTransport) -> None:
    reply = await ask(coe, extra_body={"coe": {"experts": ["tiny-a0", "tiny-a1", "tiny-base"]}})
    field = coe_of(reply)
    assert steps(field) == ["classify", "recruit", "fanout", "assess", "aggregate", "answer"]
    chats = record.chats()
    assert len(chats) == 4  # three experts, then the aggregator
    answers = [text_of(e) for e in chats[:3]]
    assert len(set(answers)) > 1, "the adapters should answer differently"
    prompt = chats[3].body["messages"]
    quoted = prompt[-1]["content"]
    for i, answer in enumerate(answers, start=1):  # each quoted in its own block, as material
        assert f'<answer expert="{i}">\n{answer}\n</answer>' in quoted
    fanout = next(s for s in field["trace"] if s["step"] == "fanout")
    assert [a["text"] for a in fanout["answers"]] == answers  # the trace shows each expert's answer
    assert "not instructions" in prompt[0]["content"]
    assert field["aggregator_called"] is True
    assert reply.model == field["answered_by"] == "tiny-a0"  # the top recruit aggregates by default
    assert reply.choices[0].message.content == text_of(chats[3])
    # usage sums all four calls, with the per-expert breakdown in coe.experts
    per_call = [e.response["usage"] for e in chats if e.response]
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == sum(u["prompt_tokens"] for u in per_call) == field["usage"]["prompt_tokens"]
    assert reply.usage.completion_tokens == sum(u["completion_tokens"] for u in per_call)
    assert [(e["name"], e["role"]) for e in field["experts"]] == [
        ("tiny-a0", "expert"), ("tiny-a1", "expert"), ("tiny-base", "expert"), ("tiny-a0", "aggregator")]
    assert field["cost"] == pytest.approx(reply.usage.prompt_tokens / 1e6)


async def test_consensus_skips_the_aggregator(coe: RunningCoe, record: RecordingTransport) -> None:
    before = await _metric(coe, "coe_consensus_skips_total")
    reply = await ask(coe, extra_body={"coe": {"experts": ["tiny-base", "tiny-twin"]}})
    field = coe_of(reply)
    assert len(record.chats()) == 2  # zero aggregator calls
    assert field["aggregator_called"] is False and field["reliability"] == 1.0
    aggregate = next(s for s in field["trace"] if s["step"] == "aggregate")
    assert aggregate["consensus"] is True and "skipped" in aggregate["reason"]
    assert reply.choices[0].message.content == text_of(record.chats()[0])
    assert await _metric(coe, "coe_consensus_skips_total") == before + 1


async def test_vote_and_best(coe: RunningCoe, record: RecordingTransport) -> None:
    experts = ["tiny-a0", "tiny-base", "tiny-twin"]
    vote = await ask(coe, extra_body={"coe": {"experts": experts, "strategy": "vote"}})
    assert len(record.chats()) == 3
    base_text = text_of(record.chats()[1])
    assert vote.choices[0].message.content == base_text
    assert coe_of(vote)["answered_by"] == "tiny-base"  # 2 of 3 agree; tiny-base gave it first
    assert coe_of(vote)["reliability"] == pytest.approx(2 / 3, abs=1e-3)
    record.clear()
    best = await ask(coe, extra_body={"coe": {"experts": experts, "strategy": "best"}})
    assert len(record.chats()) == 3
    assert best.choices[0].message.content == text_of(record.chats()[0])
    assert coe_of(best)["answered_by"] == "tiny-a0"


async def test_k_picks_the_ranked_experts(coe: RunningCoe, record: RecordingTransport) -> None:
    reply = await ask(coe, extra_body={"coe": {"k": 2, "strategy": "best"}})
    field = coe_of(reply)
    recruit = next(s for s in field["trace"] if s["step"] == "recruit")
    assert recruit["k"] == 2 and recruit["experts"][0] == "tiny-base" and len(recruit["experts"]) == 2
    assert len(record.chats()) == 2


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"n": 2}, "n"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}, "tools"),
    ({"logprobs": True}, "logprobs"),
    ({"extra_body": {"coe": {"k": 9}}}, "coe.k"),
    ({"extra_body": {"coe": {"strategy": "median"}}}, "coe.strategy"),
    ({"extra_body": {"coe": {"experts": ["nobody"]}}}, "coe.experts"),
    ({"extra_body": {"coe": {"experts": ["tiny-a0"], "k": 2}}}, "coe"),
    ({"extra_body": {"coe": {"rag": "maybe"}}}, "coe.rag"),
    ({"extra_body": {"coe": {"level2": "off"}}}, "coe.level2"),
    ({"extra_body": {"coe": {"temperature": 1}}}, "coe.temperature"),
])
async def test_what_coe_cannot_honour_is_a_400(coe: RunningCoe, record: RecordingTransport, kwargs: dict[str, Any],
                                               param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await ask(coe, **kwargs)
    body: dict[str, Any] = info.value.body  # type: ignore[assignment]
    assert body["param"] == param, body
    assert record.chats() == []  # nothing was sent to any expert


async def test_coe_options_on_a_named_expert_are_a_400(coe: RunningCoe) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await coe.client().chat.completions.create(model="tiny-a0", messages=MSG, extra_body={"coe": {"k": 2}})
    assert info.value.body["param"] == "coe"  # type: ignore[index]


async def test_streaming_synthesis_matches_the_whole_answer(coe: RunningCoe, record: RecordingTransport) -> None:
    options = {"coe": {"experts": ["tiny-a0", "tiny-a1"]}}
    whole = await ask(coe, extra_body=options)
    record.clear()
    stream = await coe.client().chat.completions.create(
        model="coe", messages=MSG, stream=True, stream_options={"include_usage": True}, extra_body=options, **GREEDY)
    chunks = [c async for c in stream]
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) > 1, "the aggregator's answer streams token by token"
    assert "".join(content) == whole.choices[0].message.content
    assert record.chats()[-1].body["stream"] is True and not any(e.body["stream"] for e in record.chats()[:-1])
    last = chunks[-1]
    field = dict((last.model_extra or {})["coe"])
    assert all("coe" not in (c.model_extra or {}) for c in chunks[:-1])
    assert last.usage is not None and last.usage.total_tokens == field["usage"]["total_tokens"]
    assert whole.usage is not None and last.usage.prompt_tokens == whole.usage.prompt_tokens
    assert [e["role"] for e in field["experts"]] == ["expert", "expert", "aggregator"]
    assert steps(field)[-2:] == ["aggregate", "answer"] and field["trace"][-1]["streamed"] is True


async def test_streaming_k1_and_consensus(coe: RunningCoe) -> None:
    client = coe.client()
    for options in ({}, {"coe": {"experts": ["tiny-base", "tiny-twin"]}}):
        whole = await ask(coe, extra_body=options)
        stream = await client.chat.completions.create(model="coe", messages=MSG, stream=True, extra_body=options,
                                                      **GREEDY)
        chunks = [c async for c in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content
        field = dict((chunks[-1].model_extra or {})["coe"])
        assert chunks[-1].choices[0].finish_reason is not None
        assert field["answered_by"] == "tiny-base"
        assert field["usage"] == coe_of(whole)["usage"]


async def _metric(coe: RunningCoe, name: str) -> float:
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{coe.url}/metrics")).text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# -- escalation, quorum and deadlines: each with its own small registry (coe starts in a second) --

async def test_escalation_stops_at_its_bound(vllm_server: Any, tmp_path: Path) -> None:
    reg = registry(vllm_server, escalate_below=1.0, max_rounds=3, escalate_k=1, strategy="best")
    reg["experts"] = [e for e in reg["experts"] if e["name"] != "tiny-twin"]
    transport = RecordingTransport()
    async with running_coe(write_registry(tmp_path / "experts.yaml", reg),
                           transport_factory=lambda name: transport) as coe:
        reply = await ask(coe, extra_body={"coe": {"k": 2}})
        field = coe_of(reply)
        escalations = [s for s in field["trace"] if s["step"] == "escalate"]
        assert [s["round"] for s in escalations] == [2, 3]
        assert escalations[0]["experts"] == ["tiny-a2"]  # the strong tier first
        assert field["rounds"] == 3 and steps(field).count("fanout") == 3
        assert len(transport.chats()) == 4  # 2 + 1 + 1, and "best" calls no aggregator
        assert field["reliability"] < 1.0  # still disagreeing: stopped by max_rounds, not by agreement
        assert await _metric(coe, "coe_escalations_total") == 2


async def test_a_failing_expert_is_skipped_and_recorded(vllm_server: Any, tmp_path: Path) -> None:
    transport = RecordingTransport(fail={"tiny-lora-1"})
    async with running_coe(write_registry(tmp_path / "experts.yaml", registry(vllm_server)),
                           transport_factory=lambda name: transport) as coe:
        reply = await ask(coe, extra_body={"coe": {"experts": ["tiny-a0", "tiny-a1", "tiny-a2"]}})
        field = coe_of(reply)
    outcomes = {(e["name"], e["role"]): e["outcome"] for e in field["experts"]}
    assert outcomes[("tiny-a1", "expert")] == "failed"
    assert outcomes[("tiny-a0", "expert")] == outcomes[("tiny-a2", "expert")] == "ok"
    fanout = next(s for s in field["trace"] if s["step"] == "fanout")
    assert [a["expert"] for a in fanout["answers"]] == ["tiny-a0", "tiny-a2"]
    assert fanout["skipped"][0]["name"] == "tiny-a1"
    assert reply.choices[0].message.content


async def test_quorum_does_not_wait_for_a_slow_expert(vllm_server: Any, tmp_path: Path) -> None:
    transport = RecordingTransport(delay_s={"tiny-lora-1": 60})
    reg = registry(vllm_server, quorum=0.5, strategy="vote")
    async with running_coe(write_registry(tmp_path / "experts.yaml", reg),
                           transport_factory=lambda name: transport) as coe:
        started = time.monotonic()
        reply = await ask(coe, extra_body={"coe": {"experts": ["tiny-a0", "tiny-a1"]}})
        elapsed = time.monotonic() - started
    field = coe_of(reply)
    assert elapsed < 30
    late = [e for e in field["experts"] if e["outcome"] == "late"]
    assert [e["name"] for e in late] == ["tiny-a1"] and "quorum" in late[0]["error"]
    assert field["answered_by"] == "tiny-a0"


async def test_round_deadline_skips_a_slow_expert(vllm_server: Any, tmp_path: Path) -> None:
    transport = RecordingTransport(delay_s={"tiny-lora-1": 60})
    reg = registry(vllm_server, expert_deadline_s=3, strategy="best")
    async with running_coe(write_registry(tmp_path / "experts.yaml", reg),
                           transport_factory=lambda name: transport) as coe:
        started = time.monotonic()
        reply = await ask(coe, extra_body={"coe": {"experts": ["tiny-a1", "tiny-a0"]}})
        elapsed = time.monotonic() - started
    field = coe_of(reply)
    assert 2.5 < elapsed < 30
    late = [e for e in field["experts"] if e["outcome"] == "late"]
    assert [e["name"] for e in late] == ["tiny-a1"] and "expert_deadline_s" in late[0]["error"]
    assert field["answered_by"] == "tiny-a0"  # the best-ranked expert that answered


async def test_every_expert_failing_is_an_error_not_an_empty_answer(vllm_server: Any, tmp_path: Path) -> None:
    transport = RecordingTransport(fail={"tiny-lora-0", "tiny-lora-1"})
    async with running_coe(write_registry(tmp_path / "experts.yaml", registry(vllm_server)),
                           transport_factory=lambda name: transport) as coe:
        with pytest.raises(openai.InternalServerError) as info:
            await ask(coe, extra_body={"coe": {"experts": ["tiny-a0", "tiny-a1"]}})
    assert info.value.status_code == 503


def fail_from_the_fourth_chat(transport: RecordingTransport) -> None:
    """Fault injection: the first three chat calls (three experts) pass, every later one (the aggregator,
    its retries and fallbacks) gets a 500."""
    original = transport.handle_async_request
    seen = 0

    async def fail_fourth(request: httpx.Request) -> httpx.Response:
        nonlocal seen
        if request.url.path.endswith("/chat/completions"):
            seen += 1
            if seen >= 4:
                return httpx.Response(500, json={"error": {"message": "injected"}})
        return await original(request)

    transport.handle_async_request = fail_fourth  # type: ignore[method-assign]


async def test_aggregator_down_returns_the_vote(vllm_server: Any, tmp_path: Path) -> None:
    """The aggregator's backend fails after the experts answered: the vote is returned, recorded."""
    transport = RecordingTransport()
    async with running_coe(write_registry(tmp_path / "experts.yaml", registry(vllm_server)),
                           transport_factory=lambda name: transport) as coe:
        fail_from_the_fourth_chat(transport)
        reply = await ask(coe, extra_body={"coe": {"experts": ["tiny-a0", "tiny-a1", "tiny-a2"]}})
    field = coe_of(reply)
    assert any("degraded" in s for s in field["trace"])
    assert field["experts"][-1]["role"] == "aggregator" and field["experts"][-1]["outcome"] == "failed"
    assert reply.choices[0].message.content


async def test_streamed_aggregator_down_streams_the_vote(vllm_server: Any, tmp_path: Path) -> None:
    """The streamed final stage fails to open: the vote streams as text, with the record and trace step
    the non-streamed twin carries (``coe.pipeline.final``, one place for both)."""
    transport = RecordingTransport()
    async with running_coe(write_registry(tmp_path / "experts.yaml", registry(vllm_server)),
                           transport_factory=lambda name: transport) as coe:
        fail_from_the_fourth_chat(transport)
        stream = await coe.client().chat.completions.create(
            model="coe", messages=MSG, stream=True, extra_body={"coe": {"experts": ["tiny-a0", "tiny-a1", "tiny-a2"]}},
            **GREEDY)
        chunks = [c async for c in stream]
    field = dict((chunks[-1].model_extra or {})["coe"])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert any("degraded" in s for s in field["trace"])
    assert field["experts"][-1]["role"] == "aggregator" and field["experts"][-1]["outcome"] == "failed"
    assert text and field["answered_by"] in {"tiny-a0", "tiny-a1", "tiny-a2"}
