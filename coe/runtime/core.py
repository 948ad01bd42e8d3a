"""``Runtime``: everything one coe process needs, opened from one registry file, without HTTP.

The API server, ``coe worker``, ``coe batch run``, ``coe profile``, ``coe route``
(annotator mode) and the benchmarks each open one Runtime; none of them builds a
web app to reach these parts. Its parts are constructor arguments where a caller
may want its own (Starlette-style): the state store, the backend transports
(fault injection), which backends to run, whether batch jobs and a batch worker
run here.

Opening loads the registry file once, opens the state store, builds the backend
pool, the dispatcher and the pipeline, starts the registry's file watch, the batch
jobs and (when asked) the batch worker. Closing drains requests in flight, then
stops everything in reverse order. Open it with ``async with Runtime(...) as rt``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from coe.backends.pool import Attached, BackendPool, TransportFactory
from coe.batch.jobs import BatchJobs
from coe.batch.queue import open_queue
from coe.batch.stages import WaveRunner
from coe.batch.worker import BatchWorker
from coe.config import BackendConfig, RegistryConfig
from coe.dispatch import Dispatcher
from coe.errors import BackendUnavailable
from coe.keys.batches import metered
from coe.loader import load_registry
from coe.metrics import Metrics
from coe.pipeline import Pipeline
from coe.registry import Registry, RegistryManager
from coe.runtime.chat import ChatPaths
from coe.runtime.explorer import Explorer, load_snapshot
from coe.store import open_store
from coe.store.base import StateStore
from coe.telemetry import OFF, Telemetry
from coe.telemetry.setup import open_telemetry
from routers import make_router
from routers.base import Completer, Router
from routers.baseline import DefaultRouter
from routers.level1 import Sessions

log = logging.getLogger("coe.runtime")


class Runtime:
    """The composition root. ``backends``: run only these (None: every backend of the registry);
    ``batches``: open the batch jobs (the Files and Batches API needs them); ``batch_worker``: run a
    batch worker in this process (None: as ``store.embedded_worker`` says, and always when the queue
    is in memory, since no other process could take its work); ``watch``: follow edits of the file;
    ``routing``: build the registry's router (a two-level router loads, or first fits, its classifier),
    off for a process that only calls experts by name (``coe profile``, a batch without ``model: coe``);
    ``log_tag``: a managed vLLM's default log file becomes ``<backend>.<tag>.log``, so that ``coe batch run``
    or a worker on the machine of a ``coe serve`` does not write into the server's vLLM log; ``telemetry``:
    where spans go (None: as the registry's ``telemetry:`` section and ``OTEL_*`` say; closed with the
    runtime only then); ``explorer``: record routed decisions and publish this process's load for the
    routing explorer (``/ui``; a server does, a CLI command or worker does not); ``attached_backends``:
    ``launch`` backends another process runs (``coe serve --workers N``), used by URL."""

    def __init__(self, config_path: str | Path, *, config: RegistryConfig | None = None,
                 store: StateStore | None = None, transport_factory: TransportFactory | None = None,
                 backends: Collection[str] | None = None, batches: bool = True, batch_worker: bool | None = None,
                 watch: bool = True, routing: bool = True, log_tag: str | None = None,
                 poll_interval_s: float = 1.0,
                 drain_timeout_s: float = 30.0,
                 on_reload: Callable[[Registry], None] | None = None,
                 telemetry: Telemetry | None = None, explorer: bool = False,
                 attached_backends: Mapping[str, Attached] | None = None) -> None:
        self.config_path = Path(config_path).resolve()
        self._config = config
        self._store = store
        self._transport_factory = transport_factory
        self._attached = attached_backends
        self._backends = None if backends is None else frozenset(backends)
        self._batches = batches
        self._batch_worker = batch_worker
        self._watch = watch
        self._routing = routing
        self._log_tag = log_tag
        self.poll_interval_s = poll_interval_s
        self.drain_timeout_s = drain_timeout_s
        self._on_reload = on_reload
        self._telemetry = telemetry
        self._explorer = explorer
        self.explorer: Explorer | None = None
        """The routing explorer's recorder and reader (``explorer``: a server that serves ``/ui``)."""
        self.telemetry: Telemetry = OFF
        """Where this process's spans go: ``telemetry`` when given, else built from the registry's
        ``telemetry:`` section and ``OTEL_*`` at open (read once: a reload does not change it)."""
        self.metrics = Metrics()
        self.in_flight = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: list[asyncio.Task[None]] = []
        self._worker_stop = asyncio.Event()
        self._opened = False
        # Set by open(); typed here so that a caller sees them without Optional checks.
        self.store: StateStore
        self.pool: BackendPool
        self.dispatcher: Dispatcher
        self.registry: RegistryManager
        self.pipeline: Pipeline
        self.chat: ChatPaths
        self.jobs: BatchJobs | None = None
        self.worker: BatchWorker | None = None
        """This process's batch worker, when it runs one (``batch_worker``)."""
        self.worker_restarts = 0

    # -- opening and closing ---------------------------------------------------------------

    async def open(self) -> Runtime:
        initial = self._config or load_registry(self.config_path)
        self.telemetry = self._telemetry or open_telemetry(initial.telemetry)
        self.store = self._store or open_store(initial.store)
        self.pool = BackendPool(transport_factory=self._transport_factory,
                                health_interval_s=initial.dispatch.health_interval_s, leases=self.store,
                                attached=self._attached)
        self.dispatcher = Dispatcher(self.pool, initial.dispatch, self.metrics, self.telemetry)
        self.registry = RegistryManager(self.config_path, self.store, self.dispatcher, self.metrics,
                                        router_factory=self._make_router if self._routing else DefaultRouter,
                                        poll_interval_s=self.poll_interval_s,
                                        on_reload=self._on_reload, backends=self._configure)
        self.pipeline = Pipeline(self.dispatcher, self.telemetry)
        if self._explorer:
            self.explorer = Explorer(self.store, initial.explorer, self._load)
        self.chat = ChatPaths(self.registry, self.dispatcher, self.pipeline, self.metrics, self.telemetry,
                              self.explorer)
        self._opened = True
        try:
            registry = await self.registry.start(initial, watch=self._watch)
            if not self.store.durable and self._batches:  # a server: API registrations would be lost
                log.warning("state store is in memory: experts registered through the API do not survive a "
                            "restart (set store.redis_url or COE_REDIS_URL for durable state)")
            self._tasks.append(asyncio.create_task(self._load_overlay_when_ready(), name="coe-overlay"))
            if self._batches:
                self._open_batches(initial)
            if self.explorer is not None:
                self.explorer.start()
            log.info("coe runtime open: %d experts, %d backends", len(registry.experts),
                     len(self.backend_configs(registry.config)))
        except BaseException:
            await self.aclose()
            raise
        return self

    def _open_batches(self, initial: RegistryConfig) -> None:
        cfg = initial.store
        queue = open_queue(cfg, durable_store=self.store.durable)
        self.jobs = BatchJobs(self.store, queue, max_file_bytes=cfg.max_file_bytes, cancel_grace_s=cfg.claim_idle_s)
        if not queue.durable:
            log.warning("batch jobs are in memory: accepted batches do not survive a restart "
                        "(set store.redis_url or COE_REDIS_URL for durable batches)")
        run_worker = cfg.embedded_worker if self._batch_worker is None else self._batch_worker
        if run_worker or not queue.durable:
            self._tasks.append(asyncio.create_task(self._run_batch_worker(initial), name="coe-batch-worker"))

    async def aclose(self) -> None:
        """Drain requests in flight (up to ``drain_timeout_s``), then stop everything; safe to call twice."""
        if not self._opened:
            return
        self._opened = False
        self.draining = True
        if self.in_flight:
            log.info("draining %d in-flight requests (up to %.0fs)", self.in_flight, self.drain_timeout_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), self.drain_timeout_s)
        self._worker_stop.set()
        for task in self._tasks:
            if task.get_name() != "coe-batch-worker":
                task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        if self.explorer is not None:
            await self.explorer.aclose()
        if self.jobs is not None:
            await self.jobs.queue.close()
        await self.registry.aclose()
        await self.pool.aclose()
        await self.store.close()
        if self._telemetry is None:  # ours: flush what is left and stop the exporter's thread
            await asyncio.to_thread(self.telemetry.shutdown)
        log.info("coe stopped")

    async def __aenter__(self) -> Runtime:
        return await self.open()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    def _load(self) -> dict[str, Any]:
        """This replica's load for the explorer (its experts, backends, resident adapters)."""
        return load_snapshot(self.metrics, self.pool.all(), self.dispatcher.lanes,
                             list(self.registry.current.experts))

    # -- requests in flight (for draining) ------------------------------------------------

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    # -- backends ---------------------------------------------------------------------------

    def backend_configs(self, config: RegistryConfig) -> dict[str, BackendConfig]:
        """The backends this process runs: those asked for (``backends``), each managed vLLM's default
        log file tagged (``log_tag``), and started with vLLM's own tracing when this process traces
        (``Telemetry.launch``)."""
        wanted = {n: b for n, b in config.backends.items() if self._backends is None or n in self._backends}
        if self._log_tag is None and not self.telemetry.enabled:
            return wanted
        out = {}
        for name, backend in wanted.items():
            launch = backend.launch
            if launch is not None and self._log_tag is not None and launch.log_file is not None \
                    and launch.log_file.name == f"{name}.log" \
                    and launch.log_file.parent.parts[-2:] == (".coe", "logs"):  # the loader's default
                tagged = launch.log_file.with_name(f"{name}.{self._log_tag}.log")
                launch = launch.model_copy(update={"log_file": tagged})
            if launch is not None:
                launch = self.telemetry.launch(name, launch)
            if launch is not backend.launch:
                backend = backend.model_copy(update={"launch": launch})
            out[name] = backend
        return out

    async def _configure(self, config: RegistryConfig) -> None:
        await self.dispatcher.configure(config.dispatch, self.backend_configs(config))

    def _make_router(self, config: RegistryConfig, complete: Completer | None) -> Router:
        """``make_router``, with conversation sessions kept in a durable (shared) store, so that replicas
        keep a session on its experts whichever of them routes the next turn."""
        router = make_router(config, complete)
        sessions = getattr(router, "sessions", None)
        if isinstance(sessions, Sessions) and self.store.durable:
            sessions.share(self.store)
        return router

    async def wait_ready(self, backends: Collection[str], timeout_s: float) -> None:
        """Until every named backend is healthy; on-demand ones are skipped (their batch wave starts them).
        A backend that failed to start, or the timeout, raises ``BackendUnavailable`` naming them."""
        names = {b for b in backends if b in self.pool.all() and not self.pool.is_on_demand(b)}
        deadline = time.monotonic() + timeout_s
        while True:
            states = {n: self.pool.get(n).state for n in sorted(names)}
            if all(s == "healthy" for s in states.values()):
                return
            failed = [n for n, s in states.items() if s == "failed"]
            if failed or time.monotonic() > deadline:
                down = ", ".join(f"{n} ({s})" for n, s in states.items() if s != "healthy")
                raise BackendUnavailable(f"backends not healthy after {timeout_s:.0f}s: {down}" if not failed
                                         else f"backends failed to start: {down}")
            await asyncio.sleep(0.5)

    def startup_timeout_s(self) -> float:
        """The longest start-up any managed backend of the registry is allowed (at least 60 s)."""
        config = self.registry.current.config
        return max([b.launch.startup_timeout_s for b in config.backends.values() if b.launch] + [60.0])

    # -- background work ------------------------------------------------------------------------

    async def _run_batch_worker(self, initial: RegistryConfig) -> None:
        """This process's batch worker (the API server's embedded default; ``coe worker``'s whole job),
        supervised: the loop retries its own failures, and should it still end with an error it is
        started again after a jittered backoff, so batch work never stops while the process runs."""
        assert self.jobs is not None
        cfg = initial.store
        runner = WaveRunner(self.dispatcher, models=self.pool, metrics=self.metrics,
                            concurrency=cfg.worker_concurrency)
        execute = metered(self.chat.execute, self.store)  # items count against the key that submitted them
        self.worker = BatchWorker(self.jobs, execute, runner, window=cfg.batch_window,
                                  claim_idle_s=cfg.claim_idle_s, drain_s=10.0)
        while not self._worker_stop.is_set():
            try:
                await self.worker.run(self._worker_stop)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.worker_restarts += 1
                delay = self.worker.health.failed(exc)
                log.exception("the batch worker loop ended with an error; restarting it in %.1fs", delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._worker_stop.wait(), delay)

    def worker_health(self) -> dict[str, Any] | None:
        """The batch worker's state for ``/health/ready`` and the metrics (None: no worker here)."""
        if self.worker is None:
            return None
        health = self.worker.health
        self.metrics.batch_worker_up.set(1 if health.state == "running" else 0)
        self.metrics.batch_worker_errors.set(health.errors)
        return {**health.to_json(), "restarts": self.worker_restarts}

    async def _load_overlay_when_ready(self) -> None:
        """API adapter experts must be loaded into their vLLM again after a restart; wait for backends."""
        manager = self.registry
        for _ in range(600):
            names = {e.backend for n, e in manager.current.experts.items() if manager.current.sources[n] == "api"}
            if not names:
                return
            if all(self.pool.get(n).is_healthy for n in names if n in self.pool.all()):
                await manager.load_overlay_adapters()
                return
            await asyncio.sleep(1)
