"""Files and batches are seen only by their owner (and the admin key): another key gets the same 404 as
for an id that does not exist, so it cannot learn that the id exists (``coe.keys.owners``)."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from coe.errors import NotFound, clip
from coe.keys import Owners
from services.api.auth import caller_of
from services.api.state import runtime_of


def owners(request: Request) -> Owners:
    return Owners(runtime_of(request.app).store)


def no_file(file_id: str, param: str = "file_id") -> NotFound:
    return NotFound(f"no file with id {clip(file_id)}", param=param, code="file_not_found")


def no_batch(batch_id: str) -> NotFound:
    return NotFound(f"no batch with id {clip(batch_id)}", param="batch_id", code="batch_not_found")


async def require_owner(request: Request, object_id: str, missing: NotFound) -> None:
    """Raise ``missing`` unless the caller may see ``object_id``."""
    caller = caller_of(request)
    if caller.sees_all:
        return
    if not caller.may_see(await owners(request).owner_of(object_id)):
        raise missing


async def claim(request: Request, object_id: str) -> None:
    await owners(request).claim(object_id, caller_of(request).owner)


async def visible_ids(request: Request) -> set[str] | None:
    """The ids the caller may list; None: all of them."""
    caller = caller_of(request)
    return None if caller.sees_all else await owners(request).owned_by(caller.owner)


def only(items: list[dict[str, Any]], ids: set[str] | None) -> list[dict[str, Any]]:
    return items if ids is None else [x for x in items if x.get("id") in ids]
