"""Dedicated mode: every fully fine-tuned model on its own vLLM engine, behind the same API.

The honest other column of the hosting table. Each model is a full folder with its own
engine processes, weights and KV cache. With `max_resident_models`, only that many engines
run; a request for another model swaps the least recently used one out and starts the
one it needs, and waits for it (bounded, then a 503 with Retry-After). An engine that dies
is reported by /health and restarted by the engine supervisor both modes share
(hosting/supervisor.py: one restart policy, back-off included), and the other models keep
serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from adapterserve.config import Settings
from adapterserve.errors import RETRY_AFTER_SECONDS, Conflict, Unavailable, engine_unavailable, model_not_found, not_in_dedicated_mode
from adapterserve.registry import kinds

from .engine import EngineSpec, VllmEngine, start_together
from .protocol import (
    GiB, Endpoint, Engine, HostedTask, HostObserver, ModelCard, Target, check_endpoint, engine_runtime_bytes, missing_model,
    requested_name,
)
from .full_models import FullModel, discover_models, folder_bytes, merged_adapter_elements  # noqa: F401 (discover_models: re-exported)
from .supervisor import EngineSupervisor

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 2.0


class BudgetExceeded(RuntimeError):
    """The configured models do not fit the memory budget."""


class DedicatedHost:
    mode = "dedicated"
    remote_engines = False
    registry = None  # no adapters: every task is a whole model

    def __init__(
        self, settings: Settings, models: list[FullModel], engine_factory=VllmEngine, observer: HostObserver | None = None,
        trainable_base: tuple[Path, str] | None = None,
    ):
        if not models:
            raise ValueError("dedicated mode needs at least one model folder")
        self.settings = settings
        self.full_models = {m.name: m for m in models}
        self.observer = observer or HostObserver()
        self.supervisor = EngineSupervisor(settings, engine_factory, self.observer)
        self.base_path = None  # no shared base: every model holds its own weights
        self.pinned: set[str] = set()
        # what the shared mode's slots would hold for these tasks (the metrics' estimate)
        self.lora_rank = settings.fixed_lora_rank or 16
        self.weights_path = models[0].path
        self._tasks = [HostedTask(m.name, m.kind, "full_model", folder_bytes(m.path), merged_adapter_elements(m.path)) for m in models]
        self.base_name = None  # no base model: a key's `base: true` grants none of these models
        # (path, name) of the base fine-tuning jobs train full models from (finetuning/), if any;
        # their models answer to `ft:<name>:<suffix>:<id>` too
        self.trainable_base = trainable_base
        self.fine_tuning_base = trainable_base[1] if trainable_base is not None else None
        self.resident: OrderedDict[str, Engine] = OrderedDict()  # least recently used first
        self.starting: dict[str, asyncio.Task] = {}  # model -> the swap or restart its requests wait for
        self.swap_count = 0
        self.swap_seconds: list[float] = []
        self.created = int(time.time())
        self._lock = asyncio.Lock()

    @property
    def restarts(self) -> dict[str, int]:
        return self.supervisor.restarts

    @property
    def down(self) -> dict[str, str]:
        return self.supervisor.down  # engine name (the model's) -> why it is down

    @property
    def max_resident(self) -> int:
        return self.settings.max_resident_models or len(self.full_models)

    # --- memory budget -----------------------------------------------------------
    def engine_bytes(self, model: FullModel) -> int:
        """What one engine for this model needs, by the measured decomposition above."""
        return model.weights_bytes + self.settings.kv_cache_memory_bytes + engine_runtime_bytes(self.settings)

    def check_budget(self) -> None:
        budget = self.settings.memory_budget_bytes
        if budget is None:
            return
        largest = sorted((self.engine_bytes(m) for m in self.full_models.values()), reverse=True)[: self.max_resident]
        needed = sum(largest)
        if needed > budget:
            per = ", ".join(f"{m.name} {self.engine_bytes(m) / GiB:.2f} GiB" for m in self.full_models.values())
            raise BudgetExceeded(
                f"{self.max_resident} resident engine(s) need up to {needed / GiB:.2f} GiB "
                f"(weights + KV cache {self.settings.kv_cache_memory_bytes / GiB:.2f} GiB + runtime "
                f"{engine_runtime_bytes(self.settings) / GiB:.2f} GiB each: {per}), over the budget of {budget / GiB:.2f} GiB. "
                "Lower --max-resident-models or the KV cache, or raise --memory-budget-bytes."
            )

    # --- life cycle --------------------------------------------------------------
    def _spec(self, model: FullModel) -> EngineSpec:
        return EngineSpec.from_settings(
            self.settings, model.name, model.path, model.name,
            runner=kinds.of(model.kind).runner,
            log_stats=False,  # vLLM's stats logger would unregister the other engines' metrics
        )

    async def start(self) -> None:
        self.check_budget()
        await start_together(self._start_engine(model) for model in list(self.full_models.values())[: self.max_resident])
        self.supervisor.watch(self._dead, self._on_dead, WATCH_INTERVAL_S)

    async def stop(self) -> None:
        for task in self.starting.values():
            task.cancel()
        # engines in the middle of a start too: their stop waits for their construction
        self.supervisor.stop(self.resident.values())
        self.resident.clear()

    def engines(self) -> list[Engine]:
        return list(self.resident.values())

    async def _start_engine(self, model: FullModel) -> Engine:
        engine = await self.supervisor.start(self.supervisor.new_engine(self._spec(model)))
        self.resident[model.name] = engine
        self.down.pop(model.name, None)
        return engine

    async def _swap_in(self, model: FullModel) -> Engine:
        """Make room (stop the least recently used engine) and start `model`'s engine."""
        began = time.perf_counter()
        async with self._lock:
            while len(self.resident) >= self.max_resident:
                victim_name, victim = next(iter(self.resident.items()))
                await self._drain(victim)
                log.info("swapping out %s for %s", victim_name, model.name)
                # out of the resident set before it stops: the watcher must not take a
                # stopping engine for a dead one and restart it
                del self.resident[victim_name]
                await victim.stop_async()
            engine = await self._start_engine(model)
        seconds = time.perf_counter() - began
        self.swap_count += 1
        self.swap_seconds.append(seconds)
        self.observer.model_swapped(model.name, seconds)
        log.info("swapped in %s in %.1f s", model.name, seconds)
        return engine

    @staticmethod
    async def _drain(engine: Engine, timeout: float = 30.0) -> None:
        """Let the engine's running requests finish before it is stopped (bounded)."""
        deadline = time.monotonic() + timeout
        while engine.unfinished_requests() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)

    async def _engine_for(self, model: FullModel, wait_s: float | None = -1) -> Engine:
        """The model's running engine, started (swapped in) if need be; a request waits
        for a start up to `model_start_wait_s` (-1), a None waits as long as it takes."""
        engine = self.resident.get(model.name)
        if engine is not None:
            # per request, so no process-table reads (`Engine.running`): the watcher takes a
            # dead engine out of `resident` within its interval, and vLLM marks its client
            # errored when its engine core dies
            if engine.client is None or engine.client.errored:
                raise engine_unavailable(model.name)
            self.resident.move_to_end(model.name)
            return engine
        task = self.starting.get(model.name)
        if task is None:
            task = asyncio.create_task(self._swap_in(model))
            self.starting[model.name] = task
            task.add_done_callback(lambda _: self.starting.pop(model.name, None))
        try:
            # shield: a request that gives up does not cancel the start others wait for
            timeout = self.settings.model_start_wait_s if wait_s == -1 else wait_s
            return await asyncio.wait_for(asyncio.shield(task), timeout=timeout)
        except asyncio.TimeoutError:
            raise Unavailable(
                f"The model `{model.name}` is being loaded; retry shortly.", code="model_loading", retry_after_s=RETRY_AFTER_SECONDS,
            ) from None

    def _dead(self) -> list[Engine]:
        return [e for n, e in self.resident.items() if n not in self.starting and not e.running]

    async def _on_dead(self, engine: Engine) -> None:
        """Restart a dead engine in the background; requests for its model wait for it."""
        name = engine.name
        await self.supervisor.mark_down(engine)
        # out of the resident set and marked as starting at once, with no await in between:
        # a request meanwhile waits for this restart instead of its own
        self.resident.pop(name, None)
        task = asyncio.create_task(self._restart(self.full_models[name], engine))
        self.starting[name] = task
        task.add_done_callback(lambda _, n=name: self.starting.pop(n, None))

    async def _restart(self, model: FullModel, dead: Engine) -> Engine:
        """The supervisor's restart, each try under the swap lock (swaps of other models go
        on during the back-off); requests for the model wait for this task (`_engine_for`)."""
        async def start_new() -> Engine:
            async with self._lock:
                return await self._start_engine(model)

        async def published(engine: Engine) -> None:
            return None  # `_start_engine` made it resident

        return await self.supervisor.restart(dead, published, start_new)

    def tasks(self) -> list[HostedTask]:
        return list(self._tasks)

    def published_adapters(self, engine: Engine) -> dict[int, str]:
        return {}  # full models: no adapters

    async def health(self) -> dict[str, str | None]:
        report: dict[str, str | None] = {name: self.down[name] for name in self.full_models if name in self.down}
        report.update(await self.supervisor.health(e for n, e in self.resident.items() if n not in report))
        return report

    def nonfinite_state(self, model: str) -> None:
        return None  # whole models: no quarantine

    async def engine_reports(self) -> None:
        return None

    async def metrics_pages(self) -> None:
        return None

    # --- models added while serving (fine-tuning jobs) -------------------------------
    async def add_model(self, model: FullModel) -> None:
        """Host a new full model (a fine-tuning job's) and start its engine, swapping the
        least recently used one out when the resident engines are at their limit; a model
        that does not fit the memory budget, or whose engine fails to start, is not added."""
        if model.name in self.full_models:
            raise Conflict(f"A model named `{model.name}` is already hosted.", param="model", code="model_exists")
        self.full_models[model.name] = model
        try:
            self.check_budget()
            await self._engine_for(model, wait_s=None)
        except BaseException:
            self.full_models.pop(model.name, None)
            engine = self.resident.pop(model.name, None)
            if engine is not None:
                await engine.stop_async()
            raise
        self._tasks.append(HostedTask(model.name, model.kind, "full_model", folder_bytes(model.path), 0))
        log.info("hosting the new model %s", model.name)

    async def remove_model(self, name: str) -> None:
        """Stop hosting a model added while serving (its job was cancelled meanwhile)."""
        self.full_models.pop(name, None)
        self._tasks = [t for t in self._tasks if t.name != name]
        async with self._lock:
            engine = self.resident.pop(name, None)
            if engine is not None:
                await engine.stop_async()

    # --- routing -----------------------------------------------------------------
    async def resolve(self, model: str | None, endpoint: Endpoint) -> Target:
        if not model:
            raise missing_model()
        model = requested_name(model, None, self.fine_tuning_base)  # ft:<base>:<suffix>:<id> is a job's model
        entry = self.full_models.get(model)
        if entry is None:
            raise model_not_found(model)
        check_endpoint(model, entry.kind, endpoint)
        engine = await self._engine_for(entry)
        return Target(engine=engine, vllm_model=model, model=model, record=_labels_only(entry))

    def model_cards(self) -> list[ModelCard]:
        return [
            ModelCard(
                id=m.name, root=m.name, parent=None, kind=m.kind, created=self.created,
                max_model_len=self.settings.max_model_len, size_bytes=m.weights_bytes,
                labels=m.labels or None,
            )
            for m in self.full_models.values()
        ]

    # --- adapters: not in this mode ------------------------------------------------
    async def load_adapter(self, name: str):
        raise _no_adapters()

    async def unload_adapter(self, name: str):
        raise _no_adapters()

    async def reload_adapter(self, name: str):
        raise _no_adapters()

    async def pin_adapter(self, name: str):
        raise _no_adapters()

    async def unpin_adapter(self, name: str):
        raise _no_adapters()

    async def rescan(self):
        raise _no_adapters()


def _no_adapters():
    return not_in_dedicated_mode()


@dataclass
class _LabelsOnly:
    labels: list[str]


def _labels_only(model: FullModel):
    return _LabelsOnly(model.labels) if model.kind == kinds.HEAD.name else None
