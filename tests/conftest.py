"""Shared fixtures, above all the one real vLLM CPU server of a test session.

vLLM on these CPUs needs about a minute to answer ``/health``, so every test that
needs a real expert shares ``vllm_server``: the tiny model with four LoRA
adapters, three loaded at start-up and ``tiny-lora-3`` left for run-time loading.
Such tests carry the ``vllm`` marker; ``--no-vllm`` (or ``COE_TESTS_NO_VLLM=1``)
skips them for a fast local run, and they skip by themselves where vLLM is not
installed.

``stub``: the STUB upstream (``coe.testing.stub_upstream``) in this process, with the record of what it
was sent; a module that needs another stub (slow, streaming) defines its own ``stub``, which wins.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from coe.backends.launch import ManagedVLLM
from coe.config import LaunchConfig, LoraModule
from coe.testing.server import serve_app
from coe.testing.stub_upstream import StubRecord, create_stub_app

NO_VLLM_ENV = "COE_TESTS_NO_VLLM"
LOADED_ADAPTERS = ("tiny-lora-0", "tiny-lora-1", "tiny-lora-2")
"""Adapters served from start-up; ``tiny-lora-3`` is built but left for run-time loading tests."""
VLLM_ARGS = ["--dtype", "float32", "--max-model-len", "512"]
"""Measured: --enforce-eager and VLLM_ENABLE_V1_MULTIPROCESSING=0 do not help (the latter starts ~10 s
sooner but serves concurrent requests ~30x slower); start-up is mostly three processes importing vLLM."""
VLLM_STARTUP_TIMEOUT_S = 300.0


@pytest_asyncio.fixture(loop_scope="session")
async def stub() -> AsyncIterator[tuple[str, StubRecord]]:
    record = StubRecord()
    async with serve_app(create_stub_app(record=record)) as url:
        yield url, record


@pytest.fixture(scope="session", autouse=True)
def on_demand_lock(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This session's own machine-wide on-demand lock (``coe.backends.machine_lock``), inherited by the
    coe processes the tests start, so two test runs on one machine do not wait for each other."""
    path = tmp_path_factory.mktemp("locks") / "on-demand.lock"
    os.environ["COE_ON_DEMAND_LOCK"] = str(path)
    return path


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--no-vllm",
        action="store_true",
        default=False,
        help=f"skip tests that need the real vLLM CPU server (same as {NO_VLLM_ENV}=1)",
    )


def vllm_skip_reason(config: pytest.Config) -> str | None:
    """Why real-vLLM tests cannot run here, or None when they can."""
    if config.getoption("--no-vllm") or os.environ.get(NO_VLLM_ENV, "") not in ("", "0"):
        return f"real vLLM tests skipped (--no-vllm or {NO_VLLM_ENV}=1)"
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed in this environment: run deploy/setup.sh"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = vllm_skip_reason(config)
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "vllm" in item.keywords:
            item.add_marker(skip)


@dataclass(frozen=True)
class VllmServer:
    """The session's running vLLM server and what it serves."""

    base_url: str
    """``http://host:port`` without ``/v1``."""
    model_dir: Path
    served_name: str
    adapters: dict[str, Path]
    """Every adapter built, ``tiny-lora-0..3``; only ``LOADED_ADAPTERS`` are loaded at start-up."""
    managed: ManagedVLLM
    log_file: Path

    @property
    def api_url(self) -> str:
        """The OpenAI base URL (with ``/v1``) for SDK clients."""
        return f"{self.base_url}/v1"


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def vllm_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[VllmServer]:
    """The tiny model with 4 adapters (3 loaded) on one real vLLM CPU server for the whole session."""
    reason = vllm_skip_reason(request.config)
    if reason is not None:
        pytest.skip(reason)
    from coe.models.tiny import build_tiny  # needs transformers/peft: only when a test asks for vLLM

    tiny = build_tiny(tmp_path_factory.mktemp("tiny"), adapters=4)
    log_file = tmp_path_factory.mktemp("vllm-log") / "vllm.log"
    cfg = LaunchConfig(
        model=tiny.path,
        served_name=tiny.served_name,
        lora_modules=[LoraModule(name=name, path=tiny.adapters[name]) for name in LOADED_ADAPTERS],
        max_loras=2,
        max_lora_rank=8,
        runtime_lora_updating=True,
        args=VLLM_ARGS,
        startup_timeout_s=VLLM_STARTUP_TIMEOUT_S,
        max_restarts=3,
        log_file=log_file,
    )
    managed = ManagedVLLM("tiny", cfg, python=sys.executable, health_interval_s=1.0)
    await managed.start()
    try:
        await managed.wait_healthy()
        yield VllmServer(
            base_url=managed.base_url,
            model_dir=tiny.path,
            served_name=tiny.served_name,
            adapters=dict(tiny.adapters),
            managed=managed,
            log_file=log_file,
        )
    finally:
        await managed.stop()
