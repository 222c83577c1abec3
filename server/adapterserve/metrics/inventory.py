"""What a host serves, as the metrics see it: its tasks, their storage, the adapters' names.

A task is what a client names in `model`: an adapter in shared mode, a full model in
dedicated mode. Both modes are described with the same `Task`, so the cost of the other
mode can be derived (server/adapterserve/metrics/costs.py). Everything is read through the
Host protocol; the sizes were read once, when each task was registered.
"""

from __future__ import annotations

from dataclasses import dataclass

from adapterserve.dtypes import dtype_bytes

from .costs import Task


@dataclass
class Stored:
    task: str
    kind: str  # "adapter" or "full_model"
    bytes: int


def tasks(host) -> list[Task]:
    element = dtype_bytes(host.settings.dtype)
    return [Task(t.name, t.kind, t.adapter_elements * element) for t in host.tasks()]


def storage(host) -> list[Stored]:
    """Each task's folder on disk (adapter folders in shared mode, model folders in dedicated)."""
    return [Stored(t.name, t.storage, t.storage_bytes) for t in host.tasks()]
