"""The scrape-time gauges: memory by engine and component, adapters by tier, storage,
hosting cost. They are read from the latest engine readings (Metrics.refresh) and the
host's inventory, so a scrape never waits on an engine."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily

from adapterserve.dtypes import dtype_bytes
from adapterserve.hosting.protocol import engine_runtime_bytes
from adapterserve.registry import kinds
from adapterserve.registry.records import BaseModelInfo
from adapterserve.registry.safetensors_header import safetensors_elements

from . import costs, inventory
from .labels import OTHER

COMPONENTS = ("base_weights", "adapter_slots", "adapter_cpu_cache", "kv_cache")


class HostCollector:
    def __init__(self, metrics):
        self.metrics = metrics

    def describe(self):
        return []  # families depend on the host; nothing to check at registration

    def collect(self):
        host, memory = self.metrics.host, self.metrics.memory
        families = {
            "engine": GaugeMetricFamily(
                "adapterserve_engine_memory_bytes",
                "Memory an engine holds, by component: base_weights, adapter_slots (preallocated "
                "LoRA slots), adapter_cpu_cache (adapters in the engine's CPU cache), kv_cache (reserved).",
                labels=["engine", "component"],
            ),
            "measured": GaugeMetricFamily(
                "adapterserve_engine_memory_measured",
                "1 where the engine reported its memory from its live tensors, 0 where the figures are computed.",
                labels=["engine"],
            ),
            "kv_used": GaugeMetricFamily(
                "adapterserve_kv_cache_used_bytes", "KV cache in use by running requests.", labels=["engine"]
            ),
            "process": GaugeMetricFamily(
                "adapterserve_engine_process_memory_bytes",
                "Unique set size (USS, psutil) of each engine process.",
                labels=["engine", "pid", "process"],
            ),
            "gpu": GaugeMetricFamily(
                "adapterserve_engine_gpu_memory_bytes", "GPU memory of each engine's processes (NVML).", labels=["engine", "gpu"]
            ),
            "adapters": GaugeMetricFamily(
                "adapterserve_adapters",
                "Adapters by kind and tier: registered (servable), cpu_cache (in an engine's CPU cache), "
                "engine_slot (in one of an engine's preallocated slots), pinned (never evicted).",
                labels=["kind", "tier"],
            ),
            "task_storage": GaugeMetricFamily(
                "adapterserve_task_storage_bytes",
                "Bytes on disk per task: its adapter folder (shared mode) or its full model folder (dedicated mode).",
                labels=["task", "kind"],
            ),
            "storage": GaugeMetricFamily(
                "adapterserve_storage_bytes", "Bytes on disk by component: base, adapters, full_models.", labels=["component"]
            ),
            "tasks": GaugeMetricFamily("adapterserve_tasks", "Tasks (models clients can name) the server hosts.", labels=["mode"]),
            "hosting": GaugeMetricFamily(
                "adapterserve_hosting_memory_bytes",
                "Memory to host the current tasks: the running mode as measured (basis=measured), and both "
                "modes derived from measured per-engine figures (basis=derived; see docs/metrics.md).",
                labels=["mode", "basis"],
            ),
        }
        if host is not None:
            self._engines(memory, families)
            self._adapters(host, memory, families["adapters"])
            self._storage(host, families)
            self._hosting(host, memory, families)
        yield from families.values()

    def _engines(self, memory, families) -> None:
        for reading in memory:
            values = (reading.weights_bytes, reading.lora_slot_bytes, reading.adapter_cache_bytes, reading.kv_cache_bytes)
            for component, value in zip(COMPONENTS, values):
                families["engine"].add_metric([reading.name, component], value)
            families["measured"].add_metric([reading.name], 1 if reading.measured else 0)
            families["kv_used"].add_metric([reading.name], reading.kv_cache_used_bytes)
            for pid, (process, uss) in sorted(reading.processes.items()):
                families["process"].add_metric([reading.name, str(pid), process], uss)
            for gpu, used in reading.gpu_bytes.items():
                families["gpu"].add_metric([reading.name, gpu], used)

    def _adapters(self, host, memory, family) -> None:
        registry = host.registry
        counts = {(kind, tier): 0 for kind in kinds.ADAPTER_KINDS for tier in ("registered", "cpu_cache", "engine_slot", "pinned")}
        if registry is not None:
            for record in registry.adapters.values():
                counts[(record.kind, "registered")] += 1
                if record.name in host.pinned:
                    counts[(record.kind, "pinned")] += 1
        engines = {engine.name: engine for engine in host.engines()}
        for reading in memory:
            engine = engines.get(reading.name)
            if engine is None or not reading.measured:
                continue
            kind = kinds.adapter_kind_for_runner(reading.runner)
            published = host.published_adapters(engine)  # adapters of earlier loads are not counted
            counts[(kind, "cpu_cache")] += sum(1 for i in reading.cached_adapters if i in published)
            counts[(kind, "engine_slot")] += sum(1 for i in reading.slot_adapters if i in published)
        for (kind, tier), count in counts.items():
            family.add_metric([kind, tier], count)

    def _storage(self, host, families) -> None:
        stored = inventory.storage(host)
        rest: dict[str, int] = {}
        # the largest tasks get series of their own, up to the label cap, the rest sum
        # under `other`; a scrape reads, it never hands out the traffic labels' slots
        by_size = sorted(stored, key=lambda item: (-item.bytes, item.task))
        for rank, item in enumerate(by_size):
            if rank >= self.metrics.model_labels.limit:
                rest[item.kind] = rest.get(item.kind, 0) + item.bytes
            else:
                families["task_storage"].add_metric([item.task, item.kind], item.bytes)
        for kind, total in rest.items():
            families["task_storage"].add_metric([OTHER, kind], total)
        families["storage"].add_metric(["base"], self.metrics.base_storage_bytes)
        for kind, component in (("adapter", "adapters"), ("full_model", "full_models")):
            families["storage"].add_metric([component], sum(s.bytes for s in stored if s.kind == kind))
        families["tasks"].add_metric([host.mode], len(stored))

    def _hosting(self, host, memory, families) -> None:
        tasks = inventory.tasks(host)
        engine_bytes, slot_bytes = per_engine_costs(host, memory)
        family = families["hosting"]
        family.add_metric([host.mode, "measured"], sum(reading.uss_bytes for reading in memory))
        family.add_metric(["shared", "derived"], costs.shared_bytes(tasks, engine_bytes, slot_bytes))
        family.add_metric(["dedicated", "derived"], costs.dedicated_bytes(tasks, engine_bytes))


def per_engine_costs(host, memory) -> tuple[dict[str, int], dict[str, int]]:
    """(LoRA-free engine bytes, LoRA slot bytes) per runner, from the readings (see costs.py)."""
    engine_bytes: dict[str, list[int]] = {}
    slot_bytes: dict[str, int] = {}
    for reading in memory:
        engine_bytes.setdefault(reading.runner, []).append(reading.uss_bytes - reading.lora_bytes)
        if host.mode == "shared":
            slot_bytes[reading.runner] = reading.lora_slot_bytes
    means = {runner: sum(values) // len(values) for runner, values in engine_bytes.items()}
    model_path = Path(host.weights_path)
    fallback = means.get(costs.GENERATE) or next(iter(means.values()), 0) or estimated_engine_bytes(host.settings, model_path)
    for runner in (costs.GENERATE, costs.POOLING):
        means.setdefault(runner, fallback)
        if host.mode != "shared":
            slot_bytes[runner] = slot_estimate(model_path, host.settings.max_loras, host.lora_rank, dtype_bytes(host.settings.dtype))
    return means, slot_bytes


def estimated_engine_bytes(settings, model_path: Path) -> int:
    """An engine never measured: weights + KV cache + the measured runtime overhead."""
    return safetensors_elements(model_path) * dtype_bytes(settings.dtype) + settings.kv_cache_memory_bytes + engine_runtime_bytes(settings)


@lru_cache(maxsize=8)
def slot_estimate(model_path: Path, max_loras: int, max_rank: int, element_bytes: int) -> int:
    info = BaseModelInfo.read(model_path.name, model_path)
    config = json.loads((model_path / "config.json").read_text())
    tied = bool(config.get("tie_word_embeddings")) and not any(k.endswith("lm_head.weight") for k in info.shapes)
    return costs.lora_slot_estimate(info.shapes, tied, max_loras, max_rank, element_bytes)
