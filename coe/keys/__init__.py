"""Virtual keys: client keys kept in the state store, each with its own limits, budget and objects.

``model``: the key record and how a secret becomes its id-free hash; ``ring``: create, list, revoke and
look keys up (a per-process cache that lives at most 0.5 s, so a revoked key is refused everywhere within
1 s); ``limits``: requests, tokens and spend counted atomically in the store, so N replicas share one count.
"""

from coe.keys.limits import Admission, KeyLimiter, estimate_tokens
from coe.keys.model import Caller, KeyCreate, VirtualKey, hash_secret, owner_of_static
from coe.keys.owners import Owners
from coe.keys.ring import KeyRing

__all__ = ["Admission", "Caller", "KeyCreate", "KeyLimiter", "KeyRing", "Owners", "VirtualKey", "estimate_tokens",
           "hash_secret", "owner_of_static"]
