"""``coe serve --workers N``: N API processes on one port under one supervisor, for the CPU a single
Python process cannot use.

Who owns what on a machine:

- **The supervisor** (the ``coe serve`` process) checks the config, fits the router once (the workers
  load its artifact instead of each fitting it), binds the port, and starts every ``launch:`` backend
  once (``OwnedBackends``: its own event loop in a thread, which restarts a vLLM that crashes). It
  restarts a worker that dies (uvicorn's ``Multiprocess``). On SIGTERM it stops the workers, each
  draining its requests, then the backends.
- **Each worker** is a whole API server: HTTP, dispatcher and connection pools, the registry poll, the
  explorer, and an embedded batch worker when ``store.embedded_worker`` says so. It uses the
  supervisor's vLLM servers by URL (``coe.backends.pool.Attached``). Workers share everything through
  the state store, exactly as replicas on several machines do, so N workers need Redis: with the
  in-memory store each would have its own experts, files, batches and keys, and it is refused.
- **On-demand backends** (``launch.on_demand``) are brought up by whichever process needs one, one at a
  time per machine (``coe.backends.machine_lock``), as with ``coe worker`` processes.
- **/metrics** adds up every worker: prometheus_client's multiprocess mode, each worker writing its
  samples to files in ``PROMETHEUS_MULTIPROC_DIR`` (a fresh temp folder unless set) and any worker's
  ``/metrics`` reading them all. A dead worker's gauges are dropped when it is replaced.

Limits: a change to a ``launch:`` section of the file needs a restart (workers reload experts and
remote backends as usual); the kernel spreads new connections over the workers, not requests, so one
client holding one keep-alive connection talks to one worker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from coe.backends.pool import Attached, BackendPool
from coe.config import BackendConfig, RegistryConfig
from coe.store import is_durable_url, store_url

log = logging.getLogger("coe")

ENV_CONFIG = "COE_SERVE_CONFIG"
ENV_LOG_LEVEL = "COE_SERVE_LOG_LEVEL"
ENV_ATTACHED = "COE_SERVE_ATTACHED"
ENV_DRAIN = "COE_SERVE_DRAIN_S"
ENV_METRICS = "PROMETHEUS_MULTIPROC_DIR"


def app_from_env() -> Any:
    """The app of one worker (uvicorn's factory, called in the worker process): the supervisor hands over
    the config path, the log level and its backends in the environment."""
    from coe.logs import configure
    from services.api import create_app

    configure(os.environ.get(ENV_LOG_LEVEL, "info"))
    attached = {name: Attached(**spec) for name, spec in json.loads(os.environ.get(ENV_ATTACHED) or "{}").items()}
    return create_app(os.environ[ENV_CONFIG], attached_backends=attached,
                      drain_timeout_s=float(os.environ.get(ENV_DRAIN, "30")))


class OwnedBackends:
    """The ``launch:`` backends (not on-demand) the supervisor runs for its workers, on an event loop in a
    thread of their own (the main thread belongs to the worker supervisor and its signal handling)."""

    def __init__(self, configs: dict[str, BackendConfig]) -> None:
        self.configs = configs
        self._loop = asyncio.new_event_loop()
        self._pool = BackendPool()
        self._thread = threading.Thread(target=self._loop.run_forever, name="coe-owned-backends", daemon=True)

    def start(self) -> dict[str, Attached]:
        """Start each vLLM (not waiting for it to be healthy: the workers' readiness says when) and say where
        it listens."""
        if not self.configs:
            return {}
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._pool.reconcile(self.configs), self._loop).result()
        return {name: Attached(b.base_url, b.base_adapter) for name, b in self._pool.all().items()}

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._pool.aclose(), self._loop).result(timeout=60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


def check_workers(cfg: RegistryConfig, workers: int) -> str | None:
    """Why ``workers`` processes cannot serve ``cfg``, or None."""
    if workers < 1:
        return f"--workers must be at least 1, not {workers}"
    if workers > 1 and not is_durable_url(store_url(cfg.store)):
        return (f"--workers {workers} needs a shared state store: set store.redis_url or COE_REDIS_URL (with the "
                "in-memory store each worker would have its own experts, files, batches and keys)")
    return None


def serve_workers(args: argparse.Namespace, cfg: RegistryConfig) -> int:
    """Run ``args.workers`` API processes on ``args.host:args.port`` until SIGTERM/SIGINT; the exit status."""
    import uvicorn
    from prometheus_client import multiprocess
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors.multiprocess import Multiprocess

    class Supervisor(Multiprocess):
        def keep_subprocess_alive(self) -> None:
            for process in self.processes:  # a dead worker's live gauges go with it
                if process.pid is not None and process.exitcode is not None:
                    multiprocess.mark_process_dead(process.pid)  # type: ignore[no-untyped-call]
            super().keep_subprocess_alive()

    own_metrics = not os.environ.get(ENV_METRICS)
    metrics_dir = Path(tempfile.mkdtemp(prefix="coe-metrics-")) if own_metrics else Path(os.environ[ENV_METRICS])
    owned = OwnedBackends({name: b for name, b in cfg.backends.items()
                           if b.launch is not None and not b.launch.on_demand})
    try:
        attached = owned.start()
        os.environ.update({
            ENV_CONFIG: str(Path(args.config).resolve()), ENV_LOG_LEVEL: args.log_level,
            ENV_DRAIN: str(args.drain_timeout), ENV_METRICS: str(metrics_dir),
            ENV_ATTACHED: json.dumps({name: dataclasses.asdict(a) for name, a in attached.items()}),
        })
        config = uvicorn.Config("services.workers:app_from_env", factory=True, workers=args.workers, host=args.host,
                                port=args.port, log_config=None, access_log=False, lifespan="on",
                                timeout_graceful_shutdown=args.drain_timeout)
        sock = config.bind_socket()
        log.info("serving %s on http://%s:%d/v1 with %d workers (supervisor pid %d)", args.config, args.host,
                 args.port, args.workers, os.getpid())
        supervisor = Supervisor(config, sockets=[sock])
        supervisor.run()
        sock.close()
        failed = any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes)
        if failed:
            print("coe serve: a worker failed to start; see its log lines above", file=sys.stderr)
        return 1 if failed else 0
    finally:
        owned.stop()
        if own_metrics:
            shutil.rmtree(metrics_dir, ignore_errors=True)
