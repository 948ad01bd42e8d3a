"""``/ui``: the routing explorer page, and the two admin endpoints it reads.

The page is static (HTML, one script, one stylesheet, shipped in this package: nothing from a CDN, so it
works offline). It holds no data and no key: a login form keeps the admin key in the tab's
``sessionStorage`` and sends it as a Bearer header, as any client does; a key never goes into a URL.

- ``GET /v1/explorer/live``: recent routed decisions across every replica, each replica's load (experts'
  calls, errors, queue depth; backends and the adapters resident on them), and batches in progress.
- ``GET /v1/explorer/router``: what the router knows: the classifier's last fit (held-out scores and
  confusion matrix) and every expert's skill profile.
- "Why here?" needs no endpoint of its own: the page posts to ``/v1/route``.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from coe.errors import NotFound
from services.api.auth import check_admin
from services.api.errors import openai_responses
from services.api.state import runtime_of

router = APIRouter(tags=["explorer"])

ASSETS = {"explorer.js": "text/javascript", "explorer.css": "text/css"}
IN_PROGRESS = ("validating", "in_progress", "finalizing", "cancelling")
NO_STORE = {"cache-control": "no-store", "x-content-type-options": "nosniff"}
PAGE_HEADERS = {**NO_STORE, "content-security-policy": "default-src 'self'; img-src 'self' data:; "
                "style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'"}


def _asset(name: str) -> bytes:
    return resources.files("services.api.ui").joinpath("static", name).read_bytes()


@router.get("/ui", response_class=Response, include_in_schema=False)
async def page() -> Response:
    return Response(_asset("explorer.html"), media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


@router.get("/ui/assets/{name}", response_class=Response, include_in_schema=False)
async def asset(name: str) -> Response:
    if name not in ASSETS:
        raise NotFound(f"no explorer asset {name!r}", code="not_found", param="name")
    return Response(_asset(name), media_type=f"{ASSETS[name]}; charset=utf-8", headers=PAGE_HEADERS)


@router.get("/v1/explorer/live", dependencies=[Depends(check_admin)], responses=openai_responses(401, 403, 404),
            summary="The explorer's live view: recent decisions, load per replica, batches in progress")
async def live(request: Request, limit: int = Query(50, ge=1, le=500)) -> dict[str, Any]:
    runtime = runtime_of(request.app)
    explorer = runtime.explorer
    if explorer is None or not explorer.config.enabled:
        raise NotFound("the routing explorer is off (explorer.enabled: false in the registry)", code="explorer_off")
    await explorer.publish()  # this replica's newest decisions and load, not a publish interval old
    batches: list[dict[str, Any]] = []
    if runtime.jobs is not None:
        listed, _ = await runtime.jobs.list_batches(limit=100)
        batches = [{"id": b["id"], "status": b["status"], "created_at": b.get("created_at"),
                    "request_counts": b.get("request_counts")} for b in listed if b["status"] in IN_PROGRESS]
    return {"decisions": await explorer.recent(limit), "replicas": await explorer.replicas(),
            "batches": batches, "keep_queries": explorer.config.keep_queries, "replica": explorer.replica}


@router.get("/v1/explorer/router", dependencies=[Depends(check_admin)], responses=openai_responses(401, 403),
            summary="What the router knows: the classifier's last fit and the experts' skill profiles")
async def router_view(request: Request) -> dict[str, Any]:
    registry = runtime_of(request.app).registry.current
    experts = list(registry.experts.values())
    return {**registry.router.describe(experts),
            "experts": [{"name": e.name, "categories": list(e.categories), "skills": list(e.skills),
                         "description": e.description} for e in experts]}
