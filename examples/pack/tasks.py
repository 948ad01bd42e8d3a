"""The skill pack's tasks: how an item becomes the chat coe sends, and how an answer is scored.

Shared by the training generator (``examples/pack/train_data.py``), the evaluation generator
(``bench/quality_data.py``) and the benchmark (``bench/quality.py``), so that an adapter is trained
on exactly the prompt it is evaluated on. Item *content* is generated separately by each generator.

An item has BIG-bench's fields as in ``bigbench_dev.jsonl``: ``source_task`` (``family:subtask``),
``format`` (``generative`` or ``multiple_choice``), ``task_prefix``, ``question``, ``choices`` and
``answer`` (a string, or a list of accepted strings), plus ``skill`` (which expert it belongs to).

The prompt is BIG-bench's own text, ``task_prefix + question``; a multiple-choice item lists its
choices the way BIG-bench renders them for generative models (``"  choice: ..."`` lines), and the
expert answers with the choice's text. Scoring follows each task's metric: exact string match
for generative tasks (after trimming spaces and a trailing period), and for multiple choice the
choice the answer names (exactly, or as its first line).
"""

from __future__ import annotations

import re
from typing import Any

SKILLS: dict[str, dict[str, Any]] = {
    "adder": {
        "families": ["simple_arithmetic_json", "simple_arithmetic_json_subtasks",
                     "simple_arithmetic_multiple_targets_json", "simple_arithmetic_json_multiple_choice"],
        "system_prompt": "Below are additions, each followed by its exact sum.",
        "description": "Adds whole numbers written as 'a + b =' (BIG-bench simple_arithmetic).",
        "skills": ["addition", "sums of whole numbers"],
    },
    "calculator": {
        "families": ["arithmetic"],
        "system_prompt": "Below are arithmetic questions with choices, each followed by the correct choice.",
        "description": "Answers 'What is 12 times 34?' questions by picking the right number among choices "
                       "(BIG-bench arithmetic: addition, subtraction, multiplication, division).",
        "skills": ["arithmetic", "multiplication and division"],
    },
    "plurals": {
        "families": ["linguistic_mappings:plural_json", "linguistic_mappings:plural_regular_json",
                     "linguistic_mappings:plural_irregular_json"],
        "system_prompt": "Below are English nouns, each followed by its plural form.",
        "description": "Gives the plural of an English noun, regular or irregular (BIG-bench linguistic_mappings).",
        "skills": ["plurals", "english morphology"],
    },
    "units": {
        "families": ["unit_conversion:si_conversion", "unit_conversion:unit_identification"],
        "system_prompt": "Below are unit conversions with choices, each followed by the correct choice.",
        "description": "Converts between SI prefixes of a unit (kilo, hecto, deca, deci, centi, milli) by "
                       "picking the right choice (BIG-bench unit_conversion).",
        "skills": ["unit conversion", "si prefixes"],
    },
}
"""The four skill experts: the BIG-bench task families (``family`` or ``family:subtask``) each owns,
the system prompt it is trained and served with, and its registry description and skills (the
dev split's ``labels.keywords``, disjoint between skills so that each profile skill has one owner)."""


def skill_of(source_task: str) -> str | None:
    """The skill whose families include this BIG-bench task, or None."""
    family = source_task.split(":", 1)[0]
    for name, spec in SKILLS.items():
        if source_task in spec["families"] or family in spec["families"]:
            return name
    return None


def prompt(item: dict[str, Any]) -> str:
    """The user message: BIG-bench's prefix and input, with the choices listed for multiple choice."""
    text = f"{item.get('task_prefix') or ''}{item['question']}".strip()
    if item.get("format") == "multiple_choice" and item.get("choices"):
        text += "\n" + "\n".join(f"  choice: {c}" for c in item["choices"])
    return text


def messages(item: dict[str, Any], system_prompt: str | None = None) -> list[dict[str, str]]:
    """The chat coe is sent for an item (the skill expert's system prompt unless one is given)."""
    system = system_prompt if system_prompt is not None else SKILLS[item["skill"]]["system_prompt"]
    out = [{"role": "system", "content": system}] if system else []
    return [*out, {"role": "user", "content": prompt(item)}]


def targets(item: dict[str, Any]) -> list[str]:
    answer = item["answer"]
    return [str(a) for a in answer] if isinstance(answer, list) else [str(answer)]


def _norm(text: str) -> str:
    text = " ".join(text.strip().split())
    return text[:-1].rstrip() if text.endswith(".") else text


def chosen(item: dict[str, Any], response: str) -> str | None:
    """The choice a multiple-choice answer names: exactly, or as its first line; else None."""
    lines = response.strip().splitlines()
    candidates = [response, lines[0] if lines else ""]
    for text in candidates:
        for choice in item.get("choices") or []:
            if _norm(text) == _norm(choice):
                return str(choice)
    return None


def correct(item: dict[str, Any], response: str | None) -> bool:
    """Score one answer by the task's own metric."""
    if response is None:
        return False
    if item.get("format") == "multiple_choice":
        return chosen(item, response) in targets(item)
    got = _norm(response.splitlines()[0] if response.strip() else "")
    return any(got == _norm(t) for t in targets(item))


def dedup_key(item: dict[str, Any]) -> str:
    """What makes two items the same question: the rendered text without choices, normalised."""
    text = f"{item.get('task_prefix') or ''}{item['question']}"
    return re.sub(r"\s+", " ", text).strip().lower()
