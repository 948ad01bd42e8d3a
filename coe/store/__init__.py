"""State that outlives a request: ``open_store`` picks the implementation from the config.

No URL means the in-memory store (state is lost when coe stops); a Redis URL
means the durable Redis store. ``COE_REDIS_URL`` overrides ``store.redis_url``
so one ``experts.yaml`` serves both a laptop and a deployment. Implementations
are looked up by URL scheme in ``STORES``: a new backend is one module plus one
entry there. Nothing connects here; call ``await store.ping()`` to check.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

from coe.config import StoreConfig
from coe.errors import ConfigError
from coe.store.base import StateStore
from coe.store.memory import MemoryStore

__all__ = ["ENV_URL", "STORES", "MemoryStore", "StateStore", "StoreFactory", "open_store", "store_url"]

ENV_URL = "COE_REDIS_URL"

StoreFactory = Callable[[str, StoreConfig], StateStore]
"""Builds a store from its URL and the ``store`` config section."""


def _memory(url: str, cfg: StoreConfig) -> StateStore:
    return MemoryStore()


def _redis(url: str, cfg: StoreConfig) -> StateStore:
    # Imported here so that coe without Redis configured never imports redis-py.
    from coe.store.redis import RedisStore

    return RedisStore.from_url(url, prefix=cfg.prefix)


STORES: dict[str, StoreFactory] = {
    "memory": _memory,
    "redis": _redis,
    "rediss": _redis,
    "unix": _redis,
}
"""URL scheme -> implementation. ``memory://`` lets ``COE_REDIS_URL`` force the in-memory store."""


def store_url(cfg: StoreConfig, environ: Mapping[str, str] | None = None) -> str | None:
    """The state store's URL: ``COE_REDIS_URL`` when set, else ``store.redis_url``; None means in memory.
    The one place that resolves it (the store, the batch queue and ``coe worker`` all ask here)."""
    env = os.environ if environ is None else environ
    return env.get(ENV_URL) or cfg.redis_url or None


def is_durable_url(url: str | None) -> bool:
    """Whether ``url`` names a shared, durable store (not in memory)."""
    return bool(url) and not str(url).startswith("memory:")


def open_store(cfg: StoreConfig | None = None, *, environ: Mapping[str, str] | None = None) -> StateStore:
    """The store the config (or ``COE_REDIS_URL``) asks for; raises ``ConfigError`` on an unknown scheme."""
    cfg = cfg if cfg is not None else StoreConfig()
    env = os.environ if environ is None else environ
    from_env = env.get(ENV_URL)
    url = store_url(cfg, env)
    if not url:
        return MemoryStore()
    scheme = urlsplit(url).scheme.lower()
    factory = STORES.get(scheme)
    if factory is None:
        source = ENV_URL if from_env else "store.redis_url"
        known = ", ".join(f"{name}://" for name in STORES)
        given = f"{scheme}://" if scheme else "(none)"
        raise ConfigError([f"{source}: unsupported store URL scheme {given}; use one of {known}"])
    return factory(url, cfg)
