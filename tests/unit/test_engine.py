"""Engine construction runs off the event loop, and a cancelled start leaves nothing behind."""

from __future__ import annotations

import asyncio
import threading
import time

from adapterserve.hosting.engine import _off_the_event_loop


def test_construction_runs_in_a_thread_while_the_loop_keeps_running():
    async def scenario():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        ticking = asyncio.create_task(ticker())
        built = await _off_the_event_loop(lambda: (time.sleep(0.5), threading.current_thread())[1], print)
        ticking.cancel()
        return built, ticks

    built, ticks = asyncio.run(scenario())
    assert built is not threading.main_thread()
    assert ticks >= 20  # the loop ran while the construction blocked its thread


def test_a_cancelled_start_hands_what_was_built_to_be_stopped():
    abandoned = []

    async def scenario():
        start = asyncio.create_task(_off_the_event_loop(lambda: (time.sleep(0.3), "client")[1], abandoned.append))
        await asyncio.sleep(0.05)
        start.cancel()
        try:
            await start
        except asyncio.CancelledError:
            pass
        await asyncio.sleep(0.6)  # the construction finishes in its thread

    asyncio.run(scenario())
    assert abandoned == ["client"]


def test_restart_backoff_doubles_while_an_engine_keeps_dying_and_resets_after_a_long_life():
    from adapterserve.hosting.backoff import Backoff

    now = [0.0]
    backoff = Backoff(2.0, 30.0, clock=lambda: now[0])
    assert backoff.wait_s() == 0.0  # the first restart: at once
    backoff.started()
    waits = []
    for _ in range(5):  # dies again right after each start
        now[0] += 1.0
        waits.append(backoff.wait_s())
        backoff.started()
    assert waits == [2.0, 4.0, 8.0, 16.0, 30.0]
    now[0] += 31.0  # stayed up longer than the ceiling
    assert backoff.wait_s() == 0.0
    backoff.started()
    now[0] += 1.0
    assert backoff.wait_s() == 2.0
