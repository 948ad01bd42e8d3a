"""Scoring experts' answers on labelled questions: the evidence profiles are built from.

Two formats, as in the shared data: ``multiple_choice`` (``choices`` plus an
``answer`` that is a letter or the text of a choice) scored by extracting the
letter the expert chose, and free-form (``answer`` a string or a list of
acceptable strings) scored by normalised exact match (SQuAD-style: case,
punctuation, articles and whitespace ignored).
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

LETTERS = string.ascii_uppercase

_ANSWER_IS = re.compile(r"answer\s*(?:is|:)?\s*:?\s*\(?([A-Z])\)?(?![A-Za-z])", re.IGNORECASE)
_LEADING = re.compile(r"^\W*\(?([A-Z])\)?(?:[.):,\s]|$)")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def choices_of(item: Mapping[str, Any]) -> list[str]:
    choices = item.get("choices")
    return [str(c) for c in choices] if isinstance(choices, list) else []


def format_question(item: Mapping[str, Any]) -> str:
    """The question as sent to an expert: task prefix, question, lettered choices, the instruction.

    An item that carries its own ``prompt`` (a string) is sent as written: a skill expert trained on
    its task's own rendering (the skill pack's dev split) is measured on what it will be asked."""
    if isinstance(item.get("prompt"), str):
        return str(item["prompt"])
    prefix = str(item.get("task_prefix") or "")
    text = f"{prefix}{item['question']}".strip()
    choices = choices_of(item)
    if not choices:
        return text
    lines = [text, ""] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)]
    lines += ["", f"Answer with the letter of the correct choice ({', '.join(LETTERS[: len(choices)])})."]
    return "\n".join(lines)


def normalize(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def gold_letter(item: Mapping[str, Any]) -> str | None:
    """The correct choice's letter: the answer itself when it is a letter, else the choice it names."""
    choices = choices_of(item)
    answer = item.get("answer")
    if not choices or not isinstance(answer, str):
        return None
    if len(answer) == 1 and answer.upper() in LETTERS[: len(choices)]:
        return answer.upper()
    wanted = normalize(answer)
    for i, choice in enumerate(choices):
        if normalize(choice) == wanted:
            return LETTERS[i]
    return None


def extract_choice(text: str, choices: Sequence[str]) -> str | None:
    """The letter an answer picks: "The answer is (B)", "B.", "(B) ...", or the exact text of one choice."""
    valid = LETTERS[: len(choices)]
    stated = _ANSWER_IS.search(text)
    if stated and stated.group(1).upper() in valid:
        return stated.group(1).upper()
    leading = _LEADING.match(text.strip())
    if leading and leading.group(1) in valid:
        return leading.group(1)
    said = normalize(text)
    matches = [LETTERS[i] for i, c in enumerate(choices) if normalize(c) and normalize(c) == said]
    if len(matches) == 1:
        return matches[0]
    contained = [LETTERS[i] for i, c in enumerate(choices) if len(normalize(c)) > 3 and normalize(c) in said]
    return contained[0] if len(contained) == 1 else None


def is_correct(item: Mapping[str, Any], text: str) -> bool:
    """Whether ``text`` answers ``item`` correctly (multiple choice or free-form)."""
    choices = choices_of(item)
    if choices:
        gold = gold_letter(item)
        return gold is not None and extract_choice(text, choices) == gold
    answer = item.get("answer")
    accepted = answer if isinstance(answer, list) else [answer]
    said = normalize(text)
    return any(isinstance(a, str) and normalize(a) == said for a in accepted)


def chance(item: Mapping[str, Any]) -> float:
    """The probability of a correct answer by guessing (0 for free-form)."""
    choices = choices_of(item)
    return 1.0 / len(choices) if choices else 0.0
