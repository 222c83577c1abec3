"""The registry of adapters over the adapter sources (registry/sources/: a local store is
a directory whose every sub-folder is one adapter): the ones that passed validation, and
the ones that did not, with why. Bad adapters are reported and skipped; the others are served.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import EllipsisType

from .records import AdapterInvalid, AdapterRecord, BaseModelInfo, is_safe_name, printable
from .snapshots import SnapshotStore
from .sources import AdapterSource, Signature, all_signatures, first_holding, open_source
from .validation import Limits, validate_from

log = logging.getLogger(__name__)


@dataclass
class Problem:
    """An adapter folder that was refused, and why."""

    name: str
    path: Path | str  # a folder, or a remote source's URL
    reason: str


class Budget:
    """What one scan may spend validating adapters: at most `count` of them (None: any
    number) and `seconds` from its start (None: no time limit)."""

    def __init__(self, count: int | None, seconds: float | None):
        self.left = count
        self.ends = None if seconds is None else time.monotonic() + seconds

    def take(self) -> bool:
        """Whether one more adapter may be validated now (counted when it may)."""
        if (self.left is not None and self.left <= 0) or (self.ends is not None and time.monotonic() >= self.ends):
            return False
        if self.left is not None:
            self.left -= 1
        return True


@dataclass
class Registry:
    """The adapters that passed validation, by name, and the ones that did not, over the
    adapter sources (registry/sources/) in order: the first source wins on a name."""

    base: BaseModelInfo
    sources: list[AdapterSource]
    limits: Limits
    # Where validated copies are kept and served from; None validates the folders in
    # place (the read-only reports of the CLI), never for serving.
    snapshots: SnapshotStore | None = None
    # How many adapters, and for how long, a scan fetches and validates; the others are
    # only listed, and validated on their first request (None: no limit, as the CLI's
    # reports do).
    validated_at_start: int | None = None
    validation_budget_s: float | None = None
    adapters: dict[str, AdapterRecord] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    listed: dict[str, AdapterSource] = field(default_factory=dict)  # in a source, not validated yet
    holders: dict[str, AdapterSource] = field(default_factory=dict)  # name -> its source, at the last `signatures`
    # Every name's signature as the last `scan` found it before validating: the version it
    # validated, or an older one (which the next comparison then reloads), never a newer one.
    scanned: dict[str, Signature | None] = field(default_factory=dict)

    @property
    def stores(self) -> list[str]:
        """The sources as admins see them (and as the unloads file is keyed)."""
        return [source.describe() for source in self.sources]

    def scan(self) -> None:
        """(Re)discover every source; first source wins on duplicate names."""
        self.adapters.clear()
        self.problems.clear()
        self.listed.clear()
        # Listed before validating: a folder changed while the scan validates it (which may
        # take minutes over many adapters) then differs from what the next scan lists, and
        # is reloaded; listed after, the changed version would be taken for the one served.
        self.scanned = self.signatures()
        budget = Budget(self.validated_at_start, self.validation_budget_s)
        for source in self.sources:
            try:
                names = source.names()
            except OSError as exc:  # an unreadable source is reported, the others served
                self.problems.append(Problem(source.describe(), source.describe(), f"adapter store cannot be listed ({exc})"))
                continue
            for name in names:
                if budget.take():
                    self._admit(name, source)
                else:
                    self.list_only(name, source)
        for name in self.adapters:  # unreadable before its first fetch (a Hub repo not cached yet): read now
            if self.scanned.get(name) is None and name in self.holders:
                self.scanned[name] = self.holders[name].signature(name)
        if self.listed:
            log.info("%d adapters listed, to be validated on their first request", len(self.listed))
        for problem in self.problems:
            log.warning("adapter %r refused: %s", problem.name, printable(problem.reason))
        for record in self.adapters.values():
            for warning in record.warnings:
                log.warning("adapter %r: %s", record.name, printable(warning))

    def _admit(self, name: str, source: AdapterSource) -> AdapterRecord | None:
        if name in self.adapters:
            self.problems.append(Problem(name, source.location(name), f"duplicate name, already served from {self.adapters[name].path}"))
            return None
        try:
            record = validate_from(source, name, self.base, self.limits, self.snapshots)
        except AdapterInvalid as exc:
            self.problems.append(Problem(name, source.location(name), exc.reason))
            return None
        self.adapters[name] = record
        return record

    def list_only(self, name: str, source: AdapterSource) -> None:
        """Know `name` is in `source` without fetching it yet (refused names are not listed)."""
        if is_safe_name(name) and name != self.base.name and name not in self.adapters:
            self.listed.setdefault(name, source)

    def locate(self, name: str) -> AdapterSource | None:
        """The source holding adapter `name`, looked up by name only: a client never hands
        the server a path to read."""
        return first_holding(self.sources, name)

    def signatures(self) -> dict:
        """Every adapter name in the sources -> its current signature (one listing of each
        source); the source now holding each name is kept for `list_only`."""
        self.holders = {}
        return all_signatures(self.sources, self.holders)

    def validate(self, name: str, source: AdapterSource | None | EllipsisType = ...) -> AdapterRecord:
        """Validate `name` again from its source (for load and reload; None: the caller found
        it in no source; looked up when not given) without registering it; raise
        AdapterInvalid. The registered version, if any, stays as it is."""
        if source is ...:
            source = self.locate(name)
        if source is None:
            raise AdapterInvalid(name, "no such folder in the adapter stores")
        return validate_from(source, name, self.base, self.limits, self.snapshots)

    def register(self, record: AdapterRecord) -> None:
        self.adapters[record.name] = record
        self.listed.pop(record.name, None)
        self.problems = [p for p in self.problems if p.name != record.name]

    def remove(self, name: str) -> AdapterRecord | None:
        self.listed.pop(name, None)
        return self.adapters.pop(name, None)


def base_info(settings) -> BaseModelInfo:
    """The base model the settings name (the embedded default when none), read from disk."""
    from adapterserve.base_model import resolve_base_model

    path = resolve_base_model(settings.base_model, settings.models_dir)
    return BaseModelInfo.read(settings.served_model_name or path.name, path)


def limits_from(settings) -> Limits:
    from adapterserve.config import VLLM_LORA_RANKS
    from adapterserve.dtypes import resolve_dtype

    keys = tuple(str(Path(k).expanduser()) for k in settings.trusted_adapter_keys)
    missing = [k for k in keys if not Path(k).is_file()]
    if missing:
        raise ValueError(f"trusted adapter keys not found: {', '.join(missing)}")
    return Limits(
        # auto: any rank vLLM can serve; the host then fits the engine to the stores and
        # tightens this limit to the fitted rank (hosting/shared.py)
        max_lora_rank=settings.fixed_lora_rank or VLLM_LORA_RANKS[-1],
        max_cls_labels=settings.max_cls_labels,
        refuse_other_base=settings.base_mismatch.value == "refuse",
        served_dtype=resolve_dtype(settings.dtype),
        require_signed=settings.require_signed_adapters,
        trusted_keys=keys,
    )


def open_registry(settings, stores: list[Path | str], base: BaseModelInfo | None = None, serving: bool = False) -> Registry:
    """The scanned registry of these sources (directories or source URLs) over the
    settings' base, with its limits. `serving`: adapters are snapshotted into the server's
    cache and served from there."""
    registry = Registry(
        base=base or base_info(settings),
        sources=[open_source(s, settings.adapter_fetch_timeout_s) for s in stores],
        limits=limits_from(settings),
        snapshots=SnapshotStore(settings.snapshots_dir) if serving else None,
        validated_at_start=settings.adapters_validated_at_start if serving else None,
        validation_budget_s=settings.adapter_validation_budget_s if serving else None,
    )
    registry.scan()
    return registry
