"""The live backends: one pooled HTTP client per configured server, plus the
managed vLLM processes coe launched, reconciled with the registry on each reload.

Reconciling (not rebuilding) matters: a registry edit that touches one expert
must not restart a vLLM process that takes a minute to come back.

On-demand backends (``launch.on_demand``) are built but not started: batch work
brings one up for its group of calls (``using``, which also keeps any other
user from swapping it out meanwhile) and it stays up until another one is
needed: at most one is up at a time, for models that cannot all be resident at
once. While one is down, calls to it fail fast as for any stopped backend (503).
One up at a time holds across the coe processes of a machine too
(``coe.backends.machine_lock``).

``attached``: ``launch`` backends that another process owns (``coe serve --workers N``: the supervisor
starts each vLLM once and its worker processes use it by URL). They are built as remote servers; the
owner starts, watches and stops them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from coe.backends.adapter_lock import AdapterLock, Leases
from coe.backends.base import ExpertBackend
from coe.backends.launch import ManagedVLLM
from coe.backends.machine_lock import MachineLock
from coe.backends.vllm_http import VLLMBackend, make_client, server_root
from coe.config import BackendConfig
from coe.errors import BackendUnavailable, ConfigError

log = logging.getLogger("coe.backends")

TransportFactory = Callable[[str], httpx.AsyncBaseTransport | None]
"""Given a backend name, the transport its client should use (None: real network)."""


@dataclass(frozen=True)
class Attached:
    """A ``launch`` backend another process runs: where it listens, and its zero-weight base adapter."""

    url: str
    base_adapter: str | None = None


@dataclass
class BackendRuntime:
    name: str
    config: BackendConfig
    api: ExpertBackend
    managed: ManagedVLLM | None
    base_url: str
    healthy: bool | None = None
    base_adapter: str | None = None
    adapter_locks: dict[str, AdapterLock] = field(default_factory=dict)
    leases: Leases | None = None

    def adapter_lock(self, adapter: str) -> AdapterLock:
        """One lock per adapter name: loads and unloads of one adapter never interleave, in this process
        and (through ``leases``, the state store) in every process that uses the same server."""
        lock = self.adapter_locks.get(adapter)
        if lock is None:
            lock = self.adapter_locks[adapter] = AdapterLock(self.base_url, adapter, self.leases)
        return lock

    @property
    def state(self) -> str:
        if self.managed is not None:
            return self.managed.state
        return {True: "healthy", False: "unhealthy", None: "unknown"}[self.healthy]

    @property
    def is_healthy(self) -> bool:
        return self.state == "healthy"

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"state": self.state, "url": self.base_url, "managed": self.managed is not None}
        if self.managed is not None:
            info["restarts"] = self.managed.restarts
            info["pid"] = self.managed.pid
        return info


class BackendPool:
    def __init__(self, *, transport_factory: TransportFactory | None = None, python: str = sys.executable,
                 health_interval_s: float = 2.0, on_demand_lock: Path | None = None,
                 leases: Leases | None = None, attached: Mapping[str, Attached] | None = None) -> None:
        """``leases``: the state store, for adapter locks shared with other coe processes; ``attached``: the
        ``launch`` backends another process owns (the module says when)."""
        self._transport_factory = transport_factory
        self._attached = dict(attached or {})
        self._leases = leases
        self._python = python
        self._health_interval_s = health_interval_s
        self._backends: dict[str, BackendRuntime] = {}
        self._health_task: asyncio.Task[None] | None = None
        self._residency = asyncio.Lock()
        self._in_use = asyncio.Lock()
        self._resident: str | None = None
        self._machine = MachineLock(on_demand_lock)

    def get(self, name: str) -> BackendRuntime:
        backend = self._backends.get(name)
        if backend is None:
            raise BackendUnavailable(f"backend {name!r} is not configured", retry_after=30)
        return backend

    def all(self) -> dict[str, BackendRuntime]:
        return dict(self._backends)

    def _api_key(self, name: str, cfg: BackendConfig) -> str | None:
        if cfg.api_key_env is None:
            return None
        key = os.environ.get(cfg.api_key_env)
        if not key:
            raise ConfigError([f"backends.{name}.api_key_env: environment variable {cfg.api_key_env} is not set"])
        return key

    def _build(self, name: str, cfg: BackendConfig, managed: ManagedVLLM | None) -> BackendRuntime:
        base_adapter = cfg.base_adapter
        attached = self._attached.get(name) if cfg.launch is not None and not cfg.launch.on_demand else None
        if attached is not None:
            root = server_root(attached.url)
            base_adapter = base_adapter or attached.base_adapter
        elif cfg.launch is not None:
            if managed is None:
                managed = ManagedVLLM(name, cfg.launch, python=self._python)
            root = managed.base_url
        else:
            assert cfg.url is not None
            root = server_root(cfg.url)
        transport = self._transport_factory(name) if self._transport_factory else None
        client = make_client(root, cfg.timeouts, self._api_key(name, cfg), cfg.max_concurrency, transport)
        return BackendRuntime(name=name, config=cfg, api=VLLMBackend(name, client), managed=managed,
                              base_url=root,
                              base_adapter=base_adapter, leases=self._leases)

    def set_health_interval(self, seconds: float) -> None:
        self._health_interval_s = seconds

    async def reconcile(self, configs: dict[str, BackendConfig]) -> None:
        """Make the live backends match ``configs``: start new ones, stop removed ones,
        rebuild changed ones (restarting a managed process only if its ``launch`` changed)."""
        for name in configs:  # validate every key up front so a bad reload changes nothing
            self._api_key(name, configs[name])
        for name in list(self._backends):
            if name not in configs:
                log.info("backend %s removed", name)
                await self._close(self._backends.pop(name))
        for name, cfg in configs.items():
            old = self._backends.get(name)
            if old is not None and old.config == cfg:
                continue
            keep = old.managed if old is not None and old.config.launch == cfg.launch else None
            if old is not None:
                await old.api.aclose()
                if keep is None and old.managed is not None:
                    await old.managed.stop()
            runtime = self._build(name, cfg, keep)
            if runtime.managed is not None and keep is None and not self.is_on_demand(name, cfg):
                log.info("starting managed vLLM backend %s on %s (log: %s)", name, runtime.base_url,
                         runtime.managed.log_file)
                await runtime.managed.start()
            if runtime.managed is not None:
                runtime.base_adapter = cfg.base_adapter or runtime.managed.base_adapter
            self._backends[name] = runtime
        if self._health_task is None:
            self._health_task = asyncio.create_task(self._health_loop(), name="coe-backend-health")

    def is_on_demand(self, name: str, cfg: BackendConfig | None = None) -> bool:
        """Whether the backend is started only for batch work (``launch.on_demand``)."""
        if cfg is None:
            backend = self._backends.get(name)
            cfg = backend.config if backend is not None else None
        return cfg is not None and cfg.launch is not None and cfg.launch.on_demand

    @property
    def resident(self) -> str | None:
        """The on-demand backend that is up now (or starting), if any."""
        return self._resident

    async def bring_up(self, name: str) -> bool:
        """Start an on-demand backend and wait until it is healthy, putting down the one resident before.

        Returns True when this call started its process (a model load), False when it was already up.
        ``BackendUnavailable`` when it does not come up (the process is stopped again).
        """
        async with self._residency:
            backend = self.get(name)
            if backend.managed is None or not self.is_on_demand(name):
                raise BackendUnavailable(f"backend {name!r} is not an on-demand launch backend")
            if self._resident is not None and self._resident != name:
                await self._put_down(self._resident)
            loaded = backend.managed.state in ("stopped", "failed")
            if loaded:
                await self._machine.acquire(f"on-demand backend {name}")
                log.info("bringing up on-demand backend %s (log: %s)", name, backend.managed.log_file)
            self._resident = name  # from here on, _put_down stops it and releases the machine lock
            try:
                if loaded:
                    await backend.managed.stop()  # a failed one: reset, then start afresh
                    await backend.managed.start()
                await backend.managed.wait_healthy()
            except BaseException:
                await self._put_down(name)
                raise
            if backend.config.launch is not None and not backend.base_adapter:
                backend.base_adapter = backend.config.base_adapter or backend.managed.base_adapter
            return loaded

    @contextlib.asynccontextmanager
    async def using(self, name: str) -> AsyncIterator[bool]:
        """An on-demand backend brought up (``bring_up``; yields whether that was a load) and kept up
        until the block ends: other users of the pool wait for their own model meanwhile."""
        async with self._in_use:
            yield await self.bring_up(name)

    async def put_down(self, name: str | None = None) -> None:
        """Stop an on-demand backend (default: whichever is resident) once no one is using it."""
        async with self._in_use, self._residency:
            target = name or self._resident
            if target is not None:
                await self._put_down(target)

    async def _put_down(self, name: str) -> None:
        backend = self._backends.get(name)
        if backend is not None and backend.managed is not None:
            log.info("putting down on-demand backend %s", name)
            await backend.managed.stop()
        if self._resident == name:
            self._resident = None
            self._machine.release()

    async def check_health(self) -> None:
        """Poll every remote backend once (managed ones are watched by their own monitor)."""
        async def one(b: BackendRuntime) -> None:
            ok = await b.api.health()
            if ok != b.healthy:
                log.log(logging.INFO if ok else logging.WARNING, "backend %s is %s", b.name,
                        "healthy" if ok else "unhealthy")
            b.healthy = ok
        await asyncio.gather(*(one(b) for b in self._backends.values() if b.managed is None))

    async def _health_loop(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self.check_health()
            await asyncio.sleep(self._health_interval_s)

    async def _close(self, backend: BackendRuntime) -> None:
        await backend.api.aclose()
        if backend.managed is not None:
            await backend.managed.stop()

    async def aclose(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
            self._health_task = None
        backends, self._backends = list(self._backends.values()), {}
        await asyncio.gather(*(self._close(b) for b in backends))
        self._resident = None
        self._machine.release()
