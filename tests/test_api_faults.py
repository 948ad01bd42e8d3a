"""Fault injection against a STUB upstream (coe.testing.stub_upstream): the point
here is failures vLLM will not produce on demand: a slow expert, a 500, a stream
that breaks, a client that hangs up. Behaviour with real experts is in test_api_chat.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio
from apphelpers import RunningCoe, running_coe, wait_until, write_registry

from coe.testing.server import free_port, serve_app
from coe.testing.stub_upstream import StubRecord, create_stub_app

MSG = [{"role": "user", "content": "hello there"}]


@pytest_asyncio.fixture(loop_scope="session")
async def stub() -> AsyncIterator[tuple[str, StubRecord]]:
    record = StubRecord()
    async with serve_app(create_stub_app(slow_s=30, record=record)) as url:
        yield url, record


def registry(stub_url: str, **overrides: Any) -> dict[str, Any]:
    reg: dict[str, Any] = {
        "backends": {"stub": {"url": f"{stub_url}/v1"},
                     "dead": {"url": f"http://127.0.0.1:{free_port()}/v1", "timeouts": {"connect_s": 0.5}}},
        "experts": [
            {"name": "fast", "backend": "stub", "model": "stub", "cost": {"input_per_mtok": 2, "output_per_mtok": 8}},
            {"name": "slow", "backend": "stub", "model": "stub+slow"},
            {"name": "broken", "backend": "stub", "model": "stub+break"},
            {"name": "failing", "backend": "stub", "model": "stub+fail"},
            {"name": "gone", "backend": "dead", "model": "x"},
        ],
        "auth": {"client_auth": False, "admin_auth": False},
        "dispatch": {"retries": 2, "backoff_s": 0.01, "health_interval_s": 60},
    }
    reg.update(overrides)
    return reg


@pytest_asyncio.fixture(loop_scope="session")
async def coe(stub: tuple[str, StubRecord], tmp_path: Path) -> AsyncIterator[RunningCoe]:
    async with running_coe(write_registry(tmp_path / "experts.yaml", registry(stub[0]))) as running:
        yield running


async def test_disconnect_cancels_non_streaming_upstream(coe: RunningCoe, stub: tuple[str, StubRecord]) -> None:
    _, record = stub
    async with httpx.AsyncClient(timeout=0.5) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post(f"{coe.url}/v1/chat/completions", json={"model": "slow", "messages": MSG},
                            headers={"x-request-id": "gone-early"})
    await wait_until(lambda: "gone-early" in record.cancelled, 5, "upstream saw the cancellation")
    assert "gone-early" not in record.completed


async def test_disconnect_cancels_streaming_upstream(coe: RunningCoe, stub: tuple[str, StubRecord]) -> None:
    _, record = stub
    async with httpx.AsyncClient(timeout=5) as http:
        body = {"model": "slow", "messages": MSG, "stream": True}
        async with http.stream("POST", f"{coe.url}/v1/chat/completions", json=body,
                               headers={"x-request-id": "stream-gone"}) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    break  # one chunk read, then hang up while the expert is still "thinking"
    await wait_until(lambda: "stream-gone" in record.cancelled, 5, "upstream saw the cancellation")
    assert "stream-gone" not in record.completed


async def test_disconnect_cancels_every_expert_of_a_composed_request(coe: RunningCoe,
                                                                    stub: tuple[str, StubRecord]) -> None:
    """model="coe" fanning out to a fast and a slow expert: the client hangs up during the fan-out,
    and the slow expert's upstream request is cancelled too (the whole graph run is)."""
    _, record = stub
    async with httpx.AsyncClient(timeout=0.8) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post(f"{coe.url}/v1/chat/completions",
                            json={"model": "coe", "messages": MSG, "coe": {"experts": ["fast", "slow"]}},
                            headers={"x-request-id": "fanout-gone"})
    await wait_until(lambda: "fanout-gone" in record.cancelled, 5, "the slow expert's upstream saw the cancellation")
    assert record.completed.count("fanout-gone") == 1  # the fast expert answered; the slow one never finished


async def test_failure_after_stream_began_is_an_error_event(coe: RunningCoe) -> None:
    client = coe.client()
    stream = await client.chat.completions.create(model="broken", messages=MSG, stream=True, max_tokens=8)
    seen = []
    with pytest.raises(openai.APIError, match="broke off the stream"):
        async for chunk in stream:
            seen.append(chunk)
    assert seen, "the stream began before it broke"
    async with httpx.AsyncClient() as http:
        raw = await http.post(f"{coe.url}/v1/chat/completions",
                              json={"model": "broken", "messages": MSG, "stream": True})
    assert '"error"' in raw.text.splitlines()[-2]
    assert "[DONE]" not in raw.text


async def test_5xx_before_first_byte_is_retried(coe: RunningCoe, stub: tuple[str, StubRecord]) -> None:
    _, record = stub
    record.fail_next = 2  # the third attempt (retries: 2) succeeds
    before = len(record.requests)
    reply = await coe.client().chat.completions.create(model="fast", messages=MSG)
    assert reply.choices[0].message.content == "stub answer one two"
    assert len(record.requests) - before == 3
    text = (await httpx.AsyncClient().get(f"{coe.url}/metrics")).text
    assert 'coe_upstream_errors_total{backend="stub",kind="unavailable"} 2.0' in text


async def test_routed_request_falls_back_to_next_candidate(stub: tuple[str, StubRecord], tmp_path: Path) -> None:
    reg = registry(stub[0], router={"strategy": "default", "default_expert": "failing", "fallbacks": 1})
    reg["experts"].insert(1, reg["experts"].pop(0))  # order: slow, fast... the router appends others in file order
    reg["experts"] = [e for e in reg["experts"] if e["name"] in ("failing", "fast")]
    async with running_coe(write_registry(tmp_path / "experts.yaml", reg)) as coe:
        raw = await coe.client().chat.completions.with_raw_response.create(model="coe", messages=MSG)
        reply = raw.parse()
    assert raw.headers["x-coe-experts"] == "fast"
    assert reply.model == "fast"
    trace = (reply.model_extra or {})["coe"]
    assert trace["decision"]["experts"][0]["name"] == "failing"
    assert [e["name"] for e in trace["experts"]] == ["fast"]


async def test_every_candidate_down_is_503_with_retry_after(coe: RunningCoe) -> None:
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as info:
        await coe.client().chat.completions.create(model="gone", messages=MSG)
    assert info.value.status_code == 503
    assert int(info.value.response.headers["retry-after"]) > 0
    assert info.value.body["code"] == "backend_unavailable"  # type: ignore[index]
    assert time.monotonic() - started < 10


async def test_cost_and_usage_in_coe_field(coe: RunningCoe) -> None:
    raw = await coe.client().chat.completions.with_raw_response.create(
        model="fast", messages=MSG, extra_headers={"x-request-id": "req-42"})
    reply = raw.parse()
    trace = (reply.model_extra or {})["coe"]
    usage = trace["usage"]
    assert usage == reply.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"})  # type: ignore[union-attr]
    assert trace["cost"] == pytest.approx((usage["prompt_tokens"] * 2 + usage["completion_tokens"] * 8) / 1e6)
    assert trace["request_id"] == "req-42" == raw.headers["x-request-id"]
    assert trace["experts"][0]["latency_ms"] > 0


async def test_request_id_reaches_the_upstream(coe: RunningCoe, stub: tuple[str, StubRecord]) -> None:
    _, record = stub
    await coe.client().chat.completions.create(model="fast", messages=MSG, extra_headers={"x-request-id": "trace-me"})
    assert record.headers[-1]["x-request-id"] == "trace-me"
    raw = await coe.client().chat.completions.with_raw_response.create(model="fast", messages=MSG)
    assert len(raw.headers["x-request-id"]) == 32  # a new one when the client sends none
    assert record.headers[-1]["x-request-id"] == raw.headers["x-request-id"]


async def test_total_timeout_is_504_and_not_retried(stub: tuple[str, StubRecord], tmp_path: Path) -> None:
    _, record = stub
    reg = registry(stub[0])
    reg["backends"]["stub"]["timeouts"] = {"total_s": 0.3}
    async with running_coe(write_registry(tmp_path / "experts.yaml", reg)) as coe:
        before = len(record.requests)
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as info:
            await coe.client().chat.completions.create(model="slow", messages=MSG)
    assert info.value.status_code == 504
    assert "timeouts.total_s" in str(info.value)
    assert time.monotonic() - started < 5
    assert len(record.requests) - before == 1
