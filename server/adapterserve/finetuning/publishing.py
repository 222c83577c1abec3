"""Serving what a job trained, per mode: the step after a job's training and before it
succeeds. Shared mode publishes an adapter (into the fine-tuned adapter store, one of the
registry's sources, then loaded by the host); on Ray Serve into an S3 source every
replica reads (then loaded by every replica); dedicated mode publishes a full model (into
the fine-tuned model folder, then hosted by an engine of its own). Either way the folder
goes in whole, and a refusal removes it again: no half-registered model. An adapter is
signed first where the server has a signing key (`fine_tuning_signing_key`): a server that
serves only signed adapters serves what it trained itself."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path


async def _signed(trained: Path, signing_key: Path | None) -> Path:
    """`trained` with its `model.sig` by `signing_key` (none without a key)."""
    if signing_key is not None:
        from adapterserve.registry.signing import sign_folder

        await asyncio.to_thread(sign_folder, trained, signing_key)
    return trained


class AdapterPublisher:
    """Shared mode: the trained adapter, loaded by the shared host."""

    full = False  # the trainer trains adapters (LoRA, heads)

    def __init__(self, host, folder: Path, signing_key: Path | None = None):
        self.host, self.folder, self.signing_key = host, Path(folder), signing_key

    async def publish(self, name: str, trained: Path) -> None:
        target = _move_in(await _signed(trained, self.signing_key), self.folder / name)
        try:
            await self.host.load_adapter(name)
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise

    async def withdraw(self, name: str) -> None:
        await self.host.unload_adapter(name)
        shutil.rmtree(self.folder / name, ignore_errors=True)


class SourcePublisher:
    """Ray Serve: the trained adapter uploaded to the S3 source every replica reads
    (`--fine-tuning-adapter-source`), then loaded by every replica from there."""

    full = False

    def __init__(self, host, source_spec: str, timeout_s: float, signing_key: Path | None = None):
        from adapterserve.registry.sources import open_source

        self.host, self.source, self.signing_key = host, open_source(source_spec, timeout_s), signing_key

    async def publish(self, name: str, trained: Path) -> None:
        await asyncio.to_thread(self.source.publish, name, await _signed(trained, self.signing_key))
        shutil.rmtree(trained, ignore_errors=True)
        try:
            await self.host.load_adapter(name)
        except BaseException:
            await asyncio.to_thread(self.source.withdraw, name)
            raise

    async def withdraw(self, name: str) -> None:
        await self.host.unload_adapter(name)
        await asyncio.to_thread(self.source.withdraw, name)


class FullModelPublisher:
    """Dedicated mode: the fully fine-tuned model, hosted on an engine of its own."""

    full = True  # the trainer trains every weight

    def __init__(self, host, folder: Path):
        self.host, self.folder = host, Path(folder)

    async def publish(self, name: str, trained: Path) -> None:
        from adapterserve.hosting.full_models import FullModel

        target = _move_in(trained, self.folder / name)
        try:
            await self.host.add_model(FullModel.read(target))
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise

    async def withdraw(self, name: str) -> None:
        await self.host.remove_model(name)
        shutil.rmtree(self.folder / name, ignore_errors=True)


def _move_in(trained: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    shutil.move(str(trained), str(target))
    return target
