"""The demo adapters: built from the recipes in adapters/ into the cache, once per base.

A built adapter records its recipe's fingerprint; when the recipe or its data change, it
is built again. Builds go to a temporary folder first, so an interrupted build never
leaves a half-written adapter in the store.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from .lora import progress_bar, train_lora
from .recipes import Recipe, demo_recipes

log = logging.getLogger(__name__)

BUILD_INFO = "adapterserve-build.json"


def demo_store(cache_dir: Path, base_path: Path) -> Path:
    """Where the demo adapters for this base are built (one store per base)."""
    return Path(cache_dir) / "adapters" / Path(base_path).name


def is_built(folder: Path, recipe: Recipe) -> bool:
    info = folder / BUILD_INFO
    if not info.is_file():
        return False
    try:
        return json.loads(info.read_text()).get("fingerprint") == recipe.fingerprint()
    except ValueError:
        return False


def build(recipe: Recipe, base_path: Path, store: Path, progress=None) -> dict:
    target = store / recipe.name
    staging = store / f".building-{recipe.name}"
    shutil.rmtree(staging, ignore_errors=True)
    if recipe.kind == "head":
        from .heads import train_head

        stats = train_head(base_path, recipe, staging, progress)
    else:
        stats = train_lora(base_path, recipe, staging, progress)
    stats.update(fingerprint=recipe.fingerprint(), recipe=recipe.name, kind=recipe.kind, base=str(base_path))
    (staging / BUILD_INFO).write_text(json.dumps(stats, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return stats


def build_demo_adapters(
    recipes_dir: Path, cache_dir: Path, base_path: Path, names: list[str] | None = None, force: bool = False
) -> dict[str, dict]:
    """Build the named demo adapters (all when none are named) that are missing or stale."""
    store = demo_store(cache_dir, base_path)
    store.mkdir(parents=True, exist_ok=True)
    recipes = demo_recipes(recipes_dir)
    known = {r.name for r in recipes}
    unknown = sorted(set(names or []) - known)
    if unknown:
        raise ValueError(f"no demo recipe named {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    wanted = [r for r in recipes if not names or r.name in names]
    todo = [r for r in wanted if force or not is_built(store / r.name, r)]
    built: dict[str, dict] = {}
    if todo:
        with progress_bar() as progress:
            for recipe in todo:
                built[recipe.name] = build(recipe, base_path, store, progress)
                log.info("built demo adapter %s: %s", recipe.name, built[recipe.name])
    return built


def ensure_demo_adapters(settings, base_path: Path) -> Path:
    """The demo store for this base, with every demo adapter built."""
    build_demo_adapters(settings.demo_recipes_dir, settings.cache_dir, base_path)
    return demo_store(settings.cache_dir, base_path)
