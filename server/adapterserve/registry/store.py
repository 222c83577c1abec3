"""Adapter stores on disk: discovery of the folders in them, and the registry of the valid ones.

A store is a directory; each sub-folder is one adapter, served under the folder's name.
Bad folders are reported and skipped; the others are served.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from .records import AdapterInvalid, AdapterRecord, BaseModelInfo, printable
from .snapshots import SnapshotStore
from .validation import Limits, validate_adapter

log = logging.getLogger(__name__)


def find_folder(stores: list[Path], name: str) -> tuple[Path, Path] | None:
    """The (folder, store) holding adapter `name`, looked up by name only: a client never
    hands the server a path to read."""
    for store in stores:
        folder = store / name
        if folder.exists() or folder.is_symlink():
            return folder, store
    return None


@dataclass
class Problem:
    """An adapter folder that was refused, and why."""

    name: str
    path: Path
    reason: str


@dataclass
class Registry:
    """The adapters that passed validation, by name, and the folders that did not."""

    base: BaseModelInfo
    stores: list[Path]
    limits: Limits
    # Where validated copies are kept and served from; None validates the folders in
    # place (the read-only reports of the CLI), never for serving.
    snapshots: SnapshotStore | None = None
    adapters: dict[str, AdapterRecord] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    def scan(self) -> None:
        """(Re)discover every store; first store wins on duplicate names."""
        self.adapters.clear()
        self.problems.clear()
        for store in self.stores:
            try:
                folders = candidate_folders(store)
            except OSError as exc:  # an unreadable store is reported, the others served
                self.problems.append(Problem(store.name, store, f"adapter store cannot be listed ({exc})"))
                continue
            for folder in folders:
                self._admit(folder, store)
        for problem in self.problems:
            log.warning("adapter %r refused: %s", problem.name, printable(problem.reason))
        for record in self.adapters.values():
            for warning in record.warnings:
                log.warning("adapter %r: %s", record.name, printable(warning))

    def _admit(self, folder: Path, store: Path) -> AdapterRecord | None:
        name = folder.name
        if name in self.adapters:
            self.problems.append(Problem(name, folder, f"duplicate name, already served from {self.adapters[name].path}"))
            return None
        try:
            record = validate_adapter(folder, store, self.base, self.limits, self.snapshots)
        except AdapterInvalid as exc:
            self.problems.append(Problem(name, folder, exc.reason))
            return None
        self.adapters[name] = record
        return record

    def find_folder(self, name: str) -> tuple[Path, Path] | None:
        return find_folder(self.stores, name)

    def validate(self, name: str) -> AdapterRecord:
        """Validate `name` again from its store (for load and reload) without registering
        it; raise AdapterInvalid. The registered version, if any, stays as it is."""
        found = self.find_folder(name)
        if found is None:
            raise AdapterInvalid(name, "no such folder in the adapter stores")
        folder, store = found
        return validate_adapter(folder, store, self.base, self.limits, self.snapshots)

    def register(self, record: AdapterRecord) -> None:
        self.adapters[record.name] = record
        self.problems = [p for p in self.problems if p.name != record.name]

    def remove(self, name: str) -> AdapterRecord | None:
        return self.adapters.pop(name, None)


def candidate_folders(store: Path) -> list[Path]:
    """Every entry of a store that could be an adapter (hidden entries are skipped)."""
    store = Path(store)
    if not store.is_dir():
        log.warning("adapter store %s does not exist", store)
        return []
    return sorted(
        entry for entry in store.iterdir() if not entry.name.startswith(".") and (entry.is_dir() or entry.is_symlink())
    )


def base_info(settings) -> BaseModelInfo:
    """The base model the settings name (the embedded default when none), read from disk."""
    from adapterserve.base_model import resolve_base_model

    path = resolve_base_model(settings.base_model, settings.models_dir)
    return BaseModelInfo.read(settings.served_model_name or path.name, path)


def limits_from(settings) -> Limits:
    from adapterserve.config import VLLM_LORA_RANKS
    from adapterserve.dtypes import resolve_dtype

    return Limits(
        # auto: any rank vLLM can serve; the host then fits the engine to the stores and
        # tightens this limit to the fitted rank (hosting/shared.py)
        max_lora_rank=settings.fixed_lora_rank or VLLM_LORA_RANKS[-1],
        max_cls_labels=settings.max_cls_labels,
        refuse_other_base=settings.base_mismatch.value == "refuse",
        served_dtype=resolve_dtype(settings.dtype),
    )


def open_registry(settings, stores: list[Path], base: BaseModelInfo | None = None, serving: bool = False) -> Registry:
    """The scanned registry of these stores over the settings' base, with its limits.
    `serving`: adapters are snapshotted into the server's cache and served from there."""
    registry = Registry(
        base=base or base_info(settings),
        stores=[Path(s).expanduser().resolve() for s in stores],
        limits=limits_from(settings),
        snapshots=SnapshotStore(settings.snapshots_dir) if serving else None,
    )
    registry.scan()
    return registry
