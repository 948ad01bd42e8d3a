"""Chat completions through coe against the real tiny vLLM server, with the official openai SDK."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio
from apphelpers import PRICES, RunningCoe, running_coe, tiny_registry, write_registry

pytestmark = pytest.mark.vllm

MSG = [{"role": "user", "content": "Tell me about the sea."}]
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 12}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def coe(vllm_server: Any, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningCoe]:
    path = write_registry(tmp_path_factory.mktemp("chat") / "experts.yaml", tiny_registry(vllm_server))
    async with running_coe(path) as running:
        yield running


def trace(reply: Any) -> dict[str, Any]:
    extra: dict[str, Any] = reply.model_extra or {}
    return dict(extra["coe"])


@pytest.mark.parametrize("expert", ["tiny-base", "tiny-a0", "tiny-a1"])
async def test_non_streaming_direct_expert(coe: RunningCoe, vllm_server: Any, expert: str) -> None:
    raw = await coe.client().chat.completions.with_raw_response.create(model=expert, messages=MSG, **GREEDY)
    reply = raw.parse()
    assert reply.object == "chat.completion"
    assert reply.model == expert
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens == 12
    assert raw.headers["x-coe-experts"] == expert
    t = trace(reply)
    assert [e["name"] for e in t["experts"]] == [expert]
    assert t["usage"]["prompt_tokens"] == reply.usage.prompt_tokens
    if expert != "tiny-a1":
        expected = (reply.usage.prompt_tokens * PRICES["input_per_mtok"]
                    + reply.usage.completion_tokens * PRICES["output_per_mtok"]) / 1e6
        assert t["cost"] == pytest.approx(expected)
    assert t["decision"]["router"] == "direct"


async def test_adapter_experts_answer_differently_from_base(coe: RunningCoe, vllm_server: Any) -> None:
    """Each adapter expert reaches its adapter, not the base: same prompt, same greedy settings, other text."""
    client = coe.client()
    texts = {}
    for expert in ("tiny-base", "tiny-a0"):
        reply = await client.chat.completions.create(model=expert, messages=MSG, **GREEDY)
        texts[expert] = reply.choices[0].message.content
    direct = openai.AsyncOpenAI(base_url=vllm_server.api_url, api_key="x")
    for expert, upstream in (("tiny-base", vllm_server.served_name), ("tiny-a0", "tiny-lora-0")):
        ref = await direct.chat.completions.create(model=upstream, messages=MSG, **GREEDY)  # type: ignore[arg-type]
        assert texts[expert] == ref.choices[0].message.content
    assert texts["tiny-base"] != texts["tiny-a0"]


async def test_system_prompt_of_expert_is_applied(coe: RunningCoe, vllm_server: Any) -> None:
    reply = await coe.client().chat.completions.create(model="tiny-a1", messages=MSG, max_tokens=4)
    direct = openai.AsyncOpenAI(base_url=vllm_server.api_url, api_key="x")
    with_prompt = await direct.chat.completions.create(
        model="tiny-lora-1", messages=[{"role": "system", "content": "You are expert a1."}, *MSG],  # type: ignore[list-item]
        max_tokens=4, temperature=0)
    assert reply.usage is not None and with_prompt.usage is not None
    assert reply.usage.prompt_tokens == with_prompt.usage.prompt_tokens
    assert reply.choices[0].message.content == with_prompt.choices[0].message.content


async def test_streaming_matches_non_streaming(coe: RunningCoe) -> None:
    client = coe.client()
    whole = await client.chat.completions.create(model="tiny-a0", messages=MSG, **GREEDY)
    stream = await client.chat.completions.create(model="tiny-a0", messages=MSG, stream=True, **GREEDY)
    chunks = [c async for c in stream]
    assert all(c.object == "chat.completion.chunk" and c.model == "tiny-a0" for c in chunks)
    assert all(c.choices for c in chunks), "no usage-only chunk when the client did not ask for usage"
    assert all(c.usage is None for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "coe" in (chunks[-1].model_extra or {})
    assert all("coe" not in (c.model_extra or {}) for c in chunks[:-1])
    assert trace(chunks[-1])["usage"]["completion_tokens"] == 12


async def test_streaming_with_include_usage(coe: RunningCoe) -> None:
    stream = await coe.client().chat.completions.create(
        model="tiny-base", messages=MSG, stream=True, stream_options={"include_usage": True}, **GREEDY)
    chunks = [c async for c in stream]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 12
    assert trace(last)["usage"]["total_tokens"] == last.usage.total_tokens
    assert chunks[-2].choices[0].finish_reason == "length"


async def test_raw_stream_framing(coe: RunningCoe) -> None:
    async with httpx.AsyncClient(timeout=60) as http:
        response = await http.post(f"{coe.url}/v1/chat/completions",
                                   json={"model": "tiny-base", "messages": MSG, "stream": True, "max_tokens": 4})
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-coe-experts"] == "tiny-base"
    events = [line for line in response.text.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


async def test_parameters_pass_through(coe: RunningCoe) -> None:
    client = coe.client()
    reply = await client.chat.completions.create(
        model="tiny-base", messages=MSG, n=2, max_tokens=6, temperature=1.0, seed=7,
        logprobs=True, top_logprobs=2)
    assert len(reply.choices) == 2
    assert reply.choices[0].logprobs is not None and reply.choices[0].logprobs.content
    assert len(reply.choices[0].logprobs.content[0].top_logprobs) == 2
    again = await client.chat.completions.create(model="tiny-base", messages=MSG, n=2, max_tokens=6,
                                                 temperature=1.0, seed=7)
    assert [c.message.content for c in again.choices] == [c.message.content for c in reply.choices]
    # vLLM-only extras (extra_body) pass through too: top_k=1 is greedy.
    greedy = await client.chat.completions.create(model="tiny-base", messages=MSG, max_tokens=6, temperature=0)
    top1 = await client.chat.completions.create(model="tiny-base", messages=MSG, max_tokens=6, temperature=1.0,
                                                extra_body={"top_k": 1})
    assert top1.choices[0].message.content == greedy.choices[0].message.content


async def test_upstream_rejection_keeps_status_and_message(coe: RunningCoe) -> None:
    """vLLM refuses a prompt longer than --max-model-len (512): the client sees vLLM's 400, not a 5xx."""
    long = [{"role": "user", "content": "word " * 2000}]
    with pytest.raises(openai.BadRequestError) as info:
        await coe.client().chat.completions.create(model="tiny-base", messages=long, max_tokens=4)  # type: ignore[arg-type]
    assert "512" in str(info.value) or "context" in str(info.value).lower()


async def test_routed_model_coe(coe: RunningCoe) -> None:
    raw = await coe.client().chat.completions.with_raw_response.create(model="coe", messages=MSG, max_tokens=4)
    reply = raw.parse()
    t = trace(reply)
    assert t["decision"]["router"] == "default"
    assert reply.model == t["decision"]["experts"][0]["name"] == "tiny-base" == raw.headers["x-coe-experts"]
    assert reply.choices[0].message.content


async def test_models_list(coe: RunningCoe) -> None:
    models = {m.id: m for m in (await coe.client().models.list()).data}
    assert set(models) == {"coe", "tiny-base", "tiny-a0", "tiny-a1"}
    assert (models["tiny-a0"].model_extra or {})["parent"] == (models["tiny-a1"].model_extra or {})["parent"]
    assert (models["tiny-base"].model_extra or {})["parent"] is None
    assert (await coe.client().models.retrieve("tiny-a0")).id == "tiny-a0"


async def test_unknown_model_is_404_model_not_found(coe: RunningCoe) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await coe.client().chat.completions.create(model="no-such-expert", messages=MSG)
    body: Any = info.value.body
    assert body["code"] == "model_not_found" and body["param"] == "model"


@pytest.mark.parametrize(("patch", "param"), [
    ({"temperature": 3}, "temperature"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": "two"}, "n"),
])
async def test_invalid_body_is_400_with_param(coe: RunningCoe, patch: dict[str, Any], param: str) -> None:
    body: dict[str, Any] = {"model": "tiny-base", "messages": MSG, **patch}
    with pytest.raises(openai.BadRequestError) as info:
        await coe.client().post("/chat/completions", body=body, cast_to=httpx.Response)
    err: Any = info.value.body
    assert err["param"] == param
    assert err["type"] == "invalid_request_error"


async def test_malformed_json_is_400(coe: RunningCoe) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.post(f"{coe.url}/v1/chat/completions", content=b'{"model": ',
                                   headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]["message"]


async def test_mixed_batch_through_coe_matches_solo(coe: RunningCoe, vllm_server: Any) -> None:
    """Concurrent base and adapter requests through coe give each model's solo greedy answer.

    vLLM 0.32 on CPU gets base-model requests in a mixed batch wrong (tests/test_vllm_greedy.py);
    coe sends them through the backend's zero-weight adapter, so the base expert still answers
    exactly as the base model does alone.
    """
    import asyncio

    assert vllm_server.managed.base_adapter, "the managed backend serves a zero adapter"
    direct = openai.AsyncOpenAI(base_url=vllm_server.api_url, api_key="x")
    upstream = {"tiny-base": vllm_server.served_name, "tiny-a0": "tiny-lora-0"}
    solo = {}
    for expert, model in upstream.items():  # one at a time, straight to vLLM: the reference
        ref = await direct.chat.completions.create(model=model, messages=MSG, **GREEDY)  # type: ignore[arg-type]
        solo[expert] = ref.choices[0].message.content
    experts = list(upstream) * 6
    replies = await asyncio.gather(*(coe.client().chat.completions.create(model=e, messages=MSG, **GREEDY)
                                     for e in experts))
    for expert, reply in zip(experts, replies, strict=True):
        assert reply.choices[0].message.content == solo[expert], expert


def test_openapi_declares_errors(tmp_path: Path, vllm_server: Any) -> None:
    from services.api import create_app

    app = create_app(write_registry(tmp_path / "experts.yaml", tiny_registry(vllm_server)))
    spec = app.openapi()
    chat = spec["paths"]["/v1/chat/completions"]["post"]
    assert {"400", "401", "404", "503"} <= set(chat["responses"])
    assert "messages" in chat["requestBody"]["content"]["application/json"]["schema"]["properties"]
