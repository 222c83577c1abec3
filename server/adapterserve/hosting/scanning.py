"""The stores' periodic scan and the snapshots' upkeep, for the shared mode's catalog.

A scan compares every adapter source's listing with what was validated last
(hosting/discovery.py): new adapters are registered, changed ones reloaded (the last good
version keeps serving when a change is refused), removed ones unregistered. Snapshots in
use are touched every SNAPSHOT_TOUCH_S, and a scan collects those nobody touched within
SNAPSHOT_GRACE_S: servers and replicas sharing a cache directory share its snapshots
(identical content has one address), so each keeps what it uses alive for the others.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from adapterserve.config import Settings
from adapterserve.errors import DomainError
from adapterserve.registry.store import Budget

from . import discovery, lora_table
from .catalog import AdapterCatalog
from .protocol import Engine

log = logging.getLogger(__name__)

SNAPSHOT_TOUCH_S = 60.0
SNAPSHOT_GRACE_S = 600.0


class Scanner:
    def __init__(self, settings: Settings, catalog: AdapterCatalog, engines: Callable[[], list[Engine]]):
        self.settings = settings
        self.catalog = catalog
        self.registry = catalog.registry
        self._engines = engines
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        if self.registry.snapshots is not None:
            self._tasks.append(asyncio.create_task(self._touch_forever()))
        if self.settings.adapter_scan_interval_s > 0:
            self._tasks.append(asyncio.create_task(self._scan_forever(self.settings.adapter_scan_interval_s)))

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()

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
        catalog = self.catalog
        now = await asyncio.to_thread(self.registry.signatures)
        changes = discovery.compare(catalog.signatures, now, set(self.registry.adapters))
        for name in changes.removed:
            log.info("adapter %r: its folder is gone; unregistering it", name)
            catalog.signatures.pop(name, None)
            await catalog.unregister(name)
        for name in [n for n in self.registry.listed if n not in now]:
            self.registry.listed.pop(name)
        # many new adapters at once: those past the budget are listed, validated on use
        budget = Budget(self.settings.adapters_validated_at_start, self.settings.adapter_validation_budget_s)
        for name in changes.added + changes.changed:
            if name in self.registry.listed or (name in changes.added and not budget.take()):
                catalog.signatures[name] = now[name]  # validated on its first request
                if name in self.registry.holders:
                    self.registry.list_only(name, self.registry.holders[name])
                continue
            catalog.unloaded.discard(name)  # a changed folder is served again
            try:
                await catalog.reload(name)
                log.info("adapter %r: %s folder registered", name, "new" if name in changes.added else "changed")
            except DomainError as exc:  # refused: recorded as a problem; a last good version keeps serving
                log.warning("adapter %r from the scan: %s", name, exc.message)
        for name in [n for n in catalog.signatures if n not in now]:
            catalog.signatures.pop(name)
            catalog.unloaded.discard(name)
            self.registry.problems = [p for p in self.registry.problems if p.name != name]
        await self._collect_snapshots()
        return changes

    def _snapshots_in_use(self) -> set[Path]:
        keep = {Path(r.path) for r in self.registry.adapters.values()}
        for engine in self._engines():
            keep |= {Path(p) for p in lora_table.snapshot_paths(engine)}
        return keep

    async def _collect_snapshots(self) -> None:
        """Remove the snapshots no version of this server uses and no server has touched
        within the grace period (servers sharing the cache touch theirs: `_touch_forever`)."""
        if self.registry.snapshots is not None:
            await asyncio.to_thread(self.registry.snapshots.collect, self._snapshots_in_use(), SNAPSHOT_GRACE_S)

    async def _touch_forever(self) -> None:
        """Mark the snapshots this server uses as in use, every SNAPSHOT_TOUCH_S."""
        while True:
            await asyncio.to_thread(self.registry.snapshots.touch, self._snapshots_in_use())
            await asyncio.sleep(SNAPSHOT_TOUCH_S)
