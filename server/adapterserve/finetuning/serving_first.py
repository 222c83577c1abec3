"""Serving first: a trainer on the serving machine is paused while the engines have
requests, and continues once they have been idle for a moment; the job trains in the
gaps between requests.

Why not a scheduling priority: on the 2-core machines measured, any process beside the
engines cut their throughput to a third, whether at `nice 10`, in Linux's idle class
(SCHED_IDLE), or a pure Python loop in the idle class (bench/fine_tuning.py,
bench/RESULTS.md): the engines' threads lose the core at every short wait and get it back
late, so the whole batch waits. Stopping the trainer (SIGSTOP to its process group) is
the only way that kept serving at its idle speed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

POLL_S = 0.05  # how soon a request stops the trainer (a decode step is ~10-50 ms here)
QUIET_S = 0.5  # how long the engines must be idle before the trainer continues


def engines_busy(host) -> bool:
    """Whether any engine of the host has a request it has not finished."""
    return any(engine.unfinished_requests() for engine in host.engines())


async def pause_while_serving(training, busy: Callable[[], bool], poll_s: float = POLL_S, quiet_s: float = QUIET_S) -> None:
    """Pause `training` while `busy()`, resume it after `quiet_s` of idle; runs until
    cancelled (the job's end), and leaves the training running."""
    paused, idle_since = False, time.monotonic()
    try:
        while True:
            if busy():
                idle_since = time.monotonic()
                if not paused:
                    training.pause()
                    paused = True
            elif paused and time.monotonic() - idle_since >= quiet_s:
                training.resume()
                paused = False
            await asyncio.sleep(poll_s)
    finally:
        if paused:
            training.resume()
