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

        return DedicatedHost(settings, discover_models(settings.dedicated_models), observer=observer)

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
    from adapterserve.base_model import resolve_base_model
    from adapterserve.registry.records import BaseModelInfo
    from adapterserve.registry.store import open_registry

    base_path = resolve_base_model(settings.base_model, settings.models_dir)
    base_name = settings.served_model_name or Path(base_path).name
    stores: list[Path | str] = [*(Path(p) for p in settings.adapter_dirs), *settings.adapter_sources]
    if settings.mode.value == "shared":  # what fine-tuning jobs produce (finetuning/), served as any store
        from adapterserve.finetuning.service import adapters_dir

        fine_tuned = adapters_dir(settings.cache_dir, base_name)
        fine_tuned.mkdir(parents=True, exist_ok=True)
        stores.append(fine_tuned)
    if settings.demo_adapters:
        from adapterserve.training.demo import ensure_demo_adapters

        stores.append(ensure_demo_adapters(settings, base_path))
    registry = open_registry(settings, stores, base=BaseModelInfo.read(base_name, base_path), serving=True)
    return base_path, base_name, registry


def _merged_demo_host(settings: Settings, base_path: Path, registry, observer: HostObserver | None) -> Host:
    """Dedicated mode without model folders: every adapter merged into a full model."""
    from adapterserve.training.merge import merge_adapters, merged_store

    from .dedicated import DedicatedHost, discover_models

    merged = merge_adapters(base_path, list(registry.adapters.values()), merged_store(settings.cache_dir, base_path))
    return DedicatedHost(settings, discover_models(list(merged.values())), observer=observer)
