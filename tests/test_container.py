"""The gateway container image (deploy/Containerfile), built by deploy/image.sh and run with podman.

Marked ``container`` and run only with ``COE_TESTS_CONTAINER=1``: the build takes minutes when cold (a
debootstrap base, then the wheels), so the main suite skips these tests and ``.ci/run`` runs them as
their own step. A cached build (the tag for its input hash exists) takes a few seconds.

The container shares the host's network (``--network host``), so coe inside it reaches a stub upstream
this test serves on 127.0.0.1, and the test reaches coe with the real ``openai`` SDK.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from coe.testing.server import free_port, serve_app
from coe.testing.stub_upstream import StubRecord, create_stub_app

ROOT = Path(__file__).resolve().parents[1]
PODMAN = str(ROOT / "deploy" / "podman.sh")
BUILD_TIMEOUT_S = 1800
API_KEY = "sk-container-test"

pytestmark = [
    pytest.mark.container,
    pytest.mark.skipif(os.environ.get("COE_TESTS_CONTAINER", "") in ("", "0"),
                       reason="set COE_TESTS_CONTAINER=1 to build and run the image (.ci/run does, as its own step)"),
    pytest.mark.skipif(shutil.which("podman") is None, reason="podman not installed (apt-get install podman runc)"),
]


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([PODMAN, *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert out.returncode == 0, f"podman {' '.join(args)} failed ({out.returncode}):\n{out.stderr}"
    return out


@pytest.fixture(scope="module")
def image() -> str:
    """The gateway image's reference, built (or found in the cache) by deploy/image.sh."""
    out = subprocess.run([str(ROOT / "deploy" / "image.sh"), "gateway"], capture_output=True, text=True,
                         timeout=BUILD_TIMEOUT_S, cwd=ROOT)
    assert out.returncode == 0, f"deploy/image.sh failed:\n{out.stderr[-4000:]}"
    ref = out.stdout.strip().splitlines()[-1]
    assert ref.startswith("localhost/coe:gateway-"), ref
    return ref


@pytest.fixture
def container_name() -> Iterator[str]:
    name = f"coe-test-{uuid.uuid4().hex[:8]}"
    yield name
    logs = podman("logs", name, check=False)
    podman("rm", "-f", "-t", "5", name, check=False)
    if logs.returncode == 0:
        print(f"--- container {name} log ---\n{logs.stdout}{logs.stderr}")


def test_image_runs_coe_as_non_root_without_compilers(image: str) -> None:
    inspected = json.loads(podman("image", "inspect", image).stdout)[0]
    config = inspected["Config"]
    assert config["Entrypoint"][-1].endswith("/coe"), config["Entrypoint"]
    assert config["User"].split(":")[0] == "10001"
    healthcheck = inspected.get("Healthcheck") or config.get("Healthcheck")  # podman: top level; docker: Config
    assert healthcheck and "/health/live" in " ".join(healthcheck["Test"])
    probe = podman("run", "--rm", "--network", "none", "--entrypoint", "/bin/sh", image, "-c",
                   "id -u; for c in cc gcc g++ c++ clang make ld as; do command -v $c; done; true")
    lines = probe.stdout.split()
    assert lines[0] == "10001", probe.stdout
    assert lines[1:] == [], f"compilers in the image: {lines[1:]}"


async def wait_live(url: str, name: str, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=5) as http:
        while True:
            try:
                if (await http.get(f"{url}/health/live")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            state = podman("inspect", "--format", "{{.State.Status}}", name, check=False).stdout.strip()
            assert state == "running", f"container {name} is {state or 'gone'}"
            assert time.monotonic() < deadline, f"{url}/health/live did not answer in {timeout_s:.0f} s"
            await asyncio.sleep(0.5)


async def test_container_serves_health_and_proxies_chat(image: str, container_name: str, tmp_path: Path) -> None:
    record = StubRecord()
    async with serve_app(create_stub_app(record=record), host="127.0.0.1") as upstream:
        config_dir = tmp_path / "etc-coe"
        config_dir.mkdir()
        (config_dir / "experts.yaml").write_text(yaml.safe_dump({
            "backends": {"stub": {"url": f"{upstream}/v1"}},
            "experts": [{"name": "stub-expert", "backend": "stub", "model": "stub"}],
        }))
        for path in (tmp_path, config_dir):  # the container's user (uid 10001) reads the mounted registry
            path.chmod(0o755)
        (config_dir / "experts.yaml").chmod(0o644)
        port = free_port()
        podman("run", "-d", "--name", container_name, "--network", "host", "--read-only",
               "--tmpfs", "/tmp", "-v", f"{config_dir}:/etc/coe:ro",
               "-e", f"COE_PORT={port}", "-e", f"COE_API_KEYS={API_KEY}", "-e", "COE_ADMIN_KEY=sk-admin",
               image, "serve", "--config", "/etc/coe/experts.yaml", "--host", "127.0.0.1", "--port", str(port))
        url = f"http://127.0.0.1:{port}"
        await wait_live(url, container_name)

        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=30)
        reply = await client.chat.completions.create(
            model="stub-expert", messages=[{"role": "user", "content": "hello from the host"}])
        assert reply.choices[0].message.content == "stub answer one two"
        assert [r["model"] for r in record.requests] == ["stub"]
        assert record.requests[0]["messages"][-1]["content"] == "hello from the host"

        with pytest.raises(openai.AuthenticationError):
            await openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()

        # The image's own HEALTHCHECK (what podman and Docker run) passes against the live server.
        health = podman("healthcheck", "run", container_name, check=False)
        assert health.returncode == 0, f"HEALTHCHECK failed: {health.stdout}{health.stderr}"

        # SIGTERM (podman stop) drains and exits 0 through tini.
        podman("stop", "-t", "30", container_name)
        exit_code = podman("inspect", "--format", "{{.State.ExitCode}}", container_name).stdout.strip()
        assert exit_code == "0", exit_code
    assert os.environ.get("COE_API_KEYS") != API_KEY  # the key went to the container only
