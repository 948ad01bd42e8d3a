"""Retrieval ingest and search on the real MiniLM and FAISS: chunking, citations, re-ingest replaces."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from coe.embed import shared_embedder
from coe.errors import InvalidRequest
from coe.rag import RagIndex, chunk_text

ROOT = Path(__file__).resolve().parent.parent


def test_chunks_follow_sections_and_overlap() -> None:
    text = "intro words here\n\n# Billing\n" + " ".join(f"w{i}" for i in range(50)) + "\n## Refunds\nMoney back."
    chunks = chunk_text(text, "doc.md", chunk_words=20, overlap_words=5)
    assert [c.heading for c in chunks] == ["", "Billing", "Billing", "Billing", "Refunds"]
    assert [c.id for c in chunks] == [f"doc.md#{i}" for i in range(1, 6)]
    billing = [c.text.split("\n", 1)[1].split() for c in chunks if c.heading == "Billing"]
    assert billing[0][-5:] == billing[1][:5]  # consecutive windows share the overlap
    assert chunks[-1].text == "Refunds\nMoney back."
    with pytest.raises(ValueError):
        chunk_text("x", "d", chunk_words=10, overlap_words=10)


def test_ingest_search_cite_and_reingest_replaces(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "orbit.md").write_text("# Orbit Ltd refunds\nOrbit Ltd refunds annual plans within 30 days of purchase.")
    (docs / "kiwi.txt").write_text("Kiwi birds are flightless and lay very large eggs.")
    index = RagIndex.open(tmp_path / "rag" / "default", shared_embedder("onnx"))
    report = index.ingest([docs / "orbit.md", docs / "kiwi.txt"], chunk_words=50, overlap_words=10)
    assert report["files"] == 2 and report["chunks_total"] == 2 and report["replaced"] == []
    hits = RagIndex.open(tmp_path / "rag" / "default", shared_embedder("onnx")).search(
        "How long do I have to get my money back from Orbit?", k=2)
    assert hits[0].id.endswith("orbit.md#1") and hits[0].score > hits[1].score
    assert "30 days" in hits[0].text
    (docs / "orbit.md").write_text("# Orbit Ltd refunds\nOrbit Ltd now refunds annual plans within 14 days.")
    again = RagIndex.open(tmp_path / "rag" / "default", shared_embedder("onnx"))
    report = again.ingest([docs / "orbit.md"], chunk_words=50, overlap_words=10)
    assert report["replaced"] and report["chunks_total"] == 2  # replaced, not duplicated
    texts = [c.text for c in RagIndex.open(tmp_path / "rag" / "default", shared_embedder("onnx")).chunks]
    assert any("14 days" in t for t in texts) and not any("30 days" in t for t in texts)
    meta = json.loads((tmp_path / "rag" / "default" / "meta.json").read_text())
    assert meta["format"] == 1 and len(meta["files"]) == 2
    assert not list((tmp_path / "rag").glob(".default-build-*"))


def test_readers_never_see_a_missing_or_empty_index_during_reingests(tmp_path: Path) -> None:
    """Re-ingest swaps the index with one atomic rename of a symlink: a reader looping meanwhile always
    opens a whole index (the old or the new), never none, and a plain folder from before versions is
    taken over."""
    folder = tmp_path / "rag" / "default"
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# A\nAlpha facts about the first topic.")
    embedder = shared_embedder("onnx")
    RagIndex.open(folder, embedder).ingest([docs / "a.md"], chunk_words=50, overlap_words=10)
    legacy = folder.resolve()
    folder.unlink()
    legacy.rename(folder)  # the layout before versions: a plain folder
    stop = threading.Event()
    errors: list[BaseException] = []

    def reingest() -> None:
        try:
            for i in range(12):
                (docs / "a.md").write_text(f"# A\nAlpha facts, edition {i}, about the first topic.")
                RagIndex.open(folder, embedder).ingest([docs / "a.md"], chunk_words=50, overlap_words=10)
        except BaseException as exc:  # reported by the reader's assertion below
            errors.append(exc)
        finally:
            stop.set()

    writer = threading.Thread(target=reingest)
    writer.start()
    reads = 0
    try:
        while not stop.is_set() or reads < 20:
            index = RagIndex.open(folder, embedder)
            assert len(index.chunks) == 1 and len(index.vectors) == 1, "a reader saw an empty or missing index"
            reads += 1
    finally:
        writer.join()
    assert not errors, errors
    assert folder.is_symlink() and "edition 11" in RagIndex.open(folder, embedder).chunks[0].text
    assert len(list(folder.parent.glob(".default-v*"))) <= 3, "old versions are pruned"


def test_the_index_exists_after_every_step_of_a_reingest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deterministic twin of the loop above: after every rename the publish makes, the index is there
    (the old scheme renamed the old folder away, then the new one in: a moment with no index)."""
    import os

    folder = tmp_path / "rag" / "default"
    docs = tmp_path / "a.md"
    docs.write_text("# A\nAlpha facts about the first topic.")
    embedder = shared_embedder("onnx")
    RagIndex.open(folder, embedder).ingest([docs], chunk_words=50, overlap_words=10)
    seen: list[bool] = []
    rename, replace = Path.rename, os.replace

    def checked_rename(self: Path, target: Any) -> Any:
        out = rename(self, target)
        seen.append((folder / "meta.json").exists())
        return out

    def checked_replace(src: Any, dst: Any) -> None:
        replace(src, dst)
        seen.append((folder / "meta.json").exists())

    monkeypatch.setattr(Path, "rename", checked_rename)
    monkeypatch.setattr(os, "replace", checked_replace)
    docs.write_text("# A\nAlpha facts, second edition.")
    RagIndex.open(folder, embedder).ingest([docs], chunk_words=50, overlap_words=10)
    assert seen and all(seen), seen


def test_a_reader_whose_version_is_pruned_meanwhile_reads_the_current_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race CI hit: a reader resolves a version, and before it opens the files, re-ingests prune that
    version. The reader must read the current version, not report an empty index. Made deterministic by
    running the re-ingests inside the reader's first resolve."""
    import coe.files
    import coe.rag.store

    folder = tmp_path / "rag" / "default"
    doc = tmp_path / "a.md"
    doc.write_text("# A\nAlpha facts, edition 0.")
    embedder = shared_embedder("onnx")
    RagIndex.open(folder, embedder).ingest([doc], chunk_words=50, overlap_words=10)
    resolve = coe.files.published
    reader_resolves = 0
    publishing = False
    last = coe.files.KEEP_VERSIONS + 1

    def stale_then_publish(path: Path) -> Path:
        nonlocal reader_resolves, publishing
        source = resolve(path)
        if publishing:
            return source
        reader_resolves += 1
        if reader_resolves == 1:  # hand out this version, then publish past it until it is pruned
            publishing = True
            for i in range(1, last + 1):
                doc.write_text(f"# A\nAlpha facts, edition {i}.")
                RagIndex.open(folder, embedder).ingest([doc], chunk_words=50, overlap_words=10)
            publishing = False
            assert not source.exists(), "the version handed out was pruned"
        return source

    monkeypatch.setattr(coe.files, "published", stale_then_publish)
    monkeypatch.setattr(coe.rag.store, "published", stale_then_publish, raising=False)
    index = RagIndex.open(folder, embedder)
    assert reader_resolves >= 2, "the reader resolved again after its version went"
    assert len(index.chunks) == 1 and f"edition {last}." in index.chunks[0].text


def test_bad_paths_are_all_listed_and_nothing_changes(tmp_path: Path) -> None:
    index = RagIndex.open(tmp_path / "idx", shared_embedder("onnx"))
    (tmp_path / "img.png").write_bytes(b"\x89PNG")
    with pytest.raises(InvalidRequest, match=r"2 path\(s\)(.|\n)*img.png(.|\n)*missing.md"):
        index.ingest([tmp_path / "img.png", tmp_path / "missing.md"], chunk_words=50, overlap_words=10)
    assert not (tmp_path / "idx").exists()


def test_coe_rag_ingest_cli(tmp_path: Path) -> None:
    (tmp_path / "experts.yaml").write_text("experts: []\nrag: {chunk_words: 40, overlap_words: 5}\n")
    doc = tmp_path / "faq.md"
    doc.write_text("# Support hours\nSupport answers from 9 to 5 on weekdays.")
    result = subprocess.run([sys.executable, "-m", "services.cli", "rag", "ingest", str(doc), "--index", "faq",
                             "--config", str(tmp_path / "experts.yaml")], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["chunks_total"] == 1
    assert (tmp_path / ".coe" / "rag" / "faq" / "chunks.jsonl").exists()
    bad = subprocess.run([sys.executable, "-m", "services.cli", "rag", "ingest", str(tmp_path / "nope.md"),
                          "--config", str(tmp_path / "experts.yaml")], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 1 and "nope.md" in bad.stderr and "Traceback" not in bad.stderr


def test_gate_opens_for_corpus_questions_and_respects_category_rules(tmp_path: Path) -> None:
    from coe.rag import RetrievalGate

    doc = tmp_path / "orbit.md"
    doc.write_text("# Orbit Ltd refunds\nOrbit Ltd refunds annual plans within 30 days of purchase.")
    index = RagIndex.open(tmp_path / "idx", shared_embedder("onnx"))
    index.ingest([doc], chunk_words=50, overlap_words=10)
    gate = RetrievalGate(index, 0.45, categories={"math": "never", "support": "always"})
    opened = gate.decide("Within how many days does Orbit Ltd refund an annual plan?")
    assert opened.retrieve and opened.passages[0].id.endswith("orbit.md#1") and opened.similarity >= 0.45
    closed = gate.decide("What is the derivative of x squared?")
    assert not closed.retrieve and closed.passages == [] and closed.similarity < 0.45
    assert not gate.decide("Orbit refunds?", category="math").retrieve
    assert gate.decide("What is 2 + 2?", category="support").retrieve


def test_calibrate_picks_the_best_f1_threshold() -> None:
    from coe.rag import calibrate

    c = calibrate([0.8, 0.7, 0.6, 0.3], [0.5, 0.2, 0.1])
    # by hand: t=0.3 -> P 4/5, R 1, F1 0.889; t=0.6 -> P 1, R 0.75, F1 0.857; t=0.2 -> F1 0.8; t=0.5 -> 0.75
    assert c.threshold == pytest.approx(0.25)  # midway between 0.3 (kept) and 0.2 (the next lower)
    assert c.precision == pytest.approx(0.8) and c.recall == 1.0
    assert c.f1 == pytest.approx(8 / 9)
    with pytest.raises(ValueError):
        calibrate([], [0.1])
