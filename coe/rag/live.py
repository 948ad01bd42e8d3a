"""The retrieval gate a running server uses: the configured index, reopened when it is re-ingested.

``coe rag ingest`` publishes a new index folder atomically; the server notices
the new ``meta.json`` on the next request and reopens it, so ingesting needs no
restart. No index (nothing ingested yet) means no retrieval, said in the trace.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from coe.config import RagConfig
from coe.errors import CoeError
from coe.rag.gate import GateDecision, RetrievalGate

log = logging.getLogger("coe.rag")


class LiveGate:
    def __init__(self) -> None:
        self._key: tuple[str, int, str] | None = None
        self._gate: RetrievalGate | None = None
        self._lock = asyncio.Lock()

    async def gate(self, config: RagConfig) -> RetrievalGate | None:
        """The gate over ``config``'s index, or None when nothing was ingested there."""
        assert config.folder is not None, "the loader sets rag.folder"
        folder = config.folder / config.index
        meta = folder / "meta.json"
        try:
            mtime = meta.stat().st_mtime_ns
        except OSError:
            return None
        key = (str(folder), mtime, config.model_dump_json())
        async with self._lock:
            if key != self._key:
                self._gate = await asyncio.to_thread(_open, folder, config)
                self._key = key
        return self._gate

    async def decide(self, config: RagConfig, query: str, category: str | None,
                     force: bool | None) -> GateDecision:
        """``force``: True retrieves whatever the similarity; None (or False) lets the gate decide (the
        pipeline skips the retrieve step altogether when a request turns retrieval off)."""
        gate = await self.gate(config)
        if gate is None:
            return GateDecision(False, 0.0, f"no retrieval index {config.index!r} (run: coe rag ingest)")
        if force:
            passages = await asyncio.to_thread(gate.index.search, query, gate.top_k)
            best = passages[0].score if passages else 0.0
            return GateDecision(bool(passages), best, "the request asked for retrieval", passages)
        return await asyncio.to_thread(gate.decide, query, category)


def _open(folder: Path, config: RagConfig) -> RetrievalGate | None:
    from coe.embed import shared_embedder
    from coe.rag.store import RagIndex

    try:
        index = RagIndex.open(folder, shared_embedder(config.embedder))
    except CoeError as exc:
        log.error("retrieval is off: %s", exc.message)
        return None
    except ImportError as exc:  # the router extra (numpy, faiss, onnxruntime) is not installed
        log.error("retrieval is off: %s (install coe[router])", exc)
        return None
    log.info("retrieval index %s: %d passages", folder, len(index.chunks))
    return RetrievalGate(index, config.gate_threshold, top_k=config.top_k, categories=config.categories)
