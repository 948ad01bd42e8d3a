"""Batch items run in waves, so each expert's work goes out together and a whole model loads once.

Left alone, every item runs its own request path and the expert calls of
different items interleave: adapters thrash, and whole models that cannot all be
resident would be loaded at every switch. Here:

- Every item (a *job*) runs concurrently through the real request path
  (``services.api.chat.execute``) with a stager in place of the dispatcher: its
  ``chat`` parks the call instead of sending it.
- When every unfinished job waits on a parked call, the parked calls run as one
  **wave** through the real dispatcher, grouped by the backend and expert of
  their first candidate: a backend's calls in expert order (one expert's calls
  are contiguous), ``concurrency`` at a time per backend. Backends that are
  always up run side by side; on-demand backends (``launch.on_demand``) run one
  after another, each brought up before its group (the one already resident
  goes first) and put down when the next one comes up.
- The answers resume the pipelines, which park their next calls (aggregators,
  escalation rounds): the next wave. A named-expert item is one call in wave 1;
  a ``model="coe"`` item's expert calls are in wave 1, its aggregator's in wave 2.

So a wave loads each on-demand backend it uses once (a plain batch over N
whole-model experts: N loads). ``group=False`` runs each wave's calls in arrival
order instead, bringing a model up at every switch: the baseline that
``bench/offline_models.py`` measures against. Pipelines of staged jobs run
without time deadlines (``coe.pipeline.state.Context.staged``).

A job can stop being wanted while it waits (its batch was cancelled or expired):
``run(jobs, wanted=...)`` is asked right before each of its calls would go out,
and an unwanted call fails with ``Conflict`` (code ``batch_stopped``) instead,
so a cancel takes effect within a wave, not after the worker's whole window, and
no model is brought up for calls nobody wants.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from coe.config import ExpertConfig
from coe.errors import BackendUnavailable, CoeError, Conflict

if TYPE_CHECKING:
    from coe.dispatch import ExpertCall
    from coe.metrics import Metrics
    from coe.pipeline.state import ChatCaller

log = logging.getLogger("coe.batch")

ChatResult = tuple[dict[str, Any], ExpertConfig, "ExpertCall"]
Job = Callable[["ChatCaller"], Awaitable[None]]
"""One batch item: runs through the caller it is given and records its own result; never raises."""
Wanted = Callable[[int], bool]
"""Whether job ``i`` (its index in ``run``'s list) still wants its calls sent."""

SETTLE_ROUNDS = 3
"""Event-loop turns a wave waits for, once every job seems parked, to see that none parks more."""


class OnDemandModels(Protocol):
    """Which backends are brought up only for their group of calls, and bringing them up
    (``coe.backends.pool.BackendPool``)."""

    @property
    def resident(self) -> str | None: ...

    def is_on_demand(self, name: str) -> bool: ...

    def using(self, name: str) -> contextlib.AbstractAsyncContextManager[bool]:
        """The backend up (yields True when this brought it up) and kept up until the block ends."""
        ...

    async def put_down(self, name: str | None = None) -> None: ...


@dataclass
class WaveStats:
    waves: int = 0
    calls: int = 0
    loads: list[str] = field(default_factory=list)
    """On-demand backends brought up, in order (a backend appears once per load)."""
    load_s: float = 0.0
    """Seconds spent bringing models up (and putting the previous one down)."""

    def to_json(self) -> dict[str, Any]:
        return {"waves": self.waves, "calls": self.calls, "model_loads": len(self.loads), "loads": list(self.loads),
                "load_s": round(self.load_s, 3)}


@dataclass(eq=False)
class _Parked:
    job: int
    experts: list[ExpertConfig]
    body: dict[str, Any]
    request_id: str
    future: asyncio.Future[ChatResult]
    released: bool = False

    @property
    def backend(self) -> str:
        return self.experts[0].backend if self.experts else ""

    @property
    def expert(self) -> str:
        return self.experts[0].name if self.experts else ""


class _Stager:
    """One run's parked calls, and which jobs wait on one (every live job waiting = the wave can go)."""

    def __init__(self, jobs: int, wanted: Wanted | None = None) -> None:
        self.wanted = wanted
        self.parked: list[_Parked] = []
        self.waiting = [0] * jobs
        self.live = set(range(jobs))
        self.changed = asyncio.Event()

    def park(self, job: int, experts: Sequence[ExpertConfig], body: dict[str, Any],
             request_id: str) -> asyncio.Future[ChatResult]:
        future: asyncio.Future[ChatResult] = asyncio.get_running_loop().create_future()
        call = _Parked(job, list(experts), body, request_id, future)
        self.parked.append(call)
        self.waiting[job] += 1
        future.add_done_callback(lambda _: self.release(call))  # also when the job cancels it (a quorum)
        self.changed.set()
        return future

    def release(self, call: _Parked) -> None:
        if not call.released:
            call.released = True
            self.waiting[call.job] -= 1

    def resolve(self, call: _Parked, result: ChatResult | None, exc: BaseException | None) -> None:
        """Answer a parked call; the job counts as running again at once, not a loop turn later."""
        if call.future.done():
            return
        if exc is not None:
            call.future.set_exception(exc)
        else:
            assert result is not None
            call.future.set_result(result)
        self.release(call)

    def drop_unwanted(self, calls: list[_Parked]) -> list[_Parked]:
        """The calls still to send: answered ones left out, unwanted ones failed (``batch_stopped``)."""
        keep = []
        for call in calls:
            if call.future.done():
                continue
            if self.wanted is not None and not self.wanted(call.job):
                self.resolve(call, None, Conflict("the batch was cancelled or expired before this call ran",
                                                  code="batch_stopped"))
                continue
            keep.append(call)
        return keep

    def finished(self, job: int) -> None:
        self.live.discard(job)
        self.changed.set()

    def quiescent(self) -> bool:
        return all(self.waiting[j] > 0 for j in self.live)

    async def settled(self) -> None:
        """Until every live job waits on a parked call (or none is left)."""
        while True:
            self.changed.clear()
            if self.quiescent():
                for _ in range(SETTLE_ROUNDS):  # a fan-out's other calls park in the next loop turns
                    await asyncio.sleep(0)
                if not self.changed.is_set() and self.quiescent():
                    return
                continue
            await self.changed.wait()

    def take(self) -> list[_Parked]:
        wave, self.parked = [c for c in self.parked if not c.future.done()], []
        return wave


class _Caller:
    """A job's view of the stager: ``chat`` as the pipeline expects it, parking the call."""

    def __init__(self, stager: _Stager, job: int) -> None:
        self._stager = stager
        self._job = job

    async def chat(self, experts: Sequence[ExpertConfig], body: dict[str, Any], *,
                   request_id: str) -> ChatResult:
        return await self._stager.park(self._job, experts, body, request_id)


class WaveRunner:
    """Runs jobs in waves through ``dispatcher``; see the module docstring."""

    def __init__(self, dispatcher: ChatCaller, *, models: OnDemandModels | None = None, metrics: Metrics | None = None,
                 concurrency: int = 8, group: bool = True, on_event: Callable[[str], None] | None = None) -> None:
        self.dispatcher = dispatcher
        self.models = models
        self.metrics = metrics
        self.concurrency = max(1, concurrency)
        self.group = group
        self.on_event = on_event
        self.stats = WaveStats()
        self._loaded: str | None = None
        """The on-demand backend this runner brought up last (the only one ``release`` puts down)."""

    def _say(self, text: str) -> None:
        log.info("%s", text)
        if self.on_event is not None:
            self.on_event(text)

    async def run(self, jobs: Sequence[Job], *, wanted: Wanted | None = None) -> None:
        """Every job to its end; cancelling this cancels the jobs and their calls. ``wanted(i)`` is
        asked before each of job ``i``'s calls goes out (default: every call is sent)."""
        if not jobs:
            return
        stager = _Stager(len(jobs), wanted)
        tasks = [asyncio.create_task(self._job(stager, i, job), name=f"coe-batch-job-{i}")
                 for i, job in enumerate(jobs)]
        try:
            while True:
                await stager.settled()
                if not stager.live:
                    return
                wave = stager.take()
                if wave:
                    await self._wave(stager, wave)
                else:  # not expected: a job counted as waiting with nothing parked; look again shortly
                    await asyncio.sleep(0.01)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def release(self) -> None:
        """Put down the on-demand model this runner brought up, if it is still the resident one
        (the worker calls this when its queue is empty; another runner's model is left alone)."""
        if self.models is not None and self._loaded is not None:
            if self.models.resident == self._loaded:
                await self.models.put_down(self._loaded)
            self._loaded = None

    @staticmethod
    async def _job(stager: _Stager, index: int, job: Job) -> None:
        try:
            await job(_Caller(stager, index))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("a batch job failed outside its request path")
        finally:
            stager.finished(index)

    def _on_demand(self, backend: str) -> bool:
        return self.models is not None and self.models.is_on_demand(backend)

    def _groups(self, calls: list[_Parked]) -> list[list[_Parked]]:
        """Consecutive runs of one backend's calls, in the order they go out."""
        if not self.group:
            ordered = sorted(calls, key=lambda c: c.job)  # arrival order (stable: a job's calls as parked)
            runs: list[list[_Parked]] = []
            for call in ordered:
                if runs and runs[-1][0].backend == call.backend:
                    runs[-1].append(call)
                else:
                    runs.append([call])
            return runs
        first: dict[str, int] = {}
        for i, call in enumerate(calls):
            first.setdefault(call.backend, i)
            first.setdefault(f"{call.backend}\0{call.expert}", i)
        resident = self.models.resident if self.models is not None else None
        backends = sorted({c.backend for c in calls}, key=lambda b: (b != resident, first[b]))
        return [sorted((c for c in calls if c.backend == b), key=lambda c: first[f"{b}\0{c.expert}"])
                for b in backends]

    async def _wave(self, stager: _Stager, wave: list[_Parked]) -> None:
        self.stats.waves += 1
        self.stats.calls += len(wave)
        experts = len({(c.backend, c.expert) for c in wave})
        self._say(f"wave {self.stats.waves}: {len(wave)} expert call(s) to {experts} expert(s)")
        on_demand = self._groups([c for c in wave if self._on_demand(c.backend)])
        always_up = self._groups([c for c in wave if not self._on_demand(c.backend)])
        lanes: list[Awaitable[None]] = [self._lane(stager, on_demand, load=True)]
        if self.group:
            lanes += [self._lane(stager, [g], load=False) for g in always_up]  # servers side by side
        else:
            lanes.append(self._lane(stager, always_up, load=False))
        await asyncio.gather(*lanes)

    async def _lane(self, stager: _Stager, groups: list[list[_Parked]], *, load: bool) -> None:
        """Groups one after another (on-demand ones each with its model brought up first)."""
        for calls in groups:
            calls = stager.drop_unwanted(calls)  # before a model is brought up for them
            if not calls:
                continue
            if load:
                await self._on_demand_group(stager, calls)
            else:
                await self._send(stager, calls)

    async def _on_demand_group(self, stager: _Stager, calls: list[_Parked]) -> None:
        """The group's model brought up (and kept up while the group runs), then its calls."""
        assert self.models is not None
        backend = calls[0].backend
        started = time.perf_counter()
        if backend != self.models.resident:
            self._say(f"bringing up on-demand backend {backend} for {len(calls)} call(s)")
        try:
            async with self.models.using(backend) as loaded:
                self.stats.load_s += time.perf_counter() - started
                if loaded:
                    self._loaded = backend
                    self.stats.loads.append(backend)
                    if self.metrics is not None:
                        self.metrics.model_loads.labels(backend).inc()
                await self._send(stager, calls)
        except CoeError as exc:  # it did not come up: the group's calls fail (a 503 for their items)
            log.error("on-demand backend %s did not come up: %s", backend, exc.message)
            for call in calls:
                stager.resolve(call, None, exc)

    async def _send(self, stager: _Stager, calls: list[_Parked]) -> None:
        """The calls through the real dispatcher, ``concurrency`` at a time, started in order."""
        slots = asyncio.Semaphore(self.concurrency)  # FIFO: calls go out in the order given

        async def one(call: _Parked) -> None:
            async with slots:
                if not stager.drop_unwanted([call]):  # answered (its round reached the quorum) or unwanted
                    return
                task = asyncio.current_task()
                assert task is not None
                call.future.add_done_callback(lambda f: task.cancel() if f.cancelled() else None)
                try:
                    result = await self.dispatcher.chat(call.experts, call.body, request_id=call.request_id)
                except asyncio.CancelledError:
                    if call.future.cancelled():
                        return
                    raise
                except Exception as exc:
                    stager.resolve(call, None, exc)
                else:
                    stager.resolve(call, result, None)

        tasks = [asyncio.create_task(one(c)) for c in calls]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.gather(*tasks, return_exceptions=True)
            for call in calls:  # nothing may stay parked: a job would wait forever
                stager.resolve(call, None, BackendUnavailable("the batch wave ended before this call ran"))
