"""``StateStore`` on Redis: state that survives restarts of coe and is shared by its replicas.

Layout: one hash per namespace at ``{prefix}:{namespace}``, one field per key,
each value a JSON envelope (see ``coe.store.base``). ``put_if_absent`` is
``HSETNX`` (with ``given``, a Lua script), atomic on the server; ``drop`` is
``UNLINK`` of the namespace's hash. Every redis-py error becomes a ``StoreError``
whose message names the operation and the server, never its password.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisError

from coe.errors import StoreError
from coe.store.base import StateStore, check_key, check_namespace, decode, decode_async, encode, encode_async

_SET_GIVEN = ("if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 then "
              "return redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[3]) end return 0")
"""``put_if_absent(given=...)``: KEYS = the hash written, the hash checked; ARGV = field, checked field, value."""


def redact(url: str) -> str:
    """``url`` without credentials, for error messages and logs."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix://{parts.path}"
    host = parts.hostname or "localhost"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class RedisStore(StateStore):
    """Durable store on a Redis server (``redis://``, ``rediss://`` or ``unix://`` URL)."""

    durable = True

    def __init__(
        self, client: Redis, *, prefix: str = "coe", where: str = "redis", owns_client: bool = False
    ) -> None:
        """Wrap ``client``; ``where`` names the server in errors, ``owns_client`` lets close() close it."""
        self._client = client
        self._prefix = prefix
        self._where = where
        self._owns_client = owns_client

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "coe",
        timeout_s: float = 5.0,
        retries: int = 3,
    ) -> RedisStore:
        """A store with its own connection pool; nothing connects until the first command.

        Retries are few and short so a health check on a dead server answers in
        about a second instead of redis-py's default of ten retries.
        """
        client = Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries),
        )
        return cls(client, prefix=prefix, where=redact(url), owns_client=True)

    def _key(self, namespace: str) -> str:
        return f"{self._prefix}:{check_namespace(namespace)}"

    @asynccontextmanager
    async def _errors(self, what: str) -> AsyncIterator[None]:
        try:
            yield
        except (RedisError, OSError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            raise StoreError(f"state store {self._where}: {what} failed: {reason}") from exc

    async def get(self, namespace: str, key: str) -> dict[str, Any] | None:
        async with self._errors(f"get {namespace}/{key}"):
            raw = await self._client.hget(self._key(namespace), check_key(key))
        return None if raw is None else await decode_async(namespace, key, raw)

    async def put(self, namespace: str, key: str, doc: dict[str, Any]) -> None:
        raw = await encode_async(namespace, check_key(key), doc)
        async with self._errors(f"put {namespace}/{key}"):
            await self._client.hset(self._key(namespace), key, raw)

    async def put_if_absent(self, namespace: str, key: str, doc: dict[str, Any], *,
                            given: tuple[str, str] | None = None) -> bool:
        """``HSETNX`` (with ``given``: a Lua script, ``HEXISTS`` then ``HSETNX``, atomic on the server).
        If the connection drops after the server applied it, the retry sees the key taken and reports
        False: rare, and safe for create-once callers."""
        raw = encode(namespace, check_key(key), doc)
        async with self._errors(f"put_if_absent {namespace}/{key}"):
            if given is None:
                written: int = await self._client.hsetnx(self._key(namespace), key, raw)
            else:
                written = await self._client.eval(_SET_GIVEN, 2, self._key(namespace), self._key(given[0]), key,
                                                  check_key(given[1]), raw)
        return bool(written)

    async def delete(self, namespace: str, key: str) -> bool:
        async with self._errors(f"delete {namespace}/{key}"):
            removed: int = await self._client.hdel(self._key(namespace), check_key(key))
        return bool(removed)

    async def drop(self, namespace: str) -> bool:
        """``UNLINK``: the server frees a big hash in the background instead of blocking on it."""
        async with self._errors(f"drop {namespace}"):
            removed: int = await self._client.unlink(self._key(namespace))
        return bool(removed)

    async def items(self, namespace: str) -> dict[str, dict[str, Any]]:
        async with self._errors(f"items {namespace}"):
            raw = await self._client.hgetall(self._key(namespace))
        out: dict[str, dict[str, Any]] = {}
        for field, value in raw.items():
            try:
                key = field.decode("utf-8") if isinstance(field, bytes) else field
            except UnicodeDecodeError as exc:
                where = f"state store {self._where}: items {namespace}"
                raise StoreError(f"{where}: key {field!r} is not UTF-8") from exc
            out[key] = decode(namespace, key, value)
        return out

    async def count(self, namespace: str) -> int:
        async with self._errors(f"count {namespace}"):
            n: int = await self._client.hlen(self._key(check_namespace(namespace)))
        return n

    async def ping(self) -> None:
        async with self._errors("ping"):
            await self._client.ping()

    async def close(self) -> None:
        if self._owns_client:
            async with self._errors("close"):
                await self._client.aclose()
