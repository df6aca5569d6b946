"""OffLoop: blocking calls from Trio in worker threads, bounded, and never abandoned.

Rules: no network; threads are released by events, not by sleeping; every test runs under
``trio.fail_after``.
"""

from __future__ import annotations

import threading

import pytest
import trio
import trio.lowlevel

from vajra.state import OffLoop


async def test_results_and_errors_pass_through() -> None:
    offloop = OffLoop()
    with trio.fail_after(10):
        assert await offloop.run(int, "12", base=16) == 18
        with pytest.raises(ValueError):
            await offloop.run(int, "not a number")


async def test_at_most_max_threads_run_at_once() -> None:
    offloop = OffLoop(max_threads=2)
    lock = threading.Lock()
    pair = threading.Barrier(2, timeout=10)  # two must overlap, or this times out
    running = peak = 0

    def work() -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        pair.wait()
        with lock:
            running -= 1

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(offloop.run, work)
    assert peak == 2


async def test_cancellation_waits_for_the_call_in_flight() -> None:
    offloop = OffLoop()
    started, release = threading.Event(), threading.Event()
    written: list[bool] = []
    outcome: list[str] = []

    def write() -> None:
        started.set()
        release.wait(10)
        written.append(True)

    async def caller(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            await offloop.run(write)
            outcome.append("returned")  # the call's result is not thrown away ...
            await trio.lowlevel.checkpoint()  # ... the cancellation lands at the next checkpoint
            outcome.append("not reached")
        outcome.append("cancelled" if scope.cancelled_caught else "not cancelled")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            scope = await nursery.start(caller)
            assert await trio.to_thread.run_sync(started.wait, 10)
            scope.cancel()
            await trio.sleep(0.1)
            assert outcome == [] and written == []  # still waiting for the write to end
            release.set()
    assert written == [True] and outcome == ["returned", "cancelled"]
