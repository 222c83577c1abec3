"""The fine-tuning API's parts for one server: the store (SQLite and files), the job
runner with where its trainers run (this machine, or Ray tasks on Ray Serve), the
publisher of what jobs train, and what the checks need of the base (its tokenizer, its
module names). Opened by the app's lifespan.

Everything lives under `fine_tuning_root(settings) / <base>`: the database and uploaded
files, each job's work folder, and what succeeded jobs produced (`adapters/` in shared
mode, a store the registry reads like any other; `models/` in dedicated mode, full model
folders the dedicated host serves)."""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path

from .launchers import LocalLauncher
from .publishing import AdapterPublisher, FullModelPublisher, SourcePublisher
from .runner import JobRunner
from .serving_first import engines_busy
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
        key = settings.fine_tuning_signing_key
        if host.remote_engines:  # Ray Serve: trained in Ray tasks, published to the source the replicas read
            self.publisher = SourcePublisher(host, settings.fine_tuning_adapter_source, settings.adapter_fetch_timeout_s, key)
            launcher = host.fine_tuning_launcher()  # rayserve/fine_tuning.py: only rayserve/ imports Ray
        elif host.mode == "shared":
            self.publisher, launcher = AdapterPublisher(host, adapters_dir(settings, base_name), key), LocalLauncher(settings)
        else:
            self.publisher, launcher = FullModelPublisher(host, models_dir(settings, base_name)), LocalLauncher(settings)
        busy = None
        if settings.fine_tuning_pauses_while_serving and not host.remote_engines:
            busy = lambda: engines_busy(host)  # noqa: E731
        self.runner = JobRunner(settings, self.store, self.publisher, self.base_path, base_name, launcher, busy)

    @property
    def unsignable(self) -> str | None:
        """Why a job's adapter could not be served here (only signed adapters serve, and
        this server has no trusted key to sign it with), or None. Full models (dedicated
        mode) are not adapters: no signature is asked of them."""
        settings = self.settings
        if self.full or not settings.require_signed_adapters:
            return None
        if settings.fine_tuning_signing_key is None:
            return ("This server serves only signed adapters (require_signed_adapters) and has no "
                    "fine_tuning_signing_key to sign what a job trains.")
        from adapterserve.registry.signing import trusts_signer

        try:
            trusted = trusts_signer(settings.fine_tuning_signing_key, tuple(str(k) for k in settings.trusted_adapter_keys))
        except (OSError, ValueError, TypeError) as exc:  # a missing or unreadable key file
            return f"fine_tuning_signing_key cannot be used: {type(exc).__name__}: {exc}"
        return None if trusted else "The public key of fine_tuning_signing_key is not one of trusted_adapter_keys."

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
    """The fine-tuning API of a host with a base to train from (shared mode: its base;
    dedicated mode: the base its models were merged from, or `--base-model`; Ray Serve:
    the replicas' base, with `--fine-tuning-adapter-source`); None elsewhere: the
    endpoints then answer that fine-tuning is not available."""
    if host.remote_engines:
        if settings.fine_tuning_adapter_source is None:
            log.info("fine-tuning is not available on Ray Serve without --fine-tuning-adapter-source")
            return None
        import asyncio

        from adapterserve.base_model import resolve_base_model

        # the checks read the base's tokenizer here; the Ray tasks resolve it on their nodes
        base = (await asyncio.to_thread(resolve_base_model, settings.base_model, settings.models_dir), host.base_name)
    elif host.mode == "shared":
        base = (host.weights_path, host.base_name)
    else:
        base = host.trainable_base
    if base is None:
        log.info("fine-tuning is not available: dedicated mode with model folders and no --base-model")
        return None
    fine_tuning = FineTuning(settings, host, *base)
    await fine_tuning.runner.start()
    return fine_tuning
