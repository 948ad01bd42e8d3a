"""What every results file records about the run (package versions, the git state it measured), and
a percentile helper the benches share.

Imported by the bench scripts (``bench/`` is on ``sys.path`` when one runs as a script).
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import platform
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def versions(*packages: str) -> dict[str, str]:
    """Python's version and each installed package's (missing ones are left out)."""
    out = {"python": platform.python_version()}
    for pkg in packages:
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def git_state() -> dict[str, Any]:
    """The commit measured, and how many files differed from it (a dirty tree is not that commit)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "HEAD"), "dirty_files": len(git("status", "--porcelain").splitlines())}


def pct(sorted_xs: list[float], q: float) -> float:
    """Percentile ``q`` (0..100) of sorted values, by linear interpolation between closest ranks (numpy's
    default)."""
    if not sorted_xs:
        return float("nan")
    pos = (len(sorted_xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)
