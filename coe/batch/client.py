"""``coe worker`` and the client commands ``coe batch submit | status | download``.

``coe worker`` opens the same ``Runtime`` as the API server (backends, store, a
batch worker) without serving HTTP; it needs Redis, since only a shared queue
lets a separate process take work. The client commands talk to a running coe
(or any OpenAI-compatible server) over HTTP; the API key comes from
``--api-key`` or ``COE_API_KEY``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from coe.config import RegistryConfig
from coe.errors import InvalidRequest
from coe.loader import load_registry
from coe.store import is_durable_url, store_url


def _stop_before_start(signum: int, frame: object) -> None:
    """SIGTERM before the worker takes anything: nothing is held, so stop at once, cleanly (exit 0)."""
    raise SystemExit(0)


def cmd_worker(args: argparse.Namespace) -> int:
    from coe.logs import configure

    signal.signal(signal.SIGTERM, _stop_before_start)  # until the event loop's handler replaces it in _work
    configure(args.log_level)
    cfg = load_registry(args.config)
    if not is_durable_url(store_url(cfg.store)):
        raise InvalidRequest("coe worker needs Redis: set store.redis_url in the registry or COE_REDIS_URL "
                             "(without Redis, the API server runs batches itself)")
    asyncio.run(_work(args.config, cfg))
    return 0


async def _work(config: str, cfg: RegistryConfig) -> None:
    from coe.runtime import Runtime

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with Runtime(config, config=cfg, batch_worker=True, poll_interval_s=5.0):
        print("coe worker: taking batch items (SIGTERM finishes or releases what it holds)", file=sys.stderr,
              flush=True)
        await stop.wait()


def _client(args: argparse.Namespace) -> Any:
    import httpx

    key = args.api_key or os.environ.get("COE_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=args.base_url.rstrip("/"), headers=headers, timeout=120)


def _checked(response: Any) -> Any:
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except Exception:
            message = response.text[:500]
        raise InvalidRequest(f"HTTP {response.status_code}: {message}")
    return response


def cmd_submit(args: argparse.Namespace) -> int:
    path = Path(args.input)
    with _client(args) as http:
        with path.open("rb") as f:
            uploaded = _checked(http.post("/files", files={"file": (path.name, f)}, data={"purpose": "batch"})).json()
        batch = _checked(http.post("/batches", json={"input_file_id": uploaded["id"],
                                                     "endpoint": "/v1/chat/completions",
                                                     "completion_window": "24h"})).json()
    print(json.dumps(batch, indent=2))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as http:
        batch = _checked(http.get(f"/batches/{args.batch_id}")).json()
    print(json.dumps(batch, indent=2))
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    with _client(args) as http:
        batch = _checked(http.get(f"/batches/{args.batch_id}")).json()
        if batch["status"] not in ("completed", "cancelled", "expired", "failed"):
            counts = batch.get("request_counts") or {}
            raise InvalidRequest(f"batch {args.batch_id} is {batch['status']} ({counts.get('completed', 0)} "
                                 f"completed, {counts.get('failed', 0)} failed of {counts.get('total', '?')}); "
                                 "download it once it has ended")
        written = {}
        output = Path(args.output)
        errors = Path(args.errors) if args.errors else output.with_name(f"{output.stem}.errors{output.suffix}")
        for key, name, path in (("output_file_id", "output", output), ("error_file_id", "errors", errors)):
            if batch.get(key):
                path.write_bytes(_checked(http.get(f"/files/{batch[key]}/content")).content)
                written[name] = str(path)
    print(json.dumps({"status": batch["status"], "request_counts": batch.get("request_counts"), **written}))
    return 0


def add_commands(sub: Any, batch: Any, command: Any) -> None:
    """``coe worker`` on the top-level subparsers; submit/status/download under ``coe batch``."""
    worker = command(sub.add_parser("worker", help="take batch items from the Redis queue (needs Redis)"),
                     cmd_worker)
    worker.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    def remote(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--base-url", required=True, help="the server's OpenAI base URL, e.g. http://host:8080/v1")
        p.add_argument("--api-key", help="client key (default: COE_API_KEY)")
        return p

    submit = remote(command(batch.add_parser("submit", help="upload INPUT and create a batch on a server"),
                            cmd_submit))
    submit.add_argument("input")
    status = remote(command(batch.add_parser("status", help="a batch's status and counts"), cmd_status))
    status.add_argument("batch_id")
    download = remote(command(batch.add_parser("download", help="a finished batch's output (and error) file"),
                              cmd_download))
    download.add_argument("batch_id")
    download.add_argument("--output", required=True)
    download.add_argument("--errors", help="default: OUTPUT with .errors before the suffix")
