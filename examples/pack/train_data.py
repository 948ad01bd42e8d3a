"""Training data for the skill pack: one chat JSONL per skill, in coe's exact request format.

    .venv/bin/python examples/pack/train_data.py [--per-skill 1600]

Kept apart from the evaluation generator (``bench/quality_data.py``): its own code and seeds
(``TRAIN_SEED``), and only the three quarters of each word list that evaluation does not use.
Every example is checked against both evaluation parts (the rendered question, normalised) and
dropped on a match; the overlap it reports after that must be 0, and it fails otherwise.

Each line is ``{"messages": [system, user, assistant]}`` with the skill expert's system prompt
(``tasks.SKILLS``) and the prompt ``tasks.prompt`` renders, so the adapter sees exactly what coe
sends it when it is served.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import tasks  # noqa: E402

ROOT = HERE.parents[1]
EVAL = ROOT / "bench" / "data" / "quality"
OUT = HERE / "train"
TRAIN_SEED = 7

PREFIXES = {"kilo": ("k", 3), "hecto": ("h", 2), "deca": ("da", 1), "": ("", 0), "deci": ("d", -1),
            "centi": ("c", -2), "milli": ("m", -3)}
QUANTITIES = {"newtons": "N", "meters": "m", "grams": "g", "seconds": "s", "joules": "J", "watts": "W",
              "pascals": "Pa", "volts": "V", "amps": "A", "moles": "mol", "liters": "L", "hertz": "Hz"}


def training_word(word: str) -> bool:
    """Not in the evaluation quarter (see bench/quality_data.py)."""
    return int(hashlib.sha256(word.encode()).hexdigest(), 16) % 4 != 0


def _lines(name: str) -> list[str]:
    text = (HERE / "sources" / name).read_text()
    return [ln for ln in text.splitlines() if ln and not ln.startswith("#")]


def _mc(task: str, question: str, answer: str, wrong: list[str], rng: random.Random,
        prefix: str | None = None) -> dict[str, Any]:
    choices = [*wrong, answer]
    rng.shuffle(choices)
    return {"source_task": task, "format": "multiple_choice", "task_prefix": prefix, "question": question,
            "choices": choices, "answer": answer}


def _gen(task: str, question: str, answer: str, prefix: str | None = None) -> dict[str, Any]:
    return {"source_task": task, "format": "generative", "task_prefix": prefix, "question": question,
            "choices": None, "answer": answer}


def make_adder(rng: random.Random) -> dict[str, Any]:
    hi = rng.choice((9, 99, 999, 999))
    a, b = rng.randint(0, hi), rng.randint(0, rng.choice((9, 99, 999)) if hi == 999 else hi)
    if rng.random() < 0.5:
        a, b = b, a
    return _gen("simple_arithmetic_json", f"{a} + {b} =", str(a + b))


def make_calculator(rng: random.Random) -> dict[str, Any]:
    digits = rng.choice((1, 2, 3))
    top = 10 ** digits - 1
    a, b = rng.randint(0, top), rng.randint(1, top)
    op = rng.choice(("plus", "minus", "times", "divided by"))
    if op == "divided by":
        quotient = rng.randint(0, 12)
        a, result = b * quotient, quotient
    else:
        result = a + b if op == "plus" else a - b if op == "minus" else a * b
    scale = 10 ** len(str(abs(result)))
    wrong = {str(rng.randint(0, max(scale, 10))) for _ in range(2)} | {str(rng.randint(0, 9))}
    if op != "divided by":
        wrong.add(str(rng.randint(10000, 99999)))
    wrong.discard(str(result))
    return _mc("arithmetic", f"What is {a} {op} {b}?", str(result), [*sorted(wrong), "banana", "house"], rng)


def _plural(word: str) -> str:
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return f"{word}es"
    if word.endswith("y") and word[-2] not in "aeiou":
        return f"{word[:-1]}ies"
    return f"{word}s"


def make_plurals(rng: random.Random, _cache: dict[str, Any] = {}) -> dict[str, Any]:  # noqa: B006
    if not _cache:
        _cache["irr"] = [tuple(ln.split("\t")) for ln in _lines("wordnet-irregular-plurals.tsv")
                         if training_word(ln.split("\t")[0])]
        _cache["reg"] = [w for w in _lines("wordnet-nouns.txt") if training_word(w)]
    if rng.random() < 0.4:
        singular, plural = rng.choice(_cache["irr"])
        return _gen("linguistic_mappings:plural_irregular_json", singular, plural, "This is a ")
    word = rng.choice(_cache["reg"])
    return _gen("linguistic_mappings:plural_regular_json", word, _plural(word), "This is a ")


def _num(x: float) -> str:
    return repr(float(f"{x:.3g}"))


def make_units(rng: random.Random) -> dict[str, Any]:
    name = rng.choice(sorted(QUANTITIES))
    p_from, p_to = rng.sample(sorted(PREFIXES), 2)
    value = round(rng.uniform(1, 99.9), rng.choice((0, 1)))
    result = value * 10 ** (PREFIXES[p_from][1] - PREFIXES[p_to][1])
    if rng.random() < 0.25 and p_to:
        others = rng.sample([q for q in QUANTITIES if q != name], 2)
        return _mc("unit_conversion:unit_identification",
                   f"{value:g} {p_from}{name} expressed in units of {p_to}{name} is ",
                   f"{_num(result)} {p_to}{name}.", [f"{_num(result)} {p_to}{o}." for o in others], rng, "\n")
    def unit(prefix: str, long: bool) -> str:
        return f"{prefix}{name}" if long else f"{PREFIXES[prefix][0]}{QUANTITIES[name]}"
    long = rng.random() < 0.5
    third = rng.choice([p for p in PREFIXES if p not in (p_from, p_to)])
    wrong = [f"{_num(result * rng.uniform(0.15, 6.0))} {unit(p_to, long)}." for _ in range(2)]
    wrong += [f"{_num(value)} {unit(third, long)}.", f"{_num(result * rng.choice((10, 100, 0.1, 0.01)))} "
              f"{unit(third, long)}."]
    if rng.random() < 0.5:
        question = f"{value:g} {unit(p_from, long)} expressed in units of {unit(p_to, long)} is "
    else:
        question = f"When converted to units of {unit(p_to, long)}, {value:g} {unit(p_from, long)} is "
    return _mc("unit_conversion:si_conversion", question, f"{_num(result)} {unit(p_to, long)}.", wrong, rng, "\n")


MAKERS: dict[str, Callable[[random.Random], dict[str, Any]]] = {
    "adder": make_adder, "calculator": make_calculator, "plurals": make_plurals, "units": make_units}


def eval_keys() -> set[str]:
    keys = set()
    for part in ("part1.jsonl", "part2.jsonl"):
        for line in (EVAL / part).read_text(encoding="utf-8").splitlines():
            keys.add(tasks.dedup_key(json.loads(line)))
    return keys


def dev_split(per_skill: int, held_out: set[str]) -> list[dict[str, Any]]:
    """Questions for `coe profile` (the experts' measured skills) and the router's category
    examples: made by this generator with their own seeds, none in training or evaluation."""
    rows: list[dict[str, Any]] = []
    for offset, (skill, make) in enumerate(MAKERS.items()):
        rng, seen = random.Random(DEV_SEED * 1000 + offset), set()
        while len(seen) < per_skill:
            row = {**make(rng), "skill": skill}
            key = tasks.dedup_key(row)
            if key in held_out or key in seen:
                continue
            seen.add(key)
            rows.append({"id": f"dev/{skill}/{len(seen)}", **row, "prompt": tasks.prompt(row),
                         "labels": {"keywords": SKILLS_OF[skill]}})
    return rows


SKILLS_OF = {name: spec["skills"] for name, spec in tasks.SKILLS.items()}
DEV_SEED = 11


def build(per_skill: int, dev_per_skill: int = 30) -> dict[str, dict[str, int]]:
    """Write train/<skill>.jsonl and dev.jsonl; returns counts (and the overlap, which must be 0)."""
    OUT.mkdir(parents=True, exist_ok=True)
    held_out = eval_keys()
    trained: set[str] = set()
    report = {}
    for offset, (skill, make) in enumerate(MAKERS.items()):
        rng = random.Random(TRAIN_SEED * 1000 + offset)
        rows, seen, dropped = [], set(), 0
        while len(rows) < per_skill:
            row = {**make(rng), "skill": skill}
            key = tasks.dedup_key(row)
            if key in held_out:
                dropped += 1
                continue
            if key in seen and skill != "plurals":  # few words: plurals repeat, numbers need not
                continue
            seen.add(key)
            rows.append(row)
        trained |= {tasks.dedup_key(r) for r in rows}
        overlap = sum(tasks.dedup_key(r) in held_out for r in rows)
        if overlap:
            raise SystemExit(f"{skill}: {overlap} training items overlap the evaluation sets")
        with (OUT / f"{skill}.jsonl").open("w", encoding="utf-8") as f:
            for r in rows:
                chat = [*tasks.messages(r), {"role": "assistant", "content": r["answer"]}]
                f.write(json.dumps({"messages": chat}, ensure_ascii=False) + "\n")
        report[skill] = {"examples": len(rows), "dropped_as_eval": dropped, "overlap": overlap}
    dev = dev_split(dev_per_skill, held_out | trained)  # after training: it never changes the training set
    with (HERE / "dev.jsonl").open("w", encoding="utf-8") as f:
        for r in dev:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    report["dev"] = {"examples": len(dev)}
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-skill", type=int, default=1600)
    args = parser.parse_args()
    print(json.dumps(build(args.per_skill), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
