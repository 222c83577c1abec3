"""Adapter loads and evictions counted where they happen: in vLLM's worker LoRA manager.

Comparing the CPU cache between two metric readings misses every adapter that came and
went in between (a workload cycling 100 adapters through a 16-entry cache counted 80 loads).
Inside the worker nothing is missed: each load is counted and timed, each adapter that
leaves the CPU cache (LRU eviction, replacement, removal) is counted. The counters live on
the manager instance and travel in the worker's memory report (worker_report.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

# Upper bounds (seconds) of the load-time buckets: loads take ms on CPU from a warm page
# cache, up to seconds for large adapters from cold storage.
LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
COUNTS_ATTRIBUTE = "_adapterserve_lora_counts"


@dataclass
class LoraCounts:
    loads: int = 0
    evictions: int = 0
    load_seconds_sum: float = 0.0
    load_buckets: list[int] = field(default_factory=lambda: [0] * (len(LOAD_BUCKETS) + 1))  # last: +Inf

    def observe_load(self, seconds: float) -> None:
        self.loads += 1
        self.load_seconds_sum += seconds
        index = next((i for i, bound in enumerate(LOAD_BUCKETS) if seconds <= bound), len(LOAD_BUCKETS))
        self.load_buckets[index] += 1

    def as_report(self) -> dict:
        return {
            "loads": self.loads, "evictions": self.evictions,
            "load_seconds_sum": self.load_seconds_sum, "load_buckets": list(self.load_buckets),
        }


def counts_of(manager) -> LoraCounts:
    counts = getattr(manager, COUNTS_ATTRIBUTE, None)
    if counts is None:
        counts = LoraCounts()
        setattr(manager, COUNTS_ATTRIBUTE, counts)
    return counts


def install() -> None:
    """Wrap the worker LoRA manager's add and remove (once per process)."""
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager

    if getattr(LRUCacheWorkerLoRAManager, "_adapterserve_counted", False):
        return
    add_adapter = LRUCacheWorkerLoRAManager.add_adapter
    remove_adapter = LRUCacheWorkerLoRAManager.remove_adapter

    def counted_add_adapter(self, lora_request):
        before = set(self.list_adapters())
        began = time.perf_counter()
        result = add_adapter(self, lora_request)
        after = set(self.list_adapters())
        counts = counts_of(self)
        if lora_request.lora_int_id not in before and lora_request.lora_int_id in after:
            counts.observe_load(time.perf_counter() - began)
        counts.evictions += len(before - after)
        return result

    def counted_remove_adapter(self, adapter_id):
        present = adapter_id in self.list_adapters()
        result = remove_adapter(self, adapter_id)
        if present and adapter_id not in self.list_adapters():
            counts_of(self).evictions += 1
        return result

    LRUCacheWorkerLoRAManager.add_adapter = counted_add_adapter
    LRUCacheWorkerLoRAManager.remove_adapter = counted_remove_adapter
    LRUCacheWorkerLoRAManager._adapterserve_counted = True
