"""Bad input gets a clear OpenAI error with the right status before any work: bodies over
``limits.max_body_bytes`` (413, refused before they are read whole), too many messages, ``max_tokens`` over
the limit, integers past 64 bits anywhere in the body (400 naming the param), batches that could only fail
at run time, uploads over ``store.max_file_bytes`` (413). The upstream is a STUB (``coe.testing``): the point
is what never reaches it. Client: the real ``openai`` SDK, and raw httpx where the SDK cannot send it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio
from apphelpers import RunningCoe, running_coe, write_registry

from coe.testing.stub_upstream import StubRecord

MSG = [{"role": "user", "content": "hello there"}]


@pytest_asyncio.fixture(loop_scope="session")
async def coe(stub: tuple[str, StubRecord], tmp_path: Path) -> AsyncIterator[RunningCoe]:
    reg = {
        "backends": {"stub": {"url": f"{stub[0]}/v1"}},
        "experts": [{"name": "fast", "backend": "stub", "model": "stub"},
                    {"name": "short", "backend": "stub", "model": "stub", "max_tokens": 16}],
        "auth": {"client_auth": False, "admin_auth": False},
        "limits": {"max_body_bytes": 64 * 1024, "max_messages": 8, "max_tokens": 1000},
        "store": {"max_file_bytes": 32 * 1024},
    }
    async with running_coe(write_registry(tmp_path / "experts.yaml", reg)) as running:
        yield running


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return dict(body["error"])


async def test_a_body_over_the_limit_is_413_before_it_is_read(coe: RunningCoe, stub: tuple[str, StubRecord]) -> None:
    seen = len(stub[1].requests)
    big = {"model": "fast", "messages": [{"role": "user", "content": "x" * (80 * 1024)}]}
    async with httpx.AsyncClient(base_url=coe.url, timeout=30) as http:
        declared = await http.post("/v1/chat/completions", json=big)

        async def chunks() -> AsyncIterator[bytes]:  # no content-length: refused while it streams in
            data = json.dumps(big).encode()
            for i in range(0, len(data), 8192):
                yield data[i:i + 8192]

        streamed = await http.post("/v1/chat/completions", content=chunks(),
                                   headers={"content-type": "application/json"})
    for response in (declared, streamed):
        assert response.status_code == 413, response.text
        error = error_of(response)
        assert error["code"] == "payload_too_large" and "limits.max_body_bytes" in error["message"]
    assert len(stub[1].requests) == seen


@pytest.mark.parametrize("model", ["fast", "coe"])
async def test_limits_are_400s_naming_the_param(coe: RunningCoe, stub: tuple[str, StubRecord], model: str) -> None:
    client = coe.client()
    seen = len(stub[1].requests)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"messages": MSG * 9}, "messages"),
        ({"messages": MSG, "max_tokens": 1001}, "max_tokens"),
        ({"messages": MSG, "max_completion_tokens": 5000}, "max_completion_tokens"),
        ({"messages": MSG, "seed": 2**64}, "seed"),
        ({"messages": MSG, "extra_body": {"top_k": 2**63}}, "top_k"),
        ({"messages": MSG, "extra_body": {"guided_json": {"a": [1, {"b": -(2**70)}]}}}, "guided_json.a[1].b"),
        ({"messages": MSG, "stream": True, "seed": 2**63}, "seed"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model=model, **kwargs)
        assert info.value.status_code == 400
        error = info.value.body
        assert isinstance(error, dict) and error.get("param") == param, (param, error)
    assert len(stub[1].requests) == seen, "a refused request reached the upstream"


async def test_an_experts_own_max_tokens(coe: RunningCoe) -> None:
    client = coe.client()
    await client.chat.completions.create(model="fast", messages=MSG, max_tokens=100)
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="short", messages=MSG, max_tokens=100)
    assert "expert 'short'" in str(info.value) and isinstance(info.value.body, dict)
    assert info.value.body["param"] == "max_tokens"


async def test_refused_requests_are_counted(coe: RunningCoe) -> None:
    async with httpx.AsyncClient(base_url=coe.url, timeout=30) as http:
        before = await http.get("/metrics")
        await http.post("/v1/chat/completions", json={"model": "fast", "messages": []})
        after = await http.get("/metrics")

    def count(text: str) -> float:
        for line in text.splitlines():
            if line.startswith('coe_requests_total{route="rejected",status="400"}'):
                return float(line.split()[-1])
        return 0.0

    assert count(after.text) == count(before.text) + 1


async def test_batches_that_could_only_fail_are_refused_and_big_uploads_are_413(coe: RunningCoe) -> None:
    client = coe.client()
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "coe", "n": 2, "messages": MSG}}
    uploaded = await client.files.create(file=("in.jsonl", (json.dumps(line) + "\n").encode()), purpose="batch")
    with pytest.raises(openai.BadRequestError) as info:
        await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                    completion_window="24h")
    assert "line 1" in str(info.value) and "n" in str(info.value)
    with pytest.raises(openai.APIStatusError) as big:
        await client.files.create(file=("big.jsonl", b"x" * (40 * 1024)), purpose="batch")
    assert big.value.status_code == 413


async def test_an_api_expert_with_an_unknown_category_is_refused(stub: tuple[str, StubRecord], tmp_path: Path) -> None:
    reg = {"backends": {"stub": {"url": f"{stub[0]}/v1"}},
           "experts": [{"name": "fast", "backend": "stub", "model": "stub", "categories": ["code"]}],
           "router": {"categories": {"code": {"description": "programming"}, "law": {"description": "legal"}}},
           "auth": {"client_auth": False, "admin_auth": False}}
    async with running_coe(write_registry(tmp_path / "experts.yaml", reg)) as coe, \
            httpx.AsyncClient(base_url=coe.url, timeout=30) as http:
        refused = await http.post("/v1/experts", json={"name": "x", "backend": "stub", "model": "stub",
                                                       "categories": ["code", "cooking"]})
        assert refused.status_code == 400 and error_of(refused)["param"] == "categories"
        assert "cooking" in error_of(refused)["message"] and "law" in error_of(refused)["message"]
        accepted = await http.post("/v1/experts", json={"name": "y", "backend": "stub", "model": "stub",
                                                        "categories": ["law"]})
        assert accepted.status_code == 201, accepted.text


async def test_a_repeated_query_parameter_is_refused(coe: RunningCoe) -> None:
    async with httpx.AsyncClient(base_url=coe.url, timeout=30) as http:
        twice = await http.get("/v1/batches?limit=1&limit=2")
        once = await http.get("/v1/batches?limit=1")
        bad = await http.get("/v1/batches?limit=abc")
    assert twice.status_code == 400 and error_of(twice)["param"] == "limit"
    assert once.status_code == 200
    assert bad.status_code == 400  # as the schema now says (not FastAPI's 422)
