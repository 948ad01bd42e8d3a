"""``GET /v1/models``: the ``coe`` model and every expert; adapters name their ``parent``."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Request

from coe.config import ROUTED_MODEL, ExpertConfig
from coe.errors import ModelNotFound, clip
from services.api.auth import check_client
from services.api.errors import openai_responses
from services.api.state import runtime_of

router = APIRouter(tags=["models"], dependencies=[Depends(check_client)])

_CREATED = int(time.time())


def _entry(expert: ExpertConfig, source: str) -> dict[str, Any]:
    return {
        "id": expert.name, "object": "model", "created": _CREATED, "owned_by": "coe",
        "parent": expert.model if expert.adapter else None,
        "coe": {"backend": expert.backend, "model": expert.model,
                "adapter": expert.adapter.name if expert.adapter else None, "source": source,
                "description": expert.description, "categories": expert.categories, "skills": expert.skills},
    }


def _routed() -> dict[str, Any]:
    return {"id": ROUTED_MODEL, "object": "model", "created": _CREATED, "owned_by": "coe", "parent": None,
            "coe": {"description": "routes each request to the best experts"}}


@router.get("/v1/models", summary="List the coe model and every expert")
async def list_models(request: Request) -> dict[str, Any]:
    registry = runtime_of(request.app).registry.current
    data = [_routed()] + [_entry(e, registry.sources[n]) for n, e in registry.experts.items()]
    return {"object": "list", "data": data}


@router.get("/v1/models/{model}", responses=openai_responses(404), summary="One model")
async def get_model(model: str, request: Request) -> dict[str, Any]:
    if model == ROUTED_MODEL:
        return _routed()
    registry = runtime_of(request.app).registry.current
    expert = registry.expert(model)
    if expert is None:
        raise ModelNotFound(f"The model {clip(model)} does not exist", param="model")
    return _entry(expert, registry.sources[model])
