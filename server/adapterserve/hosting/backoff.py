"""When to try again to start an engine that died: at once the first time, then after a
delay that doubles while it keeps dying soon after each start, up to a ceiling; an
engine that stayed up longer than the ceiling starts over from the first delay."""

from __future__ import annotations

import time


class Backoff:
    def __init__(self, first_s: float, most_s: float, clock=time.monotonic):
        self.first_s, self.most_s, self.clock = first_s, most_s, clock
        self.delay_s = first_s
        self.last_start: float | None = None

    def wait_s(self) -> float:
        """Seconds to wait before the next start (and move the delay along)."""
        if self.last_start is None or self.clock() - self.last_start > self.most_s:
            self.delay_s = self.first_s  # first start, or it stayed up a while
            return 0.0
        wait, self.delay_s = self.delay_s, min(2 * self.delay_s, self.most_s)
        return wait

    def started(self) -> None:
        self.last_start = self.clock()
