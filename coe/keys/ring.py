"""Virtual keys in the state store: create, list, show, revoke, and the lookup every request makes.

Records live in one namespace keyed by the secret's hash, so a request finds its key with one ``get``;
admin operations (rare, few keys) find a key by id by reading the namespace. Each process caches a
lookup for at most ``cache_s`` (0.5 s): a key revoked through any replica is refused by every replica
within that time (the issue asks for 1 s), and a busy key costs two store reads per second per replica
instead of one per request. A secret that matched no key is cached the same way, so a client retrying a
wrong key costs no store read per request; this cannot delay a new key, whose secret is random and only
exists (and so can only be looked up) after it was created.
"""

from __future__ import annotations

import time
from typing import Any

from coe.errors import NotFound, clip
from coe.keys.model import KeyCreate, VirtualKey, hash_secret, new_secret
from coe.store.base import StateStore

KEYS_NS = "vkeys"


class KeyRing:
    def __init__(self, store: StateStore, *, cache_s: float = 0.5) -> None:
        self.store = store
        self.cache_s = cache_s
        self._cache: dict[str, tuple[float, VirtualKey | None]] = {}

    async def create(self, spec: KeyCreate) -> tuple[VirtualKey, str]:
        """A new key and its secret (shown once: only the hash is kept)."""
        secret = new_secret()
        key = VirtualKey.create(spec, secret)
        await self.store.put(KEYS_NS, key.secret_hash, key.model_dump())
        return key, secret

    async def list(self) -> list[VirtualKey]:
        keys = [VirtualKey.model_validate(d) for d in (await self.store.items(KEYS_NS)).values()]
        return sorted(keys, key=lambda k: (-k.created_at, k.id))

    async def get(self, key_id: str) -> VirtualKey:
        for key in await self.list():
            if key.id == key_id:
                return key
        raise NotFound(f"no key with id {clip(key_id)}", param="key_id", code="key_not_found")

    async def revoke(self, key_id: str) -> VirtualKey:
        """Marks the key revoked (kept, so its usage stays readable); idempotent."""
        key = await self.get(key_id)
        if key.revoked_at is None:
            key.revoked_at = int(time.time())
            await self.store.put(KEYS_NS, key.secret_hash, key.model_dump())
        self._cache.pop(key.secret_hash, None)
        return key

    async def lookup(self, secret: str, now: float | None = None) -> VirtualKey | None:
        """The usable key with this secret, or None (unknown, revoked, expired)."""
        now = time.time() if now is None else now
        digest = hash_secret(secret)
        hit = self._cache.get(digest)
        if hit is not None and now - hit[0] < self.cache_s:
            key = hit[1]
        else:
            doc: dict[str, Any] | None = await self.store.get(KEYS_NS, digest)
            key = None if doc is None else VirtualKey.model_validate(doc)
            if len(self._cache) > 10_000:  # bounded, whatever tokens come (a flood of random ones clears it)
                self._cache.clear()
            self._cache[digest] = (now, key)  # an unknown secret too: no store read per retry of a wrong key
        return key if key is not None and key.usable(now) else None
