"""Where the memory goes: each engine by component, its processes, and the adapters by tier.

Read at intervals (and at each scrape) from the live engines: the worker report
(server/adapterserve/engine_plugins/worker_report.py) gives the tensor bytes of the weights, the preallocated
LoRA slots, each adapter in the engine's CPU cache and the KV cache, plus the scheduler's
KV cache usage; psutil gives each engine process's unique set size (USS: the memory that
would be freed if the process ended); NVML the GPU memory of those processes, when a GPU
is there. An engine that cannot report (starting, stopping) gets figures computed from
its files and settings, marked as not measured.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from adapterserve.dtypes import dtype_bytes

from adapterserve.engine_plugins.worker_report import engine_report


@dataclass
class EngineMemory:
    name: str
    runner: str  # "generate" or "pooling"
    measured: bool  # False: the figures below are computed from files and settings
    weights_bytes: int = 0
    lora_slot_bytes: int = 0
    kv_cache_bytes: int = 0
    kv_cache_used_bytes: int = 0
    cached_adapters: dict[int, int] = field(default_factory=dict)  # adapter id -> bytes
    slot_adapters: list[int] = field(default_factory=list)  # adapter ids in engine slots
    processes: dict[int, tuple[str, int]] = field(default_factory=dict)  # pid -> (name, USS)
    gpu_bytes: dict[str, int] = field(default_factory=dict)  # GPU index -> bytes
    # adapter loads and evictions the workers counted since the engine started (lora_events.py);
    # None when the engine reports none
    lora_counts: dict | None = None
    # the CPU LoRA forms the worker measured and chose (engine_plugins/cpu_lora/autotune.py)
    lora_forms: dict | None = None

    @property
    def adapter_cache_bytes(self) -> int:
        return sum(self.cached_adapters.values())

    @property
    def uss_bytes(self) -> int:
        return sum(uss for _, uss in self.processes.values())

    @property
    def lora_bytes(self) -> int:
        """What LoRA support adds to the engine: its slots and the adapters it caches."""
        return self.lora_slot_bytes + self.adapter_cache_bytes


def folder_bytes(path: Path) -> int:
    """Bytes on disk of every file under `path` (a folder or a single file)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


async def measure_engine(engine, settings, weights_elements: int) -> EngineMemory:
    """One engine's memory: the worker report where there is one, else computed figures."""
    report = await engine_report(engine.client) if engine.client is not None else None
    memory = EngineMemory(name=engine.name, runner=engine.spec.runner, measured=bool(report and report.get("workers")))
    if memory.measured:
        for worker in report["workers"]:
            memory.weights_bytes += worker["weights_bytes"]
            memory.lora_slot_bytes += worker["lora_slot_bytes"]
            memory.kv_cache_bytes += worker["kv_cache_bytes"]
            memory.cached_adapters.update({int(k): v for k, v in worker["cpu_cache"].items()})
            memory.slot_adapters += [i for i in worker["slots"] if i is not None]
            if "lora_counts" in worker:
                memory.lora_counts = _add_counts(memory.lora_counts, worker["lora_counts"])
            memory.lora_forms = worker.get("lora_forms") or memory.lora_forms
        memory.kv_cache_used_bytes = int(report.get("kv_cache_usage", 0.0) * memory.kv_cache_bytes)
    else:
        memory.weights_bytes = weights_elements * dtype_bytes(settings.dtype)
        memory.kv_cache_bytes = settings.kv_cache_memory_bytes
    # in a thread: USS walks the process's page tables (~160 ms for a 1.6 GB worker here)
    memory.processes = await asyncio.to_thread(process_memory, engine.process_ids())
    memory.gpu_bytes = gpu_memory(set(memory.processes))
    return memory


def _add_counts(total: dict | None, worker: dict) -> dict:
    if total is None:
        return {**worker, "load_buckets": list(worker["load_buckets"])}
    return {
        "loads": total["loads"] + worker["loads"],
        "evictions": total["evictions"] + worker["evictions"],
        "load_seconds_sum": total["load_seconds_sum"] + worker["load_seconds_sum"],
        "load_buckets": [a + b for a, b in zip(total["load_buckets"], worker["load_buckets"])],
    }


def process_memory(pids) -> dict[int, tuple[str, int]]:
    """pid -> (process name, unique set size) for the processes still alive."""
    found = {}
    for pid in pids:
        try:
            process = psutil.Process(pid)
            found[pid] = (process.name(), process.memory_full_info().uss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def gpu_memory(pids: set[int]) -> dict[str, int]:
    """GPU memory used by these processes per GPU, through NVML; empty without a GPU."""
    try:
        import pynvml
    except ImportError:
        return {}
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver, no GPU
        return {}
    used: dict[str, int] = {}
    try:
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            for process in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if process.pid in pids and process.usedGpuMemory:
                    used[str(index)] = used.get(str(index), 0) + process.usedGpuMemory
    finally:
        pynvml.nvmlShutdown()
    return used
