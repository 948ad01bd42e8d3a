"""Writes ``code_snippets.jsonl``: real Python functions from CPython's standard library, as extra router
training data labelled ``computer science``.

Why: users paste code and ask about it; MMLU's computer-science questions are prose. Trained on MMLU and
chat requests, the word model (the TF-IDF member) had never seen ``def``, ``return`` or ``self``: it read a
pasted function by its docstring's words ("numbers", "sum", "list") and sent it to ``math``, sure and
wrong, and the lexical gate could not be trusted on code. These functions teach every member that code
is ``computer science``, also where its subject is arithmetic (``statistics``, ``fractions``).

What is taken, by a fixed rule that never looks at any evaluation set: from each module of ``MODULES``
(general-purpose, pure Python, a spread of subjects), every function or method with a docstring whose
source is ``MIN_LINES`` to ``MAX_LINES`` lines, dedented, in file order; then at most ``PER_MODULE`` of
them, drawn with a fixed seed. The code is CPython's, under the PSF License Agreement (PSF-2.0); each
line names its file and function. The output depends on the Python version (3.11.7 wrote the committed
file), so rerun this only to change the rule, and say so in the commit.

    .venv/bin/python examples/mmlu/make_code_snippets.py
"""

from __future__ import annotations

import ast
import json
import random
import sys
import sysconfig
import textwrap
from pathlib import Path

OUT = Path(__file__).with_name("code_snippets.jsonl")
MODULES = ("base64", "bisect", "calendar", "colorsys", "csv", "difflib", "email/utils", "fnmatch", "fractions",
           "glob", "graphlib", "heapq", "ipaddress", "json/decoder", "json/encoder", "posixpath", "queue",
           "random", "shlex", "statistics", "string", "textwrap", "urllib/parse", "uuid")
MIN_LINES, MAX_LINES, PER_MODULE, SEED = 5, 30, 9, 0


def functions(path: Path) -> list[tuple[str, str]]:
    """(qualified name, dedented source) of every function or method with a docstring, in file order."""
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    out: list[tuple[str, str]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) and ast.get_docstring(child):
                text = ast.get_source_segment(source, child, padded=True)
                if text and MIN_LINES <= len(text.splitlines()) <= MAX_LINES:
                    out.append((prefix + child.name, textwrap.dedent(text).strip("\n")))

    visit(tree, "")
    return out


def main(out: Path = OUT) -> int:
    """Write the file (``out``: elsewhere, for the test that the committed one is what this rule gives)."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    version = ".".join(map(str, sys.version_info[:3]))
    rng = random.Random(SEED)
    lines = []
    for module in MODULES:
        path = lib / f"{module}.py"
        if not path.exists():
            print(f"error: {path} is missing from this Python's standard library", file=sys.stderr)
            return 2
        found = functions(path)
        chosen = sorted(rng.sample(range(len(found)), min(PER_MODULE, len(found))))
        for i in chosen:
            name, code = found[i]
            lines.append({"question": code, "labels": {"subcategory": "computer science", "subject": "pasted code"},
                          "source": f"CPython {version} Lib/{module}.py {name} (PSF-2.0)"})
    out.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")
    print(f"{len(lines)} functions from {len(MODULES)} modules -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
