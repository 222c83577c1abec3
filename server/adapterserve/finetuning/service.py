"""The fine-tuning API's parts for one server: the store (SQLite and files), the job
runner, and what the checks need of the base (its tokenizer, its module names). Opened by
the app's lifespan for a shared-mode host on this machine; the fine-tuned adapters live in
a store folder the host's registry reads like any other (`adapters_dir`)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from .runner import JobRunner
from .store import FineTuningStore


def adapters_dir(cache_dir: Path, base_name: str) -> Path:
    """Where succeeded jobs' adapters are kept: a local adapter store of the shared host."""
    return Path(cache_dir) / "fine_tuned" / base_name


class FineTuning:
    def __init__(self, settings, host):
        self.settings = settings
        self.host = host
        self.store = FineTuningStore(Path(settings.cache_dir) / "fine_tuning" / host.base_name)
        self.runner = JobRunner(settings, self.store, host, adapters_dir(settings.cache_dir, host.base_name))

    @cache
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.host.weights_path)

    @cache
    def module_names(self) -> set[str]:
        from adapterserve.registry.records import BaseModelInfo

        return BaseModelInfo.read(self.host.base_name, self.host.weights_path).module_leaf_names

    async def stop(self) -> None:
        await self.runner.stop()


async def open_fine_tuning(settings, host) -> FineTuning | None:
    """The fine-tuning API of a shared-mode host on this machine; None elsewhere (dedicated
    mode and Ray Serve answer that fine-tuning is not available)."""
    if host.mode != "shared" or host.remote_engines:
        return None
    fine_tuning = FineTuning(settings, host)
    await fine_tuning.runner.start()
    return fine_tuning
