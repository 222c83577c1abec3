"""The adapter catalog of the shared mode: which adapters serve, in which engine, and why
the others do not.

It keeps the registry (validated records and refused folders), publishes each adapter in
the engine of its kind (hosting/lora_table.py: vLLM's name -> LoRARequest table, with
vLLM's per-name locking), frees a version that stopped serving once its requests end, and
does what admins and requests ask of adapters: load, reload (the last good version keeps
serving when a new one is refused), unload (kept across restarts: hosting/unloads.py),
pin, unpin, evict, discovery of a store's adapter on the first request naming it, and
quarantine of an adapter whose requests produced non-finite values. The periodic scan of
the stores and the snapshots' upkeep are in hosting/scanning.py.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable

from adapterserve.config import Settings
from adapterserve.errors import Conflict, DomainError, InvalidRequest, NotFound, adapter_not_loaded
from adapterserve.registry import kinds
from adapterserve.registry.records import AdapterInvalid, AdapterRecord, is_safe_name, printable
from adapterserve.registry.sources import AdapterSource, Signature
from adapterserve.registry.store import Problem, Registry

from . import lookups, lora_table
from .protocol import Engine, HostObserver
from .unloads import Unloads, unloads_path

log = logging.getLogger(__name__)


class AdapterCatalog:
    def __init__(
        self, settings: Settings, registry: Registry, base_name: str, observer: HostObserver,
        engine_for_role: Callable[[str], Engine | None], engines: Callable[[], list[Engine]],
        start_role: Callable[[str, AdapterRecord], Awaitable[Engine]] | None = None,
    ):
        self.settings = settings
        self.registry = registry
        self.base_name = base_name
        self.observer = observer
        self._engine_for_role = engine_for_role  # the host's engines, as they are now (restarts replace them)
        self._engines = engines
        self._start_role = start_role  # starts a role's engine for its first adapter (None: refuse the adapter)
        self._lora_ids = itertools.count(1)
        self.pinned: set[str] = set(settings.pinned_adapters)
        if len(self.pinned) >= settings.max_cpu_loras:
            raise ValueError(
                f"{len(self.pinned)} pinned adapters fill the CPU cache (max_cpu_loras {settings.max_cpu_loras}): "
                "pin fewer than max_cpu_loras, so other adapters can be loaded"
            )
        self.quarantined: dict[str, str] = {}  # adapter -> why it no longer serves (until reloaded)
        self.nonfinite: dict[str, str] = {}  # adapter -> its requests produced non-finite values (still serving)
        self.signatures: dict[str, Signature | None] = {}  # name -> its version at its last validation
        self._name_locks: dict[str, asyncio.Lock] = {}  # one discovery or reload of a name at a time
        self.lookups = lookups.LookupGate()  # the stores' lookups of names requests make up
        self._freeing: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop the host runs on (set by `open`)
        # unloaded by an admin: not served, nor discovered again, until loaded or changed (kept on disk)
        self.unloaded = Unloads(unloads_path(settings.cache_dir, base_name, registry.stores))

    async def open(self) -> None:
        """Register every adapter the registry validated, in its engine (started by now)."""
        self._loop = asyncio.get_running_loop()
        for name in sorted(self.pinned - set(self.registry.adapters)):
            log.warning("pinned adapter %r is not in the stores (or was refused); nothing to pin", name)
        self.signatures = dict(self.registry.scanned)  # the versions the registry's scan validated
        for name in [n for n in self.unloaded if n in self.registry.adapters]:
            log.info("adapter %r stays unloaded (an admin unloaded it)", name)
            self.registry.remove(name)
        await self.register_all(list(self.registry.adapters.values()))

    async def register_all(self, records: list[AdapterRecord], engine: Engine | None = None) -> None:
        """Register each record; one the engine refuses is recorded as a problem, the others go on."""
        for record in records:
            try:
                await self.register(record, engine)
            except AdapterInvalid as exc:
                self._refuse(record, exc.reason)

    def close(self) -> None:
        for task in self._freeing:
            task.cancel()

    def _refuse(self, record: AdapterRecord, reason: str) -> None:
        self.registry.remove(record.name)
        self._set_problem(record.name, record.path, reason)
        log.warning("adapter %r refused by the engine: %s", record.name, printable(reason))

    def _set_problem(self, name: str, path, reason: str) -> None:
        self.registry.problems = [p for p in self.registry.problems if p.name != name]
        self.registry.problems.append(Problem(name, path, reason))

    # --- adapters in the engines ------------------------------------------------------
    def engine_for(self, record: AdapterRecord) -> Engine | None:
        return self._engine_for_role(kinds.of(record.kind).role)

    def records_for(self, role: str) -> list[AdapterRecord]:
        return [r for r in self.registry.adapters.values() if kinds.of(r.kind).role == role]

    async def register(self, record: AdapterRecord, engine: Engine | None = None) -> None:
        """Make the adapter servable: load it once in its engine (which checks it for real
        and leaves it in the CPU LRU), then publish it under its name."""
        from vllm.lora.request import LoRARequest

        engine = engine or self.engine_for(record)
        if engine is None and self._start_role is not None:  # the first adapter of its kind while serving
            try:
                engine = await self._start_role(kinds.of(record.kind).role, record)
            except Exception as exc:
                raise AdapterInvalid(record.name, f"the {kinds.of(record.kind).role} engine its kind needs could not be "
                                     f"started: {exc}") from None
        if engine is None:
            raise AdapterInvalid(record.name, f"{record.kind} adapters are served by the {kinds.of(record.kind).role} engine, "
                                 "which is not running; restart the server to start it")
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
        for engine in self._engines():
            removed = await lora_table.unpublish(engine, name)
            if removed is not None:
                self._free_later(engine, removed)

    def published(self, name: str) -> bool:
        return any(lora_table.is_published(e, name) for e in self._engines())

    def servable(self, name: str) -> AdapterRecord | None:
        record = self.registry.adapters.get(name)
        return record if record is not None and self.published(name) else None

    # --- what admins do -----------------------------------------------------------------
    def _name_lock(self, name: str) -> asyncio.Lock:
        return self._name_locks.setdefault(name, asyncio.Lock())

    async def load(self, name: str) -> AdapterRecord:
        if self.servable(name) is not None:
            raise Conflict(f"The adapter `{name}` is already loaded; use reload to pick up new weights.",
                           param="lora_name", code="adapter_already_loaded")
        self.unloaded.discard(name)
        return await self.reload(name)

    async def reload(self, name: str) -> AdapterRecord:
        """Validate the store's folder again and serve it; when the new version is refused,
        the last good version (if any) keeps serving and the answer says why."""
        async with self._name_lock(name):
            return await self._reload(name, await self._holder(name))

    async def _holder(self, name: str) -> tuple[AdapterSource | None, Signature | None]:
        """The source holding `name` (or None) and its signature there, off the event loop: in
        S3 each is a LIST request, up to its timeouts while the store hangs."""
        def lookup() -> tuple[AdapterSource | None, Signature | None]:
            source = self.registry.locate(name)
            return source, source.signature(name) if source else None

        return await asyncio.to_thread(lookup)

    async def _reload(self, name: str, holder: tuple[AdapterSource | None, Signature | None]) -> AdapterRecord:
        previous = self.servable(name)
        source, self.signatures[name] = holder
        try:
            # validation reads and checks every weight: off the event loop
            record = await asyncio.to_thread(self.registry.validate, name, source)
            await self.register(record)
        except AdapterInvalid as exc:
            missing = "no such folder" in exc.reason
            error = NotFound if missing else InvalidRequest
            code = "adapter_not_found" if missing else "adapter_invalid"
            if previous is None:
                self.registry.remove(name)
                await self._unpublish(name)
                if source is not None:  # the reason, for the admins (/admin/adapters, `adapters list`)
                    self._set_problem(name, source.location(name), exc.reason)
                raise error(str(exc), param="lora_name", code=code) from None
            self._set_problem(name, previous.path, f"new version refused, the last good one serves: {exc.reason}")
            raise error(f"{exc}; the last good version of `{name}` keeps serving.", param="lora_name", code=code) from None
        self.registry.register(record)
        self.quarantined.pop(name, None)
        self.nonfinite.pop(name, None)
        return record

    async def unload(self, name: str) -> None:
        """Stop serving `name` now; its weights leave the engine once its requests end."""
        await self.unregister(name)
        self.unloaded.add(name)

    async def unregister(self, name: str) -> None:
        if self.registry.remove(name) is None:
            raise adapter_not_loaded(name)
        self.pinned.discard(name)
        await self._unpublish(name)

    async def pin(self, name: str) -> AdapterRecord:
        """Keep `name` in its engine's CPU cache, never evicted."""
        record = self.servable(name)
        if record is None:
            raise adapter_not_loaded(name)
        if name not in self.pinned:
            if len(self.pinned) + 1 >= self.settings.max_cpu_loras:
                raise Conflict(
                    f"Pinning `{name}` would fill the engine's CPU cache (max_cpu_loras {self.settings.max_cpu_loras}); "
                    "unpin one first.", param="lora_name", code="too_many_pinned",
                )
            self.pinned.add(name)
            engine = self.engine_for(record)
            await lora_table.pin(engine, lora_table.current(engine, name))
        return record

    async def unpin(self, name: str) -> AdapterRecord:
        """Let `name` be evicted again: vLLM cannot unpin, so it is loaded again, unpinned,
        under a fresh id (the pinned version is freed once its requests end)."""
        record = self.registry.adapters.get(name)
        if record is None or name not in self.pinned:
            raise NotFound(f"The adapter `{name}` is not pinned.", param="lora_name", code="adapter_not_pinned")
        self.pinned.discard(name)
        async with self._name_lock(name):
            await self.register(record)
        return record

    async def evict(self, name: str) -> bool:
        """Take `name`'s weights out of its engine (CPU cache and slots) while it stays
        servable: the next request for it loads it again from its snapshot. Pinned adapters
        stay; returns whether there was something to evict."""
        record = self.registry.adapters.get(name)
        if record is None or name in self.pinned:
            return False
        engine = self.engine_for(record)
        request = lora_table.current(engine, name) if engine is not None else None
        if request is None:
            return False
        await lora_table.free(engine, request)
        return True

    # --- what requests meet ----------------------------------------------------------------
    async def discover(self, name: str) -> AdapterRecord | None:
        """A request names an adapter that is not registered: if its folder is in a store,
        validate and register it now (under the same rules as every other adapter)."""
        if not is_safe_name(name) or name in self.unloaded or (  # listed: seen by the last listing of the stores
                name not in self.registry.listed and not await self.lookups.found(name, lambda: self.registry.locate(name) is not None)):
            return None
        async with self._name_lock(name):
            record = self.servable(name)
            if record is not None:
                return record  # registered by a request that came first
            holder = await self._holder(name)  # looked up once under the lock, used by _reload
            refused = any(p.name == name for p in self.registry.problems)
            if refused and self.signatures.get(name) == holder[1]:
                return None  # refused before and unchanged since (the reason: /admin/adapters)
            try:
                record = await self._reload(name, holder)
            except DomainError:
                # refused now: recorded with its reason for the admins; to the client it is
                # a model that does not exist (a reason may name server paths)
                return None
            log.info("adapter %r discovered on request and registered", name)
            return record

    def quarantine(self, adapter: str | None, request_id: str) -> None:
        """An adapter whose request produced NaN logits stops serving until it is reloaded
        (its request has already been ended with an error). Not on a server with tenants,
        unless `quarantine_nonfinite` says so: there any tenant allowed a shared adapter
        could take it offline for all with a prompt that overflows it; only that request
        fails (no adapter can change another request's output), and the log says it."""
        if adapter is None:
            log.error("request %s: the base model produced NaN logits", request_id)
            return
        record = self.registry.adapters.get(adapter)
        if record is None or adapter in self.quarantined:
            return
        if not self._quarantines():
            self.nonfinite[adapter] = "its requests produced non-finite values (not quarantined: tenants share it)"
            log.error("adapter %r produced non-finite values (NaN logits) in request %s; that request failed", adapter, request_id)
            return
        reason = "quarantined: it produced non-finite values (NaN logits) while serving; fix it, then reload it"
        self.quarantined[adapter] = reason
        self.registry.remove(adapter)  # requests for it are refused from now on
        for engine in self._engines():
            removed = lora_table.withdraw(engine, adapter)
            if removed is not None:
                self._free_later(engine, removed)
        self.registry.problems.append(Problem(record.name, record.path, reason))
        self.observer.adapter_quarantined(record.kind)
        log.error("adapter %r %s (request %s)", adapter, reason, request_id)

    def _quarantines(self) -> bool:
        chosen = self.settings.quarantine_nonfinite
        return self.settings.keys_file is None if chosen is None else chosen

    def nonfinite_state(self, name: str) -> str | None:
        """"quarantined", "reported" (its requests produced non-finite values; it serves on), or None."""
        return "quarantined" if name in self.quarantined else "reported" if name in self.nonfinite else None
