"""What routers read to place LoRA requests, with series that stay bounded.

- `vllm:lora_requests_info`: the gauge the Gateway API Inference Extension, llm-d and
  AIBrix parse (running and waiting adapters, comma-separated without spaces, and
  `max_lora`; the value is the time of the reading; routers take the highest-valued
  series). vLLM's own gauge gains a series per combination of running adapters and never
  drops one; this server replaces it with one series per LoRA engine, read at scrape time
  from the engine's request states.
- Residency, named as proposed upstream (vllm#54830, read by llm-d's load-state scorer):
  `vllm:lora_adapter_loaded{adapter_name, level, pinned, rank}` per adapter the engine
  holds (level `gpu`: in an engine slot, which is what vLLM calls its GPU cache also on a
  CPU; `cpu`: in the CPU cache), loaded but idle included; `vllm:num_gpu_loaded_lora_adapters`,
  `vllm:num_cpu_loaded_lora_adapters`, `vllm:max_gpu_lora_adapters`; and the
  `vllm:lora_adapter_load_seconds` histogram of the loads the workers timed.
  At most `max_cpu_loras` adapters per engine: bounded by the engine's own cache.
"""

from __future__ import annotations

import time

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily

from adapterserve.engine_plugins.lora_events import LOAD_BUCKETS

LORA_INFO = "vllm:lora_requests_info"


class WithoutVllmLoraInfo:
    """A view of a registry without vLLM's own (unbounded) `vllm:lora_requests_info`."""

    def __init__(self, registry):
        self.registry = registry

    def collect(self):
        for family in self.registry.collect():
            if family.name != LORA_INFO:
                yield family


class WorkerLoadCounts:
    """The workers' cumulative load and eviction counts turned into increments, per engine
    (an engine that restarted starts from zero again)."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[int, dict]] = {}  # engine name -> (client id, counts)
        self.load_buckets = [0] * (len(LOAD_BUCKETS) + 1)
        self.load_seconds_sum = 0.0

    def increments(self, engine_name: str, client_id: int, counts: dict) -> tuple[int, int]:
        """(new loads, new evictions) since the last reading of this engine."""
        last_client, last = self._last.get(engine_name, (client_id, None))
        if last is None or last_client != client_id:
            last = {"loads": 0, "evictions": 0, "load_seconds_sum": 0.0, "load_buckets": [0] * len(self.load_buckets)}
        self._last[engine_name] = (client_id, counts)
        for index, (now, before) in enumerate(zip(counts["load_buckets"], last["load_buckets"])):
            self.load_buckets[index] += max(now - before, 0)
        self.load_seconds_sum += max(counts["load_seconds_sum"] - last["load_seconds_sum"], 0.0)
        return max(counts["loads"] - last["loads"], 0), max(counts["evictions"] - last["evictions"], 0)


def requests_by_adapter(engine) -> tuple[list[str], list[str]]:
    """(running, waiting) adapter names of the engine's requests, from vLLM's own per-LoRA
    request states (kept when the engine logs stats)."""
    processor = getattr(engine.client, "output_processor", None)
    states = getattr(getattr(processor, "lora_states", None), "requests", None) or {}
    running = sorted(name for name, stats in list(states.items()) if stats.running)
    waiting = sorted(name for name, stats in list(states.items()) if stats.waiting)
    return running, waiting


class LoraRoutingCollector:
    def __init__(self, metrics):
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        host, readings = self.metrics.host, self.metrics.memory
        info = GaugeMetricFamily(
            LORA_INFO, "Running and waiting LoRA adapters (comma-separated) and max_lora; the value is the "
            "time of the reading. One series per LoRA engine.",
            labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        loaded = GaugeMetricFamily(
            "vllm:lora_adapter_loaded", "1 per adapter the engine holds, by level: gpu (an engine slot), cpu "
            "(the CPU cache); idle adapters included.",
            labels=["model_name", "adapter_name", "level", "pinned", "rank"],
        )
        in_slots = GaugeMetricFamily("vllm:num_gpu_loaded_lora_adapters", "Adapters in engine slots.", labels=["model_name"])
        in_cache = GaugeMetricFamily("vllm:num_cpu_loaded_lora_adapters", "Adapters in the engine's CPU cache.", labels=["model_name"])
        slots = GaugeMetricFamily("vllm:max_gpu_lora_adapters", "Engine slots for adapters (max_loras).", labels=["model_name"])
        counts = self.metrics.worker_loads
        buckets, cumulative = [], 0
        for bound, count in zip([*map(str, LOAD_BUCKETS), "+Inf"], counts.load_buckets):
            cumulative += count
            buckets.append((bound, cumulative))
        load_seconds = HistogramMetricFamily(
            "vllm:lora_adapter_load_seconds", "Time to load an adapter into an engine's CPU cache, timed in the worker.",
            buckets=buckets, sum_value=counts.load_seconds_sum,
        )
        if host is not None:
            self._engines(host, readings, info, loaded, in_slots, in_cache, slots)
        yield from (info, loaded, in_slots, in_cache, slots, load_seconds)

    def _engines(self, host, readings, info, loaded, in_slots, in_cache, slots) -> None:
        by_name = {engine.name: engine for engine in host.engines()}
        ranks = {task.name: task.rank for task in host.tasks()}
        base, max_loras = host.base_name, host.settings.max_loras
        for reading in readings:
            engine = by_name.get(reading.name)
            if engine is None or engine.client is None or not engine.spec.enable_lora:
                continue
            if reading.runner == "generate":
                running, waiting = requests_by_adapter(engine)
                info.add_metric([str(max_loras), ",".join(running), ",".join(waiting)], time.time())
            if not reading.measured:
                continue
            names = host.published_adapters(engine)  # earlier versions of an adapter are not counted
            in_slot = {names[i] for i in reading.slot_adapters if i in names}
            cached = {names[i] for i in reading.cached_adapters if i in names}
            for name in sorted(cached):
                pinned = "true" if name in host.pinned else "false"
                rank = str(ranks.get(name, 0))
                loaded.add_metric([base, name, "cpu", pinned, rank], 1)
                if name in in_slot:
                    loaded.add_metric([base, name, "gpu", pinned, rank], 1)
            if reading.runner == "generate":
                in_slots.add_metric([base], len(in_slot))
                in_cache.add_metric([base], len(cached))
                slots.add_metric([base], max_loras)
