"""Start-up's slow work on disk, made stoppable: converting the embedded base model,
training the demo adapters, merging adapters into full models for the dedicated mode.

It runs in a child process (spawned, as vLLM starts its engines), and only when something
is missing: a prepared server starts without it. In the server's process, torch would hold
the event loop (or, in a thread, the process's exit) for the minutes a training takes, and
SIGTERM would wait for it; a child is stopped by its process id at once. Every step writes
into a staging folder and renames it when complete, so a stopped step leaves nothing
half-made behind and is simply done again at the next start.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing

from adapterserve.config import Settings

log = logging.getLogger(__name__)

# SIGTERM first, SIGKILL after this many seconds (a training step ends within one).
STOP_WAIT_S = 3.0


class PreparationFailed(RuntimeError):
    """The child process preparing the models and adapters failed (its log says why)."""


def pending(settings: Settings) -> list[str]:
    """What start-up still has to make on disk (cheap checks: no torch, no validation)."""
    from adapterserve.base_model import default_model_dir, is_prepared
    from adapterserve.training.demo import demo_store, is_built
    from adapterserve.training.recipes import demo_recipes

    if settings.mode.value == "dedicated" and settings.dedicated_models:
        return []  # the given full models are served as they are
    todo = []
    base_path = settings.base_model or default_model_dir(settings.models_dir)
    if settings.base_model is None and not is_prepared(base_path):
        todo.append("the embedded base model")
    if settings.demo_adapters:
        store = demo_store(settings.cache_dir, base_path)
        todo += [f"demo adapter {r.name}" for r in demo_recipes(settings.demo_recipes_dir) if not is_built(store / r.name, r)]
    if settings.mode.value == "dedicated":
        # which adapters need merging is known only after validating them: the child checks
        todo.append("merged models")
    return todo


def _prepare(values: dict) -> None:
    """The child's work (its entry point): what `build_host` would otherwise make itself."""
    from adapterserve.hosting.builder import prepare_on_disk

    settings = Settings(**values)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    prepare_on_disk(settings)


async def prepare(settings: Settings) -> None:
    """Make what is missing, in a child process; cancelling this stops the child (by its
    process id) and returns once it is gone."""
    todo = pending(settings)
    if not todo:
        return
    log.info("preparing %s (in a child process)", ", ".join(todo))
    child = multiprocessing.get_context("spawn").Process(
        target=_prepare, args=(settings.model_dump(),), name="adapterserve-prepare", daemon=True,
    )
    child.start()
    try:
        while child.is_alive():  # polled: join() in a thread could not be cancelled
            await asyncio.sleep(0.2)
    except asyncio.CancelledError:
        log.info("stopping the preparation (process %d)", child.pid)
        await asyncio.to_thread(_stop, child)
        raise
    if child.exitcode != 0:
        raise PreparationFailed(f"preparing {', '.join(todo)} failed (exit code {child.exitcode}); see the log above")


def _stop(child) -> None:
    child.terminate()
    child.join(STOP_WAIT_S)
    if child.is_alive():
        child.kill()
        child.join()
