"""Writes ``chat_coding.jsonl``: the coding requests of chatterbot-corpus, as extra router training data.

Why: MMLU asks about computer science in exam style ("Which of the following is true of a
binary heap?"); users ask "can you write a Dockerfile?". Trained on MMLU alone, the router sent
half of HumanEval's code prompts to ``math``. chatterbot-corpus (Gunther Cox, BSD-3-Clause,
https://github.com/gunthercox/chatterbot-corpus) is real public chat data; its ``english/coding.yml``
holds 96 distinct coding requests, each the first turn of a conversation. Every one is labelled
``computer science``; the fine label ``chat coding`` keeps them apart from MMLU's subjects in the
linear head. Nothing is written by hand, and nothing here is evaluated on (``bench/routing.py``
measures code routing on HumanEval, a different source).

    .venv/bin/pip install chatterbot-corpus==1.3.3
    .venv/bin/python examples/mmlu/make_chat_coding.py
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import yaml

OUT = Path(__file__).with_name("chat_coding.jsonl")
SOURCE = "chatterbot-corpus==1.3.3 chatterbot_corpus/data/english/coding.yml (BSD-3-Clause, Gunther Cox)"


def main() -> int:
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        print("error: chatterbot-corpus is not installed: .venv/bin/pip install chatterbot-corpus==1.3.3",
              file=sys.stderr)
        return 2
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "english" / "coding.yml"
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    questions = list(dict.fromkeys(str(c[0]).strip() for c in doc["conversations"] if c and str(c[0]).strip()))
    OUT.write_text("".join(json.dumps({"question": q, "labels": {"subcategory": "computer science",
                                                                  "subject": "chat coding"},
                                       "source": SOURCE}, ensure_ascii=False) + "\n" for q in questions),
                   encoding="utf-8")
    print(f"{len(questions)} questions -> {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
