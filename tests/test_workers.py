"""``coe serve --workers N`` (``services.workers``): real processes on a real Redis, a STUB upstream, and a
FAKE vLLM (``launch:`` runs a stand-in ``vllm.entrypoints.openai.api_server`` that serves the stub app:
what is checked is who starts it and how often, and a real vLLM needs a minute per start).

- two workers serve one port; the supervisor starts the ``launch:`` backend once and both workers use it;
- ``/metrics`` on any worker adds up every worker's requests, including those of a worker that died;
- a worker killed with SIGKILL is replaced and nothing served before is lost from the counts;
- SIGTERM stops the workers and the vLLM, exit 0;
- without a shared store, ``--workers 2`` is refused with exit 2 and says why;
- with a two-level router fitted once by the supervisor, a conversation keeps its experts whichever
  worker routes the next turn (sessions in the store).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from apphelpers import write_registry
from redis_server import RedisServer, redis_server_fixture

from coe.testing.replicas import Proc, coe_command, start_stub, wait_http
from coe.testing.server import free_port

pytestmark = pytest.mark.redis

redis_server = redis_server_fixture(scope="module")
ROOT = Path(__file__).resolve().parents[1]

FAKE_API_SERVER = '''
"""A stand-in for vLLM's OpenAI server: the stub upstream on --port; writes its pid to $FAKE_VLLM_PIDS."""
import argparse, os, pathlib, uvicorn
from coe.testing.stub_upstream import create_stub_app
p = argparse.ArgumentParser()
p.add_argument("--port", type=int)
p.add_argument("--host", default="127.0.0.1")
args, _ = p.parse_known_args()
pathlib.Path(os.environ["FAKE_VLLM_PIDS"], str(os.getpid())).write_text("")
uvicorn.run(create_stub_app(), host=args.host, port=args.port, log_level="warning")
'''


def fake_vllm(root: Path) -> Path:
    """A folder that, on PYTHONPATH, makes ``python -m vllm.entrypoints.openai.api_server`` the stub."""
    pkg = root / "vllm" / "entrypoints" / "openai"
    pkg.mkdir(parents=True)
    for folder in (root / "vllm", root / "vllm" / "entrypoints", pkg):
        (folder / "__init__.py").write_text("")
    (pkg / "api_server.py").write_text(FAKE_API_SERVER)
    return root


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def workers_of(pid: int) -> set[int]:
    """The supervisor's worker processes (multiprocessing spawns them; the vLLM is another child)."""
    found = set()
    for child in children(pid):
        try:
            cmd = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmd:
            found.add(child)
    return found


def requests_total(metrics: str) -> float:
    return sum(float(v) for v in re.findall(r'^coe_requests_total\{[^}]*\} ([0-9.e+]+)$', metrics, re.M))


def fresh_get(url: str) -> httpx.Response:
    with httpx.Client(timeout=30) as http:  # a new connection each time: the kernel picks a worker
        return http.get(url)


def test_workers_need_a_shared_store(tmp_path: Path) -> None:
    config = write_registry(tmp_path / "experts.yaml", {
        "backends": {"b": {"url": "http://127.0.0.1:9/v1"}}, "experts": [{"name": "e", "backend": "b", "model": "m"}],
        "auth": {"client_auth": False, "admin_auth": False}})
    env = {k: v for k, v in os.environ.items() if k != "COE_REDIS_URL"}
    result = subprocess.run([coe_command(), "serve", "--config", str(config), "--workers", "2", "--port",
                             str(free_port())], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert result.returncode == 2, result.stderr
    assert "--workers 2 needs a shared state store" in result.stderr and "store.redis_url" in result.stderr


def test_two_workers_one_port_one_vllm_summed_metrics(redis_server: RedisServer, tmp_path: Path) -> None:
    stub, stub_url = start_stub(tmp_path)
    pids = tmp_path / "vllm-pids"
    pids.mkdir()
    (tmp_path / "base-model").mkdir()
    config = write_registry(tmp_path / "experts.yaml", {
        "backends": {
            "stub": {"url": f"{stub_url}/v1"},
            "local": {"launch": {"model": str(tmp_path / "base-model"), "served_name": "stub",
                                 "runtime_lora_updating": False, "zero_base_adapter": False,
                                 "env": {"PYTHONPATH": str(fake_vllm(tmp_path / "fake")),
                                         "FAKE_VLLM_PIDS": str(pids)}}}},
        "experts": [{"name": "remote", "backend": "stub", "model": "stub"},
                    {"name": "local", "backend": "local", "model": "stub"}],
        "dispatch": {"health_interval_s": 0.5},
        "auth": {"client_auth": False, "admin_auth": False},
        "store": {"redis_url": redis_server.url, "prefix": f"workers{os.getpid()}"},
    })
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = Proc("serve", [coe_command(), "serve", "--config", str(config), "--port", str(port), "--workers", "2"],
                 tmp_path / "serve.log", port).start()
    assert serve.popen is not None
    supervisor = serve.popen.pid
    try:
        wait_http(f"{url}/health/ready", serve, 120, "coe serve --workers 2")
        first = workers_of(supervisor)
        assert len(first) == 2, first

        def chat(model: str) -> int:
            with httpx.Client(timeout=30) as http:
                r = http.post(f"{url}/v1/chat/completions",
                              json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
                return r.status_code

        codes = [chat("remote" if i % 2 else "local") for i in range(40)]
        assert codes == [200] * 40, codes
        assert len(list(pids.iterdir())) == 1, "the supervisor starts the launch backend once, for both workers"
        totals = [requests_total(fresh_get(f"{url}/metrics").text) for _ in range(6)]
        assert totals == [40.0] * 6, totals  # whichever worker answers the scrape adds up both
        deadline = time.monotonic() + 5  # each worker is a replica in the store; both served some requests
        while True:
            replicas = fresh_get(f"{url}/v1/explorer/live").json()["replicas"]
            calls = [sum(e["calls"] for e in r["experts"].values()) for r in replicas]
            if (len(replicas) == 2 and all(calls) and sum(calls) == 40) or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert len(replicas) == 2 and all(calls) and sum(calls) == 40, calls
        assert len({r["backends"]["local"]["url"] for r in replicas}) == 1  # one vLLM, used by both

        victim = sorted(first)[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while len(now := workers_of(supervisor)) < 2 or victim in now:
            assert time.monotonic() < deadline, f"no replacement for worker {victim}: {now}"
            time.sleep(0.2)
        wait_http(f"{url}/health/ready", serve, 120, "coe serve after a worker died")
        codes = [chat("local") for _ in range(10)]
        assert codes == [200] * 10, codes
        assert requests_total(fresh_get(f"{url}/metrics").text) == 50.0  # the dead worker's 20-odd stay counted
        assert len(list(pids.iterdir())) == 1

        vllm_pid = int(next(pids.iterdir()).name)
        serve.signal(signal.SIGTERM)
        assert serve.wait(60) == 0, serve.tail(4000)
        deadline = time.monotonic() + 15
        while Path(f"/proc/{vllm_pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not Path(f"/proc/{vllm_pid}").exists(), "the vLLM outlived the supervisor"
    finally:
        serve.stop()
        stub.stop()


def test_a_session_keeps_its_experts_across_workers(redis_server: RedisServer, tmp_path: Path) -> None:
    """Two workers, a fitted two-level router (the supervisor fits it once; each worker loads the artifact):
    a conversation routed to law keeps its experts for a vague follow-up, whichever worker routes it."""
    from test_twolevel import write_fixture

    stub, stub_url = start_stub(tmp_path)
    config = write_fixture(tmp_path)
    reg = yaml.safe_load(config.read_text())
    reg["backends"]["b"]["url"] = f"{stub_url}/v1"
    reg["auth"] = {"client_auth": False, "admin_auth": False}
    reg["store"] = {"redis_url": redis_server.url, "prefix": f"wsess{os.getpid()}"}
    write_registry(config, reg)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = Proc("serve", [coe_command(), "serve", "--config", str(config), "--port", str(port), "--workers", "2"],
                 tmp_path / "serve.log", port).start()

    def route(text: str, session: str | None) -> dict[str, object]:
        body: dict[str, object] = {"model": "coe", "messages": [{"role": "user", "content": text}], "max_tokens": 4}
        if session:
            body["user"] = session
        with httpx.Client(timeout=60) as http:  # a new connection each time: either worker
            r = http.post(f"{url}/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        decision = r.json()["coe"]["decision"]
        assert isinstance(decision, dict)
        return decision

    def names(decision: dict[str, object]) -> list[str]:
        return [e["name"] for e in decision["experts"]]  # type: ignore[attr-defined]

    try:
        wait_http(f"{url}/health/ready", serve, 300, "coe serve --workers 2 (two-level)")
        first = route("Is a contract signed under duress enforceable?", "w-1")
        assert first["category"] == "law", first
        vague = "Can you explain that more simply?"
        alone = route(vague, None)
        assert alone["category"] != "law" or names(alone) != names(first)
        for _ in range(6):
            kept = route(vague, "w-1")
            assert names(kept) == names(first) and "session kept" in str(kept["reason"]), kept
    finally:
        serve.stop()
        stub.stop()
    log = serve.tail(10**6)
    before, _, after = log.partition("Started parent process")
    assert before.count("fitting it now") == 1 and "fitting" not in after, log[-3000:]  # fitted once, loaded twice


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
