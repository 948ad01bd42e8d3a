"""Cutting documents into passages: by Markdown section, then into overlapping word windows.

Each chunk carries its section heading in front, so a passage read alone still
says what it is about, and a stable id ``<file>#<n>`` that answers cite.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

HEADING = re.compile(r"^(#{1,6})\s+(.*\S)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Chunk:
    id: str
    source: str
    heading: str
    text: str


def _sections(text: str) -> list[tuple[str, str]]:
    """(heading, body) pairs; text before the first heading has an empty heading."""
    marks = list(HEADING.finditer(text))
    if not marks:
        return [("", text)]
    out = [("", text[: marks[0].start()])] if marks[0].start() > 0 else []
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        out.append((m.group(2), text[m.end():end]))
    return out


def chunk_text(text: str, source: str, *, chunk_words: int = 120, overlap_words: int = 20) -> list[Chunk]:
    """Word windows of ``chunk_words`` (consecutive ones share ``overlap_words``) within each section."""
    if overlap_words >= chunk_words:
        raise ValueError("overlap_words must be below chunk_words")
    chunks: list[Chunk] = []
    step = chunk_words - overlap_words
    for heading, body in _sections(text):
        words = body.split()
        if not words:
            continue
        start = 0
        while True:
            window = words[start:start + chunk_words]
            passage = " ".join(window)
            chunks.append(Chunk(f"{source}#{len(chunks) + 1}", source, heading,
                                f"{heading}\n{passage}" if heading else passage))
            if start + chunk_words >= len(words):
                break
            start += step
    return chunks
