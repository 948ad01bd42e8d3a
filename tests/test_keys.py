"""Virtual keys (``coe.keys``) against a real Redis and a STUB upstream (``coe.testing.stub_upstream``).

- 3 ``coe serve`` processes on one Redis share one requests-per-minute count: of 200 requests within
  10 s, exactly 60 are admitted; the rest get 429 with ``Retry-After`` and ``x-ratelimit-*``;
- a key revoked through one replica is refused by every replica within 1 s;
- secrets appear in no log, metric, ``/health/ready`` or error message;
- a budget stops a key within one request's reservation of the limit, at the experts' prices;
- a token limit under concurrency 16 overshoots by no more than the stated bound (0 here: direct requests
  with ``max_tokens``);
- ownership: another key's file, content, batch, cancel, batch-from-file and output are 404; lists show
  only one's own; the admin key sees everything, objects without an owner are the admin's alone.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio
from apphelpers import RunningCoe, running_coe, write_registry
from redis_server import RedisServer, redis_server_fixture

from coe.testing.replicas import Proc, coe_command, start_stub, wait_http
from coe.testing.server import free_port
from coe.testing.stub_upstream import StubRecord

pytestmark = pytest.mark.redis

redis_server = redis_server_fixture(scope="module")

ADMIN = "admin-secret-for-keys-test"
STATIC = ("static-client-one-secret", "static-client-two-secret")
PRICES = {"input_per_mtok": 1e6, "output_per_mtok": 1e6}  # 1 unit per token: costs are easy to read
MSG = [{"role": "user", "content": "hello there"}]  # the stub counts 2 prompt tokens, answers 4


def registry(stub_url: str, redis: RedisServer, **store: Any) -> dict[str, Any]:
    return {
        "backends": {"stub": {"url": f"{stub_url}/v1"}},
        "experts": [{"name": "fast", "backend": "stub", "model": "stub", "cost": PRICES},
                    {"name": "other", "backend": "stub", "model": "stub", "cost": PRICES}],
        "auth": {"client_auth": True, "admin_auth": True, "api_keys_env": "KEYS_TEST_CLIENT",
                 "admin_key_env": "KEYS_TEST_ADMIN"},
        "dispatch": {"retries": 0, "backoff_s": 0.01, "health_interval_s": 1},
        "store": {"redis_url": redis.url, "prefix": f"keys{random.randrange(10**9)}", **store},
    }


def auth_env() -> dict[str, str]:
    return {**os.environ, "KEYS_TEST_CLIENT": ",".join(STATIC), "KEYS_TEST_ADMIN": ADMIN}


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def chat(model: str = "fast", max_tokens: int = 4) -> dict[str, Any]:
    return {"model": model, "messages": MSG, "max_tokens": max_tokens}


# -- three replicas on one Redis ------------------------------------------------------------------------

class Replicas:
    def __init__(self, procs: list[Proc]) -> None:
        self.procs = procs
        self.urls = [f"http://127.0.0.1:{p.port}" for p in procs]


@pytest.fixture(scope="module")
def replicas(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    workdir = tmp_path_factory.mktemp("keys-fleet")
    stub, stub_url = start_stub(workdir)
    config = write_registry(workdir / "experts.yaml", registry(stub_url, redis_server, embedded_worker=False))
    procs = [Proc(f"r{i}", [coe_command(), "serve", "--config", str(config), "--port", str(port), "--log-level",
                            "info"], workdir / f"r{i}.log", port).start(env=auth_env())
             for i, port in enumerate(free_port() for _ in range(3))]
    try:
        for p in procs:
            wait_http(f"http://127.0.0.1:{p.port}/health/ready", p, 120, f"replica {p.name}")
        yield Replicas(procs)
    finally:
        for p in procs:
            p.stop()
        stub.stop()


async def create_key(http: httpx.AsyncClient, url: str, **spec: Any) -> dict[str, Any]:
    r = await http.post(f"{url}/v1/keys", json={"name": f"k{random.randrange(10**6)}", **spec}, headers=bearer(ADMIN))
    assert r.status_code == 201, r.text
    return dict(r.json())


async def test_rpm_is_shared_by_three_replicas_exactly(replicas: Replicas) -> None:
    urls = replicas.urls
    async with httpx.AsyncClient(timeout=30) as http:
        key = await create_key(http, urls[0], rpm=60)
        assert key["secret"].startswith("sk-coe-") and "secret_hash" not in key
        gate = asyncio.Semaphore(16)

        async def one(i: int) -> httpx.Response:
            async with gate:
                return await http.post(f"{urls[i % 3]}/v1/chat/completions", json=chat(), headers=bearer(key["secret"]))

        t0 = time.monotonic()
        answers = await asyncio.gather(*(one(i) for i in range(200)))
        took = time.monotonic() - t0
    assert took < 10, f"the 200 requests took {took:.1f}s"
    codes = [r.status_code for r in answers]
    assert codes.count(200) == 60 and codes.count(429) == 140, {c: codes.count(c) for c in set(codes)}
    per_replica = [sum(1 for i, r in enumerate(answers) if i % 3 == k and r.status_code == 200) for k in range(3)]
    assert all(n > 0 for n in per_replica), per_replica  # every replica admitted some: one count, not three
    for r in answers:
        if r.status_code == 429:
            assert 1 <= int(r.headers["retry-after"]) <= 60, r.headers
            assert r.headers["x-ratelimit-limit-requests"] == "60"
            assert r.headers["x-ratelimit-remaining-requests"] == "0"
            err = r.json()["error"]
            assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded", err
            assert key["secret"] not in r.text
    ok = next(r for r in answers if r.status_code == 200)
    assert int(ok.headers["x-ratelimit-remaining-requests"]) < 60
    async with httpx.AsyncClient(timeout=30) as http:  # the SDK sees OpenAI's RateLimitError
        client = openai.AsyncOpenAI(base_url=f"{urls[1]}/v1", api_key=key["secret"], max_retries=0)
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="fast", messages=MSG, max_tokens=4)  # type: ignore[arg-type]
        usage = (await http.get(f"{urls[2]}/v1/keys/{key['id']}/usage", headers=bearer(ADMIN))).json()
    assert usage["requests_last_minute"] == 60, usage


async def test_revoked_key_is_refused_by_every_replica_within_1s(replicas: Replicas) -> None:
    urls = replicas.urls
    async with httpx.AsyncClient(timeout=10) as http:
        key = await create_key(http, urls[0])

        async def statuses() -> list[int]:
            rs = await asyncio.gather(*(http.get(f"{u}/v1/models", headers=bearer(key["secret"])) for u in urls))
            return [r.status_code for r in rs]

        assert await statuses() == [200, 200, 200]  # every replica has the key cached now
        t0 = time.monotonic()
        r = await http.delete(f"{urls[1]}/v1/keys/{key['id']}", headers=bearer(ADMIN))
        assert r.status_code == 200 and r.json()["revoked_at"], r.text
        while (seen := await statuses()) != [401, 401, 401]:
            assert time.monotonic() - t0 < 1.0, f"still {seen} {time.monotonic() - t0:.2f}s after the revoke"
            await asyncio.sleep(0.02)
        print(f"refused everywhere {time.monotonic() - t0:.3f}s after the revoke")
        listed = (await http.get(f"{urls[2]}/v1/keys", headers=bearer(ADMIN))).json()["data"]
        assert any(k["id"] == key["id"] and k["revoked_at"] for k in listed)
        assert all("secret" not in k and "secret_hash" not in k for k in listed)
        client_try = await http.get(f"{urls[0]}/v1/keys", headers=bearer(STATIC[0]))
        assert client_try.status_code == 403  # a client key cannot manage keys


async def test_secrets_never_appear_in_logs_metrics_or_health(replicas: Replicas) -> None:
    urls = replicas.urls
    async with httpx.AsyncClient(timeout=10) as http:
        key = await create_key(http, urls[0], rpm=1, name="visible-name")
        for u in urls:
            await http.post(f"{u}/v1/chat/completions", json=chat(), headers=bearer(key["secret"]))
        bad = await http.post(f"{urls[0]}/v1/chat/completions", json=chat(), headers=bearer(key["secret"] + "x"))
        assert bad.status_code == 401
        texts = [bad.text]
        for u in urls:
            texts += [(await http.get(f"{u}/metrics")).text, (await http.get(f"{u}/health/ready")).text]
    metrics = texts[1]
    assert 'coe_key_requests_total{key="visible-name",outcome="admitted"} 1.0' in metrics, metrics[-2000:]
    assert any('key="visible-name",outcome="limited"' in t for t in texts)
    texts += [p.tail(10**7) for p in replicas.procs]
    for secret in (key["secret"], ADMIN, *STATIC):
        assert not any(secret in t for t in texts), "a secret leaked"


# -- leases: a busy key with a large rpm stays off the store's round trip ----------------------------------

async def test_leases_skip_store_steps_and_never_pass_the_limit(redis_server: RedisServer) -> None:
    """Three limiters (three replicas) on one Redis share a key with rpm 1,000. Leases admit most requests
    with no store step; the count never passes the limit; what leases left is given back, so the window
    holds exactly what was admitted, and a key under ``LEASE_MIN_RPM`` is counted request by request."""
    from coe.keys import KeyLimiter
    from coe.keys.limits import LEASE_MIN_RPM, LEASE_SHARE
    from coe.keys.model import KeyCreate, VirtualKey
    from coe.store.redis import RedisStore

    prefix = f"lease{random.randrange(10**9)}"
    stores = [RedisStore.from_url(redis_server.url, prefix=prefix) for _ in range(3)]
    limiters = [KeyLimiter(s) for s in stores]
    key = VirtualKey.create(KeyCreate(name="busy", rpm=1000), "sk-coe-lease-test")
    small = VirtualKey.create(KeyCreate(name="small", rpm=LEASE_MIN_RPM - 1), "sk-coe-lease-small")

    async def admit(limiter: KeyLimiter, k: VirtualKey) -> bool:
        try:
            await limiter.admit(k)
            return True
        except RateLimited:
            return False

    from coe.errors import RateLimited
    admitted = 0
    for i in range(450):  # the window stays over half free: leases
        admitted += await admit(limiters[i % 3], key)
    steps = sum(lim.store_steps for lim in limiters)
    assert admitted == 450 and steps < 150, (steps, admitted)  # most came from leases
    for i in range(1050):  # past the limit: leases stop at half, then every request is counted in the store
        admitted += await admit(limiters[i % 3], key)
        assert admitted <= 1000
    assert admitted >= 1000 - 3 * int(1000 * LEASE_SHARE), admitted  # at worst the leases still held
    for lim in limiters:
        await lim.close()  # gives back what leases left
    probe = KeyLimiter(stores[0])
    usage = await probe.usage(key)
    assert usage["requests_last_minute"] == admitted, usage
    extra = sum([await admit(probe, key) for _ in range(40)])
    assert admitted + extra == 1000 or extra == 40, (admitted, extra)
    assert (await probe.usage(key))["requests_last_minute"] <= 1000

    before = probe.store_steps
    got = sum([await admit(probe, small) for _ in range(50)])
    assert got == 50 and probe.store_steps - before == 50  # a small limit: every request in the store
    await probe.close()
    for s in stores:
        await s.close()


async def test_a_wrong_secret_costs_one_store_read_per_cache_period(redis_server: RedisServer) -> None:
    """A client retrying a wrong key does not cost a store read per request; a new key still works at once."""
    from coe.keys.model import KeyCreate
    from coe.keys.ring import KeyRing
    from coe.store.redis import RedisStore

    class CountingStore(RedisStore):  # counts reads; the store itself is the real Redis one
        reads = 0

        async def get(self, namespace: str, key: str) -> Any:
            CountingStore.reads += 1
            return await super().get(namespace, key)

    store = CountingStore.from_url(redis_server.url, prefix=f"ring{random.randrange(10**9)}")
    ring = KeyRing(store, cache_s=0.3)
    try:
        assert all([await ring.lookup("sk-coe-wrong") is None for _ in range(20)])
        assert CountingStore.reads == 1
        await asyncio.sleep(0.35)
        assert await ring.lookup("sk-coe-wrong") is None and CountingStore.reads == 2
        key, secret = await KeyRing(store).create(KeyCreate(name="fresh"))  # made through another replica
        found = await ring.lookup(secret)
        assert found is not None and found.id == key.id
    finally:
        await store.close()


# -- one in-process coe on Redis: budgets, token limits, ownership -------------------------------------

@pytest_asyncio.fixture(loop_scope="session")
async def coe(stub: tuple[str, StubRecord], redis_server: RedisServer, tmp_path: Path,
              monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[RunningCoe]:
    for name, value in auth_env().items():
        if name.startswith("KEYS_TEST_"):
            monkeypatch.setenv(name, value)
    path = write_registry(tmp_path / "experts.yaml", registry(stub[0], redis_server, embedded_worker=True,
                                                                worker_concurrency=1, batch_window=1))
    async with running_coe(path) as running:
        yield running


async def test_budget_stops_within_one_request_at_expert_prices(coe: RunningCoe) -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        key = await create_key(http, coe.url, budget=100.0)
        codes = []
        for _ in range(40):
            r = await http.post(f"{coe.url}/v1/chat/completions", json=chat(), headers=bearer(key["secret"]))
            codes.append(r.status_code)
            if r.status_code == 429:
                assert r.json()["error"]["code"] == "insufficient_quota"
                assert "retry-after" not in r.headers  # a total budget never frees up by itself
                break
        usage = (await http.get(f"{coe.url}/v1/keys/{key['id']}/usage", headers=bearer(ADMIN))).json()
    admitted = codes.count(200)
    cost_each = 2 + 4  # the stub's 2 prompt + 4 completion tokens at 1 unit per token
    reservation = (8 + len(b"hello there")) + 4  # coe.keys.estimate_tokens: bytes + 8 per message + max_tokens
    assert codes[-1] == 429 and admitted == codes.index(429)
    assert usage["cost"] == pytest.approx(admitted * cost_each), usage
    assert usage["spend_this_period"] == pytest.approx(admitted * cost_each, abs=1e-6)
    assert usage["cost"] <= 100 and 100 - usage["cost"] < reservation, usage  # stopped within one request


async def test_token_limit_under_concurrency_16_stays_within_the_bound(coe: RunningCoe) -> None:
    tpm = 600
    async with httpx.AsyncClient(timeout=30) as http:
        key = await create_key(http, coe.url, tpm=tpm)

        async def one() -> int:
            r = await http.post(f"{coe.url}/v1/chat/completions", json=chat(), headers=bearer(key["secret"]))
            return r.status_code

        codes: list[int] = []
        for _ in range(6):
            codes += await asyncio.gather(*(one() for _ in range(16)))
        usage = (await http.get(f"{coe.url}/v1/keys/{key['id']}/usage", headers=bearer(ADMIN))).json()
    bound = 0  # direct requests with max_tokens reserve at least what they use (coe.keys.limits)
    assert codes.count(429) > 0 and codes.count(200) > 0, codes
    assert usage["tokens"] == codes.count(200) * 6, usage
    assert usage["tokens_this_minute"] <= tpm + bound, usage


async def test_streamed_answers_count_their_real_usage(coe: RunningCoe) -> None:
    """A stream is settled at its end from its ``coe`` field: the real 6 tokens, not the 140 reserved,
    whether or not the client asked for usage, through the real SDK."""
    async with httpx.AsyncClient(timeout=30) as http:
        key = await create_key(http, coe.url, tpm=10_000, budget=1_000.0)
        client = openai.AsyncOpenAI(base_url=f"{coe.url}/v1", api_key=key["secret"], max_retries=0)
        for include_usage in (False, True):
            stream = await client.chat.completions.create(
                model="fast", messages=[{"role": "user", "content": "hello there"}], max_tokens=120, stream=True,
                stream_options={"include_usage": include_usage})
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            assert text
        for _ in range(50):  # the settle runs as its own task once the stream ended
            usage = (await http.get(f"{coe.url}/v1/keys/{key['id']}/usage", headers=bearer(ADMIN))).json()
            if usage["tokens"]:
                break
            await asyncio.sleep(0.02)
    assert usage["tokens"] == 2 * 6 and usage["tokens_this_minute"] == 2 * 6, usage
    assert usage["cost"] == pytest.approx(2 * 6) and usage["spend_this_period"] == pytest.approx(2 * 6), usage


async def test_client_auth_with_only_virtual_keys(stub: tuple[str, StubRecord], redis_server: RedisServer,
                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``COE_API_KEYS``, an admin key: clients use virtual keys, and nothing else gets in."""
    monkeypatch.delenv("KEYS_TEST_CLIENT", raising=False)
    monkeypatch.setenv("KEYS_TEST_ADMIN", ADMIN)
    path = write_registry(tmp_path / "experts.yaml", registry(stub[0], redis_server, embedded_worker=False))
    async with running_coe(path) as running, httpx.AsyncClient(timeout=30) as http:
        key = await create_key(http, running.url)
        ok = await http.post(f"{running.url}/v1/chat/completions", json=chat(), headers=bearer(key["secret"]))
        anon = await http.post(f"{running.url}/v1/chat/completions", json=chat())
        wrong = await http.post(f"{running.url}/v1/chat/completions", json=chat(), headers=bearer("sk-coe-nope"))
    assert ok.status_code == 200 and anon.status_code == 401 and wrong.status_code == 401, (ok.text, anon.text)


async def test_allowed_models(coe: RunningCoe) -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        key = await create_key(http, coe.url, models=["fast"])
        ok = await http.post(f"{coe.url}/v1/chat/completions", json=chat("fast"), headers=bearer(key["secret"]))
        no = await http.post(f"{coe.url}/v1/chat/completions", json=chat("other"), headers=bearer(key["secret"]))
    assert ok.status_code == 200 and no.status_code == 403, no.text


async def test_ownership_404_for_others_admin_sees_all(coe: RunningCoe) -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        vkey = (await create_key(http, coe.url))["secret"]
        owner, other = bearer(STATIC[0]), bearer(vkey)
        line = '{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": %s}\n'
        content = (line % '{"model": "fast", "messages": [{"role": "user", "content": "hi"}]}').encode()
        up = await http.post(f"{coe.url}/v1/files", headers=owner, data={"purpose": "batch"},
                             files={"file": ("in.jsonl", content)})
        fid = up.json()["id"]
        b = await http.post(f"{coe.url}/v1/batches", headers=owner, json={"input_file_id": fid})
        bid = b.json()["id"]
        deadline = time.monotonic() + 30
        while (batch := (await http.get(f"{coe.url}/v1/batches/{bid}", headers=owner)).json())["status"] != "completed":
            assert time.monotonic() < deadline, batch
            await asyncio.sleep(0.1)
        out = batch["output_file_id"]
        for who in (other, bearer(STATIC[1])):
            for method, path in (("GET", f"/v1/files/{fid}"), ("GET", f"/v1/files/{fid}/content"),
                                 ("GET", f"/v1/files/{out}"), ("GET", f"/v1/files/{out}/content"),
                                 ("DELETE", f"/v1/files/{out}"), ("DELETE", f"/v1/files/{fid}"),
                                 ("GET", f"/v1/batches/{bid}"), ("POST", f"/v1/batches/{bid}/cancel")):
                r = await http.request(method, f"{coe.url}{path}", headers=who)
                assert r.status_code == 404, (method, path, r.text)
                assert r.json()["error"]["type"] == "not_found_error"
            r = await http.post(f"{coe.url}/v1/batches", headers=who, json={"input_file_id": fid})
            assert r.status_code == 404, r.text
            assert (await http.get(f"{coe.url}/v1/files", headers=who)).json()["data"] == []
            assert (await http.get(f"{coe.url}/v1/batches", headers=who)).json()["data"] == []
        # an object from before keys existed: the admin's alone
        old = await coe.state.jobs.create_file("old.jsonl", "batch", content)  # type: ignore[union-attr]
        assert (await http.get(f"{coe.url}/v1/files/{old['id']}", headers=owner)).status_code == 404
        for who, want in ((owner, 200), (bearer(ADMIN), 200)):
            assert (await http.get(f"{coe.url}/v1/files/{out}/content", headers=who)).status_code == want
            assert (await http.get(f"{coe.url}/v1/batches/{bid}", headers=who)).status_code == want
        listed = {f["id"] for f in (await http.get(f"{coe.url}/v1/files", headers=owner)).json()["data"]}
        assert listed == {fid, out}
        everything = {f["id"] for f in (await http.get(f"{coe.url}/v1/files", headers=bearer(ADMIN))).json()["data"]}
        assert {fid, out, old["id"]} <= everything
        assert [x["id"] for x in (await http.get(f"{coe.url}/v1/batches", headers=owner)).json()["data"]] == [bid]
        assert (await http.delete(f"{coe.url}/v1/files/{fid}", headers=owner)).status_code == 200


async def test_cli_create_list_show_usage_revoke(coe: RunningCoe, capsys: pytest.CaptureFixture[str]) -> None:
    from coe.cli import main

    base = ["--base-url", f"{coe.url}/v1", "--admin-key", ADMIN]

    async def run(*argv: str) -> Any:
        capsys.readouterr()
        assert await asyncio.to_thread(main, ["keys", *argv, *base]) == 0
        return json.loads(capsys.readouterr().out)

    made = await run("create", "cli-key", "--rpm", "5", "--models", "fast", "--metadata", "team=a")
    assert made["secret"].startswith("sk-coe-") and made["rpm"] == 5 and made["models"] == ["fast"]
    assert made["metadata"] == {"team": "a"}
    listed = await run("list")
    assert made["id"] in [k["id"] for k in listed] and all("secret" not in k for k in listed)
    assert (await run("show", made["id"]))["name"] == "cli-key"
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(f"{coe.url}/v1/chat/completions", json=chat(), headers=bearer(made["secret"]))
        assert r.status_code == 200, r.text
    assert (await run("usage", made["id"]))["requests"] == 1
    assert (await run("revoke", made["id"]))["revoked_at"]
    await asyncio.sleep(0.6)  # the lookup cache (0.5 s)
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(f"{coe.url}/v1/chat/completions", json=chat(), headers=bearer(made["secret"]))
        assert r.status_code == 401


async def test_batch_items_count_against_the_key_and_a_spent_budget_fails_the_rest(coe: RunningCoe) -> None:
    n, cost_each, budget = 20, 1 + 4, 30.0  # "hi": 1 prompt token, 4 completion tokens, at 1 unit each
    async with httpx.AsyncClient(timeout=30) as http:
        key = await create_key(http, coe.url, budget=budget)
        who = bearer(key["secret"])
        line = '{"custom_id": "i%d", "method": "POST", "url": "/v1/chat/completions", "body": %s}\n'
        body = '{"model": "fast", "messages": [{"role": "user", "content": "hi"}]}'
        content = "".join(line % (i, body) for i in range(n)).encode()
        fid = (await http.post(f"{coe.url}/v1/files", headers=who, data={"purpose": "batch"},
                               files={"file": ("in.jsonl", content)})).json()["id"]
        bid = (await http.post(f"{coe.url}/v1/batches", headers=who, json={"input_file_id": fid})).json()["id"]
        deadline = time.monotonic() + 60
        while (batch := (await http.get(f"{coe.url}/v1/batches/{bid}", headers=who)).json())["status"] != "completed":
            assert time.monotonic() < deadline, batch
            await asyncio.sleep(0.1)
        ok = (await http.get(f"{coe.url}/v1/files/{batch['output_file_id']}/content", headers=who)).text.splitlines()
        bad = (await http.get(f"{coe.url}/v1/files/{batch['error_file_id']}/content", headers=who)).text.splitlines()
        usage = (await http.get(f"{coe.url}/v1/keys/{key['id']}/usage", headers=bearer(ADMIN))).json()
    done = int(budget // cost_each)  # one item at a time (worker_concurrency 1, batch_window 1): exact
    assert batch["request_counts"] == {"total": n, "completed": done, "failed": n - done}, batch
    assert len(ok) == done and len(bad) == n - done
    errors = [json.loads(x)["response"] for x in bad]
    assert all(e["status_code"] == 429 and e["body"]["error"]["code"] == "insufficient_quota"
               for e in errors), errors[0]
    assert "budget" in errors[0]["body"]["error"]["message"]
    assert usage["cost"] == pytest.approx(done * cost_each) and usage["tokens"] == done * cost_each, usage
