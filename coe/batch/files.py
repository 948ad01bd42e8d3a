"""OpenAI Files on the state store: batch inputs and the output and error files batches write.

Namespaces: ``files`` (metadata, listed) and ``file-data`` (content, read only
whole, by id). Content is kept as sent: UTF-8 text as a string, anything else as
base64 (a batch made from it is refused with the reason). Deleting a file removes
both records, so its memory (the in-memory store) or its Redis hash field goes
with it.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from typing import Any

from coe.errors import InvalidRequest, NotFound, PayloadTooLarge, clip
from coe.heap import trim_soon
from coe.store.base import StateStore

FILES, DATA = "files", "file-data"
OFF_LOOP = 1024 * 1024
"""Files above this many bytes (or characters) are decoded and parsed in a worker thread."""


class BatchFiles:
    def __init__(self, store: StateStore, *, max_file_bytes: int = 200 * 1024 * 1024) -> None:
        self.store = store
        self.max_file_bytes = max_file_bytes

    async def create_file(self, filename: str, purpose: str, content: bytes, *, file_id: str | None = None
                          ) -> dict[str, Any]:
        if len(content) > self.max_file_bytes:
            raise PayloadTooLarge(f"the file has {len(content)} bytes; the limit is {self.max_file_bytes} "
                                  "(store.max_file_bytes)", param="file")
        fid = file_id or f"file-{uuid.uuid4().hex}"
        meta: dict[str, Any] = {"id": fid, "object": "file", "bytes": len(content),
                "created_at": int(time.time()), "filename": filename, "purpose": purpose, "status": "processed"}
        try:
            text = content.decode("utf-8") if len(content) < OFF_LOOP else await asyncio.to_thread(content.decode)
            data: dict[str, Any] = {"text": text}
        except UnicodeDecodeError as exc:  # kept as sent (as OpenAI does); a batch made from it is refused
            data = {"b64": base64.b64encode(content).decode(), "not_utf8": f"{exc.reason} at byte {exc.start}"}
        await self.store.put(DATA, fid, data)
        await self.store.put(FILES, fid, meta)
        return meta

    async def get_file(self, file_id: str) -> dict[str, Any]:
        meta = await self.store.get(FILES, file_id)
        if meta is None:
            raise NotFound(f"no file with id {clip(file_id)}", param="file_id", code="file_not_found")
        return meta

    async def file_text(self, file_id: str) -> str:
        """The file as text; a file that is not UTF-8 cannot be batch lines (400 naming why)."""
        await self.get_file(file_id)
        data = await self.store.get(DATA, file_id) or {}
        if "not_utf8" in data:
            raise InvalidRequest(f"file {clip(file_id)} is not UTF-8 text ({data['not_utf8']}), so not batch lines",
                                 param="input_file_id")
        return str(data.get("text", ""))

    async def file_bytes(self, file_id: str) -> bytes:
        """The file's content exactly as uploaded."""
        await self.get_file(file_id)
        data = await self.store.get(DATA, file_id) or {}
        if "b64" in data:
            return base64.b64decode(data["b64"])
        return str(data.get("text", "")).encode()

    async def delete_file(self, file_id: str) -> dict[str, Any]:
        meta = await self.get_file(file_id)
        await self.store.delete(FILES, file_id)
        await self.store.delete(DATA, file_id)
        if int(meta.get("bytes", 0)) >= OFF_LOOP:
            await trim_soon()  # the freed content goes back to the OS (``coe.heap``)
        return {"id": file_id, "object": "file", "deleted": True}

    async def list_files(self, purpose: str | None = None) -> list[dict[str, Any]]:
        files = [f for f in (await self.store.items(FILES)).values() if purpose in (None, f.get("purpose"))]
        return sorted(files, key=lambda f: (-int(f["created_at"]), str(f["id"])))
