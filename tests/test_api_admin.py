"""The gateway's admin surface over real HTTP: keys, registry hot reload, experts
registered through the API (loaded into the real vLLM), health and metrics.

Every chat goes to the session's real vLLM CPU server (``vllm_server``); the only
stub is the counting ``/health`` server that measures how often backends are polled.
``tiny-lora-3`` is left unloaded in vLLM after every test here (see ``lora3_unloaded``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from apphelpers import PRICES, RunningCoe, running_coe, tiny_registry, wait_until, write_registry
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from redis_server import RedisServer, redis_binary

from coe.errors import ConfigError
from coe.store.redis import RedisStore
from coe.testing.server import free_port, serve_app
from services import cli
from services.api import create_app

MAX_TOKENS = 8
LORA3 = "tiny-lora-3"
MESSAGES: list[Any] = [{"role": "user", "content": "Say hello."}]


# -- helpers ------------------------------------------------------------------------------


async def chat(client: openai.AsyncOpenAI, model: str, **kw: Any) -> Any:
    kw.setdefault("messages", MESSAGES)
    return await client.chat.completions.create(model=model, max_tokens=MAX_TOKENS, **kw)


def assert_answer(resp: Any, model: str) -> None:
    assert resp.model == model
    assert resp.object == "chat.completion"
    assert isinstance(resp.choices[0].message.content, str)
    assert resp.usage.prompt_tokens > 0
    assert 0 < resp.usage.completion_tokens <= MAX_TOKENS


async def model_ids(client: openai.AsyncOpenAI) -> dict[str, Any]:
    return {m.id: m for m in (await client.models.list()).data}


async def vllm_models(server: Any) -> set[str]:
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.get(f"{server.api_url}/models")
        r.raise_for_status()
        return {m["id"] for m in r.json()["data"]}


async def vllm_unload(server: Any, name: str) -> int:
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(f"{server.api_url}/unload_lora_adapter", json={"lora_name": name})
        return r.status_code


def lora3_expert(server: Any, name: str = "api-lora3", **extra: Any) -> dict[str, Any]:
    return {"name": name, "backend": "tiny", "model": server.served_name,
            "adapter": {"name": LORA3, "path": str(server.adapters[LORA3])},
            "description": "registered through the API", "skills": ["greeting"], **extra}


def http(coe: RunningCoe, key: str | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.AsyncClient(base_url=coe.url, headers=headers, timeout=120)


def assert_openai_error(body: Any, type_: str, code: str | None = None) -> dict[str, Any]:
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in err["message"]
    assert err["type"] == type_, err
    if code is not None:
        assert err["code"] == code, err
    return dict(err)


def samples(metrics_text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, dict(s.labels), s.value)
            for family in text_string_to_metric_families(metrics_text) for s in family.samples]


def sample_value(metrics_text: str, name: str, **labels: str) -> float | None:
    for n, lbl, value in samples(metrics_text):
        if n == name and all(lbl.get(k) == v for k, v in labels.items()):
            return value
    return None


@pytest.fixture
async def lora3_unloaded(vllm_server: Any) -> AsyncIterator[None]:
    """``tiny-lora-3`` is not loaded in vLLM before the test and is unloaded again after it."""
    await vllm_unload(vllm_server, LORA3)
    assert LORA3 not in await vllm_models(vllm_server)
    yield
    await vllm_unload(vllm_server, LORA3)


# -- auth ---------------------------------------------------------------------------------


@pytest.mark.vllm
async def test_keys_guard_v1_and_admin_routes(vllm_server: Any, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    tag = uuid.uuid4().hex[:8].upper()
    keys_env, admin_env = f"COE_TEST_KEYS_{tag}", f"COE_TEST_ADMIN_{tag}"
    client_key, other_client_key, admin_key = f"ck-{tag}", f"ck2-{tag}", f"ak-{tag}"
    monkeypatch.setenv(keys_env, f" {client_key} , {other_client_key},")
    monkeypatch.setenv(admin_env, admin_key)
    reg = tiny_registry(vllm_server, auth={"client_auth": True, "admin_auth": True,
                                           "api_keys_env": keys_env, "admin_key_env": admin_env})
    path = write_registry(tmp_path / "experts.yaml", reg)
    expert = {"name": "auth-made", "backend": "tiny", "model": vllm_server.served_name}

    async with running_coe(path) as coe:
        # No key at all: 401 in OpenAI's error shape, through the SDK and raw.
        anon = coe.client(api_key="unused")
        with pytest.raises(openai.AuthenticationError) as no_key:
            await anon.models.list(extra_headers={"Authorization": openai.omit})
        assert no_key.value.status_code == 401
        assert_openai_error(no_key.value.response.json(), "authentication_error", "invalid_api_key")
        async with http(coe) as raw:
            r = await raw.post("/v1/chat/completions", json={"model": "tiny-base", "messages": MESSAGES,
                                                             "max_tokens": MAX_TOKENS})
            assert r.status_code == 401
            assert "missing" in assert_openai_error(r.json(), "authentication_error")["message"]
            r = await raw.get("/v1/experts")
            assert r.status_code == 401
            r = await raw.get("/v1/models", headers={"Authorization": f"Basic {client_key}"})
            assert r.status_code == 401, "only the Bearer scheme carries a key"

        # A wrong key: 401, on chat and on the admin route.
        wrong = coe.client(api_key=f"wrong-{tag}")
        with pytest.raises(openai.AuthenticationError) as bad:
            await chat(wrong, "tiny-base")
        assert bad.value.status_code == 401
        assert bad.value.code == "invalid_api_key"
        assert client_key not in str(bad.value.response.text)
        with pytest.raises(openai.AuthenticationError):
            await wrong.post("/experts", body=expert, cast_to=httpx.Response)

        # Client keys (both of the comma-separated list) answer chat and reads.
        for key in (client_key, other_client_key):
            client = coe.client(api_key=key)
            assert_answer(await chat(client, "tiny-base"), "tiny-base")
            assert "tiny-base" in await model_ids(client)
        client = coe.client(api_key=client_key)
        listed = await client.get("/experts", cast_to=httpx.Response)
        assert listed.status_code == 200

        # A client key may not change the registry: 403, and nothing is registered.
        with pytest.raises(openai.PermissionDeniedError) as denied:
            await client.post("/experts", body=expert, cast_to=httpx.Response)
        assert denied.value.status_code == 403
        assert_openai_error(denied.value.response.json(), "permission_error", "admin_key_required")
        assert "auth-made" not in await model_ids(client)

        # The admin key registers (201) and deletes; a client key cannot delete.
        admin = coe.client(api_key=admin_key)
        created = await admin.post("/experts", body=expert, cast_to=httpx.Response)
        assert created.status_code == 201
        assert created.json()["source"] == "api"
        assert "auth-made" in await model_ids(client)
        with pytest.raises(openai.PermissionDeniedError):
            await client.delete("/experts/auth-made", cast_to=httpx.Response)
        assert_answer(await chat(client, "auth-made"), "auth-made")
        assert "tiny-base" in await model_ids(admin), "the admin key is also a client key"
        deleted = await admin.delete("/experts/auth-made", cast_to=httpx.Response)
        assert deleted.status_code == 200
        assert "auth-made" not in await model_ids(client)

        # Probes and metrics need no key.
        async with http(coe) as raw:
            assert (await raw.get("/health/live")).status_code == 200

            async def ready() -> bool:
                return (await raw.get("/health/ready")).status_code == 200
            await wait_until(ready, 15, "/health/ready answers 200 without a key")
            r = await raw.get("/metrics")
            assert r.status_code == 200
            assert "coe_requests_total" in r.text


def test_serve_refuses_to_start_when_a_key_variable_is_missing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    tag = uuid.uuid4().hex[:8].upper()
    keys_env, admin_env = f"COE_TEST_KEYS_{tag}", f"COE_TEST_ADMIN_{tag}"
    monkeypatch.delenv(keys_env, raising=False)
    monkeypatch.setenv(admin_env, "admin-key")  # set, but admin auth is off: no virtual key can be made either
    reg = {"backends": {"b": {"url": f"http://127.0.0.1:{free_port()}/v1"}},
           "experts": [{"name": "e", "backend": "b", "model": "m"}],
           "auth": {"client_auth": True, "admin_auth": False, "api_keys_env": keys_env, "admin_key_env": admin_env}}
    path = write_registry(tmp_path / "experts.yaml", reg)
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))  # `serve` configures logging; undo it after
    monkeypatch.setattr(root, "level", root.level)

    code = cli.main(["serve", "--config", str(path), "--port", str(free_port())])

    assert code == 1
    err = capsys.readouterr().err
    assert keys_env in err
    assert "auth.client_auth" in err
    assert admin_env not in err, "the admin variable is set and must not be blamed"
    assert "Traceback" not in err


async def test_app_startup_fails_when_a_key_variable_is_missing(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    tag = uuid.uuid4().hex[:8].upper()
    keys_env, admin_env = f"COE_TEST_KEYS_{tag}", f"COE_TEST_ADMIN_{tag}"
    monkeypatch.setenv(keys_env, "client-key")
    monkeypatch.delenv(admin_env, raising=False)
    reg = {"backends": {"b": {"url": f"http://127.0.0.1:{free_port()}/v1"}},
           "experts": [{"name": "e", "backend": "b", "model": "m"}],
           "auth": {"api_keys_env": keys_env, "admin_key_env": admin_env}}  # both checks on by default
    app: FastAPI = create_app(write_registry(tmp_path / "experts.yaml", reg))
    with pytest.raises(ConfigError) as exc:
        async with app.router.lifespan_context(app):
            pytest.fail("the app started although the admin key variable is missing")
    assert admin_env in exc.value.message
    assert keys_env not in exc.value.message


# -- registry hot reload --------------------------------------------------------------------


@pytest.mark.vllm
async def test_registry_file_reload_applies_valid_edits_and_refuses_invalid_ones(
        vllm_server: Any, tmp_path: Path) -> None:
    reg = tiny_registry(vllm_server)
    path = write_registry(tmp_path / "experts.yaml", reg)
    async with running_coe(path) as coe, http(coe) as raw:
        client = coe.client()
        assert "tiny-sys" not in await model_ids(client)

        # A valid edit: a new expert with a system prompt is served within seconds.
        with_sys = {**reg, "experts": [*reg["experts"], {
            "name": "tiny-sys", "backend": "tiny", "model": vllm_server.served_name,
            "system_prompt": "You are a patient teacher. Always answer in one short sentence.",
            "params": {"temperature": 0}, "description": "added by editing the file"}]}
        write_registry(path, with_sys)

        async def listed() -> bool:
            return "tiny-sys" in await model_ids(client)
        await wait_until(listed, 10, "the edited registry lists tiny-sys")
        models = await model_ids(client)
        assert models["tiny-sys"].model_extra["coe"]["source"] == "file"
        sys_answer = await chat(client, "tiny-sys", temperature=0)
        assert_answer(sys_answer, "tiny-sys")
        base_answer = await chat(client, "tiny-base", temperature=0)
        assert sys_answer.usage.prompt_tokens > base_answer.usage.prompt_tokens, \
            "the expert's system prompt reaches the model"
        assert coe.state.registry.last_error is None

        # An invalid edit (unknown backend) is refused; the previous registry keeps serving.
        broken = {**with_sys, "experts": [*with_sys["experts"], {
            "name": "tiny-broken", "backend": "no-such-backend", "model": vllm_server.served_name}]}
        write_registry(path, broken)
        bad_index = len(broken["experts"]) - 1
        bad_line = next(i for i, line in enumerate(path.read_text().splitlines(), 1)
                        if "backend: no-such-backend" in line)

        async def refused() -> bool:
            return coe.state.registry.last_error is not None
        await wait_until(refused, 10, "the invalid edit is noticed")
        error = coe.state.registry.last_error
        assert error is not None
        assert f"{coe.state.registry.path}:{bad_line}: experts[{bad_index}].backend: unknown backend" in error
        assert "no-such-backend" in error
        models = await model_ids(client)
        assert "tiny-broken" not in models
        assert "tiny-sys" in models
        assert_answer(await chat(client, "tiny-sys"), "tiny-sys")
        r = await raw.get("/health/ready")
        assert r.status_code == 200, r.text
        assert r.json()["registry"]["last_reload_error"] == error
        metrics = (await raw.get("/metrics")).text
        assert sample_value(metrics, "coe_registry_reloads_total", result="refused") == 1
        assert sample_value(metrics, "coe_registry_reloads_total", result="ok") == 1

        # Fixing the file takes effect again (the fix also drops tiny-sys).
        fixed = {**broken, "experts": [*reg["experts"], {**broken["experts"][-1], "backend": "tiny"}]}
        write_registry(path, fixed)

        async def fixed_served() -> bool:
            m = await model_ids(client)
            return "tiny-broken" in m and "tiny-sys" not in m
        await wait_until(fixed_served, 10, "the fixed registry is served")
        assert coe.state.registry.last_error is None
        assert_answer(await chat(client, "tiny-broken"), "tiny-broken")
        with pytest.raises(openai.NotFoundError) as gone:
            await chat(client, "tiny-sys")
        assert gone.value.code == "model_not_found"
        r = await raw.get("/health/ready")
        assert r.json()["registry"]["last_reload_error"] is None
        metrics = (await raw.get("/metrics")).text
        assert sample_value(metrics, "coe_registry_reloads_total", result="ok") == 2


# -- experts registered through the API -------------------------------------------------------


@pytest.mark.vllm
async def test_register_and_remove_an_adapter_expert(vllm_server: Any, tmp_path: Path,
                                                     lora3_unloaded: None) -> None:
    reg = tiny_registry(vllm_server)
    path = write_registry(tmp_path / "experts.yaml", reg)
    async with running_coe(path) as coe, http(coe) as raw:
        client = coe.client()

        # Register: 201, loaded into vLLM, answers through coe.
        r = await raw.post("/v1/experts", json=lora3_expert(vllm_server))
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["name"] == "api-lora3" and body["source"] == "api" and body["object"] == "expert"
        assert body["adapter"] == {"name": LORA3, "path": str(vllm_server.adapters[LORA3])}
        assert LORA3 in await vllm_models(vllm_server)
        assert_answer(await chat(client, "api-lora3"), "api-lora3")

        r = await raw.get("/v1/experts")
        assert r.status_code == 200
        sources = {e["name"]: e["source"] for e in r.json()["data"]}
        assert sources == {"tiny-base": "file", "tiny-a0": "file", "tiny-a1": "file", "api-lora3": "api"}
        r = await raw.get("/v1/experts/api-lora3")
        assert r.status_code == 200 and r.json()["source"] == "api"
        models = await model_ids(client)
        assert models["api-lora3"].parent == vllm_server.served_name
        assert models["api-lora3"].model_extra["coe"]["adapter"] == LORA3
        assert models["api-lora3"].model_extra["coe"]["source"] == "api"
        assert models["tiny-base"].parent is None

        # Conflicts and refusals.
        r = await raw.post("/v1/experts", json=lora3_expert(vllm_server))
        assert r.status_code == 409, r.text
        assert_openai_error(r.json(), "conflict_error")
        r = await raw.post("/v1/experts", json={"name": "tiny-a0", "backend": "tiny",
                                                "model": vllm_server.served_name})
        assert r.status_code == 409, r.text
        assert "file" in assert_openai_error(r.json(), "conflict_error")["message"]

        outside = tmp_path / "elsewhere" / "tiny-lora-x"
        shutil.copytree(vllm_server.adapters[LORA3], outside)
        r = await raw.post("/v1/experts", json={**lora3_expert(vllm_server, name="api-outside"),
                                                "adapter": {"name": "tiny-lora-x", "path": str(outside)}})
        assert r.status_code == 403, r.text
        assert assert_openai_error(r.json(), "permission_error")["param"] == "adapter.path"
        link = vllm_server.model_dir / "adapters" / f"link-{uuid.uuid4().hex[:6]}"
        link.symlink_to(outside, target_is_directory=True)
        try:
            r = await raw.post("/v1/experts", json={**lora3_expert(vllm_server, name="api-link"),
                                                    "adapter": {"name": "tiny-lora-x", "path": str(link)}})
            assert r.status_code == 403, "a symlink inside a root that points outside it is refused"
        finally:
            link.unlink()
        ups = [".."] * (len(vllm_server.model_dir.parts) - 1)
        dotdot = vllm_server.model_dir.joinpath(*ups, *outside.parts[1:])  # <root>/../../<outside>
        assert str(dotdot).startswith(str(vllm_server.model_dir)) and dotdot.resolve() == outside.resolve()
        r = await raw.post("/v1/experts", json={**lora3_expert(vllm_server, name="api-dotdot"),
                                                "adapter": {"name": "tiny-lora-x", "path": str(dotdot)}})
        assert r.status_code == 403, r.text
        assert "tiny-lora-x" not in await vllm_models(vllm_server)

        r = await raw.post("/v1/experts", json={**lora3_expert(vllm_server, name="api-nobackend"),
                                                "backend": "gpu-9"})
        assert r.status_code == 400, r.text
        err = assert_openai_error(r.json(), "invalid_request_error")
        assert err["param"] == "backend" and "gpu-9" in err["message"]

        malformed: list[tuple[Any, str | None]] = [
            (b"{not json", None),
            ({"name": "api-nomodel", "backend": "tiny"}, "model"),
            ({**lora3_expert(vllm_server, name="api-extra"), "colour": "red"}, "colour"),
            ({"name": "coe", "backend": "tiny", "model": vllm_server.served_name}, "name"),
            ({"name": "bad name!", "backend": "tiny", "model": vllm_server.served_name}, "name"),
            ([1, 2], None),
        ]
        for payload, param in malformed:
            if isinstance(payload, bytes):
                r = await raw.post("/v1/experts", content=payload, headers={"content-type": "application/json"})
            else:
                r = await raw.post("/v1/experts", json=payload)
            assert r.status_code == 400, (payload, r.text)
            err = assert_openai_error(r.json(), "invalid_request_error")
            if param is not None:
                assert err["param"] == param, (payload, err)
        r = await raw.post("/v1/experts", json={**lora3_expert(vllm_server, name="api-rel"),
                                                "adapter": {"name": LORA3, "path": "adapters/tiny-lora-3"}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "adapter.path", r.text
        assert set(await model_ids(client)) == {"coe", "tiny-base", "tiny-a0", "tiny-a1", "api-lora3"}

        # The overlay survives a file reload.
        edited = {**reg, "experts": [{**reg["experts"][0], "description": "edited"}, *reg["experts"][1:]]}
        write_registry(path, edited)

        async def reloaded() -> bool:
            return (await model_ids(client))["tiny-base"].model_extra["coe"]["description"] == "edited"
        await wait_until(reloaded, 10, "the edited file is served")
        models = await model_ids(client)
        assert models["api-lora3"].model_extra["coe"]["source"] == "api"
        assert_answer(await chat(client, "api-lora3"), "api-lora3")

        # Remove it: gone from coe and unloaded from vLLM.
        r = await raw.delete("/v1/experts/api-lora3")
        assert r.status_code == 200, r.text
        assert r.json() == {"id": "api-lora3", "object": "expert", "deleted": True}
        assert "api-lora3" not in await model_ids(client)
        with pytest.raises(openai.NotFoundError) as gone:
            await chat(client, "api-lora3")
        assert gone.value.code == "model_not_found"
        assert LORA3 not in await vllm_models(vllm_server)
        assert (await raw.get("/v1/experts/api-lora3")).status_code == 404

        r = await raw.delete("/v1/experts/tiny-a0")
        assert r.status_code == 409, r.text
        assert_openai_error(r.json(), "conflict_error")
        assert_answer(await chat(client, "tiny-a0"), "tiny-a0")
        r = await raw.delete("/v1/experts/no-such-expert")
        assert r.status_code == 404, r.text
        assert_openai_error(r.json(), "not_found_error", "expert_not_found")


@pytest.mark.vllm
async def test_unloading_a_shared_adapter_waits_for_its_last_expert(vllm_server: Any, tmp_path: Path,
                                                                    lora3_unloaded: None) -> None:
    path = write_registry(tmp_path / "experts.yaml", tiny_registry(vllm_server))
    async with running_coe(path) as coe, http(coe) as raw:
        client = coe.client()
        for name in ("api-l3-a", "api-l3-b"):
            r = await raw.post("/v1/experts", json=lora3_expert(vllm_server, name=name))
            assert r.status_code == 201, r.text
        assert (await raw.delete("/v1/experts/api-l3-a")).status_code == 200
        assert LORA3 in await vllm_models(vllm_server), "api-l3-b still uses the adapter"
        assert_answer(await chat(client, "api-l3-b"), "api-l3-b")
        assert (await raw.delete("/v1/experts/api-l3-b")).status_code == 200
        assert LORA3 not in await vllm_models(vllm_server)


@pytest.mark.vllm
@pytest.mark.redis
async def test_api_experts_survive_a_restart_on_redis_and_lost_adapters_are_reloaded(
        vllm_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lora3_unloaded: None) -> None:
    if redis_binary() is None:
        pytest.skip("redis-server is not on PATH; run deploy/setup.sh")
    monkeypatch.delenv("COE_REDIS_URL", raising=False)
    with RedisServer(tmp_path / "redis") as redis:
        prefix = f"coe-test-{uuid.uuid4().hex[:6]}"
        reg = tiny_registry(vllm_server, store={"redis_url": redis.url, "prefix": prefix})
        path = write_registry(tmp_path / "experts.yaml", reg)
        expert = lora3_expert(vllm_server, name="api-durable", cost=PRICES)

        async with running_coe(path) as coe, http(coe) as raw:
            assert coe.state.store.durable
            r = await raw.post("/v1/experts", json=expert)
            assert r.status_code == 201, r.text
            assert_answer(await chat(coe.client(), "api-durable"), "api-durable")

        # vLLM loses the adapter while coe is down; the new coe loads it again at start-up.
        assert await vllm_unload(vllm_server, LORA3) == 200
        assert LORA3 not in await vllm_models(vllm_server)

        async with running_coe(path) as coe, http(coe) as raw:
            client = coe.client()
            models = await model_ids(client)
            assert models["api-durable"].model_extra["coe"]["source"] == "api"
            assert models["api-durable"].parent == vllm_server.served_name

            async def reloaded() -> bool:
                return LORA3 in await vllm_models(vllm_server)
            await wait_until(reloaded, 30, "the restarted coe loads the API expert's adapter into vLLM", 0.5)
            resp = await chat(client, "api-durable")
            assert_answer(resp, "api-durable")
            assert resp.model_extra["coe"]["cost"] > 0

            # vLLM loses it again while coe runs: the dispatcher reloads it on the 404.
            assert await vllm_unload(vllm_server, LORA3) == 200
            assert LORA3 not in await vllm_models(vllm_server)
            assert_answer(await chat(client, "api-durable"), "api-durable")
            assert LORA3 in await vllm_models(vllm_server)
            stream = await client.chat.completions.create(model="api-durable", messages=MESSAGES,
                                                          max_tokens=MAX_TOKENS, stream=True)
            assert [c async for c in stream], "the reloaded adapter streams too"

            r = await raw.delete("/v1/experts/api-durable")
            assert r.status_code == 200, r.text
            assert LORA3 not in await vllm_models(vllm_server)

        # The deletion is durable as well.
        store = RedisStore.from_url(redis.url, prefix=prefix)
        try:
            async with running_coe(path, store=store) as coe:
                assert "api-durable" not in await model_ids(coe.client())
        finally:
            await store.close()


# -- health ------------------------------------------------------------------------------------


@pytest.mark.vllm
async def test_ready_reports_each_backend(vllm_server: Any, tmp_path: Path) -> None:
    path = write_registry(tmp_path / "experts.yaml", tiny_registry(vllm_server))
    async with running_coe(path) as coe, http(coe) as raw:
        async def ready() -> bool:
            return (await raw.get("/health/ready")).status_code == 200
        await wait_until(ready, 15, "/health/ready is 200 with the tiny backend up")
        body = (await raw.get("/health/ready")).json()
        assert body["status"] == "ready"
        assert "reason" not in body
        assert body["backends"] == {"tiny": {"state": "healthy", "url": vllm_server.base_url, "managed": False}}
        assert body["registry"] == {"valid": True, "experts": 3, "last_reload_error": None}
        live = await raw.get("/health/live")
        assert live.status_code == 200 and live.json() == {"status": "ok"}
        metrics = (await raw.get("/metrics")).text
        assert sample_value(metrics, "coe_backend_up", backend="tiny") == 1


async def test_ready_is_503_when_no_backend_answers(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}/v1"
    reg = {"backends": {"gone": {"url": closed}},
           "experts": [{"name": "e", "backend": "gone", "model": "m"}],
           "auth": {"client_auth": False, "admin_auth": False},
           "dispatch": {"retries": 1, "backoff_s": 0.05}}
    path = write_registry(tmp_path / "experts.yaml", reg)
    async with running_coe(path) as coe, http(coe) as raw:
        async def unhealthy() -> bool:
            return coe.state.pool.get("gone").state == "unhealthy"
        await wait_until(unhealthy, 15, "the closed port is found unhealthy")
        r = await raw.get("/health/ready")
        assert r.status_code == 503
        body = r.json()
        assert body["status"] == "not_ready"
        assert body["reason"]
        assert body["backends"]["gone"]["state"] == "unhealthy"
        assert (await raw.get("/health/live")).status_code == 200
        metrics = (await raw.get("/metrics")).text
        assert sample_value(metrics, "coe_backend_up", backend="gone") == 0

        started = time.monotonic()
        with pytest.raises(openai.InternalServerError) as down:
            await chat(coe.client(), "e")
        assert down.value.status_code == 503
        assert int(down.value.response.headers["retry-after"]) > 0
        assert_openai_error(down.value.response.json(), "service_unavailable", "backend_unavailable")
        assert time.monotonic() - started < 5, "a known-down backend is not waited for"


async def test_backends_are_polled_at_the_configured_interval(tmp_path: Path) -> None:
    """``dispatch.health_interval_s`` sets how often remote backends are polled.

    The upstream is a stub on purpose: the point is to count ``/health`` probes.
    """
    hits: list[float] = []
    stub = FastAPI()

    @stub.get("/health")
    async def health() -> dict[str, str]:
        hits.append(time.monotonic())
        return {}

    async with serve_app(stub) as stub_url:
        reg = {"backends": {"stub": {"url": f"{stub_url}/v1"}},
               "experts": [{"name": "e", "backend": "stub", "model": "m"}],
               "auth": {"client_auth": False, "admin_auth": False},
               "dispatch": {"health_interval_s": 0.1}}
        path = write_registry(tmp_path / "experts.yaml", reg)
        async with running_coe(path):
            await asyncio.sleep(0.5)
            hits.clear()
            await asyncio.sleep(2.0)
            polls = len(hits)
    assert polls >= 8, f"{polls} health polls in 2 s with dispatch.health_interval_s: 0.1"


# -- metrics -------------------------------------------------------------------------------------


BOUNDED_LABELS: dict[str, Callable[[str], bool]] = {
    "route": lambda v: v in {"direct", "routed"},
    "status": lambda v: re.fullmatch(r"[1-5]\d\d", v) is not None,
    "stream": lambda v: v in {"true", "false"},
    "outcome": lambda v: v in {"ok", "error", "unavailable"},
    "kind": lambda v: v in {"prompt", "completion", "unavailable"} or re.fullmatch(r"http_[1-5]xx", v) is not None,
    "result": lambda v: v in {"ok", "refused"},
    "source": lambda v: v in {"file", "api"},
    "le": lambda v: v == "+Inf" or re.fullmatch(r"\d+(\.\d+)?", v) is not None,
}


@pytest.mark.vllm
async def test_metrics_count_requests_tokens_and_cost_with_bounded_labels(vllm_server: Any,
                                                                         tmp_path: Path) -> None:
    reg = tiny_registry(vllm_server)
    path = write_registry(tmp_path / "experts.yaml", reg)
    experts = {e["name"] for e in reg["experts"]}
    async with running_coe(path) as coe, http(coe) as raw:
        client = coe.client()
        request_ids = [f"req-{uuid.uuid4().hex}" for _ in range(3)]
        user = f"user-{uuid.uuid4().hex}"
        priced = [await chat(client, "tiny-base", user=user, extra_headers={"x-request-id": rid})
                  for rid in request_ids[:2]]
        free = await chat(client, "tiny-a1", extra_headers={"x-request-id": request_ids[2]})
        assert priced[0].model_extra["coe"]["request_id"] == request_ids[0]
        stream = await client.chat.completions.create(model="tiny-base", messages=MESSAGES,
                                                      max_tokens=MAX_TOKENS, stream=True,
                                                      stream_options={"include_usage": True})
        streamed_usage = [c.usage async for c in stream if c.usage is not None][-1]
        with pytest.raises(openai.NotFoundError):
            await chat(client, f"no-such-{uuid.uuid4().hex}")

        async def all_counted() -> bool:  # a stream is counted when its generator closes, just after [DONE]
            text = (await raw.get("/metrics")).text
            return sample_value(text, "coe_requests_total", route="direct", status="200") == 4
        await wait_until(all_counted, 5, "four answered requests counted")
        text = (await raw.get("/metrics")).text

    def value(name: str, **labels: str) -> float:
        found = sample_value(text, name, **labels)
        assert found is not None, f"{name}{labels} missing from /metrics"
        return found

    assert value("coe_requests_total", route="direct", status="200") == 4
    assert value("coe_requests_total", route="direct", status="404") == 1
    assert value("coe_expert_calls_total", expert="tiny-base", outcome="ok") == 3
    assert value("coe_expert_calls_total", expert="tiny-a1", outcome="ok") == 1
    prompt = sum(r.usage.prompt_tokens for r in priced) + streamed_usage.prompt_tokens
    completion = sum(r.usage.completion_tokens for r in priced) + streamed_usage.completion_tokens
    assert value("coe_tokens_total", expert="tiny-base", kind="prompt") == prompt
    assert value("coe_tokens_total", expert="tiny-base", kind="completion") == completion
    assert value("coe_tokens_total", expert="tiny-a1", kind="completion") == free.usage.completion_tokens
    expected_cost = (prompt * PRICES["input_per_mtok"] + completion * PRICES["output_per_mtok"]) / 1e6
    assert expected_cost > 0
    assert math.isclose(value("coe_cost_usd_total", expert="tiny-base"), expected_cost, rel_tol=1e-9)
    assert math.isclose(sum(r.model_extra["coe"]["cost"] for r in priced),
                        (sum(r.usage.prompt_tokens for r in priced) * PRICES["input_per_mtok"]
                         + sum(r.usage.completion_tokens for r in priced) * PRICES["output_per_mtok"]) / 1e6,
                        rel_tol=1e-9)
    assert (sample_value(text, "coe_cost_usd_total", expert="tiny-a1") or 0) == 0, "tiny-a1 has no prices"
    assert value("coe_experts", source="file") == 3

    # Every label value comes from a bounded set: no request id, user, or unknown model name.
    for rid in request_ids:
        assert rid not in text
    assert user not in text
    assert "no-such-" not in text
    for name, labels, _ in samples(text):
        if not name.startswith("coe_"):
            continue
        for key, val in labels.items():
            if key == "expert":
                assert val in experts, (name, labels)
            elif key == "backend":
                assert val == "tiny", (name, labels)
            else:
                assert key in BOUNDED_LABELS and BOUNDED_LABELS[key](val), (name, labels)


# -- registry edge cases -------------------------------------------------------------------------


def closed_registry(**overrides: Any) -> dict[str, Any]:
    """A registry over a backend nobody listens on: for what needs no expert to answer."""
    reg: dict[str, Any] = {
        "backends": {"gone": {"url": f"http://127.0.0.1:{free_port()}/v1"}},
        "experts": [{"name": "e", "backend": "gone", "model": "m"}],
        "auth": {"client_auth": False, "admin_auth": False},
    }
    reg.update(overrides)
    return reg


async def test_reverting_a_refused_edit_clears_the_reload_error(tmp_path: Path) -> None:
    reg = closed_registry()
    path = write_registry(tmp_path / "experts.yaml", reg)
    good = path.read_bytes()
    async with running_coe(path) as coe, http(coe) as raw:
        write_registry(path, {**reg, "experts": [{"name": "e", "backend": "nope", "model": "m"}]})

        async def refused() -> bool:
            return coe.state.registry.last_error is not None
        await wait_until(refused, 10, "the invalid edit is refused")
        assert "unknown backend" in (await raw.get("/health/ready")).json()["registry"]["last_reload_error"]

        path.write_bytes(good)  # the operator undoes the edit: the file is the one being served again

        async def cleared() -> bool:
            return coe.state.registry.last_error is None
        await wait_until(cleared, 10, "reverting the file clears last_error")
        assert (await raw.get("/health/ready")).json()["registry"]["last_reload_error"] is None


async def test_admin_routes_need_a_client_key_when_only_client_auth_is_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys_env = f"COE_TEST_KEYS_{uuid.uuid4().hex[:8].upper()}"
    monkeypatch.setenv(keys_env, "the-client-key")
    reg = closed_registry(auth={"client_auth": True, "admin_auth": False, "api_keys_env": keys_env})
    path = write_registry(tmp_path / "experts.yaml", reg)
    expert = {"name": "anon-made", "backend": "gone", "model": "m"}
    async with running_coe(path) as coe:
        async with http(coe) as anon:
            assert (await anon.get("/v1/experts")).status_code == 401
            r = await anon.post("/v1/experts", json=expert)
            assert r.status_code == 401, "an anonymous caller may not change a registry it may not even read"
            assert (await anon.delete("/v1/experts/e")).status_code == 401
        assert "anon-made" not in coe.state.registry.current.experts
        async with http(coe, "the-client-key") as client:
            r = await client.post("/v1/experts", json=expert)
            assert r.status_code == 201, "with admin_auth off, a client key administers"


async def test_concurrent_registrations_of_one_name_conflict(tmp_path: Path) -> None:
    path = write_registry(tmp_path / "experts.yaml", closed_registry())
    async with running_coe(path) as coe, http(coe) as raw:
        bodies = [{"name": "twin", "backend": "gone", "model": "m", "description": str(i)} for i in range(4)]
        responses = await asyncio.gather(*(raw.post("/v1/experts", json=b) for b in bodies))
        assert sorted(r.status_code for r in responses) == [201, 409, 409, 409]
        winner = next(r.json() for r in responses if r.status_code == 201)
        assert (await raw.get("/v1/experts/twin")).json()["description"] == winner["description"]
        assert list(await coe.state.store.items("experts")) == ["twin"]


async def test_adapter_experts_need_adapter_roots_on_their_backend(tmp_path: Path) -> None:
    path = write_registry(tmp_path / "experts.yaml", closed_registry())
    adapter = tmp_path / "adapters" / "a"
    adapter.mkdir(parents=True)
    async with running_coe(path) as coe, http(coe) as raw:
        r = await raw.post("/v1/experts", json={"name": "x", "backend": "gone", "model": "m",
                                                "adapter": {"name": "a", "path": str(adapter)}})
        assert r.status_code == 403, r.text
        assert assert_openai_error(r.json(), "permission_error")["param"] == "adapter.path"
        r = await raw.post("/v1/experts", json={"name": "x", "backend": "gone", "model": "m",
                                                "adapter": {"name": "a"}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "adapter.path", r.text
        assert await coe.state.store.items("experts") == {}


async def test_a_file_expert_hides_an_api_expert_of_the_same_name(tmp_path: Path) -> None:
    reg = closed_registry()
    path = write_registry(tmp_path / "experts.yaml", reg)
    async with running_coe(path) as coe, http(coe) as raw:
        r = await raw.post("/v1/experts", json={"name": "shared", "backend": "gone", "model": "m",
                                                "description": "from the API"})
        assert r.status_code == 201, r.text

        write_registry(path, {**reg, "experts": [*reg["experts"], {"name": "shared", "backend": "gone",
                                                                   "model": "m", "description": "from the file"}]})

        async def file_wins() -> bool:
            r = await raw.get("/v1/experts/shared")
            return bool(r.json()["source"] == "file")
        await wait_until(file_wins, 10, "the file's expert takes the name")
        assert (await raw.get("/v1/experts/shared")).json()["description"] == "from the file"
        assert (await raw.delete("/v1/experts/shared")).status_code == 409

        write_registry(path, reg)

        async def api_back() -> bool:
            r = await raw.get("/v1/experts/shared")
            return r.status_code == 200 and r.json()["source"] == "api"
        await wait_until(api_back, 10, "the API expert is served again once the file drops the name")
        assert (await raw.get("/v1/experts/shared")).json()["description"] == "from the API"
        assert (await raw.delete("/v1/experts/shared")).status_code == 200
        assert (await raw.get("/v1/experts/shared")).status_code == 404


@pytest.mark.vllm
async def test_an_adapter_that_fails_to_load_registers_nothing(vllm_server: Any, tmp_path: Path) -> None:
    path = write_registry(tmp_path / "experts.yaml", tiny_registry(vllm_server))
    missing = vllm_server.model_dir / "adapters" / f"missing-{uuid.uuid4().hex[:6]}"
    async with running_coe(path) as coe, http(coe) as raw:
        r = await raw.post("/v1/experts", json={**lora3_expert(vllm_server, name="api-missing"),
                                                "adapter": {"name": "tiny-lora-missing", "path": str(missing)}})
        assert 400 <= r.status_code < 600 and r.status_code not in (201, 409), r.text
        assert_openai_error(r.json(), r.json()["error"]["type"])
        assert (await raw.get("/v1/experts/api-missing")).status_code == 404
        assert await coe.state.store.items("experts") == {}
        assert "tiny-lora-missing" not in await vllm_models(vllm_server)


@pytest.mark.vllm
async def test_removing_an_api_expert_keeps_an_adapter_a_file_expert_uses(vllm_server: Any,
                                                                         tmp_path: Path) -> None:
    path = write_registry(tmp_path / "experts.yaml", tiny_registry(vllm_server))
    async with running_coe(path) as coe, http(coe) as raw:
        client = coe.client()
        body = {"name": "api-l0", "backend": "tiny", "model": vllm_server.served_name,
                "adapter": {"name": "tiny-lora-0", "path": str(vllm_server.adapters["tiny-lora-0"])}}
        r = await raw.post("/v1/experts", json=body)
        assert r.status_code == 201, r.text
        assert_answer(await chat(client, "api-l0"), "api-l0")
        assert (await raw.delete("/v1/experts/api-l0")).status_code == 200
        assert "tiny-lora-0" in await vllm_models(vllm_server), "tiny-a0 (a file expert) still uses tiny-lora-0"
        assert_answer(await chat(client, "tiny-a0"), "tiny-a0")


@pytest.mark.vllm
async def test_removing_an_api_expert_keeps_an_adapter_the_server_already_served(vllm_server: Any,
                                                                                tmp_path: Path) -> None:
    """tiny-lora-2 comes from the server's own --lora-modules, not from coe: deleting an API expert
    that named it must not unload it, since a file expert without ``adapter.path`` may rely on it."""
    reg = tiny_registry(vllm_server)
    path = write_registry(tmp_path / "experts.yaml", reg)
    assert "tiny-lora-2" in await vllm_models(vllm_server)
    try:
        async with running_coe(path) as coe, http(coe) as raw:
            client = coe.client()
            body = {"name": "api-l2", "backend": "tiny", "model": vllm_server.served_name,
                    "adapter": {"name": "tiny-lora-2", "path": str(vllm_server.adapters["tiny-lora-2"])}}
            r = await raw.post("/v1/experts", json=body)
            assert r.status_code == 201, r.text
            assert (await raw.delete("/v1/experts/api-l2")).status_code == 200

            write_registry(path, {**reg, "experts": [*reg["experts"], {
                "name": "tiny-a2", "backend": "tiny", "model": vllm_server.served_name,
                "adapter": {"name": "tiny-lora-2"}}]})

            async def listed() -> bool:
                return "tiny-a2" in await model_ids(client)
            await wait_until(listed, 10, "tiny-a2 is added")
            assert_answer(await chat(client, "tiny-a2"), "tiny-a2")
            assert "tiny-lora-2" in await vllm_models(vllm_server)
    finally:  # keep the shared server as the session started it
        if "tiny-lora-2" not in await vllm_models(vllm_server):
            async with httpx.AsyncClient(timeout=60) as h:
                r = await h.post(f"{vllm_server.api_url}/load_lora_adapter",
                                 json={"lora_name": "tiny-lora-2",
                                       "lora_path": str(vllm_server.adapters["tiny-lora-2"])})
                assert r.status_code == 200, r.text
