"""The dispatcher's admission order (``coe.dispatch.schedule``): pure logic, driven call by call."""

from __future__ import annotations

import asyncio

import pytest

from coe.dispatch.schedule import BackendSchedule
from coe.metrics import Metrics


def schedule(capacity: int, max_loras: int | None = 2, max_wait_s: float = 30.0, group: bool = True,
             resident: set[str] | None = None) -> tuple[BackendSchedule, Metrics]:
    metrics = Metrics()
    held = resident or set()
    return BackendSchedule(capacity=capacity, max_loras=max_loras, max_wait_s=max_wait_s, group=group,
                           metrics=metrics, resident=lambda k: k in held), metrics


class Calls:
    """Calls started in order; ``admitted`` is the order the schedule let them go."""

    def __init__(self, sched: BackendSchedule) -> None:
        self.sched = sched
        self.admitted: list[str] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self, *keys: str, adapter: bool = True) -> None:
        for key in keys:
            self.tasks.append(asyncio.create_task(self._one(key, adapter)))
            await asyncio.sleep(0)  # arrival order = call order
        await asyncio.sleep(0)

    async def _one(self, key: str, adapter: bool) -> None:
        await self.sched.acquire(key, expert=f"e-{key}", adapter=adapter)
        self.admitted.append(key)

    async def finish(self, key: str) -> None:
        """One running call to ``key`` ends."""
        self.sched.release(key)
        await asyncio.sleep(0)
        await asyncio.sleep(0)


async def test_a_free_slot_is_taken_at_once() -> None:
    sched, metrics = schedule(capacity=2)
    calls = Calls(sched)
    await calls.start("a", "b")
    assert calls.admitted == ["a", "b"] and sched.in_flight == 2
    assert metrics.registry.get_sample_value("coe_dispatch_wait_seconds_sum", {"expert": "e-a"}) == 0.0


async def test_running_adapters_go_first_and_switches_are_few() -> None:
    sched, _ = schedule(capacity=2, max_loras=1)
    calls = Calls(sched)
    await calls.start("a", "b", "a", "b", "a", "b", "a", "b")
    assert calls.admitted == ["a", "b"]  # free slots: nobody waits
    # a finishes while b runs: the b calls go, then the a calls, despite arrival order a, b, a, b
    await calls.finish("a")
    for _ in range(2):
        await calls.finish("b")
    assert calls.admitted == ["a", "b", "b", "b", "b"]
    await calls.finish("b")  # no b waits any more: a starts rather than leave the slot idle
    assert calls.admitted == ["a", "b", "b", "b", "b", "a"] and sched.in_flight == 2
    await calls.finish("b")
    await calls.finish("a")
    assert calls.admitted == ["a", "b", "b", "b", "b", "a", "a", "a"]
    await asyncio.gather(*calls.tasks)
    assert sched.running == {"a": 2} and sched.in_flight == 2


async def test_a_new_adapter_waits_while_running_ones_have_calls() -> None:
    sched, _ = schedule(capacity=3, max_loras=2)
    calls = Calls(sched)
    await calls.start("a", "b", "a")
    await calls.start("c", "a")
    await calls.finish("a")
    assert calls.admitted == ["a", "b", "a", "a"]  # a runs: its call goes before the older c
    await calls.finish("b")
    assert calls.admitted[-1] == "c"  # nothing of a running adapter waits: c starts
    for key in ("a", "a", "c"):
        sched.release(key)
    await asyncio.gather(*calls.tasks)
    assert sched.in_flight == 0


async def test_base_model_calls_do_not_wait_for_an_adapter_slot() -> None:
    sched, _ = schedule(capacity=2, max_loras=1)
    calls = Calls(sched)
    await calls.start("a", "a")
    await calls.start("c")
    await calls.start("base", adapter=False)
    await calls.finish("a")
    assert calls.admitted == ["a", "a", "base"]  # c (an adapter) must wait; the base model need not
    for key in ("a", "base"):
        sched.release(key)
    await asyncio.gather(*calls.tasks)


async def test_loaded_adapters_start_before_ones_to_load() -> None:
    sched, _ = schedule(capacity=1, max_loras=2, resident={"r"})
    calls = Calls(sched)
    await calls.start("x", "n", "r")
    await calls.finish("x")
    assert calls.admitted == ["x", "r"]  # r is resident, n would need a load though it came first
    await calls.finish("r")
    assert calls.admitted == ["x", "r", "n"]
    sched.release("n")
    await asyncio.gather(*calls.tasks)


async def test_waiting_is_bounded_with_one_slot() -> None:
    sched, _ = schedule(capacity=1, max_loras=1, max_wait_s=0.2)
    calls = Calls(sched)
    await calls.start("a", "a", "b", "a", "a")
    await calls.finish("a")
    assert calls.admitted == ["a", "a"]  # grouping first
    await asyncio.sleep(0.25)
    await calls.finish("a")
    assert calls.admitted == ["a", "a", "b"]  # b waited max_wait_s: it goes next although a came first
    sched.release("b")
    await asyncio.sleep(0)
    sched.release("a")
    await asyncio.sleep(0)
    sched.release("a")
    await asyncio.gather(*calls.tasks)


async def test_an_overdue_call_stops_a_long_run_of_another_adapter() -> None:
    sched, _ = schedule(capacity=2, max_loras=1, max_wait_s=0.2)
    calls = Calls(sched)
    await calls.start("a", "a")  # free slots
    await calls.start("c", "a", "a", "a")
    await calls.finish("a")
    assert calls.admitted == ["a", "a", "a"]  # a is running: its calls go first
    await asyncio.sleep(0.25)  # c has waited max_wait_s, and a has run that long
    await calls.finish("a")
    assert calls.admitted == ["a", "a", "a", "c"]
    await calls.finish("c")  # nobody is overdue now: a, still running, goes on
    assert calls.admitted == ["a", "a", "a", "c", "a"]
    await calls.finish("a")
    assert calls.admitted == ["a", "a", "a", "c", "a", "a"]
    sched.release("a")
    sched.release("a")
    await asyncio.gather(*calls.tasks)
    assert sched.in_flight == 0


async def test_fifo_without_grouping() -> None:
    sched, _ = schedule(capacity=1, group=False)
    calls = Calls(sched)
    await calls.start("a", "b", "a", "b")
    for key in ("a", "b", "a"):
        await calls.finish(key)
    assert calls.admitted == ["a", "b", "a", "b"]
    sched.release("b")
    await asyncio.gather(*calls.tasks)


async def test_a_cancelled_waiter_leaves_no_trace() -> None:
    sched, metrics = schedule(capacity=1)
    calls = Calls(sched)
    await calls.start("a", "b")
    assert metrics.registry.get_sample_value("coe_dispatch_queue_depth", {"expert": "e-b"}) == 1
    calls.tasks[1].cancel()
    with pytest.raises(asyncio.CancelledError):
        await calls.tasks[1]
    assert metrics.registry.get_sample_value("coe_dispatch_queue_depth", {"expert": "e-b"}) == 0
    assert sched.waiting() == 0
    await calls.finish("a")
    assert sched.in_flight == 0 and sched.running == {}
