"""Bearer-key checks: client keys for ``/v1/*``, a separate admin key for registry changes.

Keys come from environment variables named in the registry's ``auth`` section,
never from the file itself. A check can only be off when the file says so.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass

from fastapi import Request

from coe.config import AuthConfig
from coe.errors import ConfigError, Forbidden, Unauthorized


@dataclass(frozen=True)
class AuthKeys:
    client_keys: frozenset[str] | None  # None: client auth is off
    admin_key: str | None  # None: admin auth is off


def resolve_keys(auth: AuthConfig) -> AuthKeys:
    """Read the keys; a check that is on without a key is a configuration error, not an open door."""
    problems = []
    client: frozenset[str] | None = None
    admin: str | None = None
    if auth.client_auth:
        client = frozenset(k.strip() for k in os.environ.get(auth.api_keys_env, "").split(",") if k.strip())
        if not client:
            problems.append(f"auth.client_auth is on but {auth.api_keys_env} is not set: set it to comma-separated "
                            "client keys, or set auth.client_auth: false (local use only)")
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


async def check_client(request: Request) -> None:
    keys: AuthKeys = request.app.state.coe.keys
    if keys.client_keys is None:
        return
    token = _bearer(request)
    if token is None:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    if any(_matches(token, k) for k in keys.client_keys):
        return
    if keys.admin_key is not None and _matches(token, keys.admin_key):
        return
    raise Unauthorized("invalid API key")


async def check_admin(request: Request) -> None:
    keys: AuthKeys = request.app.state.coe.keys
    if keys.admin_key is None:
        await check_client(request)  # admin checks off never opens the registry wider than the API itself
        return
    token = _bearer(request)
    if token is None:
        raise Unauthorized("missing admin key: send 'Authorization: Bearer <admin key>'")
    if _matches(token, keys.admin_key):
        return
    if keys.client_keys is not None and any(_matches(token, k) for k in keys.client_keys):
        raise Forbidden("registry changes need the admin key, not a client key", code="admin_key_required")
    raise Unauthorized("invalid admin key")
