"""A retrieval index on disk: ``chunks.jsonl`` (id, source, heading, text), ``vectors.npy`` (one unit
row per chunk, same order), ``meta.json`` (format, embedder, files with their SHA-256). JSON and
NumPy only. Writes go to a temporary folder renamed into place under a lock, so readers see the
old index or the new one; the FAISS index is rebuilt from the vectors on load (exact inner product).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coe.errors import ConfigError, InvalidRequest
from coe.files import publish_folder, read_published
from coe.rag.chunk import Chunk, chunk_text

if TYPE_CHECKING:
    from coe.embed import Embedder, Matrix

INDEX_FORMAT = 1
SUFFIXES = (".txt", ".md", ".markdown")


@dataclass(frozen=True)
class Passage:
    id: str
    source: str
    text: str
    score: float


def source_name(path: Path) -> str:
    """How a file is named in ids and citations: relative to the working folder when under it."""
    resolved = path.resolve()
    try:
        return str(resolved.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(resolved)


class RagIndex:
    def __init__(self, folder: Path, embedder: Embedder, chunks: list[Chunk], vectors: Matrix,
                 files: dict[str, str]) -> None:
        self.folder, self.embedder, self.chunks, self.vectors, self.files = folder, embedder, chunks, vectors, files
        self._index: Any = None
        self._rebuild()

    @classmethod
    def open(cls, folder: Path, embedder: Embedder) -> RagIndex:
        """The index in ``folder``, or an empty one when it does not exist yet."""
        import numpy as np

        def load(source: Path) -> tuple[dict[str, Any], list[Chunk], Matrix] | None:
            if source == folder and folder.is_dir() and not (folder / "meta.json").exists():
                return None  # a plain folder with no index in it yet
            meta: dict[str, Any] = json.loads((source / "meta.json").read_text(encoding="utf-8"))
            chunks = [Chunk(**json.loads(line)) for line in
                      (source / "chunks.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
            return meta, chunks, np.load(source / "vectors.npy")

        try:  # every file from one version, whatever a re-ingest does meanwhile
            loaded = read_published(folder, load)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError([f"{folder}: retrieval index is damaged ({exc}); re-ingest it"]) from exc
        if loaded is None:
            return cls(folder, embedder, [], np.zeros((0, embedder.dim), dtype=np.float32), {})
        meta, chunks, vectors = loaded
        if meta.get("format") != INDEX_FORMAT or meta.get("embedder") != embedder.name:
            raise ConfigError([f"{folder}: index format {meta.get('format')!r} / embedder {meta.get('embedder')!r} "
                               f"does not match this coe ({INDEX_FORMAT} / {embedder.name}): re-ingest it"])
        if len(chunks) != len(vectors):
            raise ConfigError([f"{folder}: {len(chunks)} chunks but {len(vectors)} vectors; re-ingest it"])
        return cls(folder, embedder, chunks, vectors, dict(meta.get("files", {})))

    def ingest(self, paths: list[Path], *, chunk_words: int, overlap_words: int) -> dict[str, Any]:
        """Add files; a file ingested before has its chunks replaced. Every unreadable path is listed."""
        import numpy as np

        texts: dict[str, str] = {}
        problems: list[str] = []
        for path in paths:
            if path.suffix.lower() not in SUFFIXES:
                problems.append(f"{path}: not a text or Markdown file ({', '.join(SUFFIXES)})")
                continue
            try:
                texts[source_name(path)] = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                problems.append(f"{path}: cannot read: {exc}")
        if problems:
            raise InvalidRequest(f"{len(problems)} path(s) cannot be ingested; nothing was changed:\n"
                                 + "\n".join(problems))
        keep = [i for i, c in enumerate(self.chunks) if c.source not in texts]
        new = [c for source, text in texts.items()
               for c in chunk_text(text, source, chunk_words=chunk_words, overlap_words=overlap_words)]
        vectors = self.embedder.encode([c.text for c in new]) if new else np.zeros((0, self.embedder.dim), np.float32)
        replaced = sorted(set(texts) & set(self.files))
        self.chunks = [self.chunks[i] for i in keep] + new
        self.vectors = np.concatenate([self.vectors[keep], vectors]).astype(np.float32)
        for source, text in texts.items():
            self.files[source] = hashlib.sha256(text.encode()).hexdigest()
        self._save()
        self._rebuild()
        return {"files": len(texts), "replaced": replaced, "chunks_added": len(new), "chunks_total": len(self.chunks)}

    def search(self, query: str, k: int = 3) -> list[Passage]:
        """The ``k`` passages nearest the query, best first, with cosine similarity."""
        if not self.chunks:
            return []
        scores, idx = self._index.search(self.embedder.encode([query]), min(k, len(self.chunks)))
        return [Passage(self.chunks[i].id, self.chunks[i].source, self.chunks[i].text, round(float(s), 4))
                for s, i in zip(scores[0], idx[0], strict=True) if i >= 0]

    def _save(self) -> None:
        import numpy as np

        def build(work: Path) -> None:
            (work / "chunks.jsonl").write_text(
                "".join(json.dumps(asdict(c), ensure_ascii=False) + "\n" for c in self.chunks), encoding="utf-8")
            np.save(work / "vectors.npy", self.vectors)
            meta = {"format": INDEX_FORMAT, "embedder": self.embedder.name, "files": self.files}
            (work / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")

        publish_folder(self.folder, build)

    def _rebuild(self) -> None:
        import faiss

        self._index = faiss.IndexFlatIP(self.embedder.dim)
        if len(self.chunks):
            self._index.add(self.vectors)
