"""The virtual key record and who a request acts as.

A secret is ``sk-coe-`` plus 32 random bytes (URL-safe base64); only its SHA-256 is stored. A slow KDF
(bcrypt, scrypt) exists to make guessing *low-entropy passwords* expensive; a 256-bit random secret cannot
be guessed either way, and SHA-256 lets every request find its key by one exact lookup in microseconds
(the key check sits on every request's path). The secret is returned once, at creation.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SECRET_PREFIX = "sk-coe-"
ADMIN_OWNER = "admin"
ANON_OWNER = "anonymous"

Period = Literal["total", "daily", "monthly"]


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def owner_of_static(secret: str) -> str:
    """The owner id of a ``COE_API_KEYS`` key: a prefix of its hash, never the key itself."""
    return "env-" + hash_secret(secret)[:16]


class KeyCreate(BaseModel):
    """What an admin sends to ``POST /v1/keys``; every limit is optional (None: no limit)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$",
                      description="a label for metrics and listings (letters, digits, '_', '.', '-')")
    models: list[str] | None = Field(None, description="models (experts, or 'coe') the key may call; None: all")
    rpm: int | None = Field(None, ge=1, description="requests per minute (a sliding 60 s window)")
    tpm: int | None = Field(None, ge=1, description="tokens per minute (a fixed 60 s window)")
    budget: float | None = Field(None, gt=0, description="spend limit in the experts' cost unit (USD)")
    budget_period: Period = "total"
    metadata: dict[str, str] = Field(default_factory=dict, max_length=16)
    expires_in_s: int | None = Field(None, ge=1, description="the key stops working this long after creation")


class VirtualKey(BaseModel):
    """A key as stored (and listed): never the secret, only its hash."""

    model_config = ConfigDict(extra="ignore")

    id: str
    object: Literal["key"] = "key"
    name: str
    secret_hash: str
    models: list[str] | None = None
    rpm: int | None = None
    tpm: int | None = None
    budget: float | None = None
    budget_period: Period = "total"
    metadata: dict[str, str] = Field(default_factory=dict)
    created_at: int
    expires_at: int | None = None
    revoked_at: int | None = None

    @classmethod
    def create(cls, spec: KeyCreate, secret: str, now: float | None = None) -> VirtualKey:
        now_i = int(time.time() if now is None else now)
        return cls(id=f"key_{secrets.token_hex(8)}", name=spec.name, secret_hash=hash_secret(secret),
                   models=spec.models, rpm=spec.rpm, tpm=spec.tpm, budget=spec.budget,
                   budget_period=spec.budget_period, metadata=spec.metadata, created_at=now_i,
                   expires_at=None if spec.expires_in_s is None else now_i + spec.expires_in_s)

    def usable(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)

    def public(self) -> dict[str, Any]:
        """The listing shape: the hash stays inside (it is not a secret, but nobody needs it)."""
        return self.model_dump(exclude={"secret_hash"})


@dataclass(frozen=True)
class Caller:
    """Who a request acts as. ``owner`` owns the files and batches it creates; ``sees_all``: the admin key,
    or everyone when client auth is off (one anonymous owner); ``key``: the virtual key, when it is one."""

    owner: str
    sees_all: bool = False
    key: VirtualKey | None = None

    def may_see(self, owner: str | None) -> bool:
        """Objects without an owner (created before keys existed) are the admin's alone."""
        return self.sees_all or (owner is not None and owner == self.owner)
