"""ManagedVLLM: the command and environment it builds, its life cycle, and the real server.

Three kinds of test, cheapest first:

* ``command()`` / ``env()`` without any process;
* the life cycle (restart with backoff, giving up, timeouts, killing the process
  group, cleanup when coe dies) against ``fake_vllm``: a named stub that answers
  ``/health`` and forks an "engine" child, because crashes on demand and a server
  that never gets healthy are the point there, and real vLLM needs a minute per start;
* the shared real vLLM server (``vllm`` marker), ending with a real crash and restart.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
from conftest import LOADED_ADAPTERS, VllmServer

from coe.backends import launch
from coe.backends.launch import CPU_ENV_DEFAULTS, ManagedVLLM, State, free_port, group_alive
from coe.config import LaunchConfig, LoraModule
from coe.errors import BackendUnavailable

# --- command() and env() ------------------------------------------------------------------


def test_command_without_lora(tmp_path: Path) -> None:
    cfg = LaunchConfig(model=tmp_path / "base-model", runtime_lora_updating=False, port=8123, host="0.0.0.0")
    m = ManagedVLLM("b", cfg, python="/opt/py")
    assert m.command() == [
        "/opt/py", "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(tmp_path / "base-model"),
        "--served-model-name", "base-model",
        "--host", "0.0.0.0",
        "--port", "8123",
    ]  # fmt: skip
    assert m.base_url == "http://0.0.0.0:8123"


def test_command_with_lora_modules_and_extra_args(tmp_path: Path) -> None:
    cfg = LaunchConfig(
        model=tmp_path / "m",
        served_name="base",
        lora_modules=[LoraModule(name="a", path=tmp_path / "a"), LoraModule(name="b", path=tmp_path / "b")],
        max_loras=3,
        max_cpu_loras=5,
        max_lora_rank=16,
        args=["--dtype", "float32"],
    )
    cmd = ManagedVLLM("b", cfg, python="py").command()
    tail = cmd[cmd.index("--enable-lora") :]
    assert tail == [
        "--enable-lora", "--max-lora-rank", "16", "--max-loras", "3", "--max-cpu-loras", "5",
        "--lora-modules", f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}",
        "--dtype", "float32",
    ]  # fmt: skip
    assert cmd[cmd.index("--served-model-name") + 1] == "base"


def test_runtime_updating_alone_enables_lora(tmp_path: Path) -> None:
    cmd = ManagedVLLM("b", LaunchConfig(model=tmp_path, runtime_lora_updating=True)).command()
    assert "--enable-lora" in cmd
    assert "--lora-modules" not in cmd
    assert "--max-cpu-loras" not in cmd


def test_port_is_picked_once(tmp_path: Path) -> None:
    m = ManagedVLLM("b", LaunchConfig(model=tmp_path))
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", m.base_url)
    assert m.base_url == f"http://127.0.0.1:{m.port}"
    assert m.command()[m.command().index("--port") + 1] == str(m.port)
    assert m.state == "stopped"
    assert m.pid is None
    assert m.restarts == 0


def test_default_log_file(tmp_path: Path) -> None:
    m = ManagedVLLM("gpu-1", LaunchConfig(model=tmp_path))
    assert m.log_file == Path(".coe/logs/gpu-1.log")
    cfg = LaunchConfig(model=tmp_path, log_file=tmp_path / "x.log")
    assert ManagedVLLM("gpu-1", cfg).log_file == tmp_path / "x.log"


def test_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")  # an operator's setting wins over the default
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("SOMETHING_ELSE", "kept")
    cfg = LaunchConfig(model=tmp_path, env={"OMP_NUM_THREADS": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "1"})
    env = ManagedVLLM("b", cfg).env()
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "4"
    assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "1"  # cfg.env is applied last
    assert env["OMP_NUM_THREADS"] == "1"
    assert env["SOMETHING_ELSE"] == "kept"


def test_env_defaults_and_no_runtime_updating(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [*CPU_ENV_DEFAULTS, "VLLM_ALLOW_RUNTIME_LORA_UPDATING"]:
        monkeypatch.delenv(key, raising=False)
    env = ManagedVLLM("b", LaunchConfig(model=tmp_path, runtime_lora_updating=False)).env()
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in env


def test_free_port_is_bindable() -> None:
    import socket

    port = free_port("127.0.0.1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


# --- the life cycle, against a stub server ------------------------------------------------

FAKE_VLLM = '''
"""fake_vllm: a stub of the vLLM server for life-cycle tests (FAKE_VLLM_MODE picks the fault)."""
import http.server, os, signal, subprocess, sys, time

args = sys.argv[1:]
port = int(args[args.index("--port") + 1])
mode = os.environ.get("FAKE_VLLM_MODE", "ok")
once = os.environ.get("FAKE_VLLM_ONCE_FILE", "")
engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(f"fake vllm: engine pid {engine.pid}", flush=True)


def on_term(signum, frame):  # like vLLM: stop the engine, then exit
    engine.terminate()
    engine.wait()
    sys.exit(0)


signal.signal(signal.SIGTERM, on_term)
if mode == "crash" or (mode == "crash-once" and not os.path.exists(once)):
    if once:
        open(once, "w").close()
    print("fake vllm: RuntimeError: boom", flush=True)
    sys.exit(3)
if mode == "hang":
    time.sleep(600)


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


print("fake vllm: serving", flush=True)
http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
'''


@pytest.fixture
def fake_python(tmp_path: Path) -> str:
    """A ``python`` for ManagedVLLM that runs fake_vllm for ``-m vllm...`` (and real Python for ``-c``)."""
    server = tmp_path / "fake_vllm.py"
    server.write_text(FAKE_VLLM)
    wrapper = tmp_path / "python"
    wrapper.write_text(
        textwrap.dedent(f"""\
            #!/bin/sh
            if [ "$1" = "-c" ]; then exec {sys.executable} "$@"; fi
            exec {sys.executable} {server} "$@"
            """)
    )
    wrapper.chmod(0o755)
    return str(wrapper)


def _fake(tmp_path: Path, python: str, mode: str, max_restarts: int = 2) -> ManagedVLLM:
    cfg = LaunchConfig(
        model=tmp_path / "model",
        runtime_lora_updating=False,
        env={"FAKE_VLLM_MODE": mode, "FAKE_VLLM_ONCE_FILE": str(tmp_path / "crashed-once")},
        max_restarts=max_restarts,
        startup_timeout_s=20,
        log_file=tmp_path / "logs" / "fake.log",
    )
    return ManagedVLLM("fake", cfg, python=python, health_interval_s=0.1)


@pytest.fixture
async def managed_fakes(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[list[ManagedVLLM]]:
    """Stops every stub a test started, even when it fails; restarts back off 0.2 s, not 1 s."""
    monkeypatch.setattr(launch, "BACKOFF_FIRST_S", 0.2)
    started: list[ManagedVLLM] = []
    yield started
    for m in started:
        await m.stop(grace_s=2)


def state_of(m: ManagedVLLM) -> State:
    """``m.state`` read afresh (mypy would keep an asserted property narrowed across awaits)."""
    return m.state


def _engine_pid(m: ManagedVLLM) -> int:
    pids = re.findall(r"engine pid (\d+)", m.log_file.read_text())
    return int(pids[-1])


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


async def _until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


async def test_start_healthy_stop_kills_group(
    tmp_path: Path, fake_python: str, managed_fakes: list[ManagedVLLM]
) -> None:
    m = _fake(tmp_path, fake_python, "ok")
    managed_fakes.append(m)
    await m.start()
    assert state_of(m) == "starting"
    await m.start()  # a second start is a no-op
    await m.wait_healthy(timeout=20)
    assert state_of(m) == "healthy"
    pid = m.pid
    assert pid is not None and os.getpgid(pid) == pid  # its own process group
    engine = _engine_pid(m)
    assert _pid_alive(engine)
    await m.stop(grace_s=5)
    assert state_of(m) == "stopped"
    assert m.pid is None
    assert not group_alive(pid)
    assert not _pid_alive(engine)
    await m.stop()  # idempotent
    assert "starting vLLM 'fake'" in m.log_file.read_text()


async def test_crash_after_healthy_restarts_on_same_url(
    tmp_path: Path, fake_python: str, managed_fakes: list[ManagedVLLM]
) -> None:
    m = _fake(tmp_path, fake_python, "ok")
    managed_fakes.append(m)
    await m.start()
    await m.wait_healthy(timeout=20)
    url, pid, engine = m.base_url, m.pid, _engine_pid(m)
    assert pid is not None
    seen: list[State] = []

    def note() -> bool:
        if not seen or seen[-1] != m.state:
            seen.append(m.state)
        return m.restarts == 1 and m.state == "healthy"

    os.kill(pid, signal.SIGKILL)  # the leader only: the orphaned engine must be cleaned up too
    await _until(note, 20, "a restart")
    assert seen[:3] == ["healthy", "crashed", "starting"], seen
    assert m.base_url == url
    assert m.pid != pid
    assert not _pid_alive(engine)
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{m.base_url}/health")).status_code == 200


async def test_crash_during_startup_is_retried(
    tmp_path: Path, fake_python: str, managed_fakes: list[ManagedVLLM]
) -> None:
    m = _fake(tmp_path, fake_python, "crash-once", max_restarts=1)
    managed_fakes.append(m)
    await m.start()
    await m.wait_healthy(timeout=20)
    assert m.restarts == 1


async def test_gives_up_after_max_restarts_with_log_tail(
    tmp_path: Path, fake_python: str, managed_fakes: list[ManagedVLLM]
) -> None:
    m = _fake(tmp_path, fake_python, "crash", max_restarts=1)
    managed_fakes.append(m)
    await m.start()
    with pytest.raises(BackendUnavailable) as info:
        await m.wait_healthy(timeout=20)
    assert m.state == "failed"
    assert m.restarts == 1
    message = info.value.message
    assert "gave up after 1 restart" in message
    assert "last exit status 3" in message
    assert "RuntimeError: boom" in message  # the log tail explains why
    assert str(m.log_file) in message
    assert info.value.status == 503


async def test_startup_timeout_names_state_and_log(
    tmp_path: Path, fake_python: str, managed_fakes: list[ManagedVLLM]
) -> None:
    m = _fake(tmp_path, fake_python, "hang")
    managed_fakes.append(m)
    await m.start()
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailable, match=r"not healthy after 1 s \(state starting\)") as info:
        await m.wait_healthy(timeout=1.0)
    assert time.monotonic() - t0 < 3
    assert "engine pid" in info.value.message
    pid = m.pid
    assert pid is not None
    await m.stop(grace_s=5)  # the stub ignores nothing: SIGTERM is enough
    assert not group_alive(pid)


async def test_wait_healthy_when_not_started(tmp_path: Path) -> None:
    m = ManagedVLLM("idle", LaunchConfig(model=tmp_path, log_file=tmp_path / "idle.log"))
    with pytest.raises(BackendUnavailable, match="stopped"):
        await m.wait_healthy(timeout=1)
    await m.stop()
    assert m.state == "stopped"


async def test_stop_kills_a_server_that_ignores_sigterm(
    tmp_path: Path, fake_python: str, managed_fakes: list[ManagedVLLM]
) -> None:
    m = _fake(tmp_path, fake_python, "ok")
    managed_fakes.append(m)
    await m.start()
    await m.wait_healthy(timeout=20)
    pid = m.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # a stopped process cannot act on SIGTERM
    t0 = time.monotonic()
    await m.stop(grace_s=0.5)
    assert 0.4 < time.monotonic() - t0 < 5
    assert not group_alive(pid)


DRIVER = """
import asyncio, sys
from pathlib import Path
from coe.backends.launch import ManagedVLLM
from coe.config import LaunchConfig

async def main() -> None:
    cfg = LaunchConfig(model=Path("m"), runtime_lora_updating=False, log_file=Path(sys.argv[2]))
    m = ManagedVLLM("fake", cfg, python=sys.argv[1], health_interval_s=0.1)
    await m.start()
    await m.wait_healthy(20)
    print(m.pid, flush=True)
    if sys.argv[3] == "hang":
        await asyncio.sleep(600)
    # "exit": return without stop(); the finalizer must clean up

asyncio.run(main())
"""


@pytest.mark.parametrize("how", ["exit", "sigkill"])
async def test_server_does_not_outlive_coe(tmp_path: Path, fake_python: str, how: str) -> None:
    """Without stop(): a normal exit runs the finalizer; SIGKILL leaves it to PR_SET_PDEATHSIG."""
    mode = "exit" if how == "exit" else "hang"
    log = tmp_path / "driver.log"
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, fake_python, str(log), mode], stdout=subprocess.PIPE, text=True
    )
    try:
        assert driver.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(driver.stdout.readline), 30)
        pid = int(line)
        engine = int(re.findall(r"engine pid (\d+)", log.read_text())[-1])
        if how == "sigkill":
            driver.kill()
        await asyncio.to_thread(driver.wait, 30)
        await _until(lambda: not _pid_alive(pid) and not _pid_alive(engine), 10, "the server to die")
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()


# --- the shared real vLLM server ----------------------------------------------------------


@pytest.mark.vllm
async def test_real_server_lists_base_and_adapters(vllm_server: VllmServer) -> None:
    async with httpx.AsyncClient(base_url=vllm_server.base_url, timeout=30) as client:
        response = await client.get("/v1/models")
    assert response.status_code == 200
    models = {card["id"]: card for card in response.json()["data"]}
    assert vllm_server.served_name in models
    for name in LOADED_ADAPTERS:
        assert name in models, sorted(models)
        assert models[name]["parent"] == vllm_server.served_name
    assert "tiny-lora-3" not in models  # built, left for run-time loading
    assert vllm_server.managed.state == "healthy"


@pytest.mark.vllm
async def test_zz_real_server_restarts_after_sigkill(vllm_server: VllmServer) -> None:
    """Costs a real restart (~30-60 s); last in this file. Adapters loaded at run time are lost."""
    m = vllm_server.managed
    await m.wait_healthy(timeout=60)
    before, pid = m.restarts, m.pid
    assert pid is not None
    states: list[State] = []

    def note() -> bool:
        if not states or states[-1] != m.state:
            states.append(m.state)
        return m.restarts == before + 1 and m.state == "healthy"

    t0 = time.monotonic()
    os.killpg(os.getpgid(pid), signal.SIGKILL)
    await _until(note, 300, f"vLLM to come back (log {m.log_file})")
    elapsed = time.monotonic() - t0
    assert "crashed" in states, states
    assert states[-1] == "healthy"
    assert m.pid != pid
    assert not group_alive(pid)
    async with httpx.AsyncClient(base_url=m.base_url, timeout=60) as client:
        models = (await client.get("/v1/models")).json()["data"]
        assert {vllm_server.served_name, *LOADED_ADAPTERS} <= {card["id"] for card in models}
        body = {"model": "tiny-lora-0", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
        answer = await client.post("/v1/completions", json=body)
        assert answer.status_code == 200, answer.text
    print(f"vLLM restarted in {elapsed:.1f} s; states {states}")


async def test_start_survives_a_zero_adapter_that_cannot_be_built(tmp_path: Path) -> None:
    """A model folder the zero-adapter builder cannot read must not crash start() (and so coe's start-up);
    the backend then runs without the workaround, and says so in the log."""
    cfg = LaunchConfig(model=tmp_path / "not-a-model", runtime_lora_updating=True, log_file=tmp_path / "v.log",
                       max_restarts=0)
    m = ManagedVLLM("b", cfg, python="/bin/true")
    try:
        await m.start()
        assert m.base_adapter is None
        assert "--enable-lora" in m.command()
    finally:
        await m.stop()
