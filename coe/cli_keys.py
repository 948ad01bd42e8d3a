"""``coe keys create|list|show|revoke|usage``: virtual keys through a running server's admin API
(``/v1/keys``, the admin key), so the CLI needs no access to Redis. ``create`` prints the key with its
secret: the only time the secret is shown."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any


def _remote(args: argparse.Namespace) -> Any:
    from coe.cli_batch import _Remote

    key = args.admin_key if args.admin_key is not None else os.environ.get("COE_ADMIN_KEY")
    return _Remote(argparse.Namespace(api_key=key, base_url=args.base_url))


def _print(doc: Any) -> int:
    print(json.dumps(doc, indent=2))
    return 0


def cmd_create(args: argparse.Namespace) -> int:
    spec: dict[str, Any] = {"name": args.name, "budget_period": args.budget_period}
    for field in ("rpm", "tpm", "budget", "expires_in_s"):
        if getattr(args, field) is not None:
            spec[field] = getattr(args, field)
    if args.models:
        spec["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.metadata:
        spec["metadata"] = dict(kv.split("=", 1) for kv in args.metadata)
    with _remote(args) as remote:
        return _print(remote.call("POST", "/keys", json=spec).json())


def cmd_list(args: argparse.Namespace) -> int:
    with _remote(args) as remote:
        return _print(remote.call("GET", "/keys").json()["data"])


def cmd_show(args: argparse.Namespace) -> int:
    with _remote(args) as remote:
        return _print(remote.call("GET", f"/keys/{args.key_id}").json())


def cmd_revoke(args: argparse.Namespace) -> int:
    with _remote(args) as remote:
        return _print(remote.call("DELETE", f"/keys/{args.key_id}").json())


def cmd_usage(args: argparse.Namespace) -> int:
    with _remote(args) as remote:
        return _print(remote.call("GET", f"/keys/{args.key_id}/usage").json())


def add_commands(sub: Any) -> None:
    """``coe keys ...`` on the CLI's subparsers."""
    keys = sub.add_parser("keys", help="virtual keys with limits and budgets (admin API of a running server)"
                          ).add_subparsers(dest="keys_command", required=True, metavar="SUBCOMMAND")

    def remote(p: argparse.ArgumentParser, fn: Any) -> argparse.ArgumentParser:
        p.add_argument("--base-url", default="http://127.0.0.1:8080/v1", help="the server's /v1")
        p.add_argument("--admin-key", help="admin key (default: $COE_ADMIN_KEY)")
        p.set_defaults(fn=fn)
        return p

    create = remote(keys.add_parser("create", help="create a key; prints its secret (shown once)"), cmd_create)
    create.add_argument("name", help="a label for listings and metrics (letters, digits, '_', '.', '-')")
    create.add_argument("--rpm", type=int, help="requests per minute (sliding 60 s window)")
    create.add_argument("--tpm", type=int, help="tokens per minute (fixed 60 s window)")
    create.add_argument("--budget", type=float, help="spend limit in the experts' cost unit")
    create.add_argument("--budget-period", default="total", choices=["total", "daily", "monthly"])
    create.add_argument("--models", help="comma-separated models the key may call (default: all)")
    create.add_argument("--metadata", action="append", metavar="K=V", help="repeatable")
    create.add_argument("--expires-in-s", type=int, help="the key stops working this many seconds from now")
    remote(keys.add_parser("list", help="every key (never secrets)"), cmd_list)
    for name, fn, what in (("show", cmd_show, "one key"), ("revoke", cmd_revoke, "revoke a key (within 1 s)"),
                           ("usage", cmd_usage, "a key's requests, tokens and spend")):
        remote(keys.add_parser(name, help=what), fn).add_argument("key_id")
