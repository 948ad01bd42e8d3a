"""Which LoRA adapters one vLLM server holds: coe's own bookkeeping, checked against ``/v1/models``.

Why: a server keeps only ``--max-cpu-loras`` adapters loaded. coe loads an
adapter on demand (``/v1/load_lora_adapter``) the first time a call needs it
and, when the server is full, first unloads the least recently used adapter
that nothing is using and that coe can load again (its expert names a path),
so what the server holds is what coe believes it holds.

The bookkeeping is trusted on a hit and re-read from ``/v1/models`` on every
miss; a call that still finds its adapter gone (a restarted server) gets a 404,
and the dispatcher reloads it through ``reload``. Loads and unloads of one
adapter hold that adapter's lock, so they never interleave.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from coe.backends.pool import BackendRuntime
from coe.config import ExpertConfig
from coe.metrics import Metrics

log = logging.getLogger("coe.dispatch")


class Residency:
    def __init__(self, backend: BackendRuntime, *, capacity: int | None, evict: bool, metrics: Metrics,
                 busy: Callable[[str], bool] = lambda name: False) -> None:
        self.backend = backend
        self.capacity = capacity
        self.evict = evict
        self.metrics = metrics
        self.busy = busy
        self._loaded: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self._paths: dict[str, Path] = {}
        self._lock = asyncio.Lock()

    def is_loaded(self, name: str) -> bool:
        return name in self._loaded

    def is_hot(self, name: str) -> bool:
        """Among the ``capacity`` most recently used: what the server's own LRU cache most likely holds
        in memory (a server may list more adapters than it keeps loaded)."""
        if self.capacity is None or len(self._loaded) <= self.capacity:
            return name in self._loaded
        return name in list(self._loaded)[-self.capacity:]

    def loaded(self) -> list[str]:
        return list(self._loaded)

    def touch(self, name: str) -> None:
        if name in self._loaded:
            self._loaded.move_to_end(name)

    async def sync(self) -> None:
        """Re-read which adapters the server serves; recency is kept for the ones still there."""
        served = [str(m["id"]) for m in await self.backend.api.list_models() if m.get("parent")]
        kept = [n for n in self._loaded if n in served]
        self._loaded = OrderedDict.fromkeys([*(n for n in served if n not in kept), *kept])

    async def ensure(self, expert: ExpertConfig) -> None:
        """Make sure the expert's adapter is on the server, loading (and evicting) if not."""
        adapter = expert.adapter
        if adapter is None:
            return
        if adapter.path is not None:
            self._paths[adapter.name] = adapter.path
        if adapter.name in self._loaded:
            self._loaded.move_to_end(adapter.name)
            return
        if adapter.path is None:
            return  # served statically (lora_modules); nothing coe could load
        async with self._lock:  # one miss at a time per server: a miss may evict, and loads are rare
            if adapter.name not in self._loaded:
                await self.sync()
            if adapter.name not in self._loaded:
                await self._make_room(adapter.name)
                async with self.backend.adapter_lock(adapter.name):
                    await self.backend.api.load_adapter(adapter.name, adapter.path)
                self.metrics.adapter_loads.labels(self.backend.name).inc()
                log.info("loaded adapter %s on backend %s", adapter.name, self.backend.name)
            self._loaded[adapter.name] = None
            self._loaded.move_to_end(adapter.name)

    async def reload(self, expert: ExpertConfig) -> None:
        """The server answered 404 for the adapter: forget it and load it again."""
        if expert.adapter is not None:
            self._loaded.pop(expert.adapter.name, None)
        await self.ensure(expert)

    async def _make_room(self, incoming: str) -> None:
        if not self.evict or self.capacity is None:
            return
        while len(self._loaded) >= self.capacity:
            victim = next((n for n in self._loaded if n != incoming and n in self._paths
                           and n != self.backend.base_adapter and not self.busy(n)), None)
            if victim is None:
                return  # everything held is in use or cannot be reloaded: the server's own LRU decides
            async with self.backend.adapter_lock(victim):
                if self.busy(victim) or victim not in self._loaded:
                    continue
                await self.backend.api.unload_adapter(victim)
                self._loaded.pop(victim, None)
                self.metrics.adapter_evictions.labels(self.backend.name).inc()
                log.info("unloaded adapter %s from backend %s (least recently used)", victim, self.backend.name)
