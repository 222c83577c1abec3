"""The engine supervisor both modes share: starting engines, noticing one died, restarting
it with the one policy, and saying which are down and why.

- An engine being started is tracked until its start ends, so a host's stop reaches an
  engine under construction too (its stop waits for the construction and ends it).
- A watcher looks at the engines every `interval` seconds (`Engine.running` reads the
  process table: here, never per request) and hands each dead one to its host.
- A restart marks the engine down (requests get a 503 with Retry-After), stops what is
  left of it, and starts it again until a start succeeds, waiting between tries as its
  back-off says (hosting/restart.py). The host publishes the new engine (registering
  its adapters first, or making it resident) before it is marked up again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

from adapterserve.config import Settings
from adapterserve.errors import engine_unavailable

from .backoff import Backoff
from .engine import EngineSpec
from .protocol import Engine, HostObserver
from .restart import backoff_for, start_again

log = logging.getLogger(__name__)


class EngineSupervisor:
    def __init__(
        self, settings: Settings, engine_factory: Callable[[EngineSpec], Engine], observer: HostObserver,
        on_nonfinite: Callable[[str | None, str], None] | None = None,
    ):
        self.settings = settings
        self.engine_factory = engine_factory  # tests pass a fake with Engine's interface
        self.observer = observer
        self.on_nonfinite = on_nonfinite
        self.down: dict[str, str] = {}  # engine name -> why it is down while it restarts
        self.restarts: dict[str, int] = {}  # engine name -> restarts after it died
        self._starting: set[Engine] = set()  # engines whose start has not ended
        self._backoffs: dict[str, Backoff] = {}  # engine name -> the back-off of its restarts
        self._watcher: asyncio.Task | None = None

    # --- starting -------------------------------------------------------------------
    def new_engine(self, spec: EngineSpec) -> Engine:
        engine = self.engine_factory(spec)
        engine.on_started = self.observer.engine_started
        if self.on_nonfinite is not None:
            engine.on_nonfinite = self.on_nonfinite
        return engine

    async def start(self, engine: Engine) -> Engine:
        """Start `engine`; a failed start leaves none of its processes behind. A cancelled
        one (the host stops) is left to `stop()`, which ends its construction."""
        self._starting.add(engine)
        try:
            await engine.start()
        except asyncio.CancelledError:
            raise
        except BaseException:
            self._starting.discard(engine)
            await engine.stop_async()
            raise
        self._starting.discard(engine)
        return engine

    # --- watching and restarting -------------------------------------------------------
    def watch(self, dead: Callable[[], Iterable[Engine]], on_dead: Callable[[Engine], Awaitable[None]], interval: float) -> None:
        """Every `interval` s, hand each engine `dead()` lists to `on_dead`, one at a time."""
        async def loop() -> None:
            while True:
                await asyncio.sleep(interval)
                for engine in list(dead()):
                    try:
                        await on_dead(engine)
                    except asyncio.CancelledError:
                        raise
                    except Exception:  # keep watching whatever happened
                        log.exception("restarting engine %s failed", engine.name)

        self._watcher = asyncio.create_task(loop())

    async def mark_down(self, engine: Engine) -> str:
        """Requests for `engine` get a 503 from now on; returns why it is down."""
        self.down[engine.name] = "engine stopped"
        reason = self.down[engine.name] = (await engine.check_health()) or "engine stopped"
        log.error("engine %s is down (%s); restarting it", engine.name, reason)
        return reason

    async def restart(
        self, dead: Engine, publish: Callable[[Engine], Awaitable[None]],
        start_new: Callable[[], Awaitable[Engine]] | None = None,
    ) -> Engine:
        """Replace a dead engine by a new one of the same spec (or what `start_new` starts),
        published by the host before the engine counts as up again."""
        name = dead.name
        if name not in self.down:
            await self.mark_down(dead)
        await dead.stop_async()
        start_new = start_new or (lambda: self.start(self.new_engine(dead.spec)))
        backoff = self._backoffs.setdefault(name, backoff_for(self.settings))
        engine = await start_again(name, start_new, backoff, lambda reason: self.down.__setitem__(name, reason))
        await publish(engine)
        self.down.pop(name, None)
        self.restarts[name] = self.restarts.get(name, 0) + 1
        self.observer.engine_restarted(name)
        log.info("engine %s restarted (%d restarts)", name, self.restarts[name])
        return engine

    # --- per request ------------------------------------------------------------------
    def live(self, engine: Engine) -> Engine:
        """The engine, if it can serve now; a 503 with Retry-After while it is down. Per
        request, so no process-table reads: the watcher marks dead engines down within its
        interval, and vLLM marks its client errored when its engine core dies."""
        if engine.name in self.down or engine.client is None or engine.client.errored:
            raise engine_unavailable(engine.name)
        return engine

    async def health(self, engines: Iterable[Engine]) -> dict[str, str | None]:
        """Engine name -> None when healthy, else why not."""
        engines = list(engines)
        down = {e.name: self.down[e.name] for e in engines if e.name in self.down}
        asked = [e for e in engines if e.name not in down]
        results = await asyncio.gather(*(e.check_health() for e in asked))
        answers = {**down, **{e.name: result for e, result in zip(asked, results)}}
        return {e.name: answers[e.name] for e in engines}

    # --- stopping ---------------------------------------------------------------------
    def stop(self, engines: Iterable[Engine]) -> None:
        """Stop watching, and stop `engines` and every engine still starting."""
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        for engine in [*self._starting, *engines]:
            engine.stop()
        self._starting.clear()
