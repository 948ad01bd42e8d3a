"""``coe.runtime.Runtime`` as the processes open it (no HTTP): which backends it runs, and where their
vLLM logs go."""

from __future__ import annotations

from pathlib import Path

from coe.loader import load_registry
from coe.runtime import Runtime


def write(tmp_path: Path) -> Path:
    (tmp_path / "m").mkdir()
    config = tmp_path / "experts.yaml"
    config.write_text(
        "backends:\n"
        "  a: {launch: {model: m, on_demand: true}}\n"
        "  b: {launch: {model: m, on_demand: true, log_file: mine.log}}\n"
        "  c: {url: 'http://127.0.0.1:9/v1'}\n"
        "experts:\n"
        "  - {name: x, backend: a, model: m}\n"
        "  - {name: y, backend: b, model: m}\n"
        "  - {name: z, backend: c, model: m}\n"
        "auth: {client_auth: false, admin_auth: false}\n")
    return config


def test_each_process_has_its_own_vllm_log_and_only_the_backends_it_needs(tmp_path: Path) -> None:
    config = write(tmp_path)
    cfg = load_registry(config)
    serve = Runtime(config).backend_configs(cfg)
    assert set(serve) == {"a", "b", "c"}
    assert serve["a"].launch is not None and serve["a"].launch.log_file == tmp_path / ".coe" / "logs" / "a.log"
    batch = Runtime(config, backends={"a", "b"}, log_tag="batch-run").backend_configs(cfg)
    assert set(batch) == {"a", "b"}
    logs = tmp_path / ".coe" / "logs"
    assert batch["a"].launch is not None and batch["a"].launch.log_file == logs / "a.batch-run.log"
    assert batch["b"].launch is not None and batch["b"].launch.log_file == tmp_path / "mine.log"  # set by the operator
    assert cfg.backends["a"].launch is not None and cfg.backends["a"].launch.log_file.name == "a.log"  # not mutated


async def test_a_runtime_for_named_experts_opens_without_http_or_router(tmp_path: Path) -> None:
    """What ``coe profile`` opens: no batch jobs, no router, no backend but the ones named (none here)."""
    config = write(tmp_path)
    async with Runtime(config, backends=set(), batches=False, watch=False, routing=False) as runtime:
        assert runtime.jobs is None and runtime.worker is None
        assert runtime.pool.all() == {}
        assert runtime.registry.current.router.name == "default"
        assert set(runtime.registry.current.experts) == {"x", "y", "z"}
