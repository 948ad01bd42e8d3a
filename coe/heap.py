"""Handing freed heap memory back to the OS after a big free (glibc's ``malloc_trim``).

Why: when coe lets go of something big (a 64 MiB batch file, the half a GiB of items
parsed from it, a finished batch's records), CPython frees the objects but glibc
keeps much of the freed memory: free chunks below the top of the main heap, and
the heaps of the threads big files are parsed in. RSS then stays high though
nothing is kept. ``malloc_trim(0)`` returns those pages. It takes milliseconds, so
it runs in a thread, only after a big free, and at most once a second.
On other C libraries (musl, macOS) ``trim`` does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import threading
import time
from collections.abc import Callable

MIN_INTERVAL_S = 1.0

_lock = threading.Lock()
_last = float("-inf")


def _find() -> Callable[[int], int] | None:
    try:
        fn = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


_malloc_trim = _find()


def trim() -> bool:
    """``malloc_trim(0)`` unless one ran within ``MIN_INTERVAL_S``; True when it ran."""
    global _last
    if _malloc_trim is None:
        return False
    with _lock:
        now = time.monotonic()
        if now - _last < MIN_INTERVAL_S:
            return False
        _last = now
    _malloc_trim(0)
    return True


async def trim_soon() -> None:
    """``trim`` in a thread (callers: right after freeing something big)."""
    if _malloc_trim is not None:
        await asyncio.to_thread(trim)
