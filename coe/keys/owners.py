"""Who owns each file and batch: the owner id of the key that created it (``Caller.owner``).

Kept beside the objects in their own namespace (``owners``: object id -> owner), so the OpenAI-shaped
file and batch records stay as they are and reveal no key. A batch's output and error files
(``file-<batch id>-output``, ``-errors``) belong to the batch's owner. An object with no owner record
(made before keys existed) belongs to nobody: only the admin key sees it.
"""

from __future__ import annotations

import re

from coe.store.base import StateStore

OWNERS_NS = "owners"
_RESULT_FILE = re.compile(r"^file-(batch_[0-9a-f]+)-(?:output|errors)$")


class Owners:
    def __init__(self, store: StateStore) -> None:
        self.store = store

    async def claim(self, object_id: str, owner: str) -> None:
        await self.store.put(OWNERS_NS, object_id, {"owner": owner})

    async def release(self, object_id: str) -> None:
        await self.store.delete(OWNERS_NS, object_id)

    async def owner_of(self, object_id: str) -> str | None:
        made_by = _RESULT_FILE.match(object_id)
        doc = await self.store.get(OWNERS_NS, made_by.group(1) if made_by else object_id)
        owner = (doc or {}).get("owner")
        return owner if isinstance(owner, str) else None

    async def owned_by(self, owner: str) -> set[str]:
        """Every object id ``owner`` holds, result files included (one read of the namespace)."""
        ids = {oid for oid, doc in (await self.store.items(OWNERS_NS)).items() if doc.get("owner") == owner}
        return ids | {f"file-{oid}-{kind}" for oid in ids if oid.startswith("batch_") for kind in ("output", "errors")}
