"""Pinning an adapter in the engine's CPU cache only.

vLLM's `pin_lora` pins an adapter in the CPU cache and in an engine slot. A slot pinned
for good leaves `max_loras - 1` slots while the scheduler still admits batches of
`max_loras` distinct adapters: activating the last one then evicts another adapter of the
same batch. Pinning in the CPU cache gives what users pin for (never loaded again from
disk) and leaves the slots to the scheduler; moving a cached adapter into a slot is a copy.
"""

from __future__ import annotations

WORKER_METHOD = "adapterserve_pin_cpu"
ENGINE_UTILITY = "adapterserve_pin_lora"


def install() -> None:
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    setattr(WorkerWrapperBase, WORKER_METHOD, _pin_in_worker)
    setattr(EngineCore, ENGINE_UTILITY, _pin_in_engine)


async def pin_lora(client, lora_id: int) -> None:
    """From the API process: pin adapter `lora_id` (already added) in the engine's CPU cache."""
    results = await client.engine_core.call_utility_async(ENGINE_UTILITY, lora_id)
    if not all(results):
        raise RuntimeError(f"adapter id {lora_id} is not in the engine's CPU cache")


def _pin_in_engine(core, lora_id: int) -> list[bool]:
    return core.model_executor.collective_rpc(WORKER_METHOD, args=(lora_id,))


def _pin_in_worker(wrapper, lora_id: int) -> bool:
    worker = getattr(wrapper, "worker", wrapper)
    manager = getattr(getattr(worker.model_runner, "lora_manager", None), "_adapter_manager", None)
    if manager is None or lora_id not in manager.list_adapters():
        return False
    manager._registered_adapters.pin(lora_id)
    return True
