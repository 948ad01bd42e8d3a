"""The state store interface: small JSON documents grouped in namespaces.

coe keeps a little state that must outlive one request: experts registered
through the API (an overlay over ``experts.yaml``), and later batch jobs and
files. ``StateStore`` is the one interface for it; ``MemoryStore`` is the
reference implementation (one process, lost on restart) and ``RedisStore`` the
durable one. Both pass the same conformance suite (``tests/test_store.py``).

Every record is stored as JSON inside a schema envelope ``{"v": 1, "doc": ...}``
so a later coe can change a document's shape and still recognise old records;
a record with a version this coe does not know raises ``StoreError`` rather
than being misread.
"""

from __future__ import annotations

import asyncio
import functools
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar

import orjson

from coe.errors import StoreError

SCHEMA_VERSION = 1
"""The envelope version this coe writes and reads."""

NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
"""Namespaces are chosen by code, not users; no ':' so Redis keys stay unambiguous."""

# Fail loudly on datetimes and dataclasses instead of letting orjson quietly turn
# them into strings and dicts that read back as a different type.
_DUMP_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS


def check_namespace(namespace: str) -> str:
    """Reject namespace names that would make store keys ambiguous (a bug in the caller)."""
    if not isinstance(namespace, str) or not NAMESPACE_RE.match(namespace):
        raise ValueError(f"invalid store namespace {namespace!r}: use 1-64 letters, digits, '_', '.' or '-'")
    return namespace


def check_key(key: str) -> str:
    if not isinstance(key, str):
        raise ValueError(f"store keys are strings, got {type(key).__name__}")
    return key


def encode(namespace: str, key: str, doc: dict[str, Any], *, keep: bool = False) -> bytes:
    """Wrap ``doc`` in the schema envelope and serialise it; JSON only, never pickle.

    ``keep``: the caller keeps the result (the in-memory store), so it gets an exact-size copy. orjson
    (3.12 and later) returns bytes whose allocation it never shrinks: at least 4 KiB for a 100-byte record,
    and about 15 times the length of a long string. Kept as is, one small record per batch item cost
    4 KiB each (a 330k-line batch: 2.6 GiB), and a 64 MiB file about 1 GiB of address space."""
    if not isinstance(doc, dict):
        raise StoreError(f"store {namespace}/{key}: documents are JSON objects, got {type(doc).__name__}")
    try:
        raw = orjson.dumps({"v": SCHEMA_VERSION, "doc": doc}, option=_DUMP_OPTIONS)
    except TypeError as exc:  # orjson.JSONEncodeError is a TypeError
        raise StoreError(f"store {namespace}/{key}: document is not JSON-serialisable: {exc}") from exc
    return bytes(memoryview(raw)) if keep else raw


BIG_RECORD = 1 << 20
"""Records above this many bytes (a batch input file) are encoded and decoded in a worker thread, so one
big file does not stall the event loop that serves every other request."""


async def encode_async(namespace: str, key: str, doc: dict[str, Any], *, keep: bool = False) -> bytes:
    """``encode``, off the event loop when the document's top-level strings are big."""
    if isinstance(doc, dict) and sum(len(v) for v in doc.values() if isinstance(v, str | bytes)) > BIG_RECORD:
        return await asyncio.to_thread(functools.partial(encode, namespace, key, doc, keep=keep))
    return encode(namespace, key, doc, keep=keep)


async def decode_async(namespace: str, key: str, raw: bytes | str) -> dict[str, Any]:
    """``decode``, off the event loop for a big record."""
    if len(raw) > BIG_RECORD:
        return await asyncio.to_thread(decode, namespace, key, raw)
    return decode(namespace, key, raw)


def decode(namespace: str, key: str, raw: bytes | str) -> dict[str, Any]:
    """Unwrap a stored record, refusing versions and shapes this coe does not understand."""
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise StoreError(f"store {namespace}/{key}: record is not valid JSON: {exc}") from exc
    if not isinstance(record, dict) or "v" not in record:
        raise StoreError(f"store {namespace}/{key}: record has no schema envelope {{'v': ..., 'doc': ...}}")
    version = record["v"]
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise StoreError(
            f"store {namespace}/{key}: record has schema version {version!r}, this coe reads version "
            f"{SCHEMA_VERSION}; it was written by another coe version (upgrade coe or delete the record)"
        )
    doc = record.get("doc")
    if not isinstance(doc, dict):
        raise StoreError(f"store {namespace}/{key}: record's 'doc' is not a JSON object")
    return doc


@dataclass(frozen=True)
class Counter:
    """One counter of an atomic ``StateStore.add_counters`` step (rate limits, token limits, budgets).

    ``add`` is added when the step is admitted; ``limit``: the step is refused when this counter would go
    above it (only a positive ``add`` can be refused, so reconciling down always lands). A counter is either
    a number that expires ``ttl_s`` after it was created (a fixed window or a budget period; None: kept),
    or, with ``sliding_s``, a log of events of which only those in the last ``sliding_s`` seconds count
    (``add`` is then a whole number of events; a negative ``add`` takes back that many of the newest events,
    how a rate limiter returns the unused part of a lease)."""

    key: str
    add: float
    limit: float | None = None
    ttl_s: float | None = None
    sliding_s: float | None = None


@dataclass(frozen=True)
class Counted:
    """What ``add_counters`` did: ``admitted``, each counter's value after the step (before it, when
    refused) in the order given, and when refused the seconds until the refusing counter has room
    (None: never by itself, a budget with no period)."""

    admitted: bool
    values: list[float]
    retry_after_s: float | None = None


class StateStore(ABC):
    """Async storage of small JSON documents, ``namespace -> key -> document``.

    Documents hold only JSON types (dict, list, str, int, float, bool, None) and
    come back as fresh copies, so mutating one never changes the store. Failures
    of the backing service raise ``coe.errors.StoreError``; an invalid namespace
    is a bug in the caller and raises ``ValueError``.
    """

    durable: ClassVar[bool]
    """Whether state survives a restart of coe (callers warn when it does not)."""

    @abstractmethod
    async def get(self, namespace: str, key: str) -> dict[str, Any] | None:
        """The document at ``key``, or None when there is none."""

    @abstractmethod
    async def put(self, namespace: str, key: str, doc: dict[str, Any]) -> None:
        """Create or replace the document at ``key``."""

    @abstractmethod
    async def put_if_absent(self, namespace: str, key: str, doc: dict[str, Any], *,
                            given: tuple[str, str] | None = None) -> bool:
        """Atomically create ``key`` unless it exists; True if this call wrote it.

        Exactly one of many concurrent callers for the same key gets True, which
        is what makes create-once operations (register an expert) race-free.
        ``given=(namespace, key)``: write only while that other document exists, checked
        in the same atomic step (a batch item's result only while its "begun" mark is
        there, so none lands after the batch's records were dropped).
        """

    @abstractmethod
    async def delete(self, namespace: str, key: str) -> bool:
        """Remove ``key``; True if it existed."""

    @abstractmethod
    async def drop(self, namespace: str) -> bool:
        """Remove every document of ``namespace`` at once; True if it held any. For state whose use has
        ended (a finished batch's per-item records), so that it does not stay in memory or in Redis."""

    @abstractmethod
    async def items(self, namespace: str) -> dict[str, dict[str, Any]]:
        """Every document in ``namespace``, by key (small namespaces: one round trip)."""

    @abstractmethod
    async def count(self, namespace: str) -> int:
        """How many documents ``namespace`` holds (without reading them)."""

    @abstractmethod
    async def add_counters(self, namespace: str, counters: Sequence[Counter], *, now: float | None = None
                           ) -> Counted:
        """Check every counter against its limit and, when none would go above it, add to all of them: one
        atomic step, so replicas sharing the store share one count (a request, its tokens and its cost are
        admitted together or not at all). ``now``: the clock in seconds (tests); default ``time.time()``.
        Counters live beside the namespace's documents, not in them: ``drop`` leaves them to expire."""

    async def put_expiring(self, namespace: str, key: str, doc: dict[str, Any], ttl_s: float) -> None:
        """Create or replace a document that vanishes ``ttl_s`` seconds after its last write (a conversation
        session's experts: shared by replicas, never piling up). Kept apart from ``put``'s documents:
        read it with ``get_expiring``; ``items``, ``count`` and ``drop`` do not see it. Not abstract (as the
        leases below): a wrapper may omit it, and callers then keep such state per process."""
        raise NotImplementedError(f"{type(self).__name__} has no expiring documents")

    async def get_expiring(self, namespace: str, key: str) -> dict[str, Any] | None:
        """The ``put_expiring`` document at ``key``, or None when there is none or it expired."""
        raise NotImplementedError(f"{type(self).__name__} has no expiring documents")

    async def acquire_lease(self, name: str, owner: str, ttl_s: float) -> int | None:
        """Take the exclusive lease ``name`` for ``owner`` for ``ttl_s`` seconds unless someone else holds
        it; returns a fencing token (larger for each later holder of ``name``), or None when it is held.
        A lease ends on ``release_lease`` or when its time runs out (a holder that crashed frees it by
        itself). The lock that several replicas need around one vLLM's adapter loads and unloads
        (``coe.backends.pool.AdapterLock``). Not abstract, so wrappers of a store may omit it: the
        default says the store has no leases, and callers fall back to a per-process lock."""
        raise NotImplementedError(f"{type(self).__name__} has no leases")

    async def release_lease(self, name: str, owner: str) -> bool:
        """End ``owner``'s lease ``name``; False when it no longer held it (it expired, and maybe another
        owner took it meanwhile: the caller's work may have overlapped someone else's)."""
        raise NotImplementedError(f"{type(self).__name__} has no leases")

    @abstractmethod
    async def ping(self) -> None:
        """Check the store answers; raises ``StoreError`` when it is unreachable (health checks)."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections; the app's lifespan calls this on shutdown."""

    async def __aenter__(self) -> StateStore:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
