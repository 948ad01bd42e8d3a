"""The live registry: ``experts.yaml`` plus the experts registered through the API.

- The file is polled; a valid edit takes effect without a restart, an invalid
  one is refused and logged, and the previous registry keeps serving.
- API experts live in the state store (namespace ``experts``) as an overlay: they
  survive file reloads, and restarts when the store is durable (Redis). A file
  expert with the same name as an overlay expert wins; the overlay one is hidden
  (and logged) until the file stops naming it.
- Each snapshot (``Registry``) is immutable; requests keep the one they started with.
- Several replicas on one store behave as one service: each polls the overlay every
  ``overlay_poll_s`` (0.25 s) and takes any change another replica wrote, so an expert
  registered or deleted through one replica is served or refused by all within
  ``overlay_poll_s`` plus one store round trip (well under 1 s). Polling, not Redis pub/sub
  or keyspace notifications: a message published while a replica is reconnecting is lost,
  so pub/sub would need this poll as a fallback anyway; the overlay is small (one HGETALL
  per poll, a few commands per second per replica); and the in-memory store (one process)
  needs no second mechanism.
- coe unloads an adapter only when it loaded it (for an API expert) and the last
  expert using it is removed; adapters the server already served are left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import ValidationError

from coe.config import ExpertConfig, RegistryConfig
from coe.dispatch import Dispatcher
from coe.errors import (
    BackendUnavailable,
    ConfigError,
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    StoreError,
    clip,
)
from coe.loader import check_expert, load_registry
from coe.logs import request_id_var
from coe.metrics import Metrics
from coe.store.base import StateStore

if TYPE_CHECKING:  # the router family is injected (``router_factory``); only its types are named here
    from routers.base import Completer, Router

RouterFactory = Callable[[RegistryConfig, "Completer | None"], "Router"]
"""Builds the registry's router (``routers.make_router``; the runtime passes it in)."""

log = logging.getLogger("coe.registry")

OVERLAY = "experts"


@dataclass(frozen=True)
class Registry:
    config: RegistryConfig
    experts: dict[str, ExpertConfig]
    sources: dict[str, str]
    router: Router

    def expert(self, name: str) -> ExpertConfig | None:
        return self.experts.get(name)


def _fingerprint(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


class RegistryManager:
    def __init__(self, path: Path, store: StateStore, dispatcher: Dispatcher, metrics: Metrics,
                 *, router_factory: RouterFactory, poll_interval_s: float = 1.0,
                 on_reload: Callable[[Registry], None] | None = None,
                 backends: Callable[[RegistryConfig], Awaitable[None]] | None = None,
                 overlay_poll_s: float = 0.25) -> None:
        """``on_reload`` sees each new snapshot before it takes effect; raising ConfigError refuses it.
        ``backends`` applies a new config's backends and dispatch settings (default: all of them, through
        ``Dispatcher.configure``; the runtime narrows it for a process that needs only some).
        ``overlay_poll_s``: how often the stored API experts are re-read (other replicas' changes)."""
        self.path = path
        self.store = store
        self.dispatcher = dispatcher
        self.metrics = metrics
        self.router_factory = router_factory
        self.poll_interval_s = poll_interval_s
        self.on_reload = on_reload
        self._configure = backends or (lambda config: dispatcher.configure(config.dispatch, config.backends))
        self._current: Registry | None = None
        self._overlay: dict[str, ExpertConfig] = {}
        self._owned: set[tuple[str, str]] = set()  # (backend, adapter) that coe loaded, so may unload
        self._fingerprint: tuple[int, int] | None = None
        self._digest = ""
        self._router_cache: tuple[bytes, Router] | None = None
        self._lock = asyncio.Lock()
        self._watch: asyncio.Task[None] | None = None
        self.overlay_poll_s = overlay_poll_s
        self._overlay_digest = b""
        self._overlay_watch: asyncio.Task[None] | None = None
        self.last_error: str | None = None

    @property
    def current(self) -> Registry:
        if self._current is None:
            raise BackendUnavailable("the registry is not loaded yet", retry_after=1)
        return self._current

    # -- loading -----------------------------------------------------------------------

    def _snapshot(self, config: RegistryConfig) -> Registry:
        experts = {e.name: e for e in config.experts}
        sources = dict.fromkeys(experts, "file")
        for name, expert in self._overlay.items():
            if name in experts:
                log.warning("API expert %s is hidden by the file's expert of the same name", name)
                continue
            problems = check_expert(expert, config)
            if problems:
                log.warning("API expert %s is not served: %s", name, "; ".join(m for _, m in problems))
                continue
            experts[name] = expert
            sources[name] = "api"
        for source in ("file", "api"):
            self.metrics.experts_registered.labels(source).set(sum(1 for s in sources.values() if s == source))
        return Registry(config=config, experts=experts, sources=sources, router=self._router(config))

    def _router(self, config: RegistryConfig) -> Router:
        """The previous router when nothing it was built from changed: the two-level router loads (or
        fits) a classifier, which an API registration or an unrelated edit must not redo."""
        key = orjson.dumps([config.router.model_dump(mode="json"),
                            [e.model_dump(mode="json", include={"name", "description", "skills", "categories"})
                             for e in config.experts]], option=orjson.OPT_SORT_KEYS)
        if self._router_cache is None or self._router_cache[0] != key:
            self._router_cache = (key, self.router_factory(config, self._complete))
        return self._router_cache[1]

    async def _complete(self, expert: ExpertConfig, messages: list[dict[str, Any]], params: dict[str, Any]) -> str:
        """One non-streaming answer through the dispatcher (the annotator's keywords)."""
        response, _, _ = await self.dispatcher.chat([expert], {"messages": messages, **params},
                                                    request_id=request_id_var.get())
        choices = response.get("choices") or [{}]
        return str((choices[0].get("message") or {}).get("content") or "")

    async def _apply(self, config: RegistryConfig) -> None:
        # A two-level router may fit its classifier here (seconds to minutes): off the event loop.
        snapshot = await asyncio.to_thread(self._snapshot, config)  # may raise ConfigError: nothing changed yet
        if self.on_reload is not None:
            self.on_reload(snapshot)  # may refuse it too (e.g. auth keys missing)
        await self._configure(config)
        self._current = snapshot

    async def start(self, config: RegistryConfig | None = None, *, watch: bool = True) -> Registry:
        """Load the file (a bad file is fatal at start-up) and the stored overlay. ``config``: the file as
        the caller already loaded it (read once per process); ``watch``: poll the file for edits."""
        self._fingerprint = _fingerprint(self.path)
        self._digest = hashlib.sha256(self.path.read_bytes()).hexdigest()
        config = config if config is not None else load_registry(self.path)
        self._take_overlay(await self._stored_overlay())
        await self._apply(config)
        if watch:
            self._watch = asyncio.create_task(self._watch_loop(), name="coe-registry-watch")
            self._overlay_watch = asyncio.create_task(self._overlay_loop(), name="coe-registry-overlay")
        return self.current

    def _take_overlay(self, docs: dict[str, dict[str, Any]]) -> None:
        """Make the stored API experts ``docs`` this process's overlay (not yet a snapshot)."""
        overlay: dict[str, ExpertConfig] = {}
        for name, doc in docs.items():
            try:
                expert = overlay[name] = ExpertConfig.model_validate(doc.get("expert"))
                if doc.get("owns_adapter") and expert.adapter is not None:
                    self._owned.add((expert.backend, expert.adapter.name))
            except ValidationError as exc:
                log.error("stored API expert %s is invalid and ignored: %s", name, exc)
        self._overlay = overlay
        self._overlay_digest = orjson.dumps(docs, option=orjson.OPT_SORT_KEYS)

    async def sync_overlay(self) -> bool:
        """Take the API experts other replicas registered or deleted since the last look. True when the
        served registry changed. Read under the lock, so a registration in flight here is never undone by
        a read made before its write."""
        async with self._lock:
            docs = await self.store.items(OVERLAY)
            if orjson.dumps(docs, option=orjson.OPT_SORT_KEYS) == self._overlay_digest:
                return False
            before = set(self._overlay)
            self._take_overlay(docs)
            self._current = self._snapshot(self.current.config)
            added, removed = set(self._overlay) - before, before - set(self._overlay)
            if added or removed:
                log.info("API experts changed in the store: added %s, removed %s",
                         ", ".join(sorted(added)) or "none", ", ".join(sorted(removed)) or "none")
            return True

    async def _overlay_loop(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.overlay_poll_s)
            try:
                await self.sync_overlay()
                if failing:
                    log.info("API experts are read from the store again")
                failing = False
            except StoreError as exc:  # Redis restarting: keep serving what we have, look again soon
                if not failing:  # once per outage, not four times a second
                    log.warning("could not read API experts from the store (serving the last ones read): %s",
                                exc.message)
                failing = True
            except Exception:
                log.exception("API expert sync failed")

    async def _stored_overlay(self, wait_s: float = 60.0) -> dict[str, dict[str, Any]]:
        """The API experts in the store. A store that does not answer yet (Redis restarting while replicas
        start) is retried with backoff for up to ``wait_s``, then its error is raised."""
        deadline = time.monotonic() + wait_s
        delay = 0.5
        while True:
            try:
                return await self.store.items(OVERLAY)
            except StoreError as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("state store not answering (%s); retrying in %.1fs", exc.message, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def reload(self) -> bool:
        """Re-read the file if it changed. True when a new registry took effect."""
        fingerprint = _fingerprint(self.path)
        if fingerprint == self._fingerprint:
            return False
        self._fingerprint = fingerprint
        async with self._lock:
            try:
                digest = hashlib.sha256(self.path.read_bytes()).hexdigest()
            except OSError as exc:
                self.last_error = f"{self.path}: cannot read: {exc.strerror}"
                log.error("registry reload refused, previous registry keeps serving: %s", self.last_error)
                self.metrics.registry_reloads.labels("refused").inc()
                return False
            if digest == self._digest:  # e.g. a refused edit was reverted: what serves is the file again
                self.last_error = None
                return False
            try:
                await self._apply(load_registry(self.path))
            except ConfigError as exc:
                self.last_error = exc.message
                log.error("registry reload refused, previous registry keeps serving:\n%s", exc.message)
                self.metrics.registry_reloads.labels("refused").inc()
                return False
            self._digest = digest
            self.last_error = None
            self.metrics.registry_reloads.labels("ok").inc()
            log.info("registry reloaded from %s: %d experts", self.path, len(self.current.experts))
            return True

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self.reload()
            except Exception:
                log.exception("registry reload failed")

    async def load_overlay_adapters(self) -> None:
        """Make sure every API adapter expert is loaded (after a restart of coe or of vLLM)."""
        for name, source in self.current.sources.items():
            if source == "api":
                expert = self.current.experts[name]
                try:
                    await self.dispatcher.ensure_adapter(expert)
                except Exception as exc:
                    log.warning("could not load adapter of API expert %s yet: %s", name, exc)

    # -- API registration --------------------------------------------------------------

    def _check_adapter_path(self, expert: ExpertConfig, config: RegistryConfig) -> None:
        if expert.adapter is None:
            return
        if expert.adapter.path is None:
            raise InvalidRequest("an adapter expert registered through the API needs adapter.path",
                                 param="adapter.path")
        path = expert.adapter.path
        if not path.is_absolute():
            raise InvalidRequest("adapter.path must be absolute", param="adapter.path")
        roots = config.backends[expert.backend].adapter_roots
        if not roots:
            raise Forbidden(f"backend {expert.backend!r} has no adapter_roots configured, so no adapter may be "
                            "registered on it through the API", param="adapter.path")
        resolved = path.resolve()
        if not any(resolved.is_relative_to(root.resolve()) for root in roots):
            raise Forbidden(f"adapter.path {str(path)!r} is not under an allowed root of backend "
                            f"{expert.backend!r}", param="adapter.path")

    @staticmethod
    def _check_categories(expert: ExpertConfig, config: RegistryConfig) -> None:
        """A category level 1 does not know would never route to the expert: refused, naming the known ones.
        Without ``router.categories`` (a router without level 1) the names are only labels: logged."""
        known = set(config.router.categories)
        unknown = [c for c in expert.categories if c not in known]
        if not unknown:
            return
        if known:
            raise InvalidRequest(f"unknown categories: {', '.join(unknown)} (router.categories has "
                                 f"{', '.join(sorted(known))})", param="categories")
        log.warning("API expert %s names categories %s, but router.categories is empty: they route nothing",
                    expert.name, ", ".join(unknown))

    async def register(self, expert: ExpertConfig) -> ExpertConfig:
        async with self._lock:
            current = self.current
            if expert.name in current.experts:
                raise Conflict(f"an expert named {expert.name!r} already exists "
                               f"(source: {current.sources[expert.name]})", param="name")
            problems = check_expert(expert, current.config)
            if problems:
                loc, msg = problems[0]
                raise InvalidRequest(msg, param=".".join(str(p) for p in loc))
            self._check_adapter_path(expert, current.config)
            self._check_categories(expert, current.config)
            owns = False
            if expert.adapter is not None:
                key = (expert.backend, expert.adapter.name)
                served = await self.dispatcher.served_models(expert.backend)
                owns = key in self._owned or expert.adapter.name not in served  # unload only what coe loaded
                await self.dispatcher.ensure_adapter(expert)
            doc: dict[str, Any] = {"expert": expert.model_dump(mode="json", exclude_defaults=True),
                                   "owns_adapter": owns}
            if not await self.store.put_if_absent(OVERLAY, expert.name, doc):
                raise Conflict(f"an expert named {expert.name!r} already exists (source: api)", param="name")
            self._overlay[expert.name] = expert
            self._overlay_digest = b""  # the store changed here: the next poll must compare afresh
            if owns and expert.adapter is not None:
                self._owned.add((expert.backend, expert.adapter.name))
            self._current = self._snapshot(current.config)
            log.info("registered API expert %s on backend %s", expert.name, expert.backend)
            return expert

    async def unregister(self, name: str) -> None:
        async with self._lock:
            current = self.current
            source = current.sources.get(name)
            if source is None:
                raise NotFound(f"no expert named {clip(name)}", code="expert_not_found")
            if source == "file":
                raise Conflict(f"expert {clip(name)} is defined in {self.path.name}; edit the file to remove it")
            expert = current.experts[name]
            await self.store.delete(OVERLAY, name)
            self._overlay.pop(name, None)
            self._overlay_digest = b""  # e.g. another replica may re-register it before the next poll
            self._current = self._snapshot(current.config)
            await self._unload_if_unused(expert)
            log.info("unregistered API expert %s", name)

    async def _unload_if_unused(self, expert: ExpertConfig) -> None:
        if expert.adapter is None:
            return
        current = self.current
        adapter = expert.adapter.name
        if (expert.backend, adapter) not in self._owned:
            return  # the server served it before coe was asked to: not coe's to unload
        in_use = any(e.adapter is not None and e.adapter.name == adapter and e.backend == expert.backend
                     for e in current.experts.values())
        launch = current.config.backends[expert.backend].launch if expert.backend in current.config.backends else None
        preloaded = launch is not None and any(m.name == adapter for m in launch.lora_modules)
        if in_use or preloaded:
            return
        self._owned.discard((expert.backend, adapter))
        try:
            await self.dispatcher.unload_adapter(expert.backend, adapter)
        except Exception as exc:
            log.warning("could not unload adapter %s from %s: %s", adapter, expert.backend, exc)

    async def aclose(self) -> None:
        for task in (self._watch, self._overlay_watch):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
