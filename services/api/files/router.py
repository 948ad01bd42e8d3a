"""OpenAI Files: ``POST /v1/files`` (purpose ``batch``), get, content, delete, list.

Files hold batch inputs and the output and error files batches produce; they
live in the state store (Redis when configured), as UTF-8 text.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from starlette.datastructures import UploadFile

from coe.errors import InvalidRequest, PayloadTooLarge
from services.api.auth import check_client
from services.api.errors import once, openai_responses
from services.api.keys.ownership import claim, no_file, only, owners, require_owner, visible_ids
from services.api.state import jobs_of

router = APIRouter(tags=["files"], dependencies=[Depends(check_client)])

PURPOSES = ("batch",)
FORM_OVERHEAD = 64 * 1024
"""Room for the multipart framing and the other fields around the file."""


@router.post("/v1/files", responses=openai_responses(400, 413), summary="Upload a file (purpose 'batch')",
             openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                 "type": "object", "required": ["file", "purpose"],
                 "properties": {"file": {"type": "string", "format": "binary"},
                                "purpose": {"type": "string", "enum": list(PURPOSES)}}}}}}})
async def create_file(request: Request) -> dict[str, Any]:
    jobs = jobs_of(request.app)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > jobs.max_file_bytes + FORM_OVERHEAD:  # refused before it is read
        raise PayloadTooLarge(f"the upload has {declared} bytes; files may have {jobs.max_file_bytes} "
                              "(store.max_file_bytes)", param="file")
    try:
        form = await request.form(max_files=1, max_fields=8, max_part_size=jobs.max_file_bytes + 1)
    except Exception as exc:  # starlette raises MultiPartException / ValueError on malformed bodies
        if "exceeded maximum size" in str(exc):
            raise PayloadTooLarge(f"the file is larger than {jobs.max_file_bytes} bytes (store.max_file_bytes)",
                                  param="file") from exc
        raise InvalidRequest(f"the body must be multipart/form-data with 'file' and 'purpose': {exc}") from exc
    upload, purpose = form.get("file"), form.get("purpose")
    if not isinstance(upload, UploadFile):
        raise InvalidRequest("'file' is required (a multipart file field)", param="file")
    if purpose not in PURPOSES:
        raise InvalidRequest(f"purpose must be one of {', '.join(PURPOSES)}, not {purpose!r}", param="purpose")
    content = await upload.read(jobs.max_file_bytes + 1)
    created = await jobs.create_file(upload.filename or "upload.jsonl", str(purpose), content)
    await claim(request, created["id"])
    return created


@router.get("/v1/files", summary="Files, newest first", dependencies=[Depends(once("purpose"))])
async def list_files(request: Request, purpose: str | None = None) -> dict[str, Any]:
    files = only(await jobs_of(request.app).list_files(purpose), await visible_ids(request))
    return {"object": "list", "data": files, "has_more": False}


@router.get("/v1/files/{file_id}", responses=openai_responses(404))
async def get_file(file_id: str, request: Request) -> dict[str, Any]:
    await require_owner(request, file_id, no_file(file_id))
    return await jobs_of(request.app).get_file(file_id)


@router.get("/v1/files/{file_id}/content", responses=openai_responses(404), response_class=Response)
async def file_content(file_id: str, request: Request) -> Response:
    await require_owner(request, file_id, no_file(file_id))
    return Response(await jobs_of(request.app).file_bytes(file_id), media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}", responses=openai_responses(404))
async def delete_file(file_id: str, request: Request) -> dict[str, Any]:
    await require_owner(request, file_id, no_file(file_id))
    deleted = await jobs_of(request.app).delete_file(file_id)
    await owners(request).release(file_id)
    return deleted
