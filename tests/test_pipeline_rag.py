"""Retrieval inside the pipeline: the gate opens for a question the ingested corpus answers and stays
shut for an unrelated one; passages reach the experts with their ids and come back as citations.
Real MiniLM, FAISS and vLLM; a RECORDING transport shows what the experts were sent."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from apphelpers import RunningCoe, running_coe, write_registry
from test_pipeline import GREEDY, coe_of, registry

from coe.embed import shared_embedder
from coe.rag import RagIndex
from coe.testing.recording import RecordingTransport

pytestmark = pytest.mark.vllm

ANSWERABLE = "How many days do I have to get a refund from Orbit Ltd for an annual plan?"
UNRELATED = "Tell me about the sea."


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def rag_coe(vllm_server: Any, tmp_path_factory: pytest.TempPathFactory
                  ) -> AsyncIterator[tuple[RunningCoe, RecordingTransport]]:
    root = tmp_path_factory.mktemp("rag")
    (root / "docs").mkdir()
    (root / "docs" / "refunds.md").write_text(
        "# Orbit Ltd refunds\nOrbit Ltd refunds annual plans within 30 days of purchase.\n\n"
        "# Orbit Ltd support hours\nSupport answers from 9:00 to 17:00 on weekdays.")
    # chunk and top_k small: the tiny test model has a 512-token context
    reg = registry(vllm_server)
    reg["rag"] = {"folder": str(root / "rag"), "chunk_words": 40, "overlap_words": 5, "top_k": 1,
                  "gate_threshold": 0.45}
    RagIndex.open(root / "rag" / "default", shared_embedder("onnx")).ingest(
        [root / "docs" / "refunds.md"], chunk_words=40, overlap_words=5)
    transport = RecordingTransport()
    async with running_coe(write_registry(root / "experts.yaml", reg),
                           transport_factory=lambda name: transport) as running:
        yield running, transport


async def ask(coe: RunningCoe, question: str, **kw: Any) -> Any:
    return await coe.client().chat.completions.create(
        model="coe", messages=[{"role": "user", "content": question}], **GREEDY, **kw)


def user_prompt(body: dict[str, Any]) -> str:
    return str(body["messages"][-1]["content"])


async def test_gate_opens_for_the_corpus_and_cites(rag_coe: tuple[RunningCoe, RecordingTransport]) -> None:
    coe, transport = rag_coe
    transport.clear()
    reply = await ask(coe, ANSWERABLE, extra_body={"coe": {"experts": ["tiny-a0", "tiny-a1"]}})
    field = coe_of(reply)
    step = next(s for s in field["trace"] if s["step"] == "retrieve")
    assert step["retrieved"] is True and step["similarity"] >= 0.45
    assert [c["id"] for c in field["citations"]] == step["passages"]
    cited = field["citations"][0]
    assert cited["source"].endswith("refunds.md") and "30 days" in cited["text"]
    experts = transport.chats()[:2]
    for exchange in experts:  # each expert got the passage with its id, ahead of the question
        prompt = user_prompt(exchange.body)
        assert f"[{cited['id']}]" in prompt and "30 days" in prompt and prompt.endswith(ANSWERABLE)


async def test_gate_stays_shut_for_an_unrelated_question(rag_coe: tuple[RunningCoe, RecordingTransport]) -> None:
    coe, transport = rag_coe
    transport.clear()
    reply = await ask(coe, UNRELATED)
    field = coe_of(reply)
    step = next(s for s in field["trace"] if s["step"] == "retrieve")
    assert step["retrieved"] is False and step["similarity"] < 0.45
    assert "citations" not in field
    assert user_prompt(transport.chats()[0].body) == UNRELATED


async def test_request_forces_the_gate(rag_coe: tuple[RunningCoe, RecordingTransport]) -> None:
    coe, transport = rag_coe
    forced = coe_of(await ask(coe, UNRELATED, extra_body={"coe": {"rag": True}}))
    assert next(s for s in forced["trace"] if s["step"] == "retrieve")["retrieved"] is True
    assert forced["citations"]
    transport.clear()
    off = coe_of(await ask(coe, ANSWERABLE, extra_body={"coe": {"rag": False}}))
    assert "retrieve" not in [s["step"] for s in off["trace"]] and "citations" not in off
    assert "turned retrieval off" in next(s for s in off["trace"] if s["step"] == "recruit")["retrieval"]
    assert user_prompt(transport.chats()[0].body) == ANSWERABLE


async def test_no_index_means_no_retrieval(vllm_server: Any, tmp_path: Path) -> None:
    reg = registry(vllm_server)
    reg["rag"] = {"folder": str(tmp_path / "empty")}
    async with running_coe(write_registry(tmp_path / "experts.yaml", reg)) as coe:
        field = coe_of(await ask(coe, ANSWERABLE))
    assert "retrieve" not in [s["step"] for s in field["trace"]]
    recruit = next(s for s in field["trace"] if s["step"] == "recruit")
    assert "coe rag ingest" in recruit["retrieval"]


def test_citations_are_checked_against_the_retrieved_ids() -> None:
    """A model may cite an id it was never given: say which cited ids were retrieved, and which not."""
    from coe.pipeline.response import check_citations

    ids = ["kb/vpn.md#2", "kb/vpn.md#3"]
    text = "Restart the client [kb/vpn.md#2], then reset the token [kb/tokens.md#9] (see [4]) [sic] [kb/vpn.md#2]."
    assert check_citations(text, ids) == (["kb/vpn.md#2"], ["kb/tokens.md#9", "4"])
    assert check_citations("no citations here", ids) == ([], [])
