"""Building registries for tests and running coe in-loop on a real port.

Every API test talks to coe over real HTTP with the official ``openai`` SDK;
experts are the shared tiny vLLM server's base model and adapters.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import openai
import yaml
from fastapi import FastAPI

from coe.runtime import Runtime
from coe.testing.server import serve_app
from services.api import create_app
from services.api.state import runtime_of

PRICES = {"input_per_mtok": 1.5, "output_per_mtok": 4.0}


def tiny_registry(server: Any, **overrides: Any) -> dict[str, Any]:
    """A registry over the shared tiny server: a base expert and two adapter experts."""
    reg: dict[str, Any] = {
        "backends": {"tiny": {"url": server.api_url, "adapter_roots": [str(server.model_dir)],
                              "base_adapter": server.managed.base_adapter,
                              "timeouts": {"read_s": 60, "total_s": 120}}},
        "experts": [
            {"name": "tiny-base", "backend": "tiny", "model": server.served_name, "cost": PRICES,
             "description": "the tiny base model", "categories": ["general"]},
            {"name": "tiny-a0", "backend": "tiny", "model": server.served_name,
             "adapter": {"name": "tiny-lora-0", "path": str(server.adapters["tiny-lora-0"])},
             "cost": PRICES, "categories": ["code"]},
            {"name": "tiny-a1", "backend": "tiny", "model": server.served_name,
             "adapter": {"name": "tiny-lora-1"}, "system_prompt": "You are expert a1.",
             "params": {"temperature": 0}},
        ],
        "auth": {"client_auth": False, "admin_auth": False},
        "dispatch": {"retries": 1, "backoff_s": 0.05, "health_interval_s": 0.5},
    }
    reg.update(overrides)
    return reg


def batch_input(n: int, tag: str) -> bytes:
    """A Batches API input file of ``n`` requests for ``tiny_registry``'s experts, alternating the base
    model and an adapter (the SIGKILL test and ``bench/batch_kill.py``)."""
    lines = [{"custom_id": f"{tag}-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": ("tiny-base", "tiny-a0")[i % 2], "max_tokens": 6, "temperature": 0,
                       "messages": [{"role": "user", "content": f"Item {i} of {tag}?"}]}} for i in range(n)]
    return "".join(json.dumps(x) + "\n" for x in lines).encode()


def write_registry(path: Path, reg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(reg, sort_keys=False))
    return path


class RunningCoe:
    def __init__(self, url: str, app: FastAPI) -> None:
        self.url = url
        self.app = app

    @property
    def state(self) -> Runtime:
        """The server's runtime (registry, store, pool, jobs, metrics)."""
        return runtime_of(self.app)

    def client(self, api_key: str = "none", **kw: Any) -> openai.AsyncOpenAI:
        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 120)
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=api_key, **kw)


@contextlib.asynccontextmanager
async def running_coe(config: Path, **app_kwargs: Any) -> AsyncIterator[RunningCoe]:
    app_kwargs.setdefault("poll_interval_s", 0.2)
    app = create_app(config, **app_kwargs)
    async with serve_app(app) as url:
        yield RunningCoe(url, app)


async def wait_until(check: Callable[[], bool | Awaitable[bool]], timeout: float, what: str,
                     interval: float = 0.1) -> None:
    """Poll ``check`` (sync or async) until it is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout:.0f}s: {what}")
        await asyncio.sleep(interval)
