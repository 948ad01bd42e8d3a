"""Reading a JSONL input where every bad line is found before anything runs.

``coe route``, ``coe profile`` and ``coe router fit`` all promise the same thing:
on bad input, list every bad line number, do nothing, exit 1. This is that
promise once; each caller supplies only what a good line must contain.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from coe.errors import InvalidRequest

T = TypeVar("T")
SHOWN = 50


class BadLines(InvalidRequest):
    """Some lines are bad; ``problems`` lists each as ``line N: why``."""

    def __init__(self, source: str, problems: list[str], consequence: str = "nothing was done") -> None:
        shown = problems[:SHOWN] + ([f"... and {len(problems) - SHOWN} more"] if len(problems) > SHOWN else [])
        super().__init__(f"{source}: {len(problems)} bad line(s); {consequence}:\n" + "\n".join(shown))
        self.problems = problems


def read_jsonl(path: Path, parse: Callable[[dict[str, Any], int], T | str], *,
               consequence: str = "nothing was done") -> list[T]:
    """``parse(object, line number)`` returns the item or why the line is bad. Blank lines are skipped;
    a line that is not a JSON object is bad. Raises ``BadLines`` listing every bad line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"{path}: cannot read: {exc}") from exc
    return parse_jsonl(text, str(path), parse, consequence=consequence)


def parse_jsonl(text: str, source: str, parse: Callable[[dict[str, Any], int], T | str], *,
                consequence: str = "nothing was done") -> list[T]:
    """``read_jsonl`` on text already in memory (an uploaded file); ``source`` names it in errors."""
    lines = text.splitlines()
    items: list[T] = []
    problems: list[str] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"line {number}: not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        parsed = parse(obj, number) if isinstance(obj, dict) else "must be a JSON object"
        if isinstance(parsed, str):
            problems.append(f"line {number}: {parsed}")
        else:
            items.append(parsed)
    if problems:
        raise BadLines(source, problems, consequence)
    return items
