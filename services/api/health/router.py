"""Liveness, readiness (registry valid and at least one backend healthy) and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from services.api.state import runtime_of

router = APIRouter(tags=["health"])


@router.get("/health/live", summary="The process is up")
async def live() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/health/ready", summary="Ready while the registry is valid and a backend is healthy",
            responses={503: {"description": "not ready; the body says why"}})
async def ready(request: Request) -> JSONResponse:
    runtime = runtime_of(request.app)
    backends = {name: b.describe() for name, b in runtime.pool.all().items()}
    online = [b for name, b in backends.items() if not runtime.pool.is_on_demand(name)]
    # on-demand backends are down until batch work needs them: a server with only those is ready for batches
    healthy = any(b["state"] == "healthy" for b in online) or (bool(backends) and not online)
    body: dict[str, Any] = {
        "status": "ready" if healthy and not runtime.draining else "not_ready",
        "registry": {"valid": True, "experts": len(runtime.registry.current.experts),
                     "last_reload_error": runtime.registry.last_error},
        "backends": backends,
    }
    worker = runtime.worker_health()
    if worker is not None:  # batch work only: chat keeps serving while the worker waits for its store
        body["batch_worker"] = worker
    if runtime.draining:
        body["reason"] = "shutting down"
    elif not healthy:
        body["reason"] = "no backend is healthy yet"
    return JSONResponse(body, status_code=200 if body["status"] == "ready" else 503)


@router.get("/metrics", summary="Prometheus metrics (names start with coe_)", response_class=Response,
            responses={200: {"description": "Prometheus text exposition format",
                             "content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(request: Request) -> Response:
    runtime = runtime_of(request.app)
    runtime.worker_health()  # sets the batch worker gauges
    for name, backend in runtime.pool.all().items():
        runtime.metrics.backend_up.labels(name).set(1 if backend.is_healthy else 0)
    return Response(runtime.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
