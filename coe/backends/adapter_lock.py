"""The lock around loading and unloading one adapter on one vLLM server, across processes and machines.

Several coe replicas (and ``coe worker``s) may share one vLLM server. Two of them loading, or one loading
while another unloads, the same adapter would race: vLLM answers the second load with an error, or an
unload lands just after a load and the next request 404s. So the lock is two locks, taken in order:

- a per-process ``asyncio.Lock``: tasks of one process queue here, and never poll the store;
- a lease in the state store (``StateStore.acquire_lease``, Redis ``SET NX PX``) named after the server's
  URL and the adapter, so every process that talks to that server shares it whatever it calls the backend.

The lease has a time-to-live (``ttl_s``, longer than any adapter load), so a process SIGKILLed while
holding it blocks the others for at most that long. Each acquisition gets a fencing token; vLLM cannot
check tokens, so the token is logged, and a release that finds the lease gone (it expired: the work may
have overlapped another holder's) is logged as a warning. A store without leases (a wrapper) or one that
does not answer falls back to the per-process lock alone: an adapter race costs a retry, while refusing to
load would fail requests.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from types import TracebackType
from typing import Protocol

from coe.errors import BackendUnavailable, StoreError

log = logging.getLogger("coe.backends")

LEASE_TTL_S = 120.0
"""An adapter load on a busy CPU server takes seconds; a lease outliving a crashed holder by two minutes
at most is the price of never having two loads overlap."""

POLL_S = 0.05
"""How often a waiter asks the store again (loads are rare; a waiter is a request that needs the adapter)."""


class Leases(Protocol):
    """What the lock needs of a ``coe.store.StateStore`` (the backends layer does not import the store)."""

    async def acquire_lease(self, name: str, owner: str, ttl_s: float) -> int | None: ...

    async def release_lease(self, name: str, owner: str) -> bool: ...


class AdapterLock:
    """``async with lock:`` holds ``adapter`` on the server at ``server`` against every process sharing
    ``leases``; re-usable, not re-entrant."""

    def __init__(self, server: str, adapter: str, leases: Leases | None, *, ttl_s: float = LEASE_TTL_S,
                 wait_s: float = LEASE_TTL_S + 30) -> None:
        self.name = f"adapter:{server}:{adapter}"
        self.leases = leases
        self.ttl_s = ttl_s
        self.wait_s = wait_s
        self.local = asyncio.Lock()
        self.token: int | None = None
        self._owner: str | None = None

    def locked(self) -> bool:
        return self.local.locked()

    async def __aenter__(self) -> AdapterLock:
        await self.local.acquire()
        try:
            await self._acquire_lease()
        except BaseException:
            self.local.release()
            raise
        return self

    async def _acquire_lease(self) -> None:
        if self.leases is None:
            return
        owner = uuid.uuid4().hex
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                token = await self.leases.acquire_lease(self.name, owner, self.ttl_s)
            except (NotImplementedError, StoreError) as exc:
                log.warning("%s: no shared lease (%s); holding the per-process lock only", self.name, exc)
                return
            if token is not None:
                self.token, self._owner = token, owner
                log.debug("%s: lease taken, fencing token %d", self.name, token)
                return
            if time.monotonic() > deadline:
                raise BackendUnavailable(f"{self.name} is held by another coe process for more than "
                                         f"{self.wait_s:.0f}s", retry_after=5)
            await asyncio.sleep(POLL_S)

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        owner, self._owner = self._owner, None
        try:
            if owner is not None and self.leases is not None:
                try:
                    if not await self.leases.release_lease(self.name, owner):
                        log.warning("%s: the lease (token %s) had expired before the work ended; it may "
                                    "have overlapped another process's", self.name, self.token)
                except StoreError as exc:
                    log.warning("%s: could not release the lease (it expires by itself): %s", self.name, exc)
        finally:
            self.local.release()
