"""The tasks `compare` runs through both modes, laid out for each.

A task is one adapter (shared mode) and the full model merged from it (dedicated mode),
under the same name. Asking for more tasks than there are adapters repeats them under new
names (`pirate-2`): to both modes each name is a task of its own (its own adapter slot
and cache entry, or its own engine). One more task, `added-task`, is kept aside to
measure what adding a task costs."""

from __future__ import annotations

import itertools
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from adapterserve.metrics.memory import folder_bytes
from adapterserve.registry.records import AdapterRecord

ADDED_TASK = "added-task"
KINDS = ("all", "lora", "head")


@dataclass
class Task:
    name: str
    kind: str  # "lora" or "head"
    rank: int
    adapter: Path  # the adapter folder as the shared server sees it
    full_model: Path  # the merged full model as the dedicated server sees it

    @property
    def adapter_bytes(self) -> int:
        return folder_bytes(self.adapter)

    @property
    def full_model_bytes(self) -> int:
        return folder_bytes(self.full_model.resolve())

    def row(self) -> dict:
        return {
            "name": self.name, "kind": self.kind, "rank": self.rank,
            "adapter_bytes": self.adapter_bytes, "full_model_bytes": self.full_model_bytes,
        }


@dataclass
class TaskSet:
    tasks: list[Task]
    added: Task  # not served at start; added while serving
    adapter_store: Path  # the shared server's store (the tasks only)
    added_source: Path  # the added task's adapter, copied into the store when it is added

    @property
    def generative(self) -> list[str]:
        return [t.name for t in self.tasks if t.kind == "lora"]

    @property
    def heads(self) -> list[str]:
        return [t.name for t in self.tasks if t.kind == "head"]


def choose(records: list[AdapterRecord], count: int | None, kind: str) -> list[tuple[str, AdapterRecord]]:
    """`count` tasks (all when None): LoRA adapters first, then heads, each by name;
    repeated under new names when `count` is larger than the adapters there are."""
    pool = sorted((r for r in records if kind in ("all", r.kind)), key=lambda r: (r.kind != "lora", r.name))
    if not pool:
        raise ValueError(f"no adapter of kind {kind!r} to compare with")
    count = len(pool) if count is None else count
    chosen = []
    for i, record in zip(range(count), itertools.cycle(pool)):
        copy = i // len(pool)
        chosen.append((record.name if copy == 0 else f"{record.name}-{copy + 1}", record))
    return chosen


def lay_out(chosen: list[tuple[str, AdapterRecord]], merged: dict[str, Path], workdir: Path) -> TaskSet:
    """Copy the adapters into a store of their own (they are small) and link the merged
    models (they are not) under the task names."""
    store, models, aside = workdir / "adapters", workdir / "models", workdir / "added"
    for folder in (store, models, aside):
        folder.mkdir(parents=True, exist_ok=True)

    def place(name: str, record: AdapterRecord, adapter_dir: Path) -> Task:
        shutil.copytree(record.path, adapter_dir / name, dirs_exist_ok=True)
        link = models / name
        if not link.exists():
            os.symlink(merged[record.name].resolve(), link)
        return Task(name, record.kind, record.rank, adapter_dir / name, link)

    tasks = [place(name, record, store) for name, record in chosen]
    added = place(ADDED_TASK, chosen[0][1], aside)
    return TaskSet(tasks, added, store, added.adapter)


def fitting_lora_rank(ranks: list[int]) -> int:
    """The smallest rank vLLM accepts as --max-lora-rank that holds every task's rank:
    the engine preallocates slots of this rank, so a larger one only costs memory."""
    allowed = (8, 16, 32, 64, 128, 256, 320, 512)  # vLLM 0.32's MaxLoRARanks, 1 aside
    need = max(ranks, default=8)
    return next((r for r in allowed if r >= need), need)
