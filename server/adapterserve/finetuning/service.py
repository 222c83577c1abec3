"""The fine-tuning API's parts for one server: the store (SQLite and files), the job
runner, the publisher of what jobs train, and what the checks need of the base (its
tokenizer, its module names). Opened by the app's lifespan for a host on this machine.

Everything lives under `fine_tuning_root(settings) / <base>`: the database and uploaded
files, each job's work folder, and what succeeded jobs produced (`adapters/` in shared
mode, a store the registry reads like any other; `models/` in dedicated mode, full model
folders the dedicated host serves)."""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path

from .publishing import AdapterPublisher, FullModelPublisher
from .runner import JobRunner
from .store import FineTuningStore

log = logging.getLogger(__name__)


def fine_tuning_root(settings, base_name: str) -> Path:
    return Path(settings.fine_tuning_dir or Path(settings.cache_dir) / "fine_tuning") / base_name


def adapters_dir(settings, base_name: str) -> Path:
    """Where succeeded jobs' adapters are kept (shared mode)."""
    return fine_tuning_root(settings, base_name) / "adapters"


def models_dir(settings, base_name: str) -> Path:
    """Where succeeded jobs' full models are kept (dedicated mode)."""
    return fine_tuning_root(settings, base_name) / "models"


class FineTuning:
    def __init__(self, settings, host, base_path: Path, base_name: str):
        self.settings = settings
        self.host = host
        self.base_path, self.base_name = Path(base_path), base_name
        self.store = FineTuningStore(fine_tuning_root(settings, base_name))
        if host.mode == "shared":
            self.publisher = AdapterPublisher(host, adapters_dir(settings, base_name))
        else:
            self.publisher = FullModelPublisher(host, models_dir(settings, base_name))
        self.runner = JobRunner(settings, self.store, self.publisher, self.base_path, base_name)

    @property
    def full(self) -> bool:
        """Whether jobs train every weight (dedicated mode) or adapters (shared mode)."""
        return self.publisher.full

    @cache
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.base_path)

    @cache
    def module_names(self) -> set[str]:
        from adapterserve.registry.records import BaseModelInfo

        return BaseModelInfo.read(self.base_name, self.base_path).module_leaf_names

    async def stop(self) -> None:
        await self.runner.stop()


async def open_fine_tuning(settings, host) -> FineTuning | None:
    """The fine-tuning API of a host on this machine with a base to train from (shared
    mode: its base; dedicated mode: the base its models were merged from, or
    `--base-model`); None elsewhere (Ray Serve, a dedicated host with no base): the
    endpoints then answer that fine-tuning is not available."""
    if host.remote_engines:
        return None
    base = (host.weights_path, host.base_name) if host.mode == "shared" else host.trainable_base
    if base is None:
        log.info("fine-tuning is not available: dedicated mode with model folders and no --base-model")
        return None
    fine_tuning = FineTuning(settings, host, *base)
    await fine_tuning.runner.start()
    return fine_tuning
