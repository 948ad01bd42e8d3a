"""The conversation as text, and retrieved passages put in front of the question."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from coe.rag.store import Passage


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def last_user_text(messages: Sequence[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return _text(message.get("content"))
    return ""


def conversation_text(messages: Sequence[dict[str, Any]]) -> str:
    """The question the aggregator sees: the last user turn, after earlier turns when there are any
    (system messages are the experts' instructions, not part of the question)."""
    turns = [m for m in messages if m.get("role") in ("user", "assistant")]
    if len(turns) <= 1:
        return last_user_text(messages)
    return "\n".join(f"{m['role'].capitalize()}: {_text(m.get('content'))}" for m in turns)


def passages_block(passages: Sequence[Passage]) -> str:
    lines = ["Passages retrieved for this question; use them if they are relevant and cite a passage by its "
             "[id] when you use it:"]
    lines += [f"[{p.id}] {p.text}" for p in passages]
    return "\n\n".join(lines)


def with_passages(messages: Sequence[dict[str, Any]], passages: Sequence[Passage]) -> list[dict[str, Any]]:
    """The conversation with the passages in front of the last user turn (not a system message: some
    chat templates allow only one, and the expert's own system prompt takes it)."""
    out = [dict(m) for m in messages]
    for message in reversed(out):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        block = passages_block(passages)
        if isinstance(content, list):
            message["content"] = [{"type": "text", "text": block + "\n\nQuestion:"}, *content]
        else:
            message["content"] = f"{block}\n\nQuestion: {content or ''}"
        break
    return out
