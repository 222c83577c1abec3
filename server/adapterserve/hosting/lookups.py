"""The stores' lookups of names that requests make up: remembered when missed, a few at a time.

A request naming an adapter that is not registered looks its name up in the stores
(`discover_on_request`): in S3 a LIST request, taking up to its timeouts while the store
hangs, in one of the event loop's worker threads (the default executor has min(32, cores
+ 4) of them, 6 on 2 cores, and validation and every other off-loop step need them too).
Any client can name anything, so without bounds a flood of made-up names makes as many
LIST requests and can hold every one of those threads. This gate

- remembers a name found in no store for `ttl_s` (10 s; at most `max_misses` names, the
  oldest forgotten first): asked again meanwhile, it answers "not found" without a
  request; a folder added under that name is found once that time has passed, or at once
  where the next scan of the stores registers or lists it, or an admin loads it (the
  catalog asks the gate only for names neither registered nor listed);
- lets at most `concurrent` lookups run at once: the others wait their turn on the event
  loop, holding no thread.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable

MISS_TTL_S = 10.0  # long enough that a flood repeating names costs one lookup per name per 10 s
MAX_MISSES = 10_000  # names remembered; made-up names beyond push out the oldest (~1 MB at most)
CONCURRENT_LOOKUPS = 2  # of the 6 worker threads a 2-core machine's event loop has


class LookupGate:
    def __init__(self, ttl_s: float = MISS_TTL_S, max_misses: int = MAX_MISSES, concurrent: int = CONCURRENT_LOOKUPS):
        self.ttl_s, self.max_misses = ttl_s, max_misses
        self._misses: OrderedDict[str, float] = OrderedDict()  # name -> when a lookup found it in no store
        self._turns = asyncio.Semaphore(concurrent)

    def missed_recently(self, name: str) -> bool:
        seen = self._misses.get(name)
        return seen is not None and time.monotonic() - seen < self.ttl_s

    async def found(self, name: str, lookup: Callable[[], bool]) -> bool:
        """Whether `lookup()` (run in a worker thread, in turn) finds `name`; False at once
        for a name it missed within `ttl_s`."""
        if self.missed_recently(name):
            return False
        async with self._turns:
            if self.missed_recently(name):  # missed by a lookup this one waited behind
                return False
            found = await asyncio.to_thread(lookup)
        if found:
            self._misses.pop(name, None)
            return True
        self._misses[name] = time.monotonic()
        self._misses.move_to_end(name)
        while len(self._misses) > self.max_misses:
            self._misses.popitem(last=False)
        return False
