"""Retrieval for the composition pipeline: ingest text and Markdown into a FAISS index, search it.

``coe rag ingest PATHS --index NAME`` chunks files, embeds the chunks with the
packaged MiniLM and stores them under ``rag.folder/NAME/``; re-ingesting a file
replaces its chunks. See ``coe.rag.store``.
"""

from coe.rag.chunk import Chunk, chunk_text
from coe.rag.gate import Calibration, GateDecision, RetrievalGate, calibrate
from coe.rag.store import Passage, RagIndex

__all__ = ["Calibration", "Chunk", "GateDecision", "Passage", "RagIndex", "RetrievalGate", "calibrate", "chunk_text"]
