"""Virtual keys over HTTP (admin key): ``POST /v1/keys`` (the secret is in this answer only),
``GET /v1/keys``, ``GET /v1/keys/{id}``, ``DELETE /v1/keys/{id}`` (revoke), ``GET /v1/keys/{id}/usage``
(the admin key, or the key itself)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from coe.errors import BackendUnavailable, NotFound
from coe.keys import KeyCreate
from services.api.auth import VirtualKeys, caller_of, check_admin, check_client
from services.api.errors import json_body, openai_responses, parse_body
from services.api.state import state_of

router = APIRouter(tags=["keys"])


def _vkeys(request: Request) -> VirtualKeys:
    vkeys: VirtualKeys | None = getattr(state_of(request.app), "vkeys", None)
    if vkeys is None:
        raise BackendUnavailable("virtual keys are not ready yet", retry_after=1)
    return vkeys


@router.post("/v1/keys", dependencies=[Depends(check_admin)], responses=openai_responses(400, 401, 403),
             openapi_extra=json_body(KeyCreate), status_code=201,
             summary="Create a virtual key; its secret is shown in this answer only")
async def create_key(request: Request) -> JSONResponse:
    spec = await parse_body(request, KeyCreate)
    key, secret = await _vkeys(request).ring.create(spec)
    return JSONResponse({**key.public(), "secret": secret}, status_code=201)


@router.get("/v1/keys", dependencies=[Depends(check_admin)], responses=openai_responses(401, 403))
async def list_keys(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [k.public() for k in await _vkeys(request).ring.list()]}


@router.get("/v1/keys/{key_id}", dependencies=[Depends(check_admin)], responses=openai_responses(401, 403, 404))
async def show_key(key_id: str, request: Request) -> dict[str, Any]:
    return (await _vkeys(request).ring.get(key_id)).public()


@router.delete("/v1/keys/{key_id}", dependencies=[Depends(check_admin)],
               responses=openai_responses(401, 403, 404), summary="Revoke a key (refused everywhere within 1 s)")
async def revoke_key(key_id: str, request: Request) -> dict[str, Any]:
    return (await _vkeys(request).ring.revoke(key_id)).public()


@router.get("/v1/keys/{key_id}/usage", dependencies=[Depends(check_client)],
            responses=openai_responses(401, 404), summary="Requests, tokens and spend of a key (admin, or itself)")
async def key_usage(key_id: str, request: Request) -> dict[str, Any]:
    caller = caller_of(request)
    if not (caller.sees_all or (caller.key is not None and caller.key.id == key_id)):
        raise NotFound(f"no key with id {key_id[:64]}", param="key_id", code="key_not_found")
    vkeys = _vkeys(request)
    return await vkeys.limiter.usage(await vkeys.ring.get(key_id))
