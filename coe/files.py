"""Small file-system guarantees shared by the caches and artifacts coe writes."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


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


KEEP_VERSIONS = 3
"""Published versions kept on disk: the current one and the two before it, so that a reader that resolved
an older version a moment ago can still read its files."""


def publish_folder(folder: Path, build: Callable[[Path], None]) -> None:
    """Write a folder's files with ``build`` into a new version beside it, then swap ``folder`` (a symlink
    to the current version) to it with one atomic ``os.replace``, under a lock. ``folder`` never stops
    existing: a reader sees the old version or the new one, never none or half of one, and a crash leaves
    the old one. Readers should resolve it once (``published``) and read every file from there.
    A ``folder`` that is still a plain folder (written before versions) becomes a version first: that
    one-time move is the only moment it is missing."""
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    with locked(parent / f".{folder.name}-lock"):
        work = Path(tempfile.mkdtemp(prefix=f".{folder.name}-build-", dir=parent))
        try:
            build(work)
            version = parent / f".{folder.name}-v{time.time_ns()}"
            work.rename(version)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if folder.is_dir() and not folder.is_symlink():
            folder.rename(parent / f".{folder.name}-v0")
        link = parent / f".{folder.name}-link-{uuid.uuid4().hex}"
        os.symlink(version.name, link)
        os.replace(link, folder)
        versions = sorted((p for p in parent.glob(f".{folder.name}-v*") if p.is_dir()),
                          key=lambda p: int(p.name.rsplit("-v", 1)[1]) if p.name.rsplit("-v", 1)[1].isdigit() else -1)
        for old in versions[:-KEEP_VERSIONS]:
            if old != version:
                shutil.rmtree(old, ignore_errors=True)


def published(folder: Path) -> Path:
    """The version ``folder`` points at now (``folder`` itself when it is a plain folder): resolve once,
    then read every file of one load from the result, so a swap in between cannot mix two versions."""
    return folder.resolve() if folder.is_symlink() else folder


def read_published(folder: Path, read: Callable[[Path], T], *, wait_s: float = 2.0) -> T | None:
    """``read(version)`` on the version ``folder`` points at, or None when nothing was ever published there.

    Why a retry: a reader resolves a version and then opens its files; meanwhile a publish may prune that
    version (more than ``KEEP_VERSIONS`` publishes in between), or take over a plain folder from before
    versions (the one moment ``folder`` is missing). Either way ``read`` raises FileNotFoundError, and the
    fresh version is one resolve away. Readers stay lock-free; ``folder`` missing with no version beside it
    means never published, and a file missing from the version that is still current is a damaged folder
    (raised at once)."""
    deadline = time.monotonic() + wait_s
    delay = 0.001
    while True:
        source = published(folder)
        try:
            return read(source)
        except FileNotFoundError:
            if not folder.exists() and not any(folder.parent.glob(f".{folder.name}-v*")):
                return None
            moved = not folder.exists() or published(folder) != source
            if not moved or time.monotonic() >= deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
