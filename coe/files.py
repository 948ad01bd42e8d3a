"""Small file-system guarantees shared by the caches and artifacts coe writes."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
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


def publish_folder(folder: Path, build: Callable[[Path], None]) -> None:
    """Write a folder's files with ``build`` into a temporary sibling, then rename it into place under a
    lock: readers see the old folder or the new one, never half of one; a crash leaves the old one."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with locked(folder.parent / f".{folder.name}-lock"):
        work = Path(tempfile.mkdtemp(prefix=f".{folder.name}-build-", dir=folder.parent))
        try:
            build(work)
            old = folder.with_name(f".{folder.name}-old")
            shutil.rmtree(old, ignore_errors=True)
            if folder.exists():
                folder.rename(old)
            work.rename(folder)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
