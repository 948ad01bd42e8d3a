"""Conformance suite for ``coe.store``: every ``StateStore`` must pass the same tests.

The store tests run against the in-memory reference and against a real
``redis-server`` started for this session (never the machine's own Redis), and
the Redis-only tests cover what memory cannot: a crash and restart of an
append-only server, an unreachable server, the on-disk layout.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError
from redis_server import RedisServer, free_port, redis_factory_fixture, redis_server_fixture

from coe.config import StoreConfig
from coe.errors import ConfigError, StoreError
from coe.store import ENV_URL, STORES, MemoryStore, StateStore, open_store
from coe.store.base import SCHEMA_VERSION
from coe.store.redis import RedisStore

redis_server = redis_server_fixture(scope="session")
redis_factory = redis_factory_fixture()

MakeServer = Callable[..., RedisServer]


@dataclass
class Harness:
    """A store under test plus a way to plant raw bytes in it (old or foreign records)."""

    store: StateStore
    write_raw: Callable[[str, str, bytes], Awaitable[None]]


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    if request.param == "memory":
        memory = MemoryStore()

        async def write_memory(namespace: str, key: str, raw: bytes) -> None:
            memory._data.setdefault(namespace, {})[key] = raw

        yield Harness(memory, write_memory)
        await memory.close()
        return

    server: RedisServer = request.getfixturevalue("redis_server")
    prefix = f"t{uuid.uuid4().hex[:12]}"  # a fresh prefix per test: no state leaks between tests
    store = RedisStore.from_url(server.url, prefix=prefix)
    raw_client = Redis.from_url(server.url)

    async def write_redis(namespace: str, key: str, raw: bytes) -> None:
        await raw_client.hset(f"{prefix}:{namespace}", key, raw)

    yield Harness(store, write_redis)
    await store.close()
    await raw_client.aclose()


@pytest.fixture
def store(harness: Harness) -> StateStore:
    return harness.store


DOC: dict[str, Any] = {
    "name": "math-expert",
    "skills": ["algebra", "calculus"],
    "params": {"temperature": 0.2, "max_tokens": 512, "stop": None},
    "enabled": True,
    "big": 2**53 + 1,
    "nested": {"list": [1, [2, [3, {"four": 4.5}]]], "empty": {}, "none": []},
}


# --- every method --------------------------------------------------------------


async def test_missing_key_and_empty_namespace(store: StateStore) -> None:
    assert await store.get("experts", "nope") is None
    assert await store.items("experts") == {}
    assert await store.delete("experts", "nope") is False


async def test_put_then_get_round_trips_json(store: StateStore) -> None:
    await store.put("experts", "math", DOC)
    assert await store.get("experts", "math") == DOC


async def test_put_replaces(store: StateStore) -> None:
    await store.put("experts", "math", {"version": 1})
    await store.put("experts", "math", {"version": 2})
    assert await store.get("experts", "math") == {"version": 2}
    assert await store.items("experts") == {"math": {"version": 2}}


async def test_documents_are_copies(store: StateStore) -> None:
    doc: dict[str, Any] = {"skills": ["a"]}
    await store.put("experts", "k", doc)
    doc["skills"].append("changed after put")
    got = await store.get("experts", "k")
    assert got == {"skills": ["a"]}
    assert got is not None
    got["skills"].append("changed after get")
    assert await store.get("experts", "k") == {"skills": ["a"]}


async def test_put_if_absent(store: StateStore) -> None:
    assert await store.put_if_absent("experts", "k", {"n": 1}) is True
    assert await store.put_if_absent("experts", "k", {"n": 2}) is False
    assert await store.get("experts", "k") == {"n": 1}
    assert await store.delete("experts", "k") is True
    assert await store.put_if_absent("experts", "k", {"n": 3}) is True
    assert await store.get("experts", "k") == {"n": 3}


async def test_put_if_absent_given_another_document(store: StateStore) -> None:
    """``given``: written only while that other document exists, checked in the same atomic step."""
    assert await store.put_if_absent("results", "item", {"n": 1}, given=("marks", "item")) is False
    assert await store.items("results") == {}
    await store.put("marks", "item", {})
    assert await store.put_if_absent("results", "item", {"n": 2}, given=("marks", "other")) is False
    assert await store.put_if_absent("results", "item", {"n": 3}, given=("marks", "item")) is True
    assert await store.put_if_absent("results", "item", {"n": 4}, given=("marks", "item")) is False
    assert await store.get("results", "item") == {"n": 3}
    await store.drop("marks")
    await store.drop("results")
    assert await store.put_if_absent("results", "item", {"n": 5}, given=("marks", "item")) is False
    assert await store.count("results") == 0
    ok = await asyncio.gather(*(store.put_if_absent("r", "once", {"w": i}, given=("results", "item"))
                                for i in range(10)))
    assert sum(ok) == 0
    await store.put("m", "k", {})
    ok = await asyncio.gather(*(store.put_if_absent("r", "once", {"w": i}, given=("m", "k")) for i in range(10)))
    assert sum(ok) == 1 and await store.get("r", "once") == {"w": ok.index(True)}


async def test_drop(store: StateStore) -> None:
    for i in range(50):
        await store.put("batch-results.b1", f"item-{i}", {"i": i})
    await store.put("batch-results.b2", "item-0", {"i": 0})
    assert await store.drop("batch-results.b1") is True
    assert await store.drop("batch-results.b1") is False
    assert await store.count("batch-results.b1") == 0
    assert await store.items("batch-results.b1") == {}
    assert await store.get("batch-results.b1", "item-3") is None
    assert await store.items("batch-results.b2") == {"item-0": {"i": 0}}
    assert await store.put_if_absent("batch-results.b1", "item-3", {"again": True}) is True
    assert await store.drop("never-written") is False
    with pytest.raises(ValueError):
        await store.drop("bad:namespace")


async def test_memory_store_keeps_records_at_their_size() -> None:
    """orjson over-allocates what it returns (at least 4 KiB for a small record): the in-memory store keeps
    exact-size copies, or one small record per batch item costs 4 KiB (2.6 GiB for 330k items)."""
    store = MemoryStore()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for i in range(2000):
            await store.put_if_absent("batch-results.b", f"item-{i}", {"line": i, "status": 0, "skipped": True})
            await store.put("batch-skipped.b", f"item-{i}", {})
        grown = sum(d.size_diff for d in tracemalloc.take_snapshot().compare_to(before, "filename"))
    finally:
        tracemalloc.stop()
    assert grown < 2000 * 1024, f"{grown / 2000:.0f} bytes per item (two small records)"


async def test_delete(store: StateStore) -> None:
    await store.put("experts", "a", {"x": 1})
    await store.put("experts", "b", {"x": 2})
    assert await store.delete("experts", "a") is True
    assert await store.delete("experts", "a") is False
    assert await store.get("experts", "a") is None
    assert await store.items("experts") == {"b": {"x": 2}}
    assert await store.delete("experts", "b") is True
    assert await store.items("experts") == {}


async def test_count(store: StateStore) -> None:
    assert await store.count("ns") == 0
    for i in range(3):
        await store.put("ns", f"k{i}", {"i": i})
    await store.put("other", "k", {})
    assert await store.count("ns") == 3
    await store.delete("ns", "k0")
    assert await store.count("ns") == 2


async def test_items(store: StateStore) -> None:
    docs = {f"expert-{i}": {"i": i, "tags": ["t"] * i} for i in range(5)}
    for key, doc in docs.items():
        await store.put("experts", key, doc)
    assert await store.items("experts") == docs


async def test_ping_and_close(harness: Harness) -> None:
    await harness.store.ping()
    async with harness.store as entered:
        assert entered is harness.store


def test_durable_flag(store: StateStore) -> None:
    assert store.durable is isinstance(store, RedisStore)


# --- namespaces, concurrency, unicode ------------------------------------------


async def test_namespaces_are_independent(store: StateStore) -> None:
    await store.put("experts", "same", {"ns": "experts"})
    await store.put("batches", "same", {"ns": "batches"})
    assert await store.get("experts", "same") == {"ns": "experts"}
    assert await store.get("batches", "same") == {"ns": "batches"}
    assert await store.put_if_absent("files", "same", {"ns": "files"}) is True
    assert await store.delete("experts", "same") is True
    assert await store.get("batches", "same") == {"ns": "batches"}
    assert await store.items("experts") == {}
    assert await store.items("batches") == {"same": {"ns": "batches"}}
    assert await store.items("files") == {"same": {"ns": "files"}}


async def test_put_if_absent_is_atomic_under_concurrency(store: StateStore) -> None:
    results = await asyncio.gather(*(store.put_if_absent("jobs", "once", {"writer": i}) for i in range(20)))
    assert sum(results) == 1
    winner = results.index(True)
    assert await store.get("jobs", "once") == {"writer": winner}
    assert await store.items("jobs") == {"once": {"writer": winner}}


async def test_concurrent_puts_on_distinct_keys(store: StateStore) -> None:
    await asyncio.gather(*(store.put("jobs", f"job-{i}", {"i": i}) for i in range(20)))
    assert await store.items("jobs") == {f"job-{i}": {"i": i} for i in range(20)}


UNICODE_DOCS = {
    "ключ": {"text": "Привет, мир"},
    "鍵🔑": {"text": "你好\uff0c世界 🌍", "family": "\U0001f469\u200d\U0001f469\u200d\U0001f467"},
    "e\u0301": {"text": "combining e\u0301 vs precomposed \u00e9", "rtl": "مرحبا بالعالم"},
    "quote\"back\\slash\nnewline": {"text": "\u0000 nul and \t tab", "astral": "\U0001f600"},
}


async def test_unicode_keys_and_values(store: StateStore) -> None:
    for key, doc in UNICODE_DOCS.items():
        assert await store.put_if_absent("experts", key, doc) is True
    for key, doc in UNICODE_DOCS.items():
        assert await store.get("experts", key) == doc
    assert await store.items("experts") == UNICODE_DOCS
    assert await store.get("experts", "\u00e9") is None  # precomposed é is not e + combining accent


# --- records and documents the store must refuse --------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"v": 99, "doc": {"from": "the future"}}', "schema version 99"),
        (b'{"v": "1", "doc": {}}', "schema version '1'"),
        (b'{"v": true, "doc": {}}', "schema version True"),
        (b'{"name": "no envelope"}', "no schema envelope"),
        (b'{"v": 1, "doc": [1, 2]}', "not a JSON object"),
        (b"\x80\x04\x95 pickle, not json", "not valid JSON"),
    ],
)
async def test_unreadable_record_raises_store_error(harness: Harness, raw: bytes, message: str) -> None:
    await harness.write_raw("experts", "odd", raw)
    with pytest.raises(StoreError, match=message) as info:
        await harness.store.get("experts", "odd")
    assert "experts/odd" in str(info.value)
    with pytest.raises(StoreError, match=message):
        await harness.store.items("experts")
    # The record can still be removed, and current records stay readable.
    assert await harness.store.delete("experts", "odd") is True
    await harness.store.put("experts", "ok", {"fine": True})
    assert await harness.store.items("experts") == {"ok": {"fine": True}}


async def test_current_version_record_is_readable(harness: Harness) -> None:
    await harness.write_raw("experts", "k", orjson.dumps({"v": SCHEMA_VERSION, "doc": {"a": 1}}))
    assert await harness.store.get("experts", "k") == {"a": 1}


@pytest.mark.parametrize(
    "doc",
    [
        {"when": datetime(2025, 1, 1, tzinfo=UTC)},
        {"tags": {"a", "b"}},
        {1: "non-string key"},
        {"obj": object()},
    ],
    ids=["datetime", "set", "int-key", "object"],
)
async def test_non_json_document_is_refused(store: StateStore, doc: dict[Any, Any]) -> None:
    with pytest.raises(StoreError, match="not JSON-serialisable"):
        await store.put("experts", "bad", doc)
    with pytest.raises(StoreError):
        await store.put_if_absent("experts", "bad", doc)
    assert await store.get("experts", "bad") is None


async def test_non_dict_document_is_refused(store: StateStore) -> None:
    with pytest.raises(StoreError, match="JSON objects"):
        await store.put("experts", "bad", ["a", "list"])  # type: ignore[arg-type]


@pytest.mark.parametrize("namespace", ["", "a:b", "with space", "x" * 65])
async def test_invalid_namespace_is_a_caller_bug(store: StateStore, namespace: str) -> None:
    with pytest.raises(ValueError, match="invalid store namespace"):
        await store.get(namespace, "k")
    with pytest.raises(ValueError, match="invalid store namespace"):
        await store.put(namespace, "k", {})
    with pytest.raises(ValueError, match="invalid store namespace"):
        await store.items(namespace)


# --- Redis only -----------------------------------------------------------------


@pytest.mark.redis
async def test_redis_layout_is_one_hash_per_namespace(redis_server: RedisServer) -> None:
    prefix = f"layout{uuid.uuid4().hex[:8]}"
    store = RedisStore.from_url(redis_server.url, prefix=prefix)
    raw = Redis.from_url(redis_server.url)
    try:
        await store.put("experts", "math", {"a": 1})
        await store.put("experts", "code", {"b": 2})
        await store.put("batches", "b1", {"c": 3})
        assert await raw.type(f"{prefix}:experts") == b"hash"
        assert await raw.hlen(f"{prefix}:experts") == 2
        record = await raw.hget(f"{prefix}:experts", "math")
        assert record is not None
        assert orjson.loads(record) == {"v": 1, "doc": {"a": 1}}
        expected = [f"{prefix}:batches".encode(), f"{prefix}:experts".encode()]
        assert sorted(await raw.keys(f"{prefix}:*")) == expected
    finally:
        await store.close()
        await raw.aclose()


@pytest.mark.redis
async def test_redis_data_survives_sigkill_and_restart(redis_factory: MakeServer) -> None:
    server = redis_factory(appendonly=True)
    store = RedisStore.from_url(server.url)
    await store.put("experts", "kept", DOC)
    assert await store.put_if_absent("experts", "created", {"n": 1}) is True
    await store.put("experts", "dropped", {"n": 2})
    assert await store.delete("experts", "dropped") is True
    await store.put("batches", "ünïcode-🔑", {"text": "日本語"})

    server.kill()
    server.restart()

    reopened = RedisStore.from_url(server.url)
    try:
        assert await reopened.items("experts") == {"kept": DOC, "created": {"n": 1}}
        assert await reopened.items("batches") == {"ünïcode-🔑": {"text": "日本語"}}
        assert await reopened.put_if_absent("experts", "created", {"n": 9}) is False
        # The store that was open across the crash reconnects by itself.
        assert await store.get("experts", "kept") == DOC
    finally:
        await reopened.close()
        await store.close()


@pytest.mark.redis
async def test_redis_ping_raises_store_error_when_down(redis_factory: MakeServer) -> None:
    server = redis_factory()
    store = RedisStore.from_url(server.url)
    try:
        await store.ping()
        await store.put("experts", "k", {"a": 1})
        server.kill()
        started = time.monotonic()
        with pytest.raises(StoreError, match="ping failed") as info:
            await store.ping()
        assert time.monotonic() - started < 10, "a dead server must be reported quickly"
        assert isinstance(info.value.__cause__, RedisError)
        for call in (store.get("experts", "k"), store.items("experts"), store.delete("experts", "k"),
                     store.put("experts", "k", {}), store.put_if_absent("experts", "j", {})):
            with pytest.raises(StoreError):
                await call
        server.restart()  # not append-only: the data is gone, but the store works again
        await store.ping()
        assert await store.get("experts", "k") is None
    finally:
        await store.close()


async def test_redis_errors_never_show_the_password() -> None:
    store = RedisStore.from_url(f"redis://admin:s3cret-pw@127.0.0.1:{free_port()}/0", retries=0)
    try:
        with pytest.raises(StoreError) as info:
            await store.ping()
        assert "s3cret-pw" not in str(info.value)
        assert "redis://127.0.0.1:" in str(info.value)
    finally:
        await store.close()


# --- open_store -----------------------------------------------------------------


def test_registry_covers_redis_schemes() -> None:
    assert {"redis", "rediss", "unix", "memory"} <= set(STORES)


async def test_open_store_defaults_to_memory() -> None:
    store = open_store(StoreConfig(), environ={})
    assert isinstance(store, MemoryStore)
    assert store.durable is False
    assert isinstance(open_store(environ={}), MemoryStore)


@pytest.mark.redis
async def test_open_store_redis_url_uses_prefix(redis_server: RedisServer) -> None:
    prefix = f"cfg{uuid.uuid4().hex[:8]}"
    store = open_store(StoreConfig(redis_url=redis_server.url, prefix=prefix), environ={})
    raw = Redis.from_url(redis_server.url)
    try:
        assert isinstance(store, RedisStore)
        assert store.durable is True
        await store.ping()
        await store.put("experts", "k", {"a": 1})
        assert await raw.hexists(f"{prefix}:experts", "k")
    finally:
        await store.close()
        await raw.aclose()


@pytest.mark.redis
async def test_env_var_overrides_config(redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = StoreConfig(redis_url=f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    store = open_store(cfg, environ={ENV_URL: redis_server.url})
    try:
        await store.ping()
    finally:
        await store.close()
    monkeypatch.setenv(ENV_URL, "memory://")
    assert isinstance(open_store(cfg), MemoryStore)
    monkeypatch.setenv(ENV_URL, redis_server.url)
    from_os = open_store(StoreConfig())
    try:
        assert isinstance(from_os, RedisStore)
        await from_os.ping()
    finally:
        await from_os.close()


@pytest.mark.redis
async def test_open_store_unix_socket(redis_server: RedisServer) -> None:
    store = open_store(StoreConfig(redis_url=redis_server.unix_url), environ={})
    try:
        assert isinstance(store, RedisStore)
        await store.ping()
        await store.put("experts", "via-unix", {"ok": True})
        assert await store.get("experts", "via-unix") == {"ok": True}
        assert await store.delete("experts", "via-unix") is True
    finally:
        await store.close()


async def test_open_store_rediss_does_not_connect_at_open() -> None:
    store = open_store(StoreConfig(redis_url="rediss://user:pw@redis.invalid:6380/0"), environ={})
    assert isinstance(store, RedisStore)
    await store.close()


@pytest.mark.parametrize(
    ("cfg_url", "env", "source"),
    [
        ("http://localhost:6379", {}, "store.redis_url"),
        (None, {ENV_URL: "postgres://db/coe"}, ENV_URL),
        ("localhost:6379", {}, "store.redis_url"),
    ],
)
def test_unknown_scheme_is_a_config_error(cfg_url: str | None, env: dict[str, str], source: str) -> None:
    with pytest.raises(ConfigError, match="unsupported store URL scheme") as info:
        open_store(StoreConfig(redis_url=cfg_url), environ=env)
    assert str(info.value).startswith(f"{source}:")
    assert "redis://" in str(info.value)


def test_importing_coe_store_does_not_import_redis() -> None:
    code = "import sys, coe.store; assert 'redis' not in sys.modules, 'redis imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, ENV_URL: ""})


# Counters (``add_counters``): the atomic step under virtual keys' limits (``coe.keys.limits``).

async def test_counters_sliding_window_admits_exactly_limit_in_any_window(store: StateStore) -> None:
    from coe.store.base import Counter
    c = Counter("k:req", 1, limit=3, sliding_s=60)
    t0 = 1_000_000.0
    got = [(await store.add_counters("ctr", [c], now=t0 + i)).admitted for i in range(5)]
    assert got == [True, True, True, False, False]
    refused = await store.add_counters("ctr", [c], now=t0 + 59.5)  # a fixed minute would have reset by now
    assert not refused.admitted and refused.retry_after_s == pytest.approx(0.5, abs=0.01)
    assert (await store.add_counters("ctr", [c], now=t0 + 60.01)).admitted  # the first one left the window
    assert not (await store.add_counters("ctr", [c], now=t0 + 60.5)).admitted


async def test_counters_sliding_negative_add_takes_back_the_newest_events(store: StateStore) -> None:
    """How a limiter returns the unused part of a lease: the newest events go, the oldest keep their time."""
    from coe.store.base import Counter
    t0 = 1_000_000.0
    await store.add_counters("ctr", [Counter("l", 1, limit=10, sliding_s=60)], now=t0)
    await store.add_counters("ctr", [Counter("l", 4, limit=10, sliding_s=60)], now=t0 + 30)
    back = await store.add_counters("ctr", [Counter("l", -3, limit=10, sliding_s=60)], now=t0 + 31)
    assert back.admitted and back.values == [2.0]
    assert (await store.add_counters("ctr", [Counter("l", -5, sliding_s=60)], now=t0 + 31)).values == [0.0]
    await store.add_counters("ctr", [Counter("l", 2, limit=10, sliding_s=60)], now=t0 + 40)
    await store.add_counters("ctr", [Counter("l", -1, sliding_s=60)], now=t0 + 41)  # takes one from t0+40
    assert (await store.add_counters("ctr", [Counter("l", 0, sliding_s=60)], now=t0 + 99)).values == [1.0]
    assert (await store.add_counters("ctr", [Counter("l", 0, sliding_s=60)], now=t0 + 100.5)).values == [0.0]


async def test_counters_are_all_or_nothing_and_reconcile_down(store: StateStore) -> None:
    from coe.store.base import Counter
    ok = await store.add_counters("ctr", [Counter("a", 5, limit=10, ttl_s=60), Counter("b", 0.25, limit=1.0)])
    assert ok.admitted and ok.values == [5.0, 0.25]
    refused = await store.add_counters("ctr", [Counter("a", 1, limit=10, ttl_s=60), Counter("b", 0.8, limit=1.0)])
    assert not refused.admitted and refused.values == [5.0, 0.25]  # neither counter moved
    assert refused.retry_after_s is None  # "b" has no window: it never frees up by itself
    down = await store.add_counters("ctr", [Counter("a", -3, limit=10), Counter("b", -0.125)])
    assert down.admitted and down.values == [2.0, 0.125]


async def test_counters_fixed_window_expires(store: StateStore) -> None:
    from coe.store.base import Counter
    c = Counter("w", 2, limit=2, ttl_s=0.3)
    assert (await store.add_counters("ctr", [c])).admitted
    refused = await store.add_counters("ctr", [c])
    assert not refused.admitted and 0 < (refused.retry_after_s or 0) <= 0.3
    await asyncio.sleep(0.35)
    assert (await store.add_counters("ctr", [c])).admitted


async def test_counters_concurrent_adders_never_pass_the_limit(store: StateStore) -> None:
    from coe.store.base import Counter
    c = Counter("n", 1, limit=25, sliding_s=60)
    results = await asyncio.gather(*(store.add_counters("ctr", [c]) for _ in range(60)))
    assert sum(r.admitted for r in results) == 25


async def test_leases_are_exclusive_fenced_and_expire(store: StateStore) -> None:
    """``acquire_lease``/``release_lease`` (the cross-process adapter lock): one holder at a time, a larger
    fencing token for each later holder, only the holder releases, and a lease nobody releases expires."""
    first = await store.acquire_lease("adapter:x", "a", 5.0)
    assert first is not None
    assert await store.acquire_lease("adapter:x", "b", 5.0) is None
    assert await store.acquire_lease("adapter:y", "b", 5.0) is not None  # other names are independent
    assert not await store.release_lease("adapter:x", "b")
    assert await store.release_lease("adapter:x", "a")
    assert not await store.release_lease("adapter:x", "a")
    second = await store.acquire_lease("adapter:x", "b", 0.2)
    assert second is not None and second > first
    await asyncio.sleep(0.3)  # b "crashed": its lease runs out by itself
    third = await store.acquire_lease("adapter:x", "c", 5.0)
    assert third is not None and third > second
    assert not await store.release_lease("adapter:x", "b")  # b's release after expiry finds c's lease
    assert await store.release_lease("adapter:x", "c")


async def test_expiring_documents_expire_and_stay_apart(store: StateStore) -> None:
    """``put_expiring``/``get_expiring`` (conversation sessions shared by replicas): read back until the
    time-to-live runs out, renewed by each write, and invisible to the namespace's ordinary documents."""
    await store.put_expiring("sessions", "s1", {"experts": ["law"]}, 0.4)
    assert await store.get_expiring("sessions", "s1") == {"experts": ["law"]}
    assert await store.get("sessions", "s1") is None and await store.count("sessions") == 0
    await asyncio.sleep(0.25)
    await store.put_expiring("sessions", "s1", {"experts": ["math"]}, 0.4)  # a new turn renews it
    await asyncio.sleep(0.25)
    assert await store.get_expiring("sessions", "s1") == {"experts": ["math"]}
    await asyncio.sleep(0.3)
    assert await store.get_expiring("sessions", "s1") is None
    assert await store.get_expiring("sessions", "never") is None
