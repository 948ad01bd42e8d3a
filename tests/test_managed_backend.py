"""A ``launch:`` backend end to end: coe starts its own vLLM, serves through it,
answers 503 + Retry-After while it is down, restarts it after a crash, and stops
it on shutdown.

This is the one extra vLLM process of the suite (the tiny model of the shared
``vllm_server`` fixture, served a second time, without LoRA), so everything is one
test to pay its start-up once.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from apphelpers import running_coe, wait_until, write_registry

from coe.backends.launch import group_alive

MAX_TOKENS = 8
MESSAGES: list[Any] = [{"role": "user", "content": "Say hello."}]
ARGS = ["--dtype", "float32", "--max-model-len", "512", "--enforce-eager"]
STARTUP_S = 300.0
RESTART_S = 240.0


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def assert_unavailable(client: openai.AsyncOpenAI, within_s: float) -> openai.InternalServerError:
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as exc:
        await client.chat.completions.create(model="local-base", messages=MESSAGES, max_tokens=MAX_TOKENS)
    elapsed = time.monotonic() - started
    assert exc.value.status_code == 503
    assert int(exc.value.response.headers["retry-after"]) > 0
    err = exc.value.response.json()["error"]
    assert err["type"] == "service_unavailable" and err["code"] == "backend_unavailable"
    assert elapsed < within_s, f"503 took {elapsed:.1f}s"
    return exc.value


async def assert_answers(client: openai.AsyncOpenAI) -> None:
    resp = await client.chat.completions.create(model="local-base", messages=MESSAGES, max_tokens=MAX_TOKENS)
    assert resp.model == "local-base"
    assert isinstance(resp.choices[0].message.content, str)
    assert 0 < resp.usage.completion_tokens <= MAX_TOKENS  # type: ignore[union-attr]


@pytest.mark.vllm
@pytest.mark.timeout(1200)
async def test_managed_vllm_lifecycle(vllm_server: Any, tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "local.log"
    reg = {
        "backends": {"local": {
            "launch": {"model": str(vllm_server.model_dir), "served_name": vllm_server.served_name,
                       "runtime_lora_updating": False, "args": ARGS, "startup_timeout_s": STARTUP_S,
                       "max_restarts": 2, "log_file": str(log_file)},
            "timeouts": {"connect_s": 2, "read_s": 60, "total_s": 120},
        }},
        "experts": [{"name": "local-base", "backend": "local", "model": vllm_server.served_name}],
        "auth": {"client_auth": False, "admin_auth": False},
        "dispatch": {"retries": 1, "backoff_s": 0.05},
    }
    path = write_registry(tmp_path / "experts.yaml", reg)

    async with running_coe(path) as coe, httpx.AsyncClient(base_url=coe.url, timeout=30) as raw:
        client = coe.client(max_retries=0)
        managed = coe.state.pool.get("local").managed
        assert managed is not None
        first_pid = managed.pid
        assert first_pid is not None and pid_exists(first_pid)
        assert "--enable-lora" not in managed.command()

        async def ready() -> bool:
            return (await raw.get("/health/ready")).status_code == 200

        # While vLLM starts (a minute on CPU): not ready, and requests get 503 + Retry-After at once.
        assert managed.state == "starting"
        r = await raw.get("/health/ready")
        assert r.status_code == 503
        assert r.json()["reason"]
        assert r.json()["backends"]["local"]["state"] == "starting"
        assert r.json()["backends"]["local"]["managed"] is True
        await assert_unavailable(client, within_s=5)

        # An adapter expert cannot be registered on a backend launched without LoRA.
        r = await raw.post("/v1/experts", json={
            "name": "local-lora", "backend": "local", "model": vllm_server.served_name,
            "adapter": {"name": "tiny-lora-3", "path": str(vllm_server.adapters["tiny-lora-3"])}})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "adapter"

        await wait_until(ready, STARTUP_S, "the managed vLLM becomes ready", interval=0.5)
        body = (await raw.get("/health/ready")).json()
        assert body["backends"]["local"] == {"state": "healthy", "url": managed.base_url, "managed": True,
                                             "restarts": 0, "pid": first_pid}
        assert log_file.stat().st_size > 0
        await assert_answers(client)

        # A crash: SIGKILL the whole process group (server and engine).
        os.killpg(first_pid, signal.SIGKILL)
        await assert_unavailable(client, within_s=10)

        async def down_reported() -> bool:
            r = await raw.get("/health/ready")
            return r.status_code == 503 and r.json()["backends"]["local"]["state"] in ("crashed", "starting")
        await wait_until(down_reported, 10, "/health/ready reports the crash", interval=0.1)
        await assert_unavailable(client, within_s=5)

        # The monitor restarts it on the same URL.
        async def restarted() -> bool:
            return managed.restarts == 1 and await ready()
        await wait_until(restarted, RESTART_S, "the managed vLLM is restarted and ready again", interval=0.5)
        second_pid = managed.pid
        assert second_pid is not None and second_pid != first_pid
        assert not group_alive(first_pid), "the killed group left a process behind"
        body = (await raw.get("/health/ready")).json()
        assert body["backends"]["local"]["restarts"] == 1
        assert body["backends"]["local"]["url"] == managed.base_url
        await assert_answers(client)

    # Shutting coe down stops the server and everything in its group.
    assert managed.state == "stopped"
    assert managed.pid is None
    assert not pid_exists(second_pid)
    assert not group_alive(second_pid)
