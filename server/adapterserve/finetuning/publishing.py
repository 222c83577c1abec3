"""Serving what a job trained, per mode: the step after a job's training and before it
succeeds. Shared mode publishes an adapter (into the fine-tuned adapter store, one of the
registry's sources, then loaded by the host); dedicated mode publishes a full model (into
the fine-tuned model folder, then hosted by an engine of its own). Either way the folder
is moved in whole, and a refusal removes it again: no half-registered model."""

from __future__ import annotations

import shutil
from pathlib import Path


class AdapterPublisher:
    """Shared mode: the trained adapter, loaded by the shared host."""

    full = False  # the trainer trains adapters (LoRA, heads)

    def __init__(self, host, folder: Path):
        self.host, self.folder = host, Path(folder)

    async def publish(self, name: str, trained: Path) -> None:
        target = _move_in(trained, self.folder / name)
        try:
            await self.host.load_adapter(name)
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise

    async def withdraw(self, name: str) -> None:
        await self.host.unload_adapter(name)
        shutil.rmtree(self.folder / name, ignore_errors=True)


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
