"""The app factory. Nothing happens at import time: ``create_app`` takes its parts
as arguments (Starlette-style) and the lifespan loads the registry, opens the
store, starts managed backends (not on-demand ones: batch waves bring those up),
and on shutdown drains and stops them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coe.backends.pool import BackendPool, TransportFactory
from coe.batch.jobs import BatchJobs
from coe.batch.lines import BatchItem
from coe.batch.queue import open_queue
from coe.batch.stages import WaveRunner
from coe.batch.worker import BatchWorker
from coe.config import StoreConfig
from coe.dispatch import Dispatcher
from coe.loader import load_registry
from coe.logs import request_id_var
from coe.metrics import Metrics
from coe.pipeline import ChatCaller, Pipeline
from coe.registry import Registry, RegistryManager
from coe.store import open_store
from coe.store.base import StateStore
from services.api import errors
from services.api.auth import AuthKeys, resolve_keys

log = logging.getLogger("coe.api")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")


@dataclass
class AppState:
    config_path: Path
    metrics: Metrics
    store: StateStore
    pool: BackendPool
    dispatcher: Dispatcher
    registry: RegistryManager
    pipeline: Pipeline
    jobs: BatchJobs | None = None
    keys: AuthKeys = field(default_factory=lambda: AuthKeys(None, None))
    in_flight: int = 0
    draining: bool = False
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def enter(self) -> None:
        self.in_flight += 1
        self.idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.idle.set()


class RequestIdMiddleware:
    """Give every request an id (the client's ``x-request-id`` when sane, else a new one),
    echo it in the response, and put it on every log line of the request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = ""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                rid = value.decode("latin-1")
                break
        if not _REQUEST_ID.match(rid):
            rid = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        raw = rid.encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", raw)]
            await send(message)

        token = request_id_var.set(rid)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


def create_app(
    config_path: str | Path,
    *,
    store: StateStore | None = None,
    transport_factory: TransportFactory | None = None,
    poll_interval_s: float = 1.0,
    drain_timeout_s: float = 30.0,
    batch_worker: bool | None = None,
) -> FastAPI:
    """Build the API server for the registry at ``config_path``.

    ``store`` overrides the one the registry's ``store`` section names;
    ``transport_factory`` swaps backend transports (fault injection in tests);
    ``batch_worker`` overrides ``store.embedded_worker`` (``coe worker`` forces it on).
    """
    config_path = Path(config_path).resolve()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        metrics = Metrics()
        initial = load_registry(config_path)
        state_store = store or open_store(initial.store)
        pool = BackendPool(transport_factory=transport_factory, health_interval_s=initial.dispatch.health_interval_s)
        dispatcher = Dispatcher(pool, initial.dispatch, metrics)
        state: AppState | None = None
        overlay_task: asyncio.Task[None] | None = None
        worker_task: asyncio.Task[None] | None = None
        worker_stop = asyncio.Event()

        def on_reload(snapshot: Registry) -> None:
            keys = resolve_keys(snapshot.config.auth)
            if state is not None:
                state.keys = keys

        manager = RegistryManager(config_path, state_store, dispatcher, metrics,
                                  poll_interval_s=poll_interval_s, on_reload=on_reload)
        state = AppState(config_path, metrics, state_store, pool, dispatcher, manager, Pipeline(dispatcher))
        state.idle.set()
        app.state.coe = state
        try:
            registry = await manager.start()
            state.keys = resolve_keys(registry.config.auth)
            if not state_store.durable:
                log.warning("state store is in memory: experts registered through the API do not survive a "
                            "restart (set store.redis_url or COE_REDIS_URL for durable state)")
            overlay_task = asyncio.create_task(_load_overlay_when_ready(manager, pool))
            queue = open_queue(initial.store, durable_store=state_store.durable)
            state.jobs = BatchJobs(state_store, queue, max_file_bytes=initial.store.max_file_bytes,
                                   cancel_grace_s=initial.store.claim_idle_s)
            if not queue.durable:
                log.warning("batch jobs are in memory: accepted batches do not survive a restart "
                            "(set store.redis_url or COE_REDIS_URL for durable batches)")
            run_worker = initial.store.embedded_worker if batch_worker is None else batch_worker
            if run_worker or not queue.durable:
                worker_task = asyncio.create_task(_batch_worker(state, initial.store, worker_stop))
            log.info("coe ready to accept requests: %d experts, %d backends", len(registry.experts),
                     len(registry.config.backends))
            yield
        finally:
            state.draining = True
            if state.in_flight:
                log.info("draining %d in-flight requests (up to %.0fs)", state.in_flight, drain_timeout_s)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(state.idle.wait(), drain_timeout_s)
            if overlay_task is not None:
                overlay_task.cancel()
            worker_stop.set()
            if worker_task is not None:
                with contextlib.suppress(Exception):
                    await worker_task
            if state.jobs is not None:
                await state.jobs.queue.close()
            await manager.aclose()
            await pool.aclose()
            await state_store.close()
            log.info("coe stopped")

    app = FastAPI(
        title="coe",
        summary="Composition of experts: one OpenAI-compatible endpoint in front of expert LLMs",
        version="0.1.0",
        lifespan=lifespan,
        responses=errors.openai_responses(401, 500),
    )
    errors.install(app)
    from services.api.batches.router import router as batches_router
    from services.api.chat.router import router as chat_router
    from services.api.experts.router import router as experts_router
    from services.api.files.router import router as files_router
    from services.api.health.router import router as health_router
    from services.api.models.router import router as models_router
    from services.api.route.router import router as route_router

    app.include_router(chat_router)
    app.include_router(models_router)
    app.include_router(experts_router)
    app.include_router(route_router)
    app.include_router(files_router)
    app.include_router(batches_router)
    app.include_router(health_router)
    app.add_middleware(RequestIdMiddleware)
    return app


async def _batch_worker(state: AppState, cfg: StoreConfig, stop: asyncio.Event) -> None:
    """The API server's own batch worker (the embedded default; optional with Redis)."""
    from services.api.chat.execute import execute

    assert state.jobs is not None

    async def run(item: BatchItem, request_id: str, caller: ChatCaller) -> tuple[int, dict[str, Any]]:
        return await execute(state, item, request_id, caller)

    runner = WaveRunner(state.dispatcher, models=state.pool, metrics=state.metrics,
                        concurrency=cfg.worker_concurrency)
    worker = BatchWorker(state.jobs, run, runner, window=cfg.batch_window, claim_idle_s=cfg.claim_idle_s,
                         drain_s=10.0)
    try:
        await worker.run(stop)
    except Exception:
        log.exception("the embedded batch worker stopped")


async def _load_overlay_when_ready(manager: RegistryManager, pool: BackendPool) -> None:
    """API adapter experts must be loaded into their vLLM again after a restart; wait for backends."""
    for _ in range(600):
        names = {e.backend for n, e in manager.current.experts.items() if manager.current.sources[n] == "api"}
        if not names:
            return
        if all(pool.get(n).is_healthy for n in names if n in pool.all()):
            await manager.load_overlay_adapters()
            return
        await asyncio.sleep(1)


def state_of(app: Any) -> AppState:
    coe_state: AppState = app.state.coe
    return coe_state
