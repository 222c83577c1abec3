"""Start-up composition in one place: the host (and what it needs) for a set of settings.

Shared mode: the base (the embedded model prepared on first use, or a local folder), the
adapter stores (plus the demo adapters, trained on first use) opened through the
registry's own constructor, with server-owned snapshots. Dedicated mode: the given full
model folders, or the demo adapters merged into full models on first use. The engines are
started later, by the app's lifespan.
"""

from __future__ import annotations

from pathlib import Path

from adapterserve.config import Settings

from .protocol import Host, HostObserver


def build_host(settings: Settings, observer: HostObserver | None = None) -> Host:
    """The real host for these settings: prepares the base, builds and validates adapters."""
    if settings.mode.value == "dedicated" and settings.dedicated_models:
        from .dedicated import DedicatedHost, discover_models

        base = _named_base(settings) if settings.base_model is not None else None  # what fine-tuning jobs train from
        models = discover_models([*settings.dedicated_models, *_fine_tuned_models(settings, base)])
        return DedicatedHost(settings, models, observer=observer, trainable_base=base)

    base_path, base_name, registry = _open_stores(settings)
    if settings.mode.value == "dedicated":
        return _merged_demo_host(settings, base_path, registry, observer)
    from .shared import SharedBaseHost

    return SharedBaseHost(settings, base_path, base_name, registry, observer=observer)


def prepare_on_disk(settings: Settings) -> None:
    """Make on disk everything `build_host` needs for these settings (the embedded base,
    the demo adapters, the merged models), without building the host: the slow part of
    start-up, run by hosting/preparation.py in a process of its own."""
    if settings.mode.value == "dedicated" and settings.dedicated_models:
        return
    base_path, _, registry = _open_stores(settings)
    if settings.mode.value == "dedicated":
        from adapterserve.training.merge import merge_adapters, merged_store

        merge_adapters(base_path, list(registry.adapters.values()), merged_store(settings.cache_dir, base_path))


def _open_stores(settings: Settings):
    """The base (prepared on first use), its name, and the registry of the adapter stores
    (plus the demo adapters, trained on first use), served from snapshots."""
    from adapterserve.registry.records import BaseModelInfo
    from adapterserve.registry.store import open_registry

    base_path, base_name = _named_base(settings)
    stores: list[Path | str] = [*(Path(p) for p in settings.adapter_dirs), *settings.adapter_sources]
    if settings.mode.value == "shared":  # what fine-tuning jobs produce (finetuning/), served as any store
        from adapterserve.finetuning.service import adapters_dir

        fine_tuned = adapters_dir(settings, base_name)
        fine_tuned.mkdir(parents=True, exist_ok=True)
        stores.append(fine_tuned)
    if settings.demo_adapters:
        from adapterserve.training.demo import ensure_demo_adapters

        stores.append(ensure_demo_adapters(settings, base_path))
    registry = open_registry(settings, stores, base=BaseModelInfo.read(base_name, base_path), serving=True)
    return base_path, base_name, registry


def _named_base(settings: Settings) -> tuple[Path, str]:
    """The base (the embedded model prepared on first use, or a local folder) and its name."""
    from adapterserve.base_model import resolve_base_model

    base_path = resolve_base_model(settings.base_model, settings.models_dir)
    return base_path, settings.served_model_name or Path(base_path).name


def _fine_tuned_models(settings: Settings, base: tuple[Path, str] | None) -> list[Path]:
    """The full models earlier fine-tuning jobs produced from this base (dedicated mode)."""
    if base is None:
        return []
    from adapterserve.finetuning.service import models_dir

    folder = models_dir(settings, base[1])
    return [folder] if folder.is_dir() and any((p / "config.json").is_file() for p in folder.iterdir()) else []


def _merged_demo_host(settings: Settings, base_path: Path, registry, observer: HostObserver | None) -> Host:
    """Dedicated mode without model folders: every adapter merged into a full model."""
    from adapterserve.training.merge import merge_adapters, merged_store

    from .dedicated import DedicatedHost, discover_models

    base = (base_path, registry.base.name)
    merged = merge_adapters(base_path, list(registry.adapters.values()), merged_store(settings.cache_dir, base_path))
    models = discover_models([*merged.values(), *_fine_tuned_models(settings, base)])
    return DedicatedHost(settings, models, observer=observer, trainable_base=base)
