"""``StateStore`` on Redis: state that survives restarts of coe and is shared by its replicas.

Layout: one hash per namespace at ``{prefix}:{namespace}``, one field per key,
each value a JSON envelope (see ``coe.store.base``). ``put_if_absent`` is
``HSETNX`` (with ``given``, a Lua script), atomic on the server; ``drop`` is
``UNLINK`` of the namespace's hash. Counters (``add_counters``) are separate keys at
``{prefix}:{namespace}:{key}`` (a string, or a sorted set for a sliding log), checked and added in one
Lua script. Every redis-py error becomes a ``StoreError``
whose message names the operation and the server, never its password.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import NoScriptError, RedisError

from coe.errors import StoreError
from coe.store.base import (
    Counted,
    Counter,
    StateStore,
    check_key,
    check_namespace,
    decode,
    decode_async,
    encode,
    encode_async,
)

_SET_GIVEN = ("if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 then "
              "return redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[3]) end return 0")
"""``put_if_absent(given=...)``: KEYS = the hash written, the hash checked; ARGV = field, checked field, value."""

_ACQUIRE = ("if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then "
            "return redis.call('INCR', KEYS[2]) end return false")
"""``acquire_lease``: KEYS = the lease, its fencing counter; ARGV = owner, milliseconds. Token and lease in
one step, so a token is never issued for a lease that was not taken."""

_RELEASE = ("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0")
"""``release_lease``: delete the lease only while ``owner`` holds it (not one that expired and was retaken)."""

_COUNTERS = """
local now, nonce, n = tonumber(ARGV[1]), ARGV[2], #KEYS
local cur, retry, refused, never = {}, 0, false, false
for i = 1, n do
  local b = 2 + (i - 1) * 4
  local add, lim, slide = tonumber(ARGV[b + 1]), ARGV[b + 2], tonumber(ARGV[b + 4])
  if slide > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - slide)
    cur[i] = redis.call('ZCARD', KEYS[i])
  else
    cur[i] = tonumber(redis.call('GET', KEYS[i]) or '0')
  end
  if lim ~= '' and add > 0 and cur[i] + add > tonumber(lim) then
    refused = true
    local wait = -1
    if slide > 0 then
      local first = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
      wait = slide
      if first[2] then wait = tonumber(first[2]) + slide - now end
    else
      wait = redis.call('PTTL', KEYS[i])
    end
    if wait < 0 then never = true elseif wait > retry then retry = wait end
  end
end
if not refused then
  for i = 1, n do
    local b = 2 + (i - 1) * 4
    local add, ttl, slide = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
    if slide > 0 then
      if add > 0 then
        for j = 1, add do redis.call('ZADD', KEYS[i], now, nonce .. ':' .. j) end
        redis.call('PEXPIRE', KEYS[i], math.ceil(slide))
      elseif add < 0 then
        redis.call('ZPOPMAX', KEYS[i], -add)
      end
      cur[i] = redis.call('ZCARD', KEYS[i])
    elseif add ~= 0 then
      cur[i] = tonumber(redis.call('INCRBYFLOAT', KEYS[i], ARGV[b + 1]))
      if ttl > 0 and redis.call('PTTL', KEYS[i]) < 0 then redis.call('PEXPIRE', KEYS[i], math.ceil(ttl)) end
    end
  end
end
local out = {refused and 0 or 1, never and '-1' or tostring(retry)}
for i = 1, n do out[#out + 1] = tostring(cur[i]) end
return out
"""
"""``add_counters``: ARGV = now (ms), a nonce, then per key: add, limit ('' = none), ttl (ms, 0 = kept),
sliding window (ms, 0 = a plain number). Numbers go back as strings: Redis would truncate Lua floats."""


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
        self._counters = client.register_script(_COUNTERS)  # EVALSHA; loads itself on first use

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

    async def add_counters(self, namespace: str, counters: Sequence[Counter], *, now: float | None = None
                           ) -> Counted:
        now_ms = (time.time() if now is None else now) * 1000
        keys = [f"{self._key(namespace)}:{check_key(c.key)}" for c in counters]
        args: list[str | float] = [now_ms, uuid.uuid4().hex]
        for c in counters:
            args += [repr(float(c.add)), "" if c.limit is None else repr(float(c.limit)),
                     0 if c.ttl_s is None else c.ttl_s * 1000, 0 if c.sliding_s is None else c.sliding_s * 1000]
        async with self._errors(f"add_counters {namespace}"):
            try:  # EVALSHA straight: the script object's own call costs more than the command on loopback
                raw = await self._client.evalsha(self._counters.sha, len(keys), *keys, *args)
            except NoScriptError:  # a restarted or flushed server: load it again
                raw = await self._counters(keys=keys, args=args)
        out = [x.decode() if isinstance(x, bytes) else str(x) for x in raw[2:]]
        retry = float(raw[1])
        return Counted(bool(int(raw[0])), [float(x) for x in out],
                       None if int(raw[0]) else (None if retry < 0 else retry / 1000))

    def _expiring_key(self, namespace: str, key: str) -> str:
        return f"{self._prefix}:@expiring:{check_namespace(namespace)}:{check_key(key)}"

    async def put_expiring(self, namespace: str, key: str, doc: dict[str, Any], ttl_s: float) -> None:
        raw = await encode_async(namespace, key, doc)
        async with self._errors(f"put_expiring {namespace}/{key}"):
            await self._client.set(self._expiring_key(namespace, key), raw, px=max(1, int(ttl_s * 1000)))

    async def get_expiring(self, namespace: str, key: str) -> dict[str, Any] | None:
        async with self._errors(f"get_expiring {namespace}/{key}"):
            raw = await self._client.get(self._expiring_key(namespace, key))
        return None if raw is None else await decode_async(namespace, key, raw)

    def _lease_key(self, name: str) -> str:
        """``@`` is not allowed in namespaces: no lease key can be a namespace's hash or counter."""
        return f"{self._prefix}:@lease:{check_key(name)}"

    async def acquire_lease(self, name: str, owner: str, ttl_s: float) -> int | None:
        key = self._lease_key(name)
        async with self._errors(f"acquire lease {name}"):
            token = await self._client.eval(_ACQUIRE, 2, key, f"{key}:fence", owner, max(1, int(ttl_s * 1000)))
        return None if token is None else int(token)

    async def release_lease(self, name: str, owner: str) -> bool:
        async with self._errors(f"release lease {name}"):
            removed = await self._client.eval(_RELEASE, 1, self._lease_key(name), owner)
        return bool(removed)

    async def ping(self) -> None:
        async with self._errors("ping"):
            await self._client.ping()

    async def close(self) -> None:
        if self._owns_client:
            async with self._errors("close"):
                await self._client.aclose()
