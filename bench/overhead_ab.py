#!/usr/bin/env python
"""coe's own latency overhead, two arms side by side: a baseline commit against the working tree, or two
settings of the working tree.

    .venv/bin/python bench/overhead_ab.py --baseline c971334              # 3 rounds, default cells
    .venv/bin/python bench/overhead_ab.py --baseline HEAD~3 --rounds 5 -- --requests-c1 300 --requests-cn 1000
    .venv/bin/python bench/overhead_ab.py --candidate-args=--tracing -- --requests-c1 300   # tracing on vs off

What it does
- Checks the baseline out as a detached ``git worktree`` in a temporary folder (removed at the end);
  without ``--baseline`` both arms run the working tree, told apart by ``--baseline-args`` and
  ``--candidate-args`` (e.g. ``--tracing``: tracing on against off).
- Runs ``bench/overhead.py`` (stub upstream: coe's own cost) once per version per round, alternating
  which goes first (AB, BA, AB, ...), so that machine noise falls on both alike. The baseline's
  ``coe serve`` runs from the worktree (``--coe-src``); the candidate's from this checkout. Arguments
  after ``--`` go to every ``overhead.py`` run.
- Per cell (mode x concurrency): the median over rounds of each version's added p50 and p99 (coe's
  percentile minus the direct path's, measured in the same run) and of coe's CPU per request (from
  /proc: less at the mercy of other load than latency), and the ratios candidate / baseline.

Results: ``bench/results/overhead-ab-<UTC timestamp>.json`` (every run's cells too) and a table on stdout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from meta import git_state

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def run_overhead(label: str, src: Path | None, out: Path, extra: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, str(ROOT / "bench" / "overhead.py"), "--out", str(out), *extra]
    if src is not None:
        cmd += ["--coe-src", str(src)]
    print(f"[ab] {label}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def cells(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Added latency per cell and metric: whole latency (non-streaming), TTFT and total (streaming)."""
    out = {}
    for cell in result["cells"]:
        for metric, stats in cell["stats"].items():
            added = stats["added"]
            out[f"{cell['mode']} c={cell['concurrency']} {metric}"] = {
                "p50_ms": added["p50"], "p99_ms": added["p99"],
                "cpu_ms": cell["resources"]["coe_cpu_ms_per_request"]}  # coe's CPU per request in that cell
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", default=None,
                   help="the git commit (or ref) to compare against (default: the working tree, with --baseline-args)")
    p.add_argument("--baseline-args", default="", help="overhead.py arguments for the baseline's runs only")
    p.add_argument("--candidate-args", default="", help="overhead.py arguments for the candidate's runs only")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None, help="results file (default bench/results/overhead-ab-<UTC>.json)")
    p.add_argument("extra", nargs="*", help="after --: arguments for every bench/overhead.py run")
    args = p.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", args.baseline], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip() if args.baseline else None
    extra = {"baseline": [*args.extra, *shlex.split(args.baseline_args)],
             "candidate": [*args.extra, *shlex.split(args.candidate_args)]}
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="coe-ab-") as tmp:
        worktree = Path(tmp) / "baseline" if commit else None
        if worktree is not None:
            subprocess.run(["git", "worktree", "add", "--detach", str(worktree), str(commit)], cwd=ROOT, check=True,
                           capture_output=True)
        try:
            for r in range(args.rounds):
                order = [("baseline", worktree), ("candidate", None)]
                if r % 2:
                    order.reverse()
                for label, src in order:
                    result = run_overhead(f"round {r + 1} {label}", src, Path(tmp) / f"{label}-{r}.json",
                                          extra[label])
                    runs.append({"round": r + 1, "version": label, "cells": cells(result)})
        finally:
            if worktree is not None:
                subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, capture_output=True)
    summary: dict[str, Any] = {}
    for name in runs[0]["cells"]:
        row: dict[str, Any] = {}
        for version in ("baseline", "candidate"):
            for q in ("p50_ms", "p99_ms"):
                row[f"{version}_{q}"] = statistics.median(x["cells"][name][q] for x in runs if x["version"] == version)
            row[f"{version}_cpu_ms"] = statistics.median(x["cells"][name]["cpu_ms"] for x in runs
                                                         if x["version"] == version)
        for q in ("p50_ms", "p99_ms", "cpu_ms"):
            base = row[f"baseline_{q}"]
            row[f"ratio_{q[:3]}"] = row[f"candidate_{q}"] / base if base > 0 else None
        summary[name] = row
    out = Path(args.out) if args.out else RESULTS / f"overhead-ab-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"bench": "overhead-ab", "started_utc": stamp,
                               "baseline": commit or "the working tree", "candidate": git_state(),
                               "rounds": args.rounds, "overhead_args": args.extra,
                               "baseline_args": args.baseline_args, "candidate_args": args.candidate_args,
                               "command": " ".join([sys.executable, *sys.argv]), "summary": summary,
                               "runs": runs}, indent=2))
    base = f"{commit[:10]} {args.baseline_args}".strip() if commit else f"working tree {args.baseline_args}".strip()
    print(f"\nadded latency (ms), median of {args.rounds} rounds; baseline {base} vs the working tree "
          f"{args.candidate_args}".rstrip())
    print(f"{'cell':<26} {'base p50':>9} {'cand p50':>9} {'ratio':>6} {'base p99':>9} {'cand p99':>9} {'ratio':>6}"
          f" {'base CPU':>9} {'cand CPU':>9} {'ratio':>6}")
    for name, row in summary.items():
        def ratio(x: float | None) -> str:
            return "-" if x is None else f"{x:.2f}"
        print(f"{name:<26} {row['baseline_p50_ms']:>9.3f} {row['candidate_p50_ms']:>9.3f} {ratio(row['ratio_p50']):>6}"
              f" {row['baseline_p99_ms']:>9.3f} {row['candidate_p99_ms']:>9.3f} {ratio(row['ratio_p99']):>6}"
              f" {row['baseline_cpu_ms']:>9.3f} {row['candidate_cpu_ms']:>9.3f} {ratio(row['ratio_cpu']):>6}")
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
