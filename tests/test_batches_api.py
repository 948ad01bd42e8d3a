"""OpenAI Files and Batches through the official openai SDK, against coe on the shared real vLLM
(the embedded in-memory store and worker)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
import pytest_asyncio
from apphelpers import RunningCoe, running_coe, tiny_registry, write_registry

from coe.testing.recording import RecordingTransport

pytestmark = pytest.mark.vllm


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(x) + "\n" for x in lines).encode()


def request(custom_id: str, model: str = "tiny-base", **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": f"Say {custom_id}."}],
                     "max_tokens": 6, "temperature": 0, **body}}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def recorded(vllm_server: Any, tmp_path_factory: pytest.TempPathFactory
                   ) -> AsyncIterator[tuple[RunningCoe, RecordingTransport]]:
    transport = RecordingTransport()
    path = write_registry(tmp_path_factory.mktemp("batches") / "experts.yaml",
                          tiny_registry(vllm_server, store={"worker_concurrency": 4}))
    async with running_coe(path, transport_factory=lambda name: transport) as running:
        yield running, transport


async def wait_done(client: openai.AsyncOpenAI, batch_id: str, timeout: float = 180) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        batch = await client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "cancelled", "expired"):
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}: {batch.request_counts}"
        await asyncio.sleep(0.3)


async def test_batch_round_trip(recorded: tuple[RunningCoe, RecordingTransport]) -> None:
    coe, _ = recorded
    client = coe.client()
    lines = [request("a-1"), request("a-2", model="tiny-a0"), request("a-3", model="tiny-a1"),
             request("routed", model="coe", coe={"experts": ["tiny-a0", "tiny-base"], "strategy": "best"}),
             request("too-long", messages=[{"role": "user", "content": "word " * 2000}])]
    uploaded = await client.files.create(file=("input.jsonl", jsonl(lines)), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == len(jsonl(lines))
    assert (await client.files.retrieve(uploaded.id)).filename == "input.jsonl"
    batch = await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                        completion_window="24h", metadata={"job": "t1"})
    assert batch.status == "in_progress" and batch.request_counts is not None
    assert batch.request_counts.total == 5 and batch.metadata == {"job": "t1"}
    done = await wait_done(client, batch.id)
    assert done.status == "completed" and done.completed_at is not None
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (4, 1)
    assert done.output_file_id and done.error_file_id
    output = [json.loads(x) for x in (await client.files.content(done.output_file_id)).text.splitlines()]
    assert [r["custom_id"] for r in output] == ["a-1", "a-2", "a-3", "routed"]  # input order
    for r in output:
        assert r["response"]["status_code"] == 200 and r["error"] is None and r["id"].startswith("batch_req_")
        assert r["response"]["body"]["choices"][0]["message"]["content"]
    assert output[1]["response"]["body"]["model"] == "tiny-a0"
    assert output[3]["response"]["body"]["coe"]["answered_by"] == "tiny-a0"
    errors = [json.loads(x) for x in (await client.files.content(done.error_file_id)).text.splitlines()]
    assert [e["custom_id"] for e in errors] == ["too-long"] and errors[0]["response"]["status_code"] == 400
    listed = await client.batches.list(limit=5)
    assert batch.id in [b.id for b in listed.data]


async def test_bad_input_is_refused_with_every_line(recorded: tuple[RunningCoe, RecordingTransport]) -> None:
    coe, transport = recorded
    client = coe.client()
    bad = jsonl([request("x"), {"custom_id": "y", "method": "POST", "url": "/v1/embeddings", "body": {}},
                 request("x"), request("z", model="nobody"), request("w", temperature=9)])
    uploaded = await client.files.create(file=("bad.jsonl", bad), purpose="batch")
    transport.clear()
    with pytest.raises(openai.BadRequestError) as info:
        await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                    completion_window="24h")
    message = str(info.value)
    for line in ("line 2", "line 3", "line 4", "line 5"):
        assert line in message
    assert "line 1:" not in message and transport.chats() == []
    with pytest.raises(openai.BadRequestError):
        await client.files.create(file=("x.jsonl", b"{}\n"), purpose="fine-tune")  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError):
        await client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions",
                                    completion_window="24h")


async def test_cancel_skips_what_has_not_run(recorded: tuple[RunningCoe, RecordingTransport]) -> None:
    coe, transport = recorded
    client = coe.client()
    transport.delay_s["tiny-lora-1"] = 1.0
    try:
        lines = [request(f"c-{i}", model="tiny-a1") for i in range(24)]
        uploaded = await client.files.create(file=("c.jsonl", jsonl(lines)), purpose="batch")
        batch = await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                            completion_window="24h")
        cancelling = await client.batches.cancel(batch.id)
        assert cancelling.status in ("cancelling", "cancelled")
        done = await wait_done(client, batch.id)
    finally:
        transport.delay_s.pop("tiny-lora-1")
    assert done.status == "cancelled" and done.cancelled_at is not None
    assert done.request_counts is not None and done.request_counts.completed < 24
    ran = done.request_counts.completed
    if ran:
        assert done.output_file_id
        text = (await client.files.content(done.output_file_id)).text
        assert len(text.splitlines()) == ran
    with pytest.raises(openai.ConflictError):
        await client.batches.cancel(batch.id)


async def test_cancel_reaches_a_window_the_worker_is_running(recorded: tuple[RunningCoe, RecordingTransport]
                                                               ) -> None:
    """The worker took all 40 items in one window; a cancel once it is running stops further calls
    within its status poll (0.5 s): only calls already sent finish, the rest are skipped."""
    coe, transport = recorded
    client = coe.client()
    transport.delay_s["tiny-lora-1"] = 0.5
    transport.clear()
    try:
        lines = [request(f"m-{i}", model="tiny-a1") for i in range(40)]
        uploaded = await client.files.create(file=("m.jsonl", jsonl(lines)), purpose="batch")
        batch = await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                            completion_window="24h")
        deadline = time.monotonic() + 120
        while (counts := (await client.batches.retrieve(batch.id)).request_counts) is None or counts.completed < 4:
            assert time.monotonic() < deadline, counts
            await asyncio.sleep(0.05)
        sent_at_cancel = len(transport.chats())
        await client.batches.cancel(batch.id)
        done = await wait_done(client, batch.id)
    finally:
        transport.delay_s.pop("tiny-lora-1")
    sent = len(transport.chats())
    assert done.status == "cancelled" and done.request_counts is not None
    # 4 slots: the calls in flight at the cancel were counted; each slot may start ~one more before the poll
    assert sent <= sent_at_cancel + 8 < 40, (sent_at_cancel, sent)
    assert done.request_counts.completed == sent and done.request_counts.failed == 0
    assert done.output_file_id and done.error_file_id is None
    output = (await client.files.content(done.output_file_id)).text.splitlines()
    assert len(output) == sent and all(json.loads(x)["response"]["status_code"] == 200 for x in output)


async def test_file_delete(recorded: tuple[RunningCoe, RecordingTransport]) -> None:
    client = recorded[0].client()
    uploaded = await client.files.create(file=("d.jsonl", jsonl([request("d")])), purpose="batch")
    deleted = await client.files.delete(uploaded.id)
    assert deleted.deleted and deleted.id == uploaded.id
    with pytest.raises(openai.NotFoundError):
        await client.files.retrieve(uploaded.id)


async def coe_cli(*args: str) -> tuple[int, str, str]:
    """The CLI as a subprocess, awaited (the server under test runs on this event loop)."""
    import sys
    from pathlib import Path

    proc = await asyncio.create_subprocess_exec(str(Path(sys.executable).parent / "coe"), *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_cli_submit_status_download(recorded: tuple[RunningCoe, RecordingTransport], tmp_path: Any) -> None:
    coe, _ = recorded
    source = tmp_path / "in.jsonl"
    source.write_bytes(jsonl([request("s-1"), request("s-2", model="tiny-a0")]))
    base = ["--base-url", f"{coe.url}/v1"]
    code, out, err = await coe_cli("batch", "submit", str(source), *base)
    assert code == 0, err
    batch_id = json.loads(out)["id"]
    await wait_done(coe.client(), batch_id)
    code, out, _ = await coe_cli("batch", "status", batch_id, *base)
    assert code == 0 and json.loads(out)["status"] == "completed"
    code, out, err = await coe_cli("batch", "download", batch_id, "--output", str(tmp_path / "out.jsonl"), *base)
    assert code == 0, err
    assert json.loads(out)["output"] == str(tmp_path / "out.jsonl")
    ids = [json.loads(x)["custom_id"] for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert ids == ["s-1", "s-2"]
    code, _, err = await coe_cli("batch", "status", "batch_nope", *base)
    assert code == 1 and "404" in err


async def test_cli_submit_refused_leaves_no_file(recorded: tuple[RunningCoe, RecordingTransport],
                                                 tmp_path: Any) -> None:
    """A batch refused at creation (``model: coe`` cannot honour ``n: 2``) takes its uploaded file with it."""
    coe, _ = recorded
    source = tmp_path / "bad.jsonl"
    source.write_bytes(jsonl([request("b-1", model="coe", n=2)]))
    before = {f.id async for f in coe.client().files.list()}
    code, _, err = await coe_cli("batch", "submit", str(source), "--base-url", f"{coe.url}/v1")
    assert code == 1 and "HTTP 400" in err and "line 1" in err, err
    assert {f.id async for f in coe.client().files.list()} == before
