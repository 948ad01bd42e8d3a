"""A batch's items count against the virtual key that submitted it (``metered``, wrapped around the
batch worker's ``execute`` by the runtime).

Before each item the key's budget is checked (the key looked up by the batch's owner; revoked or expired
keys stop their batches too); after it, its real tokens and cost are added to the key's usage and spend.
Once the budget is spent, every remaining item fails with a 429 ``insufficient_quota`` error line naming
the key: results already recorded stay in the output file. Items are not held to requests or tokens per
minute (a batch is the way to send more than a minute's worth). Items in flight when the budget runs out
still finish, so a batch can pass its budget by at most the worker's concurrency times one item's cost.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from coe.errors import CoeError, RateLimited
from coe.keys.limits import Admission, KeyLimiter
from coe.keys.model import VirtualKey
from coe.keys.owners import Owners
from coe.keys.ring import KEYS_NS
from coe.store.base import StateStore
from coe.telemetry import batch_link

Execute = Callable[..., Awaitable[tuple[int, dict[str, Any]]]]


def metered(execute: Execute, store: StateStore) -> Execute:
    owners, limiter = Owners(store), KeyLimiter(store)
    keys: dict[str, tuple[float, VirtualKey | None]] = {}  # batch id -> its key, re-read every second

    async def key_of(batch_id: str) -> VirtualKey | None:
        hit = keys.get(batch_id)
        if hit is not None and time.monotonic() - hit[0] < 1.0:
            return hit[1]
        owner = await owners.owner_of(batch_id)
        key = None
        if owner is not None and owner.startswith("key_"):
            for doc in (await store.items(KEYS_NS)).values():
                if doc.get("id") == owner:
                    key = VirtualKey.model_validate(doc)
        if len(keys) > 1000:
            keys.clear()
        keys[batch_id] = (time.monotonic(), key)
        return key

    async def run(item: Any, request_id: str, *args: Any, **kwargs: Any) -> tuple[int, dict[str, Any]]:
        batch_id, _ = batch_link()
        key = None if batch_id is None else await key_of(batch_id)
        if key is None:
            return await execute(item, request_id, *args, **kwargs)
        try:
            if not key.usable(time.time()):
                raise CoeError(f"key {key.name} was revoked or has expired; the batch's remaining items are "
                               "not run", code="key_revoked")
            admission = await limiter.admit(key, cost=0.0, requests=0) if key.budget is not None else Admission(key)
        except RateLimited as exc:
            return exc.status, {"error": {**exc.to_openai()["error"],
                                          "message": f"{exc.message}: this item was not run"}}
        except CoeError as exc:
            return 403, {"error": {**exc.to_openai()["error"], "type": "permission_error"}}
        status, body = await execute(item, request_id, *args, **kwargs)
        field = body.get("coe") if isinstance(body, dict) else None
        usage = (field or {}).get("usage") or {}
        cost = (field or {}).get("cost")
        await limiter.settle(admission, int(usage.get("total_tokens", 0)),
                             float(cost) if isinstance(cost, int | float) else 0.0)
        return status, body

    return run
