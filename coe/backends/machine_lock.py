"""One on-demand model up per machine, across coe processes.

On-demand backends (``launch.on_demand``) exist because their models cannot
all be resident at once. One process keeps one up at a time; this lock extends
that to every coe process on the machine (an API server's embedded worker and
``coe worker`` processes), so two of them never load models side by side.

It is an exclusive ``flock`` on a file, held from bringing a model up until
putting it down. The kernel drops it when the process dies, even by SIGKILL, so
a crashed holder never blocks the others. Waiting polls without blocking the
event loop. The path is ``COE_ON_DEMAND_LOCK``, default
``<tempdir>/coe-on-demand.lock``: every process that shares the accelerator
must see the same file.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import tempfile
from pathlib import Path

from coe.errors import BackendUnavailable

log = logging.getLogger("coe.backends")

POLL_S = 0.25


def default_path() -> Path:
    return Path(os.environ.get("COE_ON_DEMAND_LOCK") or Path(tempfile.gettempdir()) / "coe-on-demand.lock")


class MachineLock:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path or default_path()
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    async def acquire(self, why: str) -> None:
        """Hold the lock (a no-op when this object holds it); waits while another process holds it."""
        if self._fd is not None:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise BackendUnavailable(f"{why}: cannot open the on-demand lock {self.path} ({exc.strerror}); "
                                     "set COE_ON_DEMAND_LOCK to a file every coe process here can write") from exc
        told = False
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not told:
                        log.info("%s: waiting for another coe process to put its on-demand model down (lock %s)",
                                 why, self.path)
                        told = True
                    await asyncio.sleep(POLL_S)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
