"""OpenAI batch lines: the input a batch accepts and the output and error lines it writes.

Input, one JSON object per line: ``{"custom_id", "method": "POST", "url":
"/v1/chat/completions", "body"}``, where ``body.model`` is an expert or ``coe``.
The whole input is checked before anything runs; every bad line is reported
with its number. Output lines follow OpenAI's shape: ``{"id", "custom_id",
"response": {"status_code", "request_id", "body"}, "error"}``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coe.errors import InvalidRequest
from coe.jsonl import BadLines, parse_jsonl

CHAT_URL = "/v1/chat/completions"
MAX_CUSTOM_ID = 512


@dataclass(frozen=True)
class BatchItem:
    custom_id: str
    body: dict[str, Any]
    line: int

    @property
    def model(self) -> str:
        return str(self.body.get("model", ""))


BodyCheck = Callable[[dict[str, Any]], str | None]
"""Returns why a request body is invalid (e.g. the chat protocol's own validation), or None."""


def parse_item(obj: dict[str, Any], line: int, models: Collection[str] | None,
               check: BodyCheck | None) -> BatchItem | str:
    """One input line as an item, or why it is bad."""
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID:
        return f"custom_id must be a non-empty string of at most {MAX_CUSTOM_ID} characters"
    if obj.get("method", "POST") != "POST":
        return f"method must be POST, not {obj.get('method')!r}"
    if obj.get("url") != CHAT_URL:
        return f"url must be {CHAT_URL!r}, not {obj.get('url')!r}"
    extra = sorted(set(obj) - {"custom_id", "method", "url", "body"})
    if extra:
        return f"unknown key(s): {', '.join(extra)}"
    body = obj.get("body")
    if not isinstance(body, dict):
        return "body must be a JSON object (the chat completion request)"
    model = body.get("model")
    if not isinstance(model, str) or (models is not None and model not in models):
        return f"body.model {model!r} is neither 'coe' nor an expert of this registry"
    if body.get("stream"):
        return "body.stream must be false in a batch"
    problem = check(body) if check is not None else None
    return f"body: {problem}" if problem else BatchItem(custom_id, body, line)


def read_batch(path: Path, models: Collection[str], check: BodyCheck | None = None) -> list[BatchItem]:
    """Every item of a batch input file; ``BadLines`` (every bad line, nothing run) otherwise."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"{path}: cannot read: {exc}") from exc
    return parse_batch(text, str(path), models, check)


def parse_batch(text: str, source: str, models: Collection[str] | None,
                check: BodyCheck | None = None) -> list[BatchItem]:
    """``read_batch`` on text in memory (an uploaded input file); ``models`` None accepts any model."""
    seen: dict[str, int] = {}
    items = parse_jsonl(text, source, _checker(seen, models, check), consequence="the batch was not started")
    if not items:
        raise BadLines(source, ["the input holds no requests"], "the batch was not started")
    return items


def batch_ids(text: str, source: str, models: Collection[str] | None,
              check: BodyCheck | None = None) -> list[str]:
    """``parse_batch``'s checks, returning only the custom_ids in input order. Accepting a batch needs
    nothing else, and each line's parsed request is let go once checked: holding all of a 64 MiB file's
    at once took about 0.5 GiB, and left the heap fragmented after it was freed."""
    seen: dict[str, int] = {}
    checker = _checker(seen, models, check)

    def parse(obj: dict[str, Any], line: int) -> bool | str:
        item = checker(obj, line)
        return item if isinstance(item, str) else True

    if not parse_jsonl(text, source, parse, consequence="the batch was not started"):
        raise BadLines(source, ["the input holds no requests"], "the batch was not started")
    return list(seen)


def _checker(seen: dict[str, int], models: Collection[str] | None,
             check: BodyCheck | None) -> Callable[[dict[str, Any], int], BatchItem | str]:
    """``parse_item`` that also refuses a custom_id seen before (``seen``: custom_id -> its line)."""

    def parse(obj: dict[str, Any], line: int) -> BatchItem | str:
        item = parse_item(obj, line, models, check)
        if isinstance(item, BatchItem):
            if item.custom_id in seen:
                return f"custom_id {item.custom_id!r} repeats line {seen[item.custom_id]}"
            seen[item.custom_id] = line
        return item

    return parse


def output_line(custom_id: str, request_id: str, status: int, body: dict[str, Any],
                error: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": body}, "error": error}
