"""Every expert call goes through the dispatcher.

Contract:
- The candidates are tried in order. On each, a connect error, a timeout or a
  5xx *before the first byte* is retried with exponential backoff
  (``dispatch.retries``, ``dispatch.backoff_s``); then the next candidate is
  tried. A 4xx is the request's fault and is raised at once, except a 404 for
  an adapter expert whose adapter the server has lost (a restarted vLLM): the
  adapter is reloaded under its lock and the call retried once.
- A candidate whose backend is known to be down is skipped without waiting.
  When every candidate fails: ``BackendUnavailable`` (503 with Retry-After).
- Once a stream has started, nothing is retried: the caller gets an error event.
- A non-streaming call longer than ``timeouts.total_s`` is a 504 and is not retried
  (streams are bounded by ``read_s`` between chunks instead).
- Concurrency per backend is bounded (``backends.X.max_concurrency``); a stream
  holds its slot until it is closed. When a backend is full, waiting calls queue
  per model and go out in an adapter-aware order (``coe.dispatch.schedule``);
  an adapter is loaded on demand once its call has a slot, evicting the least
  recently used one when the server is full (``coe.dispatch.residency``).
  The server's ``max_loras`` comes from the backend's config, else its launch,
  else (a remote vLLM) its ``/metrics``, read when the backend first fills up.
- Cancelling the awaiting task (client disconnect) closes the upstream
  connection, which makes vLLM abort the request.
- Each candidate tried is one ``chat {model}`` span (``coe.telemetry.genai``),
  current while the call runs so that its ``traceparent`` goes upstream; a
  stream's span ends when the stream is finished or closed.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

from coe import usage as usage_mod
from coe.backends.base import ChatStream
from coe.backends.pool import BackendPool, BackendRuntime
from coe.config import BackendConfig, DispatchConfig, ExpertConfig
from coe.dispatch.body import upstream_body
from coe.dispatch.residency import Residency
from coe.dispatch.schedule import BackendSchedule
from coe.errors import BackendUnavailable, UpstreamError, UpstreamTimeout
from coe.metrics import Metrics
from coe.telemetry import OFF, Span, Telemetry
from coe.telemetry import genai as genai_spans

log = logging.getLogger("coe.dispatch")

T = TypeVar("T")

DOWN_STATES = frozenset({"unhealthy", "crashed", "failed", "stopped", "starting"})
PROBE_EVERY_S = 30.0
"""Seconds between reads of a full backend's ``/metrics`` while its ``max_loras`` is unknown."""


@dataclass
class ExpertCall:
    """What one expert call cost; the response's ``coe.experts`` entries."""

    name: str
    usage: dict[str, int] | None = None
    cost: float | None = None
    latency_ms: float = 0.0
    attempts: int = 0
    skipped: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "usage": self.usage, "cost": self.cost,
                "latency_ms": round(self.latency_ms, 2)}


@dataclass
class OpenedStream:
    """A started stream from one expert; ``finish`` records its usage once known."""

    expert: ExpertConfig
    call: ExpertCall
    chunks: AsyncIterator[dict[str, Any]]
    _stream: ChatStream
    _release: Callable[[], None]
    _started: float
    _span: Span
    _closed: bool = False

    def finish(self, usage: dict[str, Any] | None, metrics: Metrics) -> ExpertCall:
        self.call.usage = usage_mod.normalize(usage)
        self.call.cost = usage_mod.cost(self.expert, self.call.usage)
        self.call.latency_ms = (time.perf_counter() - self._started) * 1000
        metrics.record_usage(self.expert.name, self.call.usage, self.call.cost)
        metrics.expert_latency.labels(self.expert.name).observe(self.call.latency_ms / 1000)
        if self._span.is_recording():
            genai_spans.record_usage(self._span, usage)
            genai_spans.record_call(self._span, cost=self.call.cost, attempts=self.call.attempts,
                                    skipped=self.call.skipped)
            self._span.end()
        return self.call

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._release()
            if self._span.is_recording():  # not finished: the stream broke off or the client went away
                self._span.set_attribute("coe.completed", False)
                self._span.end()
            await self._stream.aclose()


@dataclass
class Lane:
    """One backend's admission queue and adapter bookkeeping, rebuilt when the backend or config changes."""

    backend: BackendRuntime
    config: DispatchConfig
    schedule: BackendSchedule
    residency: Residency
    probe: bool = False
    """Whether ``max_loras`` is still to be read from the server (grouping on, capacity not configured)."""
    _probe_task: asyncio.Task[None] | None = None
    _probed_at: float = float("-inf")

    @classmethod
    def build(cls, backend: BackendRuntime, config: DispatchConfig, metrics: Metrics) -> Lane:
        launch = backend.config.launch
        max_loras = backend.config.max_loras
        max_cpu = backend.config.max_cpu_loras
        if launch is not None and launch.enables_lora():
            max_loras = max_loras or launch.max_loras
            max_cpu = max_cpu or launch.max_cpu_loras
        residency = Residency(backend, capacity=max_cpu or max_loras, evict=config.evict_adapters, metrics=metrics)
        schedule = BackendSchedule(capacity=backend.config.max_concurrency, max_loras=max_loras,
                                   max_wait_s=config.max_wait_s, group=config.group_adapters, metrics=metrics,
                                   resident=residency.is_hot)
        residency.busy = lambda name: schedule.running.get(name, 0) > 0
        return cls(backend, config, schedule, residency, probe=config.group_adapters and max_loras is None)

    def _probe_capacity(self) -> None:
        """Read the server's ``max_loras`` in the background (at most every ``PROBE_EVERY_S``): only a
        full backend needs it, and vLLM reports it only once it has scheduled requests."""
        now = time.monotonic()
        if (self._probe_task is not None and not self._probe_task.done()) or now - self._probed_at < PROBE_EVERY_S:
            return
        self._probed_at = now
        self._probe_task = asyncio.create_task(self._read_capacity(), name=f"coe-probe-{self.backend.name}")

    async def _read_capacity(self) -> None:
        found = await self.backend.api.max_loras()
        if found is not None and self.probe:
            self.probe = False
            self.schedule.max_loras = found
            log.info("backend %s reports max_loras=%d: waiting calls now go out grouped by adapter",
                     self.backend.name, found)

    def key(self, expert: ExpertConfig) -> tuple[str, bool]:
        """The model name the call is sent as, and whether that is an adapter."""
        if expert.adapter is not None:
            return expert.adapter.name, True
        if self.backend.base_adapter:
            return self.backend.base_adapter, True
        return expert.upstream_model, False

    async def acquire(self, expert: ExpertConfig) -> Callable[[], None]:
        """A slot for one call to ``expert``; returns the function that frees it."""
        key, adapter = self.key(expert)
        if self.probe and self.schedule.in_flight >= self.schedule.capacity:
            self._probe_capacity()
        await self.schedule.acquire(key, expert=expert.name, adapter=adapter)
        return functools.partial(self.schedule.release, key)

    @asynccontextmanager
    async def slot(self, expert: ExpertConfig) -> AsyncIterator[None]:
        release = await self.acquire(expert)
        try:
            yield
        finally:
            release()


class Dispatcher:
    def __init__(self, pool: BackendPool, config: DispatchConfig, metrics: Metrics,
                 telemetry: Telemetry = OFF) -> None:
        self.pool = pool
        self.config = config
        self.metrics = metrics
        self.telemetry = telemetry
        self._lanes: dict[str, Lane] = {}

    @property
    def lanes(self) -> Mapping[str, Lane]:
        """Each backend's lane built so far, by backend name (read-only: the explorer shows residency)."""
        return MappingProxyType(self._lanes)

    def lane(self, backend: BackendRuntime) -> Lane:
        lane = self._lanes.get(backend.name)
        if lane is None or lane.backend is not backend or lane.config is not self.config:
            lane = self._lanes[backend.name] = Lane.build(backend, self.config, self.metrics)
        return lane

    async def configure(self, config: DispatchConfig, backends: dict[str, BackendConfig]) -> None:
        """A registry (re)load: the backends to run (started, stopped or rebuilt as they changed) and the
        dispatch settings. The registry calls this rather than reaching into the pool."""
        self.pool.set_health_interval(config.health_interval_s)
        await self.pool.reconcile(backends)
        self.config = config

    async def served_models(self, backend: str) -> set[str]:
        """The model and adapter names a backend's server lists now."""
        return {str(m.get("id")) for m in await self.pool.get(backend).api.list_models()}

    async def unload_adapter(self, backend: str, adapter: str) -> None:
        """Unload ``adapter`` from ``backend``'s server, under the adapter's lock (no load races it)."""
        runtime = self.pool.get(backend)
        async with runtime.adapter_lock(adapter):
            await runtime.api.unload_adapter(adapter)

    async def ensure_adapter(self, expert: ExpertConfig) -> None:
        """Load the expert's adapter into its backend (a no-op when already there)."""
        await self.lane(self.pool.get(expert.backend)).residency.ensure(expert)

    def _usable(self, experts: Sequence[ExpertConfig]) -> list[tuple[ExpertConfig, BackendRuntime]]:
        out = []
        for expert in experts:
            try:
                out.append((expert, self.pool.get(expert.backend)))
            except BackendUnavailable:
                log.warning("expert %s names backend %s, which is not running", expert.name, expert.backend)
        up = [(e, b) for e, b in out if b.state not in DOWN_STATES]
        if not up:
            states = ", ".join(f"{b.name}: {b.state}" for _, b in out) or "no backend"
            starting = any(b.state == "starting" for _, b in out)
            raise BackendUnavailable(
                f"no expert is available ({states})" + ("; a backend is still starting" if starting else ""),
                retry_after=10 if starting else 5,
            )
        return up

    async def _attempts(self, expert: ExpertConfig, backend: BackendRuntime, call: ExpertCall,
                        fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn()`` against one expert with the retry policy; the last error propagates."""
        delay = self.config.backoff_s
        reloaded = False
        attempt = 0
        while True:
            attempt += 1
            call.attempts += 1
            try:
                return await fn()
            except BackendUnavailable as exc:
                self.metrics.upstream_errors.labels(backend.name, "unavailable").inc()
                if attempt > self.config.retries:
                    raise
                wait = random.uniform(delay / 2, delay)  # jittered: requests hit by one blip do not retry in step
                log.info("expert %s attempt %d failed (%s); retrying in %.2fs", expert.name, attempt, exc, wait)
                await asyncio.sleep(wait)
                delay *= 2
            except UpstreamError as exc:
                self.metrics.upstream_errors.labels(backend.name, f"http_{exc.status // 100}xx").inc()
                if exc.status == 404 and not reloaded and expert.adapter is not None and expert.adapter.path:
                    log.warning("backend %s lost adapter %s; reloading it", backend.name, expert.adapter.name)
                    reloaded = True
                    await self.lane(backend).residency.reload(expert)
                    continue
                if exc.status == 404:
                    raise UpstreamError(
                        f"expert {expert.name!r}: backend {backend.name!r} does not serve "
                        f"{expert.upstream_model!r} ({exc.message})", status=502) from exc
                raise

    async def chat(self, experts: Sequence[ExpertConfig], body: dict[str, Any], *,
                   request_id: str) -> tuple[dict[str, Any], ExpertConfig, ExpertCall]:
        """A non-streaming answer from the first candidate that gives one."""
        last: BackendUnavailable | None = None
        skipped: list[str] = []
        for expert, backend in self._usable(experts):
            call = ExpertCall(expert.name, skipped=list(skipped))
            started = time.perf_counter()
            payload = upstream_body(expert, body, base_adapter=backend.base_adapter)
            total_s = backend.config.timeouts.total_s
            lane = self.lane(backend)
            span = genai_spans.start_call(self.telemetry, payload, expert=expert.name, backend=backend.name,
                                          server=backend.base_url, request_id=request_id)
            try:
                with self.telemetry.use(span, end=True):
                    async with asyncio.timeout(total_s), lane.slot(expert):
                        await lane.residency.ensure(expert)
                        result = await self._attempts(
                            expert, backend, call, functools.partial(backend.api.chat, payload, request_id=request_id))
                    if span.is_recording():
                        self._record(span, result, call, expert)
            except TimeoutError as exc:
                self.metrics.expert_calls.labels(expert.name, "timeout").inc()
                raise UpstreamTimeout(f"expert {expert.name!r} did not answer within {total_s:g}s "
                                      f"(backends.{backend.name}.timeouts.total_s)") from exc
            except BackendUnavailable as exc:
                self.metrics.expert_calls.labels(expert.name, "unavailable").inc()
                last, skipped = exc, [*skipped, expert.name]
                continue
            except UpstreamError:
                self.metrics.expert_calls.labels(expert.name, "error").inc()
                raise
            call.latency_ms = (time.perf_counter() - started) * 1000
            call.usage = usage_mod.normalize(result.get("usage"))
            call.cost = usage_mod.cost(expert, call.usage)
            self.metrics.expert_calls.labels(expert.name, "ok").inc()
            self.metrics.expert_latency.labels(expert.name).observe(call.latency_ms / 1000)
            self.metrics.record_usage(expert.name, call.usage, call.cost)
            if skipped:
                self.metrics.fallbacks.labels(expert.name).inc()
            return result, expert, call
        raise BackendUnavailable(f"every candidate expert failed ({', '.join(skipped)}): {last}",
                                 retry_after=last.retry_after if last else 5)

    def _record(self, span: Span, result: dict[str, Any], call: ExpertCall, expert: ExpertConfig) -> None:
        """A whole answer on its call span (only while it records)."""
        genai_spans.record_response(span, self.telemetry, result)
        genai_spans.record_call(span, cost=usage_mod.cost(expert, usage_mod.normalize(result.get("usage"))),
                                attempts=call.attempts, skipped=call.skipped)

    async def open_stream(self, experts: Sequence[ExpertConfig], body: dict[str, Any], *,
                          request_id: str) -> OpenedStream:
        """Open a stream on the first candidate that accepts; retries stop at the first byte."""
        last: BackendUnavailable | None = None
        skipped: list[str] = []
        for expert, backend in self._usable(experts):
            call = ExpertCall(expert.name, skipped=list(skipped))
            started = time.perf_counter()
            payload = upstream_body(expert, body, stream=True, base_adapter=backend.base_adapter)
            lane = self.lane(backend)
            span = genai_spans.start_call(self.telemetry, payload, expert=expert.name, backend=backend.name,
                                          server=backend.base_url, request_id=request_id, stream=True)
            try:
                with self.telemetry.use(span):
                    release = await lane.acquire(expert)
            except BaseException:
                span.end()
                raise
            try:
                with self.telemetry.use(span):  # an error fails the span on the way out
                    await lane.residency.ensure(expert)
                    stream = await self._attempts(
                        expert, backend, call,
                        functools.partial(backend.api.open_chat_stream, payload, request_id=request_id))
            except BackendUnavailable as exc:
                release()
                span.end()
                self.metrics.expert_calls.labels(expert.name, "unavailable").inc()
                last, skipped = exc, [*skipped, expert.name]
                continue
            except BaseException:
                release()
                span.end()
                self.metrics.expert_calls.labels(expert.name, "error").inc()
                raise
            self.metrics.expert_calls.labels(expert.name, "ok").inc()
            if skipped:
                self.metrics.fallbacks.labels(expert.name).inc()
            chunks = stream.chunks()
            if span.is_recording():
                chunks = genai_spans.observe(chunks, span, self.telemetry, started)
            return OpenedStream(expert, call, chunks, stream, release, started, span)
        raise BackendUnavailable(f"every candidate expert failed ({', '.join(skipped)}): {last}",
                                 retry_after=last.retry_after if last else 5)
