"""The routing explorer (``/ui``): its admin API on a real two-level router (fitted on MMLU rows) over a
stub upstream, two replicas on one real Redis, and the page itself in Debian's real Chromium (Playwright).

Screenshots go to the test's tmp folder, or to ``$COE_SCREENSHOTS`` when set (``bench/results/explorer``
keeps the ones the README shows).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import yaml
from apphelpers import RunningCoe, running_coe, wait_until, write_registry
from redis_server import redis_server_fixture
from test_twolevel import write_fixture

from coe.testing.server import serve_app
from coe.testing.stub_upstream import StubRecord, create_stub_app

ADMIN, CLIENT = "explorer-admin-key", "explorer-client-key"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CODE_Q = "Write a Python function that checks whether a binary search tree is balanced, and explain its runtime."
LAW_Q = "Under the doctrine of adverse possession, what must a trespasser prove to acquire title to land?"

redis_server = redis_server_fixture(scope="module")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The two-level fixture of test_twolevel (5 MMLU categories, 40 rows each), fitted once for the module."""
    folder = tmp_path_factory.mktemp("explorer")
    write_fixture(folder)
    return folder


@pytest.fixture(autouse=True)
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COE_API_KEYS", CLIENT)
    monkeypatch.setenv("COE_ADMIN_KEY", ADMIN)


@pytest_asyncio.fixture(loop_scope="session")
async def stub() -> AsyncIterator[str]:
    async with serve_app(create_stub_app(record=StubRecord())) as url:
        yield url


def registry(folder: Path, stub_url: str, name: str, **extra: Any) -> Path:
    """The fitted fixture, its experts served by the stub, auth on, queries kept for the page."""
    reg = yaml.safe_load((folder / "experts.yaml").read_text())
    reg["backends"] = {"b": {"url": f"{stub_url}/v1"}}
    reg["router"].update(k_min=1, k_max=1)
    reg["router"]["data"] = str(folder / "data.jsonl")
    reg["router"]["artifact"] = str(folder / ".coe/router")
    for e in reg["experts"]:
        e["cost"] = {"input_per_mtok": 1.0, "output_per_mtok": 2.0}
    reg["auth"] = {"client_auth": True, "admin_auth": True}
    reg["explorer"] = {"keep_queries": True, "publish_interval_s": 0.2}
    reg.update(extra)
    return write_registry(folder / name, reg)


async def ask(coe: RunningCoe, question: str) -> dict[str, Any]:
    async with coe.client(CLIENT) as client:
        response = await client.chat.completions.create(
            model="coe", messages=[{"role": "user", "content": question}], max_tokens=4)
    coe_field: dict[str, Any] = response.model_extra["coe"]  # type: ignore[index]
    return coe_field


def admin(coe: RunningCoe, key: str | None = ADMIN) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=coe.url, headers={"authorization": f"Bearer {key}"} if key else {},
                             timeout=60)


async def test_live_view_lists_decisions_and_load_and_needs_the_admin_key(fitted: Path, stub: str) -> None:
    path = registry(fitted, stub, "live.yaml")
    async with running_coe(path) as coe:
        asked = {q: await ask(coe, q) for q in (CODE_Q, LAW_Q)}
        async with admin(coe) as raw:
            live = (await raw.get("/v1/explorer/live")).json()
            for key, status in ((CLIENT, 403), (None, 401), ("wrong", 401)):
                async with admin(coe, key) as other:
                    refused = await other.get("/v1/explorer/live")
                    assert refused.status_code == status and refused.json()["error"]["message"]
            router = (await raw.get("/v1/explorer/router")).json()
            assert (await raw.get("/ui")).headers["content-security-policy"].startswith("default-src 'self'")
            assert (await raw.get("/ui/assets/nope.js")).status_code == 404
    by_query = {d["query"]: d for d in live["decisions"]}
    assert set(by_query) == {CODE_Q, LAW_Q}
    assert [d["query"] for d in live["decisions"]] == [LAW_Q, CODE_Q]  # newest first
    for q, field in asked.items():
        d = by_query[q]
        assert [e["name"] for e in d["experts"]] == [e["name"] for e in field["decision"]["experts"]]
        assert d["category"] == field["decision"]["category"] and d["request_id"] == field["request_id"]
        assert d["k"] == 1 and d["answered_by"] == field["answered_by"] and d["cost"] == field["cost"] > 0
        assert d["latency_ms"] > 0 and d["replica"] == live["replica"]
    assert by_query[CODE_Q]["experts"][0]["name"] == "computer-science"
    assert by_query[LAW_Q]["experts"][0]["name"] == "law"
    [me] = live["replicas"]
    assert me["experts"]["law"]["calls"] == 1 and me["experts"]["law"]["errors"] == 0
    assert me["experts"]["computer-science"]["latency_count"] == 1 and me["backends"]["b"]["state"]
    # what the router knows: the last fit's held-out confusion matrix, and every expert's profile
    fit = router["fit"]
    matrix = fit["confusion"]
    n = len(fit["classes"])
    assert n == 5 and len(matrix) == n and all(len(row) == n for row in matrix)
    assert sum(map(sum, matrix)) == fit["held_out"]["rows"]
    correct = sum(matrix[i][i] for i in range(n))
    assert correct / fit["held_out"]["rows"] == pytest.approx(fit["held_out_top1"], abs=1e-3)
    assert {e["name"] for e in router["experts"]} == set(router["profiles"])
    assert router["profiles"]["computer-science"]["skills"]


async def test_route_shows_level1_categories_and_level2_skills(fitted: Path, stub: str) -> None:
    async with running_coe(registry(fitted, stub, "route.yaml")) as coe, admin(coe) as raw:
        r = await raw.post("/v1/route", json={"model": "coe", "messages": [{"role": "user", "content": CODE_Q}]})
    d = r.json()
    cats = d["categories"]
    assert cats[0]["name"] == d["category"] == "computer science" and cats[0]["score"] == d["confidence"]
    assert [c["score"] for c in cats] == sorted((c["score"] for c in cats), reverse=True) and len(cats) == 5
    assert d["skill_matches"] and d["skill_matches"][0]["name"] in {"programming", "algorithms"}
    assert d["skills"] == [s["name"] for s in d["skill_matches"]]


async def test_queries_are_not_kept_unless_asked(fitted: Path, stub: str) -> None:
    path = registry(fitted, stub, "private.yaml", explorer={"publish_interval_s": 0.2})
    async with running_coe(path) as coe:
        await ask(coe, LAW_Q)
        async with admin(coe) as raw:
            live = (await raw.get("/v1/explorer/live")).json()
    [d] = live["decisions"]
    assert d["query"] is None and live["keep_queries"] is False and d["experts"][0]["name"] == "law"


@pytest.mark.redis
async def test_every_replica_sees_every_replicas_decisions(fitted: Path, stub: str, redis_server: Any) -> None:
    path = registry(fitted, stub, "redis.yaml", store={"redis_url": redis_server.url,
                                                      "prefix": f"explorer-{time.monotonic_ns()}"})
    async with running_coe(path) as one, running_coe(path) as two:
        await ask(one, CODE_Q)
        await ask(two, LAW_Q)
        async with admin(one) as raw:
            async def both() -> bool:
                live = (await raw.get("/v1/explorer/live")).json()
                return {d["query"] for d in live["decisions"]} == {CODE_Q, LAW_Q} and len(live["replicas"]) == 2
            await wait_until(both, 10, "replica one lists both replicas' decisions")
            live = (await raw.get("/v1/explorer/live")).json()
    replica = {d["query"]: d["replica"] for d in live["decisions"]}
    assert replica[CODE_Q] != replica[LAW_Q]
    assert {r["replica"] for r in live["replicas"]} == set(replica.values())


# -- the page, in a real browser -------------------------------------------------------------------

@pytest.fixture
def shots(tmp_path: Path) -> Iterator[Path]:
    folder = Path(os.environ.get("COE_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    yield folder


@pytest.mark.browser
async def test_the_page_in_chromium(fitted: Path, stub: str, shots: Path) -> None:
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (deploy/setup.sh installs it with apt-get)")
    from playwright.async_api import async_playwright, expect

    async with running_coe(registry(fitted, stub, "page.yaml")) as coe:
        await ask(coe, CODE_Q)
        await ask(coe, LAW_Q)
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = await browser.new_page(viewport={"width": 1500, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            await page.goto(f"{coe.url}/ui")
            # a client key is refused with the server's own message; the page stays on the login form
            await page.fill("#key", CLIENT)
            await page.click("#login-form button")
            await expect(page.locator("#login-error")).to_contain_text("admin key")
            await page.fill("#key", ADMIN)
            await page.click("#login-form button")
            rows = page.locator("#decisions tbody tr")
            await expect(rows).to_have_count(2)
            await expect(rows.nth(0)).to_contain_text(LAW_Q[:40])
            await expect(rows.nth(0).locator("b.expert")).to_have_text("law")
            await expect(rows.nth(1).locator("b.expert")).to_have_text("computer-science")
            await expect(page.locator("#experts-load tbody")).to_contain_text("computer-science")
            await page.screenshot(path=shots / "explorer-live.png", full_page=True)

            await page.click("#tabs button[data-tab=why]")
            await page.fill("#why-query", CODE_Q)
            await page.click("#why-form button")
            await expect(page.locator("#why-summary b.expert")).to_have_text("computer-science")
            top = page.locator("#why-categories g.bar").first
            await expect(top).to_have_attribute("data-name", "computer science")
            await expect(top).to_have_class("bar hl")
            await expect(page.locator("#why-ranking g.bar.hl")).to_have_attribute("data-name", "computer-science")
            await expect(page.locator("#why-skills g.bar").first).to_be_visible()
            await page.screenshot(path=shots / "explorer-why-here.png", full_page=True)

            await page.click("#tabs button[data-tab=experts]")
            await expect(page.locator("#profiles .profile")).to_have_count(6)
            await expect(page.locator("table.confusion tr")).to_have_count(6)  # a header and 5 categories
            await page.screenshot(path=shots / "explorer-experts.png", full_page=True)

            # the key lives in this tab only, and never in a URL
            stored = await page.evaluate("sessionStorage.getItem('coe.adminKey')")
            assert stored == ADMIN
            assert not [u for u in requests if ADMIN in u or CLIENT in u]
            assert not [u for u in requests if not u.startswith(coe.url)]  # nothing from elsewhere (no CDN)
            await page.click("#logout")
            assert await page.evaluate("sessionStorage.getItem('coe.adminKey')") is None
            await browser.close()
    assert not errors, errors
    for name in ("explorer-live.png", "explorer-why-here.png", "explorer-experts.png"):
        assert (shots / name).stat().st_size > 10_000
