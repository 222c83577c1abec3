"""Memory by component, measured inside a vLLM worker: what the engine really holds.

vLLM exports no memory bytes. This module (a `vllm.general_plugins` entry point, so it is
loaded in every vLLM process) adds one method to vLLM's worker wrapper and one utility to
the engine core; the host calls the utility (`engine_report`) and gets the scheduler's KV
cache usage and, from each worker's live tensors:

- the model's weights (deduplicated, so tied embeddings count once),
- the preallocated LoRA slots (vLLM's stacked A/B tensors in every LoRA-wrapped layer),
- each adapter in the engine's CPU cache (its LoRA weights) and which slot holds which,
- the adapter loads and evictions counted in the worker (lora_events.py),
- the KV cache tensors.

Only tensor bytes are read; nothing is copied or changed.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("vllm.plugins.adapterserve_worker_report")

REPORT_METHOD = "adapterserve_memory_report"
ENGINE_UTILITY = "adapterserve_engine_report"


def register() -> None:
    """vLLM calls this in each of its processes; adding the methods twice is harmless."""
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    from . import lora_events, pinning

    setattr(WorkerWrapperBase, REPORT_METHOD, _worker_report)
    setattr(EngineCore, ENGINE_UTILITY, _engine_report)
    lora_events.install()  # adapter loads and evictions counted in the worker
    pinning.install()  # pinning in the CPU cache only


REPORT_TIMEOUT_S = 10.0  # a report takes milliseconds; an engine that died never answers


async def engine_report(client) -> dict | None:
    """From the API process: the report of one engine (an AsyncLLM), or None if it has none.

    Bounded in time: a utility call to an engine core that has died is never answered, and
    the metrics hold their refresh lock while they wait (every later scrape would hang)."""
    import asyncio

    try:
        return await asyncio.wait_for(client.engine_core.call_utility_async(ENGINE_UTILITY), REPORT_TIMEOUT_S)
    except Exception as exc:  # an engine without the plugin, one shutting down, or dead
        log.debug("no memory report: %s", exc)
        return None


def _engine_report(core) -> dict:
    """Runs in the engine core process, between scheduler steps."""
    from .heap import release_free_memory

    release_free_memory()  # before the API process reads this process's memory
    manager = getattr(core.scheduler, "kv_cache_manager", None)
    return {
        "kv_cache_usage": float(manager.usage) if manager is not None else 0.0,
        "workers": core.model_executor.collective_rpc(REPORT_METHOD),
    }


def _worker_report(wrapper) -> dict:
    from .heap import release_free_memory

    release_free_memory()  # before the API process reads this process's memory
    worker = getattr(wrapper, "worker", wrapper)
    return memory_report(worker.model_runner)


def memory_report(runner) -> dict:
    """The component bytes of one model runner (GPU or CPU), as plain data."""
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    seen: set[int] = set()
    slots = _lora_slot_bytes(model, seen)
    weights = _tensor_bytes(model.parameters(), seen) + _tensor_bytes(model.buffers(), seen) + _packed_bytes(model)
    report = {
        "pid": os.getpid(),
        "weights_bytes": weights,
        "lora_slot_bytes": slots,
        "kv_cache_bytes": _tensor_bytes(getattr(runner, "kv_caches", None) or [], set()),
        "cpu_cache": {},  # adapter id -> bytes of its weights
        "slots": [],  # adapter id (or None) per engine slot
    }
    worker_manager = getattr(runner, "lora_manager", None)
    manager = getattr(worker_manager, "_adapter_manager", None)
    if worker_manager is not None:
        from .cpu_lora import autotune
        from .lora_events import counts_of

        report["lora_forms"] = autotune.report()  # the CPU LoRA path's forms, as measured here

        report["lora_counts"] = counts_of(worker_manager).as_report()
    if manager is not None:
        for adapter_id, lora_model in manager.list_adapters().items():
            report["cpu_cache"][int(adapter_id)] = _lora_model_bytes(lora_model)
        report["slots"] = [None if i is None else int(i) for i in manager.lora_index_to_id]
    return report


def _tensor_bytes(tensors, seen: set[int]) -> int:
    total = 0
    for tensor in _flatten(tensors):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in seen or key == 0:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def _flatten(values):
    import torch

    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from _flatten(value)


def _packed_bytes(model) -> int:
    """Linear weights the CPU backend moved into opaque packed handles (oneDNN and others
    leave an empty `weight` behind): counted at their logical size."""
    from vllm.lora.layers import BaseLayerWithLoRA

    total = 0
    for module in model.modules():
        if isinstance(module, BaseLayerWithLoRA):
            continue  # a wrapper: its base layer is counted on its own
        weight = getattr(module, "weight", None)
        if weight is not None and weight.numel() == 0 and hasattr(module, "cpu_linear"):
            out_features = getattr(module, "output_size_per_partition", 0)
            in_features = getattr(module, "input_size_per_partition", 0)
            total += out_features * in_features * weight.element_size()
    return total


def _lora_slot_bytes(model, seen: set[int]) -> int:
    from vllm.lora.layers import BaseLayerWithLoRA

    tensors = []
    for module in model.modules():
        if isinstance(module, BaseLayerWithLoRA):
            for name, value in vars(module).items():
                if name.startswith("lora_") and name.endswith("_stacked"):
                    tensors.append(value)
    return _tensor_bytes(tensors, seen)


def _lora_model_bytes(lora_model) -> int:
    tensors = []
    for layer in lora_model.loras.values():
        tensors += [value for value in vars(layer).values()]
    return _tensor_bytes(tensors, set())
