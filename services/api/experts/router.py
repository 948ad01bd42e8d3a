"""Expert admin: list (client key), register and remove (admin key).

Registering an adapter expert loads its adapter into the running vLLM first, so
an expert is listed only once it can answer.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from coe.config import ExpertConfig
from coe.errors import NotFound, clip
from coe.merging import merge_and_register
from coe.models.merge import MergeSpec
from services.api.auth import check_admin, check_client
from services.api.errors import json_body, openai_responses, parse_body
from services.api.experts.protocol import MergeRequest
from services.api.state import runtime_of

router = APIRouter(tags=["experts"])


def _describe(expert: ExpertConfig, source: str) -> dict[str, Any]:
    return {"object": "expert", "source": source, **expert.model_dump(mode="json")}


@router.get("/v1/experts", dependencies=[Depends(check_client)], summary="Every expert with its source")
async def list_experts(request: Request) -> dict[str, Any]:
    registry = runtime_of(request.app).registry.current
    return {"object": "list", "data": [_describe(e, registry.sources[n]) for n, e in registry.experts.items()]}


@router.get("/v1/experts/{name}", dependencies=[Depends(check_client)], responses=openai_responses(404))
async def get_expert(name: str, request: Request) -> dict[str, Any]:
    registry = runtime_of(request.app).registry.current
    expert = registry.expert(name)
    if expert is None:
        raise NotFound(f"no expert named {clip(name)}", code="expert_not_found")
    return _describe(expert, registry.sources[name])


@router.post(
    "/v1/experts", dependencies=[Depends(check_admin)], status_code=201,
    responses=openai_responses(400, 403, 409, 502, 503),
    openapi_extra=json_body(ExpertConfig),
    summary="Register an expert (admin); adapter experts are loaded into their vLLM first",
)
async def register_expert(request: Request) -> JSONResponse:
    expert = await parse_body(request, ExpertConfig)
    registered = await runtime_of(request.app).registry.register(expert)
    return JSONResponse(_describe(registered, "api"), status_code=201)


@router.post(
    "/v1/experts/merge", dependencies=[Depends(check_admin)], status_code=201,
    responses=openai_responses(400, 403, 404, 409, 502, 503),
    openapi_extra=json_body(MergeRequest),
    summary="Build a merged adapter expert from registered adapter experts and register it (admin)",
)
async def merge_experts(request: Request) -> JSONResponse:
    """The merge runs in a thread under the new adapter's lock; the result is written under the backend's
    first ``adapter_roots`` folder and registered like ``POST /v1/experts``."""
    body = await parse_body(request, MergeRequest)
    runtime = runtime_of(request.app)
    spec = MergeSpec(method=body.method, weights=tuple(body.weights) if body.weights is not None else None,
                     density=body.density, rank=body.rank, seed=body.seed)
    expert, manifest = await merge_and_register(runtime.registry, runtime.pool, body.name, body.sources, spec,
                                                system_prompt=body.system_prompt, description=body.description)
    return JSONResponse({**_describe(expert, "api"), "merge": manifest}, status_code=201)


@router.delete("/v1/experts/{name}", dependencies=[Depends(check_admin)],
               responses=openai_responses(403, 404, 409), summary="Remove an API-registered expert (admin)")
async def delete_expert(name: str, request: Request) -> dict[str, Any]:
    await runtime_of(request.app).registry.unregister(name)
    return {"id": name, "object": "expert", "deleted": True}
