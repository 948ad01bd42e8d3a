"""The ``coe`` command line, run as a user runs it (subprocesses of the installed entry point)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from coe.testing.server import free_port, serve_app
from coe.testing.stub_upstream import StubRecord, create_stub_app

ROOT = Path(__file__).resolve().parent.parent
COE = [sys.executable, "-m", "services.cli"]


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*COE, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_validate_demo_registry() -> None:
    result = run("experts", "validate")
    assert result.returncode == 0, result.stderr
    assert "generalist" in result.stdout and "local-cpu" in result.stdout
    assert "experts.yaml: ok (5 experts, 1 backends)" in result.stdout


def test_validate_reports_every_error_with_lines(tmp_path: Path) -> None:
    bad = tmp_path / "experts.yaml"
    bad.write_text(
        "backends:\n"
        "  gpu-0: {url: http://gpu-0:8000/v1}\n"
        "experts:\n"
        "  - name: a\n"
        "    backend: gpu-0\n"
        "    model: m\n"
        "  - name: b\n"
        "    backend: gpu-1\n"
        "    model: m\n"
        "    colour: blue\n"
    )
    result = run("experts", "validate", "--config", str(bad))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert f"error: {bad}:10: experts[1].colour: unknown key 'colour'" in lines
    assert any(line.startswith(f"error: {bad}:8: experts[1].backend: unknown backend 'gpu-1'") for line in lines)
    assert "Traceback" not in result.stderr


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    result = run("experts", "validate", "--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 1
    assert "nope.yaml: cannot read" in result.stderr


def test_serve_refuses_auth_without_keys(tmp_path: Path) -> None:
    cfg = tmp_path / "experts.yaml"
    cfg.write_text(yaml.safe_dump({"backends": {"b": {"url": "http://127.0.0.1:9/v1"}},
                                   "experts": [{"name": "e", "backend": "b", "model": "m"}],
                                   "auth": {"api_keys_env": "COE_TEST_UNSET_KEYS", "admin_key_env": "COE_TEST_UNSET"}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("COE_TEST_UNSET")}
    result = subprocess.run([*COE, "serve", "--config", str(cfg), "--port", str(free_port())], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 1
    assert "COE_TEST_UNSET_KEYS is not set" in result.stderr
    assert "auth.client_auth: false" in result.stderr


def test_no_command_is_usage_error() -> None:
    result = run()
    assert result.returncode == 2
    assert "usage: coe" in result.stderr


async def test_sigterm_drains_in_flight_requests(tmp_path: Path) -> None:
    record = StubRecord()
    async with serve_app(create_stub_app(slow_s=2.0, record=record)) as upstream:
        cfg = tmp_path / "experts.yaml"
        cfg.write_text(yaml.safe_dump({
            "backends": {"stub": {"url": f"{upstream}/v1"}},
            "experts": [{"name": "slow", "backend": "stub", "model": "stub+slow"}],
            "auth": {"client_auth": False, "admin_auth": False},
        }))
        port = free_port()
        proc = await asyncio.create_subprocess_exec(*COE, "serve", "--config", str(cfg), "--port", str(port),
                                                    cwd=ROOT, stderr=asyncio.subprocess.PIPE)
        try:
            async with httpx.AsyncClient(timeout=30) as http:
                deadline = time.monotonic() + 60
                while True:
                    try:
                        if (await http.get(f"http://127.0.0.1:{port}/health/ready")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    assert time.monotonic() < deadline, "coe serve did not become ready"
                    await asyncio.sleep(0.2)
                body = {"model": "slow", "messages": [{"role": "user", "content": "hi"}]}
                pending = asyncio.create_task(http.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body))
                while not record.requests:
                    await asyncio.sleep(0.02)
                proc.send_signal(signal.SIGTERM)
                response = await pending
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["message"]["content"] == "stub answer one two"
            assert await asyncio.wait_for(proc.wait(), 30) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.stderr is not None
        log = (await proc.stderr.read()).decode()
        assert "coe stopped" in log


@pytest.mark.parametrize("args", [["models", "build-tiny"], ["serve", "--port", "notaport"]])
def test_bad_arguments_exit_2(args: list[str]) -> None:
    assert run(*args).returncode == 2


def test_batch_client_commands_fail_in_one_line() -> None:
    """Nothing listening, or a base URL without /v1: one clear line and exit 1, no traceback."""
    port = free_port()
    gone = run("batch", "status", "batch_x", "--base-url", f"http://127.0.0.1:{port}/v1")
    assert gone.returncode == 1 and "Traceback" not in gone.stderr
    assert gone.stderr.strip().count("\n") == 0 and "cannot reach" in gone.stderr, gone.stderr


async def test_batch_client_hints_at_v1_on_404() -> None:
    async with serve_app(create_stub_app(record=StubRecord())) as url:  # any server: it 404s /batches/x
        result = await asyncio.to_thread(run, "batch", "status", "batch_x", "--base-url", url)
    assert result.returncode == 1 and "HTTP 404" in result.stderr and f"{url}/v1" in result.stderr, result.stderr
