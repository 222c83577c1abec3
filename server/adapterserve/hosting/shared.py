"""Shared mode: one base loaded by vLLM, many adapters swapped per request.

LoRA adapters go to the generate engine; head adapters (a trained classification layer
over the frozen base) go to a pooling engine over the same base, started only when heads
are registered. vLLM runs one runner per engine, so with heads the base is held twice;
the memory metrics count it twice.

Adapters live in three tiers: an engine slot (`max_loras`, per batch), the engine's CPU
LRU (`max_cpu_loras`), and the store on disk, loaded on first use. vLLM manages the first
two; this host keeps the name -> LoRARequest table that makes every registered adapter
servable (hosting/lora_table.py: vLLM's table, with vLLM's per-name locking).

Adapters are discovered while the server runs (hosting/discovery.py): a request naming a
folder that is in a store registers it on the spot, and a periodic scan registers new
folders, reloads changed ones and unregisters removed ones. A version that stops serving
(unload, reload, removal) is freed from the engine's slots and CPU cache once its
requests end. Pinned adapters stay in the engine. The engines' slots are fitted to the
largest rank in the stores (`max_lora_rank` auto).

An engine that dies (its process killed, or a fatal error inside a step) is detected
within a second: requests for it get a 503 with Retry-After at once, it is restarted
(hosting/restart.py: with a back-off when it keeps dying, as in the dedicated mode) and its adapters are registered again, while the
other engine keeps serving.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

from pathlib import Path

from adapterserve.config import Settings, fitted_lora_rank
from adapterserve.errors import APIError, engine_unavailable, model_not_found
from adapterserve.registry.records import AdapterInvalid, AdapterRecord, is_safe_name, printable
from adapterserve.registry.store import Registry

from . import discovery, lora_table
from .backoff import Backoff
from .restart import backoff_for, start_again
from .unloads import Unloads, unloads_path
from .engine import EngineSpec, VllmEngine, start_together
from .protocol import Endpoint, Engine, HostedTask, HostObserver, ModelCard, Target, check_endpoint, missing_model, requested_name

log = logging.getLogger(__name__)

# A snapshot in use is touched this often, and collected only once nobody has touched it
# for the grace period: servers and replicas sharing a cache directory share its snapshots
# (identical content has one address), so each keeps what it uses alive for the others.
SNAPSHOT_TOUCH_S = 60.0
SNAPSHOT_GRACE_S = 600.0


class SharedBaseHost:
    mode = "shared"

    def __init__(
        self, settings: Settings, base_path, base_name: str, registry: Registry,
        engine_factory=VllmEngine, observer: HostObserver | None = None,
    ):
        self.settings = settings
        self.base_path = Path(base_path)
        self.weights_path = self.base_path
        self.base_name = base_name
        self.registry = registry
        self.engine_factory = engine_factory  # tests pass a fake with Engine's interface
        self.generate: Engine | None = None
        self.classify: Engine | None = None
        self._lora_ids = itertools.count(1)
        self.created = int(time.time())
        self.observer = observer or HostObserver()
        # adapter -> why it no longer serves (until reloaded), or that its requests produced
        # non-finite values where it is not quarantined (see `_quarantine`)
        self.quarantined: dict[str, str] = {}
        self.down: dict[str, str] = {}  # engine name -> why it is down while it restarts
        self.restarts: dict[str, int] = {}
        self._watcher: asyncio.Task | None = None
        self._scanner: asyncio.Task | None = None
        self._toucher: asyncio.Task | None = None
        # the engines' slots hold the largest rank in the stores (auto), or the fixed rank;
        # adapters validated later are checked against it
        largest = max((r.rank for r in registry.adapters.values()), default=0)
        self.lora_rank = settings.fixed_lora_rank or fitted_lora_rank(largest)
        registry.limits.max_lora_rank = self.lora_rank
        self.pinned: set[str] = set(settings.pinned_adapters)
        if len(self.pinned) >= settings.max_cpu_loras:
            raise ValueError(
                f"{len(self.pinned)} pinned adapters fill the CPU cache (max_cpu_loras {settings.max_cpu_loras}): "
                "pin fewer than max_cpu_loras, so other adapters can be loaded"
            )
        self._signatures: dict[str, discovery.Signature | None] = {}  # name -> folder at its last validation
        self._name_locks: dict[str, asyncio.Lock] = {}  # one discovery or reload of a name at a time
        self._freeing: set[asyncio.Task] = set()
        self._starting: set[Engine] = set()  # engines being started again (stopped with the host)
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop the host runs on (set by start)
        # unloaded by an admin: not served, nor discovered again, until loaded or changed (kept on disk)
        self.unloaded = Unloads(unloads_path(settings.cache_dir, base_name, registry.stores))

    # --- life cycle --------------------------------------------------------------
    def _spec(self, name: str, runner: str, **extra) -> EngineSpec:
        return EngineSpec.from_settings(
            self.settings, name, self.base_path, self.base_name, runner=runner, enable_lora=True,
            max_lora_rank=self.lora_rank, **extra,
        )

    def _new_engine(self, spec: EngineSpec) -> Engine:
        engine = self.engine_factory(spec)
        engine.on_nonfinite = self._quarantine
        engine.on_started = self.observer.engine_started
        return engine

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.generate = self._new_engine(self._spec("generate", "generate"))
        heads = [r for r in self.registry.adapters.values() if r.kind == "head"]
        if heads:
            widest = max(len(r.labels) for r in heads)
            self.classify = self._new_engine(
                self._spec(
                    "classify",
                    "pooling",
                    num_labels=widest,
                    max_lora_cls_labels=self.settings.max_cls_labels,
                    log_stats=False,  # the generate engine keeps reporting vLLM's metrics
                )
            )
        await start_together(e.start() for e in (self.generate, self.classify) if e is not None)
        for name in sorted(self.pinned - set(self.registry.adapters)):
            log.warning("pinned adapter %r is not in the stores (or was refused); nothing to pin", name)
        self._signatures = await asyncio.to_thread(discovery.store_signatures, self.registry.stores)
        for name in [n for n in self.unloaded if n in self.registry.adapters]:
            log.info("adapter %r stays unloaded (an admin unloaded it)", name)
            self.registry.remove(name)
        for record in list(self.registry.adapters.values()):
            try:
                await self._register(record)
            except AdapterInvalid as exc:
                self._refuse(record, exc.reason)
        self._watcher = asyncio.create_task(self._watch())
        if self.registry.snapshots is not None:
            self._toucher = asyncio.create_task(self._touch_snapshots())
        if self.settings.adapter_scan_interval_s > 0:
            self._scanner = asyncio.create_task(self._scan_forever(self.settings.adapter_scan_interval_s))

    def _refuse(self, record: AdapterRecord, reason: str) -> None:
        self.registry.remove(record.name)
        self.registry.problems.append(_problem(record, reason))
        log.warning("adapter %r refused by the engine: %s", record.name, printable(reason))

    async def stop(self) -> None:
        for task in (self._watcher, self._scanner, self._toucher, *self._freeing):
            if task is not None:
                task.cancel()
        self._watcher = self._scanner = self._toucher = None
        # an engine in the middle of a restart too: its stop waits for its construction
        for engine in (*self._starting, self.classify, self.generate):
            if engine is not None:
                engine.stop()

    # --- recovery ----------------------------------------------------------------
    async def _watch(self, interval: float = 1.0) -> None:
        """Restart engines that died, one at a time; the other keeps serving meanwhile."""
        backoffs: dict[str, Backoff] = {}  # engine name -> its restart back-off
        while True:
            await asyncio.sleep(interval)
            for role in ("generate", "classify"):
                dead = getattr(self, role)
                if dead is None or dead.running:  # `running` reads the process table: here, not per request
                    continue
                self.down[dead.name] = "engine stopped"  # requests get 503 from now on
                try:
                    await self._restart(role, dead, backoffs.setdefault(dead.name, backoff_for(self.settings)))
                except asyncio.CancelledError:
                    raise
                except Exception:  # keep watching whatever happened
                    log.exception("restarting engine %s failed", dead.name)

    async def _restart(self, role: str, dead: Engine, backoff: Backoff) -> None:
        name = dead.name
        self.down[name] = (await dead.check_health()) or "engine stopped"
        log.error("engine %s is down (%s); restarting it", name, self.down[name])
        await dead.stop_async()

        async def start_new() -> Engine:
            engine = self._new_engine(dead.spec)
            self._starting.add(engine)  # cancelled (the host stops): the host's stop() stops it
            try:
                await engine.start()
            except Exception:
                self._starting.discard(engine)
                await engine.stop_async()
                raise
            self._starting.discard(engine)
            return engine

        engine = await start_again(name, start_new, backoff, lambda reason: self.down.__setitem__(name, reason))
        for record in [r for r in self.registry.adapters.values() if self._role_for(r) == role]:
            try:
                await self._register(record, engine)
            except AdapterInvalid as exc:
                self._refuse(record, exc.reason)
        setattr(self, role, engine)  # requests reach it only now, with its adapters published
        self.down.pop(name, None)
        self.restarts[name] = self.restarts.get(name, 0) + 1
        self.observer.engine_restarted(name)
        log.info("engine %s restarted (%d restarts)", name, self.restarts[name])

    def engines(self) -> list[Engine]:
        return [e for e in (self.generate, self.classify) if e is not None]

    async def health(self) -> dict[str, str | None]:
        return {engine.name: self.down.get(engine.name) or await engine.check_health() for engine in self.engines()}

    def _quarantine(self, adapter: str | None, request_id: str) -> None:
        """An adapter whose request produced NaN logits stops serving until it is reloaded
        (its request has already been ended with an error). Not on a server with tenants,
        unless `quarantine_nonfinite` says so: there any tenant allowed a shared adapter
        could take it offline for all with a prompt that overflows it; only that request
        fails (no adapter can change another request's output), and the log says it."""
        if adapter is None:
            log.error("request %s: the base model produced NaN logits", request_id)
            return
        record = self.registry.adapters.get(adapter)
        if record is None or self.quarantined.get(adapter, "").startswith("quarantined"):
            return
        if not self._quarantines():
            self.quarantined[adapter] = "its requests produced non-finite values (not quarantined: tenants share it)"
            log.error("adapter %r produced non-finite values (NaN logits) in request %s; that request failed", adapter, request_id)
            return
        reason = "quarantined: it produced non-finite values (NaN logits) while serving; fix it, then reload it"
        self.quarantined[adapter] = reason
        self.registry.remove(adapter)  # requests for it are refused from now on
        for engine in self.engines():
            removed = lora_table.withdraw(engine, adapter)
            if removed is not None:
                self._free_later(engine, removed)
        self.registry.problems.append(_problem(record, reason))
        self.observer.adapter_quarantined(record.kind)
        log.error("adapter %r %s (request %s)", adapter, reason, request_id)

    def _quarantines(self) -> bool:
        chosen = self.settings.quarantine_nonfinite
        return self.settings.keys_file is None if chosen is None else chosen

    # --- adapters in the engines ------------------------------------------------
    @staticmethod
    def _role_for(record: AdapterRecord) -> str:
        return "classify" if record.kind == "head" else "generate"

    def _engine_for(self, record: AdapterRecord) -> Engine | None:
        return getattr(self, self._role_for(record))

    async def _register(self, record: AdapterRecord, engine: Engine | None = None) -> None:
        """Make the adapter servable: load it once in its engine (which checks it for real
        and leaves it in the CPU LRU), then publish it under its name."""
        from vllm.lora.request import LoRARequest

        engine = engine or self._engine_for(record)
        if engine is None:
            raise AdapterInvalid(record.name, "heads are served by the pooling engine, which is not running; restart the server to start it")
        request = LoRARequest(
            lora_name=record.name,
            lora_int_id=next(self._lora_ids),  # a fresh id per load: reloads never reuse cached weights
            lora_path=str(record.path),
            base_model_name=self.base_name,
        )

        async def load(request) -> None:
            began = time.perf_counter()
            try:
                await engine.client.add_lora(request)
            except Exception as exc:  # the engine's own loader refused it
                raise AdapterInvalid(record.name, f"the engine could not load it: {exc}") from None
            self.observer.adapter_loaded(record.kind, time.perf_counter() - began)

        previous = await lora_table.publish(engine, request, load)
        if record.name in self.pinned:
            await lora_table.pin(engine, request)
        if previous is not None:
            self._free_later(engine, previous)

    def _free_later(self, engine: Engine, request) -> None:
        """Free a version that stopped serving once its requests end (see lora_table.free)."""
        def schedule() -> None:
            task = self._loop.create_task(lora_table.free(engine, request))
            self._freeing.add(task)
            task.add_done_callback(self._freeing.discard)

        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            schedule()
        else:  # a callback from another thread (the engine's output watch may report from one)
            self._loop.call_soon_threadsafe(schedule)

    async def _unpublish(self, name: str) -> None:
        """Stop serving `name` and free it from the engines once its requests end."""
        for engine in self.engines():
            removed = await lora_table.unpublish(engine, name)
            if removed is not None:
                self._free_later(engine, removed)

    async def load_adapter(self, name: str) -> AdapterRecord:
        if name in self.registry.adapters and self._published(name):
            raise APIError(409, f"The adapter `{name}` is already loaded; use reload to pick up new weights.", param="lora_name", code="adapter_already_loaded")
        self.unloaded.discard(name)
        return await self.reload_adapter(name)

    def _name_lock(self, name: str) -> asyncio.Lock:
        return self._name_locks.setdefault(name, asyncio.Lock())

    async def reload_adapter(self, name: str) -> AdapterRecord:
        """Validate the store's folder again and serve it; when the new version is refused,
        the last good version (if any) keeps serving and the answer says why."""
        async with self._name_lock(name):
            return await self._reload(name)

    async def _reload(self, name: str) -> AdapterRecord:
        previous = self.registry.adapters.get(name) if self._published(name) else None
        found = self.registry.find_folder(name)
        self._signatures[name] = discovery.folder_signature(found[0]) if found else None
        try:
            # validation reads and checks every weight: off the event loop
            record = await asyncio.to_thread(self.registry.validate, name)
            await self._register(record)
        except AdapterInvalid as exc:
            missing = "no such folder" in exc.reason
            if previous is None:
                self.registry.remove(name)
                await self._unpublish(name)
                if found is not None:  # the reason, for the admins (/admin/adapters, `adapters list`)
                    from adapterserve.registry.store import Problem

                    self.registry.problems = [p for p in self.registry.problems if p.name != name]
                    self.registry.problems.append(Problem(name, found[0], exc.reason))
                raise APIError(
                    404 if missing else 400, str(exc), param="lora_name",
                    code="adapter_not_found" if missing else "adapter_invalid",
                ) from None
            self.registry.problems = [p for p in self.registry.problems if p.name != name]
            self.registry.problems.append(_problem(previous, f"new version refused, the last good one serves: {exc.reason}"))
            raise APIError(
                404 if missing else 400, f"{exc}; the last good version of `{name}` keeps serving.",
                param="lora_name", code="adapter_not_found" if missing else "adapter_invalid",
            ) from None
        self.registry.register(record)
        self.quarantined.pop(name, None)
        return record

    async def unload_adapter(self, name: str) -> None:
        """Stop serving `name` now; its weights leave the engine once its requests end."""
        await self._unregister(name)
        self.unloaded.add(name)

    async def _unregister(self, name: str) -> None:
        if self.registry.remove(name) is None:
            raise APIError(404, f"The adapter `{name}` is not loaded.", param="lora_name", code="adapter_not_found")
        self.pinned.discard(name)
        await self._unpublish(name)

    # --- pinning -----------------------------------------------------------------
    async def pin_adapter(self, name: str) -> AdapterRecord:
        """Keep `name` in its engine's CPU cache, never evicted."""
        record = self.registry.adapters.get(name)
        if record is None or not self._published(name):
            raise APIError(404, f"The adapter `{name}` is not loaded.", param="lora_name", code="adapter_not_found")
        if name not in self.pinned:
            if len(self.pinned) + 1 >= self.settings.max_cpu_loras:
                raise APIError(
                    409, f"Pinning `{name}` would fill the engine's CPU cache (max_cpu_loras {self.settings.max_cpu_loras}); "
                    "unpin one first.", param="lora_name", code="too_many_pinned",
                )
            self.pinned.add(name)
            engine = self._engine_for(record)
            await lora_table.pin(engine, lora_table.current(engine, name))
        return record

    async def unpin_adapter(self, name: str) -> AdapterRecord:
        """Let `name` be evicted again: vLLM cannot unpin, so it is loaded again, unpinned,
        under a fresh id (the pinned version is freed once its requests end)."""
        record = self.registry.adapters.get(name)
        if record is None or name not in self.pinned:
            raise APIError(404, f"The adapter `{name}` is not pinned.", param="lora_name", code="adapter_not_pinned")
        self.pinned.discard(name)
        async with self._name_lock(name):
            await self._register(record)
        return record

    async def evict(self, name: str) -> bool:
        """Take `name`'s weights out of its engine (CPU cache and slots) while it stays
        servable: the next request for it loads it again from its snapshot. For placement
        decided outside the engine (Ray Serve's per-replica adapter limit). Pinned adapters
        stay; returns whether there was something to evict."""
        record = self.registry.adapters.get(name)
        if record is None or name in self.pinned:
            return False
        engine = self._engine_for(record)
        request = lora_table.current(engine, name) if engine is not None else None
        if request is None:
            return False
        await lora_table.free(engine, request)
        return True

    # --- discovery -----------------------------------------------------------------
    async def _discover(self, name: str) -> AdapterRecord | None:
        """A request names an adapter that is not registered: if its folder is in a store,
        validate and register it now (under the same rules as every other adapter)."""
        if not is_safe_name(name) or name in self.unloaded or self.registry.find_folder(name) is None:
            return None
        async with self._name_lock(name):
            record = self.registry.adapters.get(name)
            if record is not None and self._published(name):
                return record  # registered by a request that came first
            found = self.registry.find_folder(name)
            signature = discovery.folder_signature(found[0]) if found else None
            refused = any(p.name == name for p in self.registry.problems)
            if refused and self._signatures.get(name) == signature:
                return None  # refused before and unchanged since (the reason: /admin/adapters)
            try:
                record = await self._reload(name)
            except APIError:
                # refused now: recorded with its reason for the admins; to the client it is
                # a model that does not exist (a reason may name server paths)
                return None
            log.info("adapter %r discovered on request and registered", name)
            return record

    async def _scan_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.rescan()
            except asyncio.CancelledError:
                raise
            except Exception:  # keep scanning whatever one scan met
                log.exception("scanning the adapter stores failed")

    async def rescan(self) -> discovery.Changes:
        """Register new folders, reload changed ones, unregister removed ones."""
        now = await asyncio.to_thread(discovery.store_signatures, self.registry.stores)
        changes = discovery.compare(self._signatures, now, set(self.registry.adapters))
        for name in changes.removed:
            log.info("adapter %r: its folder is gone; unregistering it", name)
            self._signatures.pop(name, None)
            await self._unregister(name)
        for name in changes.added + changes.changed:
            self.unloaded.discard(name)  # a changed folder is served again
            try:
                await self.reload_adapter(name)
                log.info("adapter %r: %s folder registered", name, "new" if name in changes.added else "changed")
            except APIError as exc:  # refused: recorded as a problem; a last good version keeps serving
                log.warning("adapter %r from the scan: %s", name, exc.message)
        for name in [n for n in self._signatures if n not in now]:
            self._signatures.pop(name)
            self.unloaded.discard(name)
            self.registry.problems = [p for p in self.registry.problems if p.name != name]
        await self._collect_snapshots()
        return changes

    def _snapshots_in_use(self) -> set[Path]:
        keep = {Path(r.path) for r in self.registry.adapters.values()}
        for engine in self.engines():
            keep |= {Path(p) for p in lora_table.snapshot_paths(engine)}
        return keep

    async def _collect_snapshots(self) -> None:
        """Remove the snapshots no version of this server uses and no server has touched
        within the grace period (servers sharing the cache touch theirs: `_touch_snapshots`)."""
        if self.registry.snapshots is not None:
            await asyncio.to_thread(self.registry.snapshots.collect, self._snapshots_in_use(), SNAPSHOT_GRACE_S)

    async def _touch_snapshots(self) -> None:
        """Mark the snapshots this server uses as in use, every SNAPSHOT_TOUCH_S: other
        servers and replicas sharing the cache directory collect only what nobody touched."""
        while True:
            await asyncio.to_thread(self.registry.snapshots.touch, self._snapshots_in_use())
            await asyncio.sleep(SNAPSHOT_TOUCH_S)

    def _published(self, name: str) -> bool:
        return any(lora_table.is_published(e, name) for e in self.engines())

    # --- what the metrics read ---------------------------------------------------
    def tasks(self) -> list[HostedTask]:
        return [
            HostedTask(r.name, r.kind, "adapter", r.size_bytes, r.trainable_params, rank=r.rank, pinned=r.name in self.pinned)
            for r in self.registry.adapters.values()
        ]

    def published_adapters(self, engine: Engine) -> dict[int, str]:
        return lora_table.published(engine)

    # --- routing -----------------------------------------------------------------
    async def resolve(self, model: str | None, endpoint: Endpoint) -> Target:
        if not model:
            raise missing_model()
        name = requested_name(model, self.base_name)
        if name == self.base_name:
            check_endpoint(model, "base", endpoint)
            return Target(engine=self._live(self.generate), vllm_model=self.base_name, model=self.base_name)
        record = self.registry.adapters.get(name)
        quarantined = self.quarantined.get(name, "").startswith("quarantined")
        if record is None and not quarantined and self.settings.discover_on_request:
            record = await self._discover(name)
        if record is None and quarantined:
            raise APIError(
                400, f"The model `{model}` is quarantined: it produced non-finite values (NaN logits). "
                "An administrator must fix and reload it.", param="model", code="model_quarantined",
            )
        if record is None or not self._published(name):
            raise model_not_found(model)
        check_endpoint(model, record.kind, endpoint)
        return Target(engine=self._live(self._engine_for(record)), vllm_model=name, model=name, record=record)

    def model_cards(self) -> list[ModelCard]:
        cards = [
            ModelCard(
                id=self.base_name,
                root=self.base_name,
                parent=None,
                kind="base",
                created=self.created,
                max_model_len=self.settings.max_model_len,
            )
        ]
        for record in sorted(self.registry.adapters.values(), key=lambda r: r.name):
            if not self._published(record.name):
                continue
            cards.append(
                ModelCard(
                    id=record.name,
                    root=record.name,  # never leak server paths to clients
                    parent=self.base_name,
                    kind=record.kind,
                    created=self.created,
                    max_model_len=self.settings.max_model_len,
                    rank=record.rank,
                    size_bytes=record.size_bytes,
                    labels=record.labels or None,
                )
            )
        return cards


    def _live(self, engine: Engine) -> Engine:
        """The engine, if it can serve now; a 503 with Retry-After while it is down. Per
        request, so no process-table reads: the watcher marks dead engines down within a
        second, and vLLM marks its client errored when its engine core dies."""
        if engine.name in self.down or engine.client is None or engine.client.errored:
            raise engine_unavailable(engine.name)
        return engine


def _problem(record: AdapterRecord, reason: str):
    from adapterserve.registry.store import Problem

    return Problem(record.name, record.path, reason)
