"""Bearer-key checks: client keys for ``/v1/*``, a separate admin key for registry changes.

Keys come from environment variables named in the registry's ``auth`` section,
never from the file itself. A check can only be off when the file says so.

Besides the static keys, a bearer token may be a virtual key (``coe.keys``: kept in the state store,
with limits and a budget). ``check_client`` leaves who the request acts as in ``request.state.caller``
(a ``coe.keys.Caller``): its owner id owns the files and batches it creates. A virtual key's request is
counted against its requests-per-minute limit here, before anything else runs.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass

from fastapi import Request

from coe.config import AuthConfig
from coe.errors import ConfigError, Forbidden, RateLimited, Unauthorized
from coe.keys import Caller, KeyLimiter, KeyRing, owner_of_static
from coe.keys.model import ADMIN_OWNER, ANON_OWNER


@dataclass(frozen=True)
class AuthKeys:
    client_keys: frozenset[str] | None  # None: client auth is off
    admin_key: str | None  # None: admin auth is off


def resolve_keys(auth: AuthConfig) -> AuthKeys:
    """Read the keys; a check that is on without a key is a configuration error, not an open door. Client
    auth with no ``COE_API_KEYS`` is fine when there is an admin key: clients then use virtual keys."""
    problems = []
    client: frozenset[str] | None = None
    admin: str | None = None
    if auth.client_auth:
        client = frozenset(k.strip() for k in os.environ.get(auth.api_keys_env, "").split(",") if k.strip())
        if not client and not (auth.admin_auth and os.environ.get(auth.admin_key_env, "").strip()):
            problems.append(f"auth.client_auth is on but {auth.api_keys_env} is not set: set it to comma-separated "
                            "client keys, or turn auth.admin_auth on with a key and create virtual keys "
                            "('coe keys create'), or set auth.client_auth: false (local use only)")
    if auth.admin_auth:
        admin = os.environ.get(auth.admin_key_env, "").strip() or None
        if admin is None:
            problems.append(f"auth.admin_auth is on but {auth.admin_key_env} is not set: set it, or set "
                            "auth.admin_auth: false (local use only)")
    if problems:
        raise ConfigError(problems)
    return AuthKeys(client, admin)


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str, key: str) -> bool:
    return hmac.compare_digest(token.encode(), key.encode())


@dataclass
class VirtualKeys:
    """The key ring and the limiter of one server (both on the runtime's state store)."""

    ring: KeyRing
    limiter: KeyLimiter


def caller_of(request: Request) -> Caller:
    """Who the request acts as (set by ``check_client``/``check_admin``; anonymous when auth is off)."""
    caller: Caller | None = getattr(request.state, "caller", None)
    return caller if caller is not None else Caller(ANON_OWNER, sees_all=True)


async def check_client(request: Request) -> None:
    state = request.app.state.coe
    keys: AuthKeys = state.keys
    if keys.client_keys is None:
        request.state.caller = Caller(ANON_OWNER, sees_all=True)  # one anonymous owner: it sees everything
        return
    token = _bearer(request)
    if token is None:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    for k in keys.client_keys:
        if _matches(token, k):
            request.state.caller = Caller(owner_of_static(k))
            return
    if keys.admin_key is not None and _matches(token, keys.admin_key):
        request.state.caller = Caller(ADMIN_OWNER, sees_all=True)
        return
    vkeys: VirtualKeys | None = getattr(state, "vkeys", None)
    key = None if vkeys is None else await vkeys.ring.lookup(token)
    if vkeys is None or key is None:
        raise Unauthorized("invalid API key")
    request.state.caller = Caller(key.id, key=key)
    metrics = state.runtime.metrics
    try:
        request.state.admission = await vkeys.limiter.admit(key)
    except RateLimited:
        metrics.key_requests.labels(key.name, "limited").inc()
        raise
    metrics.key_requests.labels(key.name, "admitted").inc()


async def check_admin(request: Request) -> None:
    keys: AuthKeys = request.app.state.coe.keys
    if keys.admin_key is None:
        await check_client(request)  # admin checks off never opens the registry wider than the API itself
        return
    token = _bearer(request)
    if token is None:
        raise Unauthorized("missing admin key: send 'Authorization: Bearer <admin key>'")
    if _matches(token, keys.admin_key):
        request.state.caller = Caller(ADMIN_OWNER, sees_all=True)
        return
    if keys.client_keys is not None and any(_matches(token, k) for k in keys.client_keys):
        raise Forbidden("registry changes need the admin key, not a client key", code="admin_key_required")
    raise Unauthorized("invalid admin key")
