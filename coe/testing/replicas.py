"""Several coe replicas on one Redis behind haproxy, all real processes: ``tests/test_replicas.py`` and
``bench/replicas.py`` start the same fleet through this module.

- a STUB upstream (``coe.testing.stub_upstream``) in its own process, so the load generator's event loop
  and the upstream's do not slow each other;
- ``coe serve`` replicas and ``coe worker`` processes on one Redis (the caller's ``experts.yaml`` names it);
- haproxy in front, with active health checks on ``/health/ready`` and layer-7 retries with redispatch:
  a request that finds a replica gone (connection refused, connection reset before any answer) is sent
  to another one, which is what makes a SIGKILL or a rolling restart invisible to clients;
- a closed-loop load generator (``load``) counting successes, failures and latencies.

The fleet's processes are children of the caller; ``Fleet.stop`` ends each by its own pid.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

from coe.testing.server import free_port

HAPROXY_HINT = "haproxy is not on PATH; install it with 'apt-get install -y haproxy' (Debian)"


def coe_command() -> str:
    """The ``coe`` console script of the running interpreter's environment."""
    return str(Path(sys.executable).parent / "coe")


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy",) if Path(p).exists()), None)


@dataclass
class Proc:
    """One child process and its log."""

    name: str
    argv: list[str]
    log_path: Path
    port: int | None = None
    popen: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    def start(self, env: dict[str, str] | None = None) -> Proc:
        self._log = self.log_path.open("ab")
        self.popen = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        return self

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive and self.popen is not None:
            self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        if self.popen is None:
            return None
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; this process only."""
        self.signal(signal.SIGTERM)
        if self.wait(timeout) is None:
            self.signal(signal.SIGKILL)
            self.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def wait_http(url: str, proc: Proc | None, timeout: float, what: str) -> None:
    """Poll ``url`` until it answers 200; fail with the process's log if it dies or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and not proc.alive:
            raise RuntimeError(f"{what} exited during start-up:\n{proc.tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer {url} within {timeout:.0f}s:\n"
                               f"{proc.tail() if proc else ''}")
        time.sleep(0.1)


def fleet_registry(stub_url: str, redis_url: str, prefix: str) -> dict[str, Any]:
    """One stub expert on one Redis, no embedded worker (``coe worker`` processes take the batches): the
    registry every process of a test or benchmark fleet shares."""
    return {
        "backends": {"stub": {"url": f"{stub_url}/v1"}},
        "experts": [{"name": "fast", "backend": "stub", "model": "stub"}],
        "auth": {"client_auth": False, "admin_auth": False},
        "dispatch": {"retries": 1, "backoff_s": 0.01, "health_interval_s": 1},
        "store": {"redis_url": redis_url, "embedded_worker": False, "claim_idle_s": 2, "worker_concurrency": 8,
                  "prefix": prefix},
    }


def start_stub(workdir: Path, timeout: float = 60) -> tuple[Proc, str]:
    """The stub upstream in its own uvicorn process; returns it and its base URL (no ``/v1``)."""
    port = free_port()
    proc = Proc("stub", [sys.executable, "-m", "uvicorn", "--factory", "coe.testing.stub_upstream:create_stub_app",
                         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
                         "--no-access-log"], workdir / "stub.log", port).start()
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", proc, timeout, "stub upstream")
    return proc, url


def haproxy_config(port: int, stats_port: int, replicas: list[Proc]) -> str:
    """Round robin over the replicas. Health checks every 250 ms on ``/health/ready`` (a draining replica
    answers 503 there, a stopped one refuses the connection): two failures take a replica out, two
    successes put it back; a check may take 2 s, since a busy 2-core machine answers slowly and a short
    timeout took every replica out at once. A request sent to a replica that is already gone but not yet
    marked down is retried elsewhere (below). ``retry-on`` with
    ``redispatch``: a request whose replica refused the connection or closed it without an answer is sent,
    whole (``http-buffer-request`` keeps it), to another replica (3 tries), so no client sees a replica
    that was killed or is restarting, except a response cut off mid-body by a SIGKILL. No keep-alive to
    the replicas (``http-server-close``): a stopping replica then has no idle connections to close under
    a request in flight."""
    servers = "\n".join(f"    server {p.name} 127.0.0.1:{p.port} check" for p in replicas)
    return f"""global
    maxconn 4096
    log stdout format raw local0 info
defaults
    mode http
    log global
    option httplog
    option dontlog-normal
    option http-server-close
    option http-buffer-request
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 10s
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response junk-response response-timeout
frontend api
    bind 127.0.0.1:{port}
    default_backend replicas
frontend stats
    bind 127.0.0.1:{stats_port}
    stats enable
    stats uri /stats
backend replicas
    balance roundrobin
    option httpchk GET /health/ready
    http-check expect status 200
    timeout check 2s
    default-server inter 250ms fastinter 100ms downinter 250ms fall 2 rise 2
{servers}
"""


@dataclass
class Fleet:
    """``replicas`` ``coe serve`` processes and ``workers`` ``coe worker`` processes on ``config``, haproxy
    in front. ``start`` returns once every replica is ready and haproxy sees each one up."""

    workdir: Path
    config: Path
    replicas: int = 3
    workers: int = 2
    drain_timeout_s: float = 10.0
    serve: list[Proc] = field(default_factory=list)
    work: list[Proc] = field(default_factory=list)
    haproxy: Proc | None = None
    url: str = ""
    stats_url: str = ""

    def _serve_proc(self, i: int, port: int) -> Proc:
        return Proc(f"r{i}", [coe_command(), "serve", "--config", str(self.config), "--port", str(port),
                              "--drain-timeout", str(self.drain_timeout_s), "--log-level", "warning"],
                    self.workdir / f"r{i}.log", port)

    def start(self, timeout: float = 180) -> Fleet:
        binary = haproxy_binary()
        if binary is None:
            raise FileNotFoundError(HAPROXY_HINT)
        self.serve = [self._serve_proc(i, free_port()).start() for i in range(self.replicas)]
        self.work = [Proc(f"w{i}", [coe_command(), "worker", "--config", str(self.config)],
                          self.workdir / f"w{i}.log").start() for i in range(self.workers)]
        for proc in self.serve:
            wait_http(f"http://127.0.0.1:{proc.port}/health/ready", proc, timeout, f"replica {proc.name}")
        port, stats = free_port(), free_port()
        cfg = self.workdir / "haproxy.cfg"
        cfg.write_text(haproxy_config(port, stats, self.serve))
        self.haproxy = Proc("haproxy", [binary, "-db", "-f", str(cfg)], self.workdir / "haproxy.log", port).start()
        self.url, self.stats_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{stats}/stats;csv"
        self.wait_up([p.name for p in self.serve], timeout=30)
        return self

    def states(self) -> dict[str, str]:
        """haproxy's view of each replica: UP, DOWN, ..."""
        text = httpx.get(self.stats_url, timeout=2).text
        header = text.splitlines()[0].lstrip("# ").split(",")
        out = {}
        for line in text.splitlines()[1:]:
            row = dict(zip(header, line.split(","), strict=False))
            if row.get("pxname") == "replicas" and row.get("svname") not in ("FRONTEND", "BACKEND"):
                out[row["svname"]] = row.get("status", "")
        return out

    def wait_up(self, names: list[str], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(httpx.HTTPError):
                states = self.states()
                if all(states.get(n, "").startswith("UP") for n in names):
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"haproxy does not see {names} up: {self.states()}")
            time.sleep(0.1)

    def restart(self, i: int, timeout: float = 120) -> None:
        """Start replica ``i`` again on its port (after it stopped) and wait until haproxy sends it traffic."""
        old = self.serve[i]
        assert old.port is not None and not old.alive
        old.stop()
        proc = self.serve[i] = self._serve_proc(i, old.port).start()
        wait_http(f"http://127.0.0.1:{proc.port}/health/ready", proc, timeout, f"replica {proc.name}")
        self.wait_up([proc.name])

    def replica_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p.port}" for p in self.serve]

    def stop(self) -> None:
        for proc in [*([self.haproxy] if self.haproxy else []), *self.serve, *self.work]:
            proc.stop()


@dataclass
class LoadResult:
    ok: int = 0
    failed: int = 0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    latencies_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return self.ok + self.failed

    @property
    def success_rate(self) -> float:
        return self.ok / self.total if self.total else 0.0

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_ms)

        def pct(q: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(q * len(lat)))], 2) if lat else None

        return {"ok": self.ok, "failed": self.failed, "success_rate": round(self.success_rate, 6),
                "requests_per_s": round(self.total / self.seconds, 1) if self.seconds else None,
                "p50_ms": pct(0.5), "p99_ms": pct(0.99), "errors": dict(self.errors.most_common(5))}


async def load(url: str, *, concurrency: int, duration_s: float, model: str = "fast",
               stop: asyncio.Event | None = None) -> LoadResult:
    """``concurrency`` clients each sending chat requests back to back for ``duration_s`` (or until
    ``stop`` is set). A request fails on any status but 200 or a transport error."""
    result = LoadResult()
    body = {"model": model, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    started = time.monotonic()
    end = started + duration_s

    async def client(http: httpx.AsyncClient) -> None:
        while time.monotonic() < end and not (stop is not None and stop.is_set()):
            t0 = time.perf_counter()
            try:
                r = await http.post("/v1/chat/completions", json=body)
                if r.status_code == 200:
                    result.ok += 1
                    result.latencies_ms.append((time.perf_counter() - t0) * 1000)
                else:
                    result.failed += 1
                    result.errors[f"HTTP {r.status_code}: {r.text[:120]}"] += 1
            except httpx.HTTPError as exc:
                result.failed += 1
                result.errors[f"{type(exc).__name__}: {exc}"[:160]] += 1

    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    result.seconds = time.monotonic() - started
    return result

