"""Build the evaluation sets of the skill pack (``bench/data/quality/``); never used for training.

    .venv/bin/python bench/quality_data.py          # rewrites part1.jsonl, part2.jsonl and two_skill.jsonl

- **Part 1** (``part1.jsonl``): every real BIG-bench example of the pack's task families in
  ``../shared/data/bigbench_dev.jsonl`` (choices in their original order), tagged with its skill.
- **Part 2** (``part2.jsonl``): 200 items per skill in each task's exact BIG-bench format, made by
  this generator. It is kept apart from the training generator (``examples/pack/train_data.py``):
  its own code, its own seeds (``EVAL_SEED``), and its own quarter of the word lists (a word is
  an evaluation word when ``sha256(word)`` is 0 mod 4; training uses the other three quarters).
  Facts come from public sources committed in ``examples/pack/sources/``: WordNet 3.0's noun
  exception list and noun index (plurals) and GNU units' SI prefixes (unit conversion).
- **Two-skill set** (``two_skill.jsonl``, for merged experts): 20 items for each of the 6 pairs of
  skills. Each item asks two questions of two different skills at once ("Answer both questions, one
  answer per line.") and is right only when both answers are. Its questions come from the same
  generators with their own seed (``TWO_SKILL_SEED``), and every question that is in part 1, part 2
  or any skill's training file is dropped, so none was trained on.

Deviation from BIG-bench, stated: in BIG-bench's arithmetic JSON the answer is always the last
choice (its scoring is by log-likelihood, so order does not matter there). Here the answer is one of
listed choices that a model reads, so part 2 shuffles them; part 1 keeps the real order.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "pack"))

import tasks  # noqa: E402

SOURCES = ROOT / "examples" / "pack" / "sources"
OUT = ROOT / "bench" / "data" / "quality"
BIGBENCH = ROOT.parent / "shared" / "data" / "bigbench_dev.jsonl"
EVAL_SEED = 20261205
PER_SKILL = 200
TWO_SKILL_SEED = 20261206
PER_PAIR = 20
TWO_SKILL_INSTRUCTION = "Answer both questions, one answer per line."

SI_PREFIXES = [("kilo", "k", 3), ("hecto", "h", 2), ("deca", "da", 1), ("", "", 0), ("deci", "d", -1),
               ("centi", "c", -2), ("milli", "m", -3)]
"""From GNU units' definitions.units (kilo- 1e3, hecto- 1e2, deca- 1e1, deci- 1e-1, centi- 1e-2,
milli- 1e-3); the prefixes BIG-bench's si_conversion examples use."""

SI_UNITS = [("newtons", "N"), ("meters", "m"), ("grams", "g"), ("seconds", "s"), ("joules", "J"),
            ("watts", "W"), ("pascals", "Pa"), ("volts", "V"), ("amps", "A"), ("moles", "mol"),
            ("liters", "L"), ("hertz", "Hz")]


def eval_word(word: str) -> bool:
    """The quarter of every word list reserved for evaluation."""
    return int(hashlib.sha256(word.encode()).hexdigest(), 16) % 4 == 0


def read_list(name: str) -> list[str]:
    return [ln.rstrip("\n") for ln in (SOURCES / name).read_text().splitlines() if ln and not ln.startswith("#")]


def regular_plural(word: str) -> str:
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def number(x: float) -> str:
    """A value the way BIG-bench's unit_conversion prints it: 3 significant digits, Python's repr."""
    return repr(float(f"{x:.3g}"))


def item(i: int, task: str, question: str, answer: Any, *, prefix: str | None = None,
         choices: list[str] | None = None) -> dict[str, Any]:
    skill = tasks.skill_of(task)
    assert skill, task
    return {"id": f"eval/{task}/{i}", "source": "coe eval generator (bench/quality_data.py)", "source_task": task,
            "skill": skill, "format": "multiple_choice" if choices else "generative", "task_prefix": prefix,
            "question": question, "choices": choices, "answer": answer}


def adder(rng: random.Random) -> list[dict[str, Any]]:
    out = []
    for sub, hi, n in (("one_digit", 9, 40), ("two_digit", 99, 80), ("three_digit", 999, 80)):
        seen: set[tuple[int, int]] = set()
        while len(seen) < n:
            seen.add((rng.randint(0, hi), rng.randint(0, hi)))
        out += [item(len(out) + i, f"simple_arithmetic_json_subtasks:{sub}", f"{a} + {b} =", str(a + b))
                for i, (a, b) in enumerate(sorted(seen))]
    return out


def calculator(rng: random.Random) -> list[dict[str, Any]]:
    out = []
    ops = ("addition", "subtraction", "multiplication", "division")
    for digits in (1, 2, 3):
        lo, hi = (0 if digits == 1 else 10 ** (digits - 1)), 10 ** digits - 1
        for op in ops:
            for _ in range(17):
                a, b = rng.randint(lo, hi), rng.randint(max(lo, 1), hi)
                if op == "division":
                    q = rng.randint(0, 9)
                    a, ans, word = b * q, q, "divided by"
                else:
                    ans, word = {"addition": (a + b, "plus"), "subtraction": (a - b, "minus"),
                                 "multiplication": (a * b, "times")}[op]
                size = max(10, 10 ** len(str(abs(ans))))
                pool = {str(rng.randint(0, size)), str(rng.randint(0, size)), str(rng.randint(0, 9))}
                if op != "division":
                    pool.add(str(rng.randint(10000, 99999)))
                pool.discard(str(ans))
                choices = [*sorted(pool), "banana", "house", str(ans)]
                rng.shuffle(choices)
                out.append(item(len(out), f"arithmetic:{digits}_digit_{op}", f"What is {a} {word} {b}?", str(ans),
                                choices=choices))
    return out[:PER_SKILL]


def plurals(rng: random.Random) -> list[dict[str, Any]]:
    irregular = [ln.split("\t") for ln in read_list("wordnet-irregular-plurals.tsv")]
    irregular = [(s, p) for s, p in irregular if eval_word(s)]
    regular = [w for w in read_list("wordnet-nouns.txt") if eval_word(w)]
    rng.shuffle(irregular)
    rng.shuffle(regular)
    out = [item(i, "linguistic_mappings:plural_irregular_json", s, p, prefix="This is a ")
           for i, (s, p) in enumerate(irregular[:PER_SKILL // 2])]
    out += [item(len(out) + i, "linguistic_mappings:plural_regular_json", w, regular_plural(w), prefix="This is a ")
            for i, w in enumerate(regular[:PER_SKILL - len(out)])]
    return out


def _unit(name: str, sym: str, prefix: tuple[str, str, int], long: bool) -> str:
    return f"{prefix[0]}{name}" if long else f"{prefix[1]}{sym}"


def units(rng: random.Random) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while len(out) < PER_SKILL:
        name, sym = rng.choice(SI_UNITS)
        value = round(rng.uniform(1, 99.9), rng.choice((0, 1)))
        src, dst = rng.sample(SI_PREFIXES, 2)
        if len(out) % 4 == 3:  # unit_identification: the same number, pick the right unit
            if not dst[0]:
                continue
            right = number(value * 10 ** (src[2] - dst[2]))
            others = rng.sample([u for u in SI_UNITS if u[0] != name], 2)
            choices = [f"{right} {dst[0]}{n}." for n, _ in others] + [f"{right} {dst[0]}{name}."]
            rng.shuffle(choices)
            out.append(item(len(out), "unit_conversion:unit_identification",
                            f"{value:g} {src[0]}{name} expressed in units of {dst[0]}{name} is ",
                            f"{right} {dst[0]}{name}.", prefix="\n", choices=choices))
            continue
        long = rng.random() < 0.5
        u_src, u_dst = _unit(name, sym, src, long), _unit(name, sym, dst, long)
        right_value = value * 10 ** (src[2] - dst[2])
        other = rng.choice([p for p in SI_PREFIXES if p not in (src, dst)])
        u_other = _unit(name, sym, other, long)
        wrong = {number(right_value * rng.choice((0.2, 0.3, 0.45, 2.2, 3.5, 5.5)) * rng.uniform(0.9, 1.1))
                 for _ in range(2)}
        answer = f"{number(right_value)} {u_dst}."
        choices = [f"{w} {u_dst}." for w in sorted(wrong)] + [f"{number(value)} {u_other}.",
                                                      f"{number(right_value * 10 ** rng.choice((-2, 2)))} {u_other}.",
                                                      answer]
        if len(set(choices)) != len(choices):
            continue
        rng.shuffle(choices)
        template = rng.choice(("{v} {a} expressed in units of {b} is ", "When converted to units of {b}, {v} {a} is "))
        out.append(item(len(out), "unit_conversion:si_conversion", template.format(v=f"{value:g}", a=u_src, b=u_dst),
                        answer, prefix="\n", choices=choices))
    return out


def part1() -> list[dict[str, Any]]:
    rows = []
    for line in BIGBENCH.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        skill = tasks.skill_of(row["source_task"])
        if skill:
            row.pop("labels", None)
            rows.append({**row, "skill": skill})
    return rows


def training_questions() -> set[str]:
    """Every user prompt of every skill's training file, normalised as ``tasks.dedup_key`` does."""
    seen = set()
    for path in sorted((ROOT / "examples" / "pack" / "train").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            user = next(m["content"] for m in json.loads(line)["messages"] if m["role"] == "user")
            seen.add(tasks.dedup_key({"question": user.split("\n  choice:")[0]}))
    return seen


def two_skill(excluded: set[str]) -> list[dict[str, Any]]:
    """Pairs of fresh questions from two different skills; neither half was trained or evaluated on."""
    makers = {"adder": adder, "calculator": calculator, "plurals": plurals, "units": units}
    pools = {}
    for offset, (skill, make) in enumerate(makers.items()):
        rows = make(random.Random(TWO_SKILL_SEED + offset))
        pools[skill] = [r for r in rows if tasks.dedup_key(r) not in excluded]
    rng = random.Random(TWO_SKILL_SEED)
    out = []
    names = list(makers)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            a_pool, b_pool = rng.sample(pools[first], PER_PAIR), rng.sample(pools[second], PER_PAIR)
            for n, (a, b) in enumerate(zip(a_pool, b_pool, strict=True)):
                pair = [a, b] if rng.random() < 0.5 else [b, a]
                out.append({"id": f"two/{first}+{second}/{n}", "source": "coe eval generator (bench/quality_data.py)",
                            "source_task": "two_skill", "skill": f"{first}+{second}", "format": "two_skill",
                            "prompt": f"{TWO_SKILL_INSTRUCTION}\n\n" + "\n\n".join(tasks.prompt(p) for p in pair),
                            "parts": pair})
    return out


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    real = part1()
    generated: list[dict[str, Any]] = []
    for offset, make in enumerate((adder, calculator, plurals, units)):
        generated += make(random.Random(EVAL_SEED + offset))
    real_keys = {tasks.dedup_key(r) for r in real}
    generated = [g for g in generated if tasks.dedup_key(g) not in real_keys]
    ids = [r["id"] for r in real + generated]
    assert len(set(ids)) == len(ids), "item ids must be unique (they are the batches' custom_ids)"
    excluded = real_keys | {tasks.dedup_key(g) for g in generated} | training_questions()
    pairs = two_skill(excluded)
    for name, rows in (("part1.jsonl", real), ("part2.jsonl", generated), ("two_skill.jsonl", pairs)):
        with (OUT / name).open("w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    counts: dict[str, int] = {}
    for g in generated:
        counts[g["skill"]] = counts.get(g["skill"], 0) + 1
    print(f"part1: {len(real)} real BIG-bench items; part2: {counts}; two_skill: {len(pairs)} pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
