"""A real ``redis-server`` for tests, started on a free port in a temp folder.

Tests of the Redis store talk to a real server, never a fake, and never to a
Redis that happens to run on this machine (port 6379): each ``RedisServer``
is private, persists nothing unless ``appendonly=True``, and can be killed and
restarted on the same port and folder to test what survives a crash.

Fixtures are made by factories so each test module picks its scope::

    from redis_server import redis_server_fixture, redis_factory_fixture

    redis_server = redis_server_fixture(scope="session")   # one shared server
    redis_factory = redis_factory_fixture()                 # fresh servers per test

    async def test_survives_crash(redis_factory):
        server = redis_factory(appendonly=True)
        ...
        server.kill()
        server.restart()

When ``redis-server`` is not on PATH these fixtures skip the test, saying to
run ``deploy/setup.sh`` (which installs it with apt).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal

import pytest

Scope = Literal["session", "package", "module", "class", "function"]

SETUP_HINT = "redis-server is not on PATH; run deploy/setup.sh (it installs redis-server with apt)"


def redis_binary() -> str | None:
    """Path of ``redis-server`` (``COE_REDIS_SERVER`` overrides), or None when absent."""
    return os.environ.get("COE_REDIS_SERVER") or shutil.which("redis-server")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """One ``redis-server`` process; ``start()`` returns once it answers PING."""

    def __init__(
        self,
        directory: Path,
        *,
        port: int | None = None,
        appendonly: bool = False,
        binary: str | None = None,
    ) -> None:
        found = binary or redis_binary()
        if found is None:
            raise FileNotFoundError(SETUP_HINT)
        self.binary = found
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self.appendonly = appendonly
        self.log_path = self.directory / "redis.log"
        self.socket_path = self.directory / "redis.sock"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.socket_path}?db=0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _argv(self) -> list[str]:
        argv = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--daemonize", "no",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--appendonly", "yes" if self.appendonly else "no",
        ]
        if self.appendonly:
            argv += ["--appendfsync", "always"]
        return argv

    def start(self, timeout_s: float = 15.0) -> RedisServer:
        """Start and wait for PING; a fresh free port is tried if ours was taken meanwhile."""
        for attempt in range(3):
            try:
                self._spawn_and_wait(timeout_s)
                return self
            except RuntimeError:
                if self._fixed_port or attempt == 2 or "Address already in use" not in self.log_tail():
                    raise
                self.port = free_port()
        raise AssertionError("unreachable")

    def _spawn_and_wait(self, timeout_s: float) -> None:
        if self.running:
            raise RuntimeError(f"redis-server on port {self.port} is already running")
        self._log = open(self.log_path, "ab")  # closed in _reap()
        self._proc = subprocess.Popen(self._argv(), stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._reap()
                raise RuntimeError(f"redis-server exited at start; log tail:\n{self.log_tail()}")
            if self.ping():
                return
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"redis-server did not answer PING in {timeout_s}s; log tail:\n{self.log_tail()}")

    def ping(self) -> bool:
        """True when the server answers PING with PONG (not while it still loads its data)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: a crash, with no chance to flush anything not yet written."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
        self._reap()

    def restart(self, timeout_s: float = 15.0) -> RedisServer:
        """Stop if running, then start on the same port and folder (append-only data reloads)."""
        if self.running:
            self.stop()
        self._spawn_and_wait(timeout_s)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM and wait (redis shuts down cleanly); SIGKILL if it takes too long."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._reap()

    def _reap(self) -> None:
        if self._proc is not None:
            self._proc.wait()
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> RedisServer:
        return self if self.running else self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _require_binary() -> None:
    if redis_binary() is None:
        pytest.skip(SETUP_HINT)


def redis_server_fixture(*, scope: Scope = "session", appendonly: bool = False) -> Any:
    """A fixture that yields one started ``RedisServer`` for ``scope`` and stops it after."""

    @pytest.fixture(scope=scope)
    def _fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
        _require_binary()
        with RedisServer(tmp_path_factory.mktemp("redis"), appendonly=appendonly) as server:
            yield server

    return _fixture


def redis_factory_fixture(*, scope: Scope = "function") -> Any:
    """A fixture that yields ``make(appendonly=False) -> RedisServer``; all are stopped after."""

    @pytest.fixture(scope=scope)
    def _fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., RedisServer]]:
        _require_binary()
        servers: list[RedisServer] = []

        def make(*, appendonly: bool = False) -> RedisServer:
            server = RedisServer(tmp_path_factory.mktemp("redis"), appendonly=appendonly).start()
            servers.append(server)
            return server

        try:
            yield make
        finally:
            for server in servers:
                server.stop()

    return _fixture
