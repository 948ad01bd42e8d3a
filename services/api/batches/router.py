"""OpenAI Batches: create (the whole input is checked first), retrieve, cancel, list.

A batch's items run on batch workers (``coe.batch.worker``): in the API server
itself by default, and in ``coe worker`` processes when Redis is configured.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from coe.config import ROUTED_MODEL
from coe.runtime import body_checker
from services.api.auth import check_client
from services.api.errors import json_body, once, openai_responses, parse_body
from services.api.keys.ownership import claim, no_batch, no_file, require_owner, visible_ids
from services.api.state import jobs_of, runtime_of

router = APIRouter(tags=["batches"], dependencies=[Depends(check_client)])


class CreateBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(min_length=1)
    endpoint: Literal["/v1/chat/completions"] = Field("/v1/chat/completions", description="only this one")
    completion_window: Literal["24h"] = Field("24h", description="only 24h")
    metadata: dict[str, str] | None = Field(None, max_length=16)


@router.post("/v1/batches", responses=openai_responses(400, 404), openapi_extra=json_body(CreateBatch),
             summary="Create a batch from an uploaded file; every bad line is reported and nothing is accepted")
async def create_batch(request: Request) -> dict[str, Any]:
    body = await parse_body(request, CreateBatch)
    await require_owner(request, body.input_file_id, no_file(body.input_file_id))
    registry = runtime_of(request.app).registry.current
    models = {ROUTED_MODEL, *registry.experts}
    check = body_checker(registry.config, registry.experts)
    batch = await jobs_of(request.app).create_batch(body.input_file_id, body.endpoint, body.completion_window,
                                                    body.metadata, models, check,
                                                    expiry_s=registry.config.store.batch_expiry_s)
    await claim(request, batch["id"])
    return batch


@router.get("/v1/batches/{batch_id}", responses=openai_responses(404))
async def get_batch(batch_id: str, request: Request) -> dict[str, Any]:
    """Reading a batch past its window ends it ``expired`` here, so no worker need be running."""
    await require_owner(request, batch_id, no_batch(batch_id))
    return await jobs_of(request.app).get_batch(batch_id)


@router.post("/v1/batches/{batch_id}/cancel", responses=openai_responses(404, 409))
async def cancel_batch(batch_id: str, request: Request) -> dict[str, Any]:
    await require_owner(request, batch_id, no_batch(batch_id))
    return await jobs_of(request.app).cancel_batch(batch_id)


@router.get("/v1/batches", summary="Batches, newest first", dependencies=[Depends(once("limit", "after"))])
async def list_batches(request: Request, limit: int = 20, after: str | None = None) -> dict[str, Any]:
    page, more = await jobs_of(request.app).list_batches(max(1, min(limit, 100)), after,
                                                         only=await visible_ids(request))
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": more}
