"""Shared mode: one base loaded by vLLM, many adapters swapped per request.

This host composes three parts and routes requests between them:
- the engines (hosting/supervisor.py): one per engine role of the adapter kinds present
  (registry/kinds.py): the generate engine for the base and LoRA adapters, and a pooling
  engine over the same base for head adapters, started only when heads are registered.
  vLLM runs one runner per engine, so with heads the base is held twice; the memory
  metrics count it twice. An engine that dies is detected within a second, its requests
  get a 503 with Retry-After, and it is restarted with its adapters registered again
  while the other keeps serving;
- the adapter catalog (hosting/catalog.py): registry, publication in the engines,
  discovery on request, admin operations, quarantine;
- the scanner (hosting/scanning.py): the stores' periodic scan and the snapshots' upkeep.

Adapters live in three tiers: an engine slot (`max_loras`, per batch), the engine's CPU
LRU (`max_cpu_loras`), and the store on disk, loaded on first use. The engines' slots are
fitted to the largest rank in the stores (`max_lora_rank` auto) and, with
`lora_target_modules` auto, hold only the modules their adapters train.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from adapterserve.config import Settings, fitted_lora_modules, fitted_lora_rank
from adapterserve.errors import InvalidRequest, missing_model, model_not_found
from adapterserve.registry import kinds
from adapterserve.registry.records import AdapterRecord
from adapterserve.registry.store import Registry

from . import lora_table
from .catalog import AdapterCatalog
from .engine import EngineSpec, VllmEngine, start_together
from .protocol import Endpoint, Engine, HostedTask, HostObserver, ModelCard, Target, check_endpoint, requested_name
from .scanning import Scanner
from .supervisor import EngineSupervisor

WATCH_INTERVAL_S = 1.0  # how soon a dead engine is noticed (a process-table read per engine)


log = logging.getLogger(__name__)

class SharedBaseHost:
    mode = "shared"
    remote_engines = False

    def __init__(
        self, settings: Settings, base_path, base_name: str, registry: Registry,
        engine_factory=VllmEngine, observer: HostObserver | None = None,
    ):
        self.settings = settings
        self.base_path = Path(base_path)
        self.weights_path = self.base_path
        self.base_name = base_name
        self.fine_tuning_base = base_name  # jobs train adapters of this base
        self.registry = registry
        self.created = int(time.time())
        self.observer = observer or HostObserver()
        self.roles: dict[str, Engine | None] = dict.fromkeys(kinds.ROLES)  # engine role -> its engine
        self.catalog = AdapterCatalog(settings, registry, base_name, self.observer, self.roles.get, self.engines,
                                      start_role=self._start_on_demand)
        self._starting: dict[str, asyncio.Task] = {}  # role -> the start of its engine for a first adapter
        self.supervisor = EngineSupervisor(settings, engine_factory, self.observer, on_nonfinite=self.catalog.quarantine)
        self.scanner = Scanner(settings, self.catalog, self.engines)
        # the engines' slots hold the largest rank in the stores (auto), or the fixed rank;
        # adapters validated later are checked against it
        largest = max((r.rank for r in registry.adapters.values()), default=0)
        self.lora_rank = settings.fixed_lora_rank or fitted_lora_rank(largest)
        registry.limits.max_lora_rank = self.lora_rank
        # ...and the modules they train (auto), or the modules set (None: every module)
        self.lora_modules = fitted_lora_modules(settings.fixed_lora_modules, registry.adapters.values())
        registry.limits.lora_modules = self.lora_modules

    # --- what the protocol declares, read from the parts -------------------------------
    @property
    def generate(self) -> Engine | None:
        return self.roles["generate"]

    @property
    def classify(self) -> Engine | None:
        return self.roles["classify"]

    @property
    def pinned(self) -> set[str]:
        return self.catalog.pinned

    @property
    def restarts(self) -> dict[str, int]:
        return self.supervisor.restarts

    def engines(self) -> list[Engine]:
        return [e for e in self.roles.values() if e is not None]

    # --- life cycle ------------------------------------------------------------------------
    def _spec(self, role: str, first: AdapterRecord | None = None) -> EngineSpec:
        """`first`: the adapter an engine started while serving is for (not registered yet)."""
        extra = {}
        if role == "classify":
            widest = max(len(r.labels) for r in [*self.catalog.records_for("classify"), *([first] if first else [])])
            # the generate engine keeps reporting vLLM's metrics
            extra = dict(num_labels=widest, max_lora_cls_labels=self.settings.max_cls_labels, log_stats=False)
        runner = kinds.of(kinds.for_role(role)[0]).runner
        return EngineSpec.from_settings(
            self.settings, role, self.base_path, self.base_name, runner=runner, enable_lora=True,
            max_lora_rank=self.lora_rank,
            lora_target_modules=tuple(sorted(self.lora_modules)) if self.lora_modules is not None else None, **extra,
        )

    async def start(self) -> None:
        # the generate engine always (the base is served there); another role's engine only
        # when adapters of its kinds are registered
        needed = [r for r in kinds.ROLES if r == "generate" or self.catalog.records_for(r)]
        for role in needed:
            self.roles[role] = self.supervisor.new_engine(self._spec(role))
        await start_together(self.supervisor.start(self.roles[r]) for r in needed)
        await self.catalog.open()
        self.supervisor.watch(lambda: [e for e in self.engines() if not e.running], self._restart, WATCH_INTERVAL_S)
        self.scanner.start()

    async def _start_on_demand(self, role: str, first: AdapterRecord) -> Engine:
        """The engine of a role that was not needed at start (no adapter of its kinds),
        started for the first one registered while serving (a classification job's head,
        a head added to a store); its other adapters are registered by their callers.
        One start per role, however many adapters ask at once."""
        task = self._starting.get(role)
        if task is None:
            async def start() -> Engine:
                engine = self.supervisor.new_engine(self._spec(role, first))
                await self.supervisor.start(engine)
                self.roles[role] = engine
                log.info("started the %s engine for its first adapter", role)
                return engine

            task = asyncio.create_task(start())
            self._starting[role] = task
            task.add_done_callback(lambda _: self._starting.pop(role, None))
        return await asyncio.shield(task)

    async def _restart(self, dead: Engine) -> None:
        role = next(r for r, e in self.roles.items() if e is dead)

        async def publish(engine: Engine) -> None:
            await self.catalog.register_all(self.catalog.records_for(role), engine)
            self.roles[role] = engine  # requests reach it only now, with its adapters published

        await self.supervisor.restart(dead, publish)

    async def stop(self) -> None:
        self.scanner.stop()
        self.catalog.close()
        # an engine in the middle of a restart too: its stop waits for its construction
        self.supervisor.stop(reversed(self.engines()))

    async def health(self) -> dict[str, str | None]:
        return await self.supervisor.health(self.engines())

    # --- routing ------------------------------------------------------------------------
    async def resolve(self, model: str | None, endpoint: Endpoint) -> Target:
        if not model:
            raise missing_model()
        name = requested_name(model, self.base_name)
        if name == self.base_name:
            check_endpoint(model, "base", endpoint)
            return Target(engine=self.supervisor.live(self.generate), vllm_model=self.base_name, model=self.base_name)
        record = self.catalog.servable(name)
        quarantined = name in self.catalog.quarantined
        if record is None and not quarantined and self.settings.discover_on_request:
            record = await self.catalog.discover(name)
        if record is None and quarantined:
            raise InvalidRequest(
                f"The model `{model}` is quarantined: it produced non-finite values (NaN logits). "
                "An administrator must fix and reload it.", param="model", code="model_quarantined",
            )
        if record is None:
            raise model_not_found(model)
        check_endpoint(model, record.kind, endpoint)
        return Target(engine=self.supervisor.live(self.catalog.engine_for(record)), vllm_model=name, model=name, record=record)

    def model_cards(self) -> list[ModelCard]:
        base = ModelCard(id=self.base_name, root=self.base_name, parent=None, kind="base", created=self.created,
                         max_model_len=self.settings.max_model_len)
        return [base] + [
            ModelCard(
                id=record.name, root=record.name,  # never leak server paths to clients
                parent=self.base_name, kind=record.kind, created=self.created, max_model_len=self.settings.max_model_len,
                rank=record.rank, size_bytes=record.size_bytes, labels=record.labels or None,
            )
            for record in sorted(self.registry.adapters.values(), key=lambda r: r.name) if self.catalog.published(record.name)
        ] + [
            # in a source, validated on its first request (the rest of a large store)
            ModelCard(id=name, root=name, parent=self.base_name, kind="adapter", created=self.created,
                      max_model_len=self.settings.max_model_len, state="listed")
            for name in sorted(self.registry.listed) if name not in self.catalog.unloaded
        ]

    def nonfinite_state(self, model: str) -> str | None:
        return self.catalog.nonfinite_state(model)

    # --- what the metrics read -------------------------------------------------------------
    def tasks(self) -> list[HostedTask]:
        return [
            HostedTask(r.name, r.kind, "adapter", r.size_bytes, r.trainable_params, rank=r.rank, pinned=r.name in self.pinned)
            for r in self.registry.adapters.values()
        ]

    def published_adapters(self, engine: Engine) -> dict[int, str]:
        return lora_table.published(engine)

    async def engine_reports(self) -> None:
        return None  # the engines are here: the API reads them with the metrics' readings

    async def metrics_pages(self) -> None:
        return None

    # --- adapters: the catalog's operations -------------------------------------------------
    async def load_adapter(self, name: str) -> AdapterRecord:
        return await self.catalog.load(name)

    async def reload_adapter(self, name: str) -> AdapterRecord:
        return await self.catalog.reload(name)

    async def unload_adapter(self, name: str) -> None:
        await self.catalog.unload(name)

    async def pin_adapter(self, name: str) -> AdapterRecord:
        return await self.catalog.pin(name)

    async def unpin_adapter(self, name: str) -> AdapterRecord:
        return await self.catalog.unpin(name)

    async def evict(self, name: str) -> bool:
        """Take `name`'s weights out of its engine while it stays servable (for placement
        decided outside the engine: Ray Serve's per-replica adapter limit)."""
        return await self.catalog.evict(name)

    async def rescan(self):
        return await self.scanner.rescan()
