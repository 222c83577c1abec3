"""What a host serves, as the metrics see it: its tasks, their storage, the adapters' names.

A task is what a client names in `model`: an adapter in shared mode, a full model in
dedicated mode. Both modes are described with the same `Task`, so the cost of the other
mode can be derived (server/adapterserve/metrics/costs.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .costs import Task
from .memory import dtype_bytes, folder_bytes, safetensors_elements


@dataclass
class Stored:
    task: str
    kind: str  # "adapter" or "full_model"
    bytes: int


def tasks(host) -> list[Task]:
    element = dtype_bytes(host.settings.dtype)
    if host.mode == "shared":
        return [Task(r.name, r.kind, r.trainable_params * element) for r in host.registry.adapters.values()]
    return [Task(m.name, m.kind, merged_adapter_elements(m.path) * element) for m in host.models.values()]


def storage(host) -> list[Stored]:
    """Each task's folder on disk (adapter folders in shared mode, model folders in dedicated)."""
    if host.mode == "shared":
        return [Stored(r.name, "adapter", folder_bytes(r.path)) for r in host.registry.adapters.values()]
    return [Stored(m.name, "full_model", folder_bytes(m.path)) for m in host.models.values()]


def base_storage_bytes(host) -> int:
    """Shared mode's base model folder on disk (dedicated mode has no base of its own)."""
    return folder_bytes(host.base_path) if host.mode == "shared" else 0


def weights_elements(host, engine) -> int:
    """Elements of the weights the engine loads, from its safetensors headers."""
    return safetensors_elements(engine.spec.model_path)


def adapter_names(engine) -> dict[int, str]:
    """Adapter id -> name, for the adapters the engine publishes now."""
    models = engine.serving("models")
    requests = getattr(models, "lora_requests", None) or {}
    return {request.lora_int_id: name for name, request in requests.items()}


def merged_adapter_elements(model_path: Path) -> int:
    """A merged full model records the adapter it came from; its weights' elements (0 if unknown)."""
    from adapterserve.training.merge import MERGE_INFO

    info = Path(model_path) / MERGE_INFO
    try:
        source = json.loads(info.read_text()).get("source", "")
    except (OSError, ValueError):
        return 0
    adapter = Path(source.rsplit(":", 2)[0])
    return safetensors_elements(adapter) if adapter.is_dir() else 0
