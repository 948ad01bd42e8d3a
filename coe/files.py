"""Small file-system guarantees shared by the caches and artifacts coe writes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Exclusive lock on ``folder/.lock`` across processes; the OS drops it if we crash."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("a") as handle:
        try:
            import fcntl
        except ImportError:  # not POSIX: temp-dir + rename still keeps the files consistent
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
