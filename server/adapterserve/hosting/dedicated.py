"""Dedicated mode: every fully fine-tuned model on its own vLLM engine, behind the same API.

The honest other column of the hosting table. Each model is a full folder with its own
engine processes, weights and KV cache. With `max_resident_models`, only that many engines
run; a request for another model swaps the least recently used one out and starts the
one it needs, and waits for it (bounded, then a 503 with Retry-After). An engine that dies
is reported by /health and restarted with the shared mode's policy (hosting/restart.py,
back-off included), and the other models keep serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from adapterserve.config import Settings
from adapterserve.errors import APIError, model_not_found

from .backoff import Backoff
from .engine import EngineSpec, VllmEngine, start_together
from .restart import backoff_for, start_again
from .protocol import (
    ENGINE_RUNTIME_BYTES, GiB, Endpoint, Engine, HostedTask, HostObserver, ModelCard, Target, check_endpoint, missing_model,
)

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 10


class BudgetExceeded(RuntimeError):
    """The configured models do not fit the memory budget."""


@dataclass
class FullModel:
    """One fully fine-tuned model folder."""

    name: str
    path: Path
    kind: str  # "full" (generation) or "head" (classification)
    labels: list[str] = field(default_factory=list)

    @property
    def weights_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.glob("*.safetensors"))

    @classmethod
    def read(cls, folder: Path) -> "FullModel":
        config = json.loads((folder / "config.json").read_text())
        architectures = config.get("architectures") or []
        if any(a.endswith("ForSequenceClassification") for a in architectures):
            id2label = config.get("id2label") or {}
            labels = [id2label.get(str(i), f"LABEL_{i}") for i in range(len(id2label))]
            return cls(folder.name, folder.resolve(), "head", labels)
        return cls(folder.name, folder.resolve(), "full")


def discover_models(paths: list[Path]) -> list[FullModel]:
    """Each path is a model folder, or a directory of model folders."""
    models: list[FullModel] = []
    for path in paths:
        path = Path(path).expanduser()
        folders = [path] if (path / "config.json").is_file() else sorted(p for p in path.iterdir() if (p / "config.json").is_file())
        models += [FullModel.read(folder) for folder in folders]
    names = [m.name for m in models]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"two model folders share a name: {', '.join(duplicates)}")
    return models


class DedicatedHost:
    mode = "dedicated"
    registry = None  # no adapters: every task is a whole model

    def __init__(
        self, settings: Settings, models: list[FullModel], engine_factory=VllmEngine, observer: HostObserver | None = None,
    ):
        if not models:
            raise ValueError("dedicated mode needs at least one model folder")
        self.settings = settings
        self.models = {m.name: m for m in models}
        self.engine_factory = engine_factory
        self.observer = observer or HostObserver()
        self.base_path = None  # no shared base: every model holds its own weights
        self.pinned: set[str] = set()
        # what the shared mode's slots would hold for these tasks (the metrics' estimate)
        self.lora_rank = settings.fixed_lora_rank or 16
        self.weights_path = models[0].path
        self._tasks = [HostedTask(m.name, m.kind, "full_model", _folder_bytes(m.path), _merged_adapter_elements(m.path)) for m in models]
        self.base_name = None  # no base model: a key's `base: true` grants none of these models
        self.resident: OrderedDict[str, Engine] = OrderedDict()  # least recently used first
        self.starting: dict[str, asyncio.Task] = {}
        self.down: dict[str, str] = {}  # model -> why its engine is down
        self.swap_count = 0
        self.swap_seconds: list[float] = []
        self.restarts: dict[str, int] = {}
        self.created = int(time.time())
        self._lock = asyncio.Lock()
        self._starting: set[Engine] = set()  # engines being started (stopped with the host)
        self._monitor: asyncio.Task | None = None
        self._backoffs: dict[str, Backoff] = {}  # model -> the back-off of its engine's restarts

    @property
    def max_resident(self) -> int:
        return self.settings.max_resident_models or len(self.models)

    # --- memory budget -----------------------------------------------------------
    def engine_bytes(self, model: FullModel) -> int:
        """What one engine for this model needs, by the measured decomposition above."""
        return model.weights_bytes + self.settings.kv_cache_memory_bytes + ENGINE_RUNTIME_BYTES

    def check_budget(self) -> None:
        budget = self.settings.memory_budget_bytes
        if budget is None:
            return
        largest = sorted((self.engine_bytes(m) for m in self.models.values()), reverse=True)[: self.max_resident]
        needed = sum(largest)
        if needed > budget:
            per = ", ".join(f"{m.name} {self.engine_bytes(m) / GiB:.2f} GiB" for m in self.models.values())
            raise BudgetExceeded(
                f"{self.max_resident} resident engine(s) need up to {needed / GiB:.2f} GiB "
                f"(weights + KV cache {self.settings.kv_cache_memory_bytes / GiB:.2f} GiB + runtime "
                f"{ENGINE_RUNTIME_BYTES / GiB:.2f} GiB each: {per}), over the budget of {budget / GiB:.2f} GiB. "
                "Lower --max-resident-models or the KV cache, or raise --memory-budget-bytes."
            )

    # --- life cycle --------------------------------------------------------------
    def _spec(self, model: FullModel) -> EngineSpec:
        return EngineSpec.from_settings(
            self.settings, model.name, model.path, model.name,
            runner="pooling" if model.kind == "head" else "generate",
            log_stats=False,  # vLLM's stats logger would unregister the other engines' metrics
        )

    async def start(self) -> None:
        self.check_budget()
        await start_together(self._start_engine(model) for model in list(self.models.values())[: self.max_resident])
        self._monitor = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
        for task in self.starting.values():
            task.cancel()
        # engines in the middle of a start too: their stop waits for their construction
        for engine in [*self._starting, *self.resident.values()]:
            engine.stop()
        self._starting.clear()
        self.resident.clear()

    def engines(self) -> list[Engine]:
        return list(self.resident.values())

    async def _start_engine(self, model: FullModel) -> Engine:
        engine = self.engine_factory(self._spec(model))
        engine.on_started = self.observer.engine_started
        self._starting.add(engine)
        try:
            await engine.start()
        except asyncio.CancelledError:
            raise  # the host is stopping: its stop() stops this engine too
        except BaseException:
            self._starting.discard(engine)
            await engine.stop_async()
            raise
        self._starting.discard(engine)
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
        processor = getattr(engine.client, "output_processor", None)
        while processor is not None and processor.get_num_unfinished_requests() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)

    async def _engine_for(self, model: FullModel) -> Engine:
        engine = self.resident.get(model.name)
        if engine is not None:
            # per request, so no process-table reads (`Engine.running`): the watcher takes a
            # dead engine out of `resident` within its interval, and vLLM marks its client
            # errored when its engine core dies
            if engine.client is None or engine.client.errored:
                raise APIError(
                    503, f"The engine serving `{model.name}` is down and is being restarted.",
                    code="engine_unavailable", headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
                )
            self.resident.move_to_end(model.name)
            return engine
        task = self.starting.get(model.name)
        if task is None:
            task = asyncio.create_task(self._swap_in(model))
            self.starting[model.name] = task
            task.add_done_callback(lambda _: self.starting.pop(model.name, None))
        try:
            # shield: a request that gives up does not cancel the start others wait for
            return await asyncio.wait_for(asyncio.shield(task), timeout=self.settings.model_start_wait_s)
        except asyncio.TimeoutError:
            raise APIError(
                503, f"The model `{model.name}` is being loaded; retry shortly.",
                code="model_loading", headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            ) from None

    async def _watch(self, interval: float = 2.0) -> None:
        """Restart engines that died; the other models keep serving meanwhile."""
        while True:
            await asyncio.sleep(interval)
            for name, engine in list(self.resident.items()):
                if engine.running or name in self.starting:
                    continue
                reason = await engine.check_health() or "engine stopped"
                self.down[name] = reason
                log.error("engine for %s is down (%s); restarting it", name, reason)
                # out of the resident set and marked as starting at once, with no await in
                # between: a request meanwhile waits for this restart instead of its own
                self.resident.pop(name, None)
                task = asyncio.create_task(self._restart(self.models[name], engine))
                self.starting[name] = task
                task.add_done_callback(lambda _, n=name: self.starting.pop(n, None))

    async def _restart(self, model: FullModel, dead: Engine) -> Engine:
        """Stop what is left of the dead engine and start a new one, with the shared mode's
        restart policy (hosting/restart.py: tried again after a back-off until it starts);
        requests for the model wait for this task (see `_engine_for`)."""
        await dead.stop_async()

        async def start_new() -> Engine:
            async with self._lock:  # per try: swaps of other models go on during the back-off
                return await self._start_engine(model)

        def failed(reason: str) -> None:
            self.down[model.name] = reason

        backoff = self._backoffs.setdefault(model.name, backoff_for(self.settings))
        engine = await start_again(model.name, start_new, backoff, failed)
        self.restarts[model.name] = self.restarts.get(model.name, 0) + 1
        self.observer.engine_restarted(model.name)
        return engine

    def tasks(self) -> list[HostedTask]:
        return list(self._tasks)

    def published_adapters(self, engine: Engine) -> dict[int, str]:
        return {}  # full models: no adapters

    async def health(self) -> dict[str, str | None]:
        report: dict[str, str | None] = {name: self.down[name] for name in self.models if name in self.down}
        resident = [(n, e) for n, e in self.resident.items() if n not in report]
        results = await asyncio.gather(*(engine.check_health() for _, engine in resident))
        report.update({name: result for (name, _), result in zip(resident, results)})
        return report

    # --- routing -----------------------------------------------------------------
    async def resolve(self, model: str | None, endpoint: Endpoint) -> Target:
        if not model:
            raise missing_model()
        entry = self.models.get(model)
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
            for m in self.models.values()
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


def _no_adapters() -> APIError:
    return APIError(400, "The server runs in dedicated mode: it hosts whole models, not adapters.", code="not_supported_in_mode")


@dataclass
class _LabelsOnly:
    labels: list[str]


def _labels_only(model: FullModel):
    return _LabelsOnly(model.labels) if model.kind == "head" else None


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _merged_adapter_elements(model_path: Path) -> int:
    """A merged full model records the adapter it came from: its weights' elements (0 if unknown)."""
    from adapterserve.registry.safetensors_header import safetensors_elements
    from adapterserve.training.merge import MERGE_INFO

    try:
        source = json.loads((Path(model_path) / MERGE_INFO).read_text()).get("source", "")
    except (OSError, ValueError, AttributeError):
        return 0
    adapter = Path(str(source).rsplit(":", 2)[0])
    return safetensors_elements(adapter) if adapter.is_dir() else 0
