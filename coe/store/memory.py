"""The reference ``StateStore``: a dict in this process, lost when coe stops.

It still round-trips every document through the same JSON envelope as Redis,
so a caller that works here (no shared mutable state, JSON-only values) works
against Redis too. The read-or-write of each method runs without awaiting (a big
record is encoded or decoded in a thread before or after it), so on one event
loop every operation, ``put_if_absent`` included, is atomic. Records are kept as exact-size
copies (``encode(keep=True)``): what orjson hands back is over-allocated.
"""

from __future__ import annotations

from typing import Any

from coe.store.base import StateStore, check_key, check_namespace, decode, decode_async, encode, encode_async


class MemoryStore(StateStore):
    """In-process store: the default when no Redis URL is configured."""

    durable = False

    def __init__(self) -> None:
        self._data: dict[str, dict[str, bytes]] = {}

    async def get(self, namespace: str, key: str) -> dict[str, Any] | None:
        raw = self._data.get(check_namespace(namespace), {}).get(check_key(key))
        return None if raw is None else await decode_async(namespace, key, raw)

    async def put(self, namespace: str, key: str, doc: dict[str, Any]) -> None:
        raw = await encode_async(check_namespace(namespace), check_key(key), doc, keep=True)
        self._data.setdefault(namespace, {})[key] = raw

    async def put_if_absent(self, namespace: str, key: str, doc: dict[str, Any], *,
                            given: tuple[str, str] | None = None) -> bool:
        raw = encode(check_namespace(namespace), check_key(key), doc, keep=True)
        if given is not None and check_key(given[1]) not in self._data.get(check_namespace(given[0]), {}):
            return False
        bucket = self._data.setdefault(namespace, {})
        if key in bucket:
            return False
        bucket[key] = raw
        return True

    async def delete(self, namespace: str, key: str) -> bool:
        bucket = self._data.get(check_namespace(namespace))
        if bucket is None or check_key(key) not in bucket:
            return False
        del bucket[key]
        if not bucket:
            del self._data[namespace]
        return True

    async def drop(self, namespace: str) -> bool:
        return bool(self._data.pop(check_namespace(namespace), None))

    async def items(self, namespace: str) -> dict[str, dict[str, Any]]:
        bucket = self._data.get(check_namespace(namespace), {})
        return {key: decode(namespace, key, raw) for key, raw in bucket.items()}

    async def count(self, namespace: str) -> int:
        return len(self._data.get(check_namespace(namespace), {}))

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None

