"""``coe experts merge``: build a merged adapter expert from registered adapter experts.

It merges on this machine (``coe.merging``), prints the expert's YAML stanza, and with ``--register``
registers it through the running server's ``POST /v1/experts`` with the admin key. The sources are the
file's experts, plus, with ``--register``, the server's API-registered ones. If registration fails, the
merged folder is removed again: a failed command leaves nothing behind.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from coe.config import ExpertConfig, RegistryConfig
from coe.errors import InvalidRequest
from coe.loader import load_registry
from coe.models.merge import METHODS, MergeSpec


def _floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError as exc:
        raise InvalidRequest(f"{flag} takes comma-separated numbers, not {text!r}") from exc


def cmd_merge(args: argparse.Namespace) -> int:
    from coe.cli_batch import _Remote

    cfg = load_registry(args.config)
    if not args.register:
        return _merge(args, cfg, {e.name: e for e in cfg.experts}, None)
    key = os.environ.get(cfg.auth.admin_key_env) if args.admin_key is None else args.admin_key
    with _Remote(argparse.Namespace(api_key=key, base_url=args.base_url)) as remote:
        experts = {e.name: e for e in cfg.experts}
        for doc in remote.call("GET", "/experts").json().get("data", []):
            if doc.get("source") == "api":  # the server's API-registered experts may be sources too
                fields = {k: v for k, v in doc.items() if k not in ("object", "source")}
                experts.setdefault(doc["name"], ExpertConfig.model_validate(fields))
        return _merge(args, cfg, experts, remote)


def _merge(args: argparse.Namespace, cfg: RegistryConfig, experts: dict[str, ExpertConfig], remote: Any) -> int:
    from coe.merging import plan_merge, run_merge, yaml_stanza

    spec = MergeSpec(method=args.method, weights=_floats(args.weights, "--weights"), density=args.density,
                     rank=args.rank, seed=args.seed)
    plan = plan_merge(cfg, experts, args.name, [s.strip() for s in args.sources.split(",") if s.strip()], spec,
                      out=Path(args.out) if args.out else None, require_root=remote is not None,
                      system_prompt=args.system_prompt, description=args.description)
    merged, expert = run_merge(plan)
    error = merged.manifest["reconstruction_error"]
    print(f"merged adapter {expert.name}: {plan.out} ({spec.method}, rank {merged.rank}, "
          f"reconstruction error max {error['relative_frobenius_max']:.4f}, "
          f"mean {error['relative_frobenius_mean']:.4f})", file=sys.stderr)
    if remote is not None:
        try:
            remote.call("POST", "/experts", json=expert.model_dump(mode="json", exclude_defaults=True))
        except BaseException:
            shutil.rmtree(plan.out, ignore_errors=True)  # not registered: leave nothing behind
            raise
        print(f"registered {expert.name} on {args.base_url}", file=sys.stderr)
    print(yaml_stanza(expert), end="")
    return 0


def add_commands(experts: Any, command: Any) -> None:
    """``coe experts merge`` on the ``experts`` subparsers (``command`` adds --config and the handler)."""
    merge = command(experts.add_parser(
        "merge", help="build a merged adapter expert (linear, cat, ties, dare_linear, dare_ties)",
        description="Merge two or more adapter experts into a new adapter. cat stacks the LoRA factors "
                    "(exact, rank = sum of ranks); the others merge delta W = B·A per module and factor it "
                    "back by truncated SVD at --rank (default: the largest source rank)."), cmd_merge)
    merge.add_argument("name", help="the new expert's (and adapter's) name")
    merge.add_argument("--from", dest="sources", required=True, help="comma-separated adapter experts")
    merge.add_argument("--method", required=True, choices=METHODS)
    merge.add_argument("--weights", help="comma-separated, one per source (default: 1 each)")
    merge.add_argument("--density", type=float, help="fraction kept by ties (trim) and dare_* (drop); default 1")
    merge.add_argument("--rank", type=int, help="rank of the SVD methods' result (default: largest source rank)")
    merge.add_argument("--seed", type=int, default=0, help="seed of DARE's masks (default: 0)")
    merge.add_argument("--out", help="output folder (default: the backend's first adapter root / NAME)")
    merge.add_argument("--system-prompt", help="the expert's system prompt (default: the sources' one when "
                                               "they all share it, else none)")
    merge.add_argument("--description", help="registry description (default: the method and the sources)")
    merge.add_argument("--register", action="store_true",
                       help="register it on the running server (POST /v1/experts, admin key)")
    merge.add_argument("--base-url", default="http://127.0.0.1:8080/v1", help="the server's /v1 (with --register)")
    merge.add_argument("--admin-key", help="admin key (default: the variable auth.admin_key_env names)")
