"""The app factory. Nothing happens at import time: ``create_app`` takes its parts as arguments
(Starlette-style), and its lifespan opens one ``coe.runtime.Runtime`` (registry, store, backends,
dispatcher, pipeline, batch jobs) and builds the serving objects once; on shutdown the Runtime drains
requests in flight and stops everything. The endpoint folders only translate HTTP.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

from fastapi import FastAPI

from coe.backends.pool import Attached, TransportFactory
from coe.config import RegistryConfig
from coe.keys import KeyLimiter, KeyRing
from coe.registry import Registry
from coe.runtime import Runtime
from coe.store.base import StateStore
from services.api import errors
from services.api.auth import AuthKeys, VirtualKeys, resolve_keys
from services.api.batches.router import router as batches_router
from services.api.chat.router import router as chat_router
from services.api.chat.serving import ChatServing
from services.api.experts.router import router as experts_router
from services.api.files.router import router as files_router
from services.api.health.router import router as health_router
from services.api.keys.router import router as keys_router
from services.api.middleware import RequestIdMiddleware, TracingMiddleware
from services.api.models.router import router as models_router
from services.api.route.router import router as route_router
from services.api.state import ApiState
from services.api.ui.router import router as ui_router

log = logging.getLogger("coe.api")


def create_app(
    config_path: str | Path,
    *,
    config: RegistryConfig | None = None,
    store: StateStore | None = None,
    transport_factory: TransportFactory | None = None,
    poll_interval_s: float = 1.0,
    drain_timeout_s: float = 30.0,
    batch_worker: bool | None = None,
    attached_backends: Mapping[str, Attached] | None = None,
) -> FastAPI:
    """Build the API server for the registry at ``config_path``.

    ``config``: the file as the caller already loaded it (parsed once per process);
    ``store`` overrides the one the registry's ``store`` section names;
    ``transport_factory`` swaps backend transports (fault injection in tests);
    ``batch_worker`` overrides ``store.embedded_worker``;
    ``attached_backends``: ``launch`` backends the supervisor of ``coe serve --workers N`` runs.
    """
    config_path = Path(config_path).resolve()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        keys = [AuthKeys(None, None)]

        def on_reload(snapshot: Registry) -> None:
            keys[0] = resolve_keys(snapshot.config.auth)  # a reload without its keys is refused
            state = getattr(app.state, "coe", None)
            if state is not None:
                state.keys = keys[0]

        runtime = Runtime(config_path, config=config, store=store, transport_factory=transport_factory,
                          poll_interval_s=poll_interval_s, drain_timeout_s=drain_timeout_s,
                          batch_worker=batch_worker, on_reload=on_reload, explorer=True,
                          attached_backends=attached_backends)
        async with runtime:
            vkeys = VirtualKeys(KeyRing(runtime.store), KeyLimiter(runtime.store))
            app.state.coe = ApiState(runtime, keys[0], ChatServing(runtime), vkeys)
            registry = runtime.registry.current
            log.info("coe ready to accept requests: %d experts, %d backends (/health/ready says when a backend "
                     "is up)", len(registry.experts), len(registry.config.backends))
            yield
            await vkeys.limiter.close()  # the keys' pending usage totals, before the store closes

    app = FastAPI(
        title="coe",
        summary="Composition of experts: one OpenAI-compatible endpoint in front of expert LLMs",
        version="0.1.0",
        lifespan=lifespan,
        responses=errors.openai_responses(401, 500),
    )
    errors.install(app)
    errors.openapi_400_not_422(app)
    for router in (chat_router, models_router, experts_router, route_router, files_router, batches_router,
                   health_router, ui_router, keys_router):
        app.include_router(router)
    app.add_middleware(TracingMiddleware)  # inside the request id's: the span carries it
    app.add_middleware(RequestIdMiddleware)
    return app
