"""The adapters an engine serves by name: vLLM's `lora_requests` table, changed with vLLM's
own per-name locking.

vLLM's serving models (`OpenAIServingModels`) keep the name -> LoRARequest table and
change it under a per-name lock (`lora_resolver_lock`) in their load, unload and resolve
paths. The host loads every version of an adapter under a fresh id (vLLM's in-place
reload reuses the id, so a running request could meet new weights mid-generation, and
its prefix-cache key would not change), and takes the same lock: a load, a reload and an
unload of one name never interleave, on our side or vLLM's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

# A freed version waits this long for the requests of its name to end. Past it, the old id
# is removed anyway: a request still using it makes vLLM load it again from its snapshot.
DRAIN_S = 30.0


def _models(engine):
    return engine.serving("models")


async def publish(engine, request, load: Callable[[object], Awaitable[object]]):
    """Load `request` into the engine with `load`, then serve it under its name; returns
    the version it replaced (to be freed), if any. Requests already running keep the id
    they started with."""
    models = _models(engine)
    async with models.lora_resolver_lock[request.lora_name]:
        await load(request)
        previous = models.lora_requests.get(request.lora_name)
        models.lora_requests[request.lora_name] = request
    return previous


async def unpublish(engine, name: str):
    """Stop serving `name`; returns the version that served (to be freed), if any."""
    models = _models(engine)
    async with models.lora_resolver_lock[name]:
        return models.lora_requests.pop(name, None)


def withdraw(engine, name: str):
    """Stop serving `name` at once, from synchronous code (no await: atomic on the loop)."""
    return _models(engine).lora_requests.pop(name, None)


def in_flight(engine, name: str) -> int:
    """Requests of adapter `name` the engine is running or has waiting."""
    processor = getattr(engine.client, "output_processor", None)
    states = getattr(processor, "request_states", None) or {}
    return sum(1 for state in list(states.values()) if getattr(state, "lora_name", None) == name)


async def free(engine, request, drain_s: float = DRAIN_S) -> None:
    """Remove a version that no longer serves from the engine's slots and CPU cache, once
    the requests of its name have ended (bounded by `drain_s`). vLLM's own unload only
    drops the name, so the weights would stay until LRU eviction (forever when pinned)."""
    deadline = time.monotonic() + drain_s
    while in_flight(engine, request.lora_name) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    client = engine.client
    if client is None or getattr(client, "errored", False):
        return  # a restarted engine never had it
    try:
        await client.remove_lora(request.lora_int_id)
    except Exception as exc:  # a dead or restarting engine: nothing left to free
        log.warning("could not free adapter %r (id %d): %s", request.lora_name, request.lora_int_id, exc)


async def pin(engine, request) -> None:
    """Keep the version in the engine's CPU cache, never evicted (engine_plugins/pinning.py
    says why not in a slot too, as vLLM's own pin does)."""
    from adapterserve.engine_plugins.pinning import pin_lora

    await pin_lora(engine.client, request.lora_int_id)


def snapshot_paths(engine) -> set[str]:
    """The folders of every version the engine serves under a name."""
    return {str(request.lora_path) for request in list(_models(engine).lora_requests.values())}


def current(engine, name: str):
    """The version serving `name` now, or None."""
    return _models(engine).lora_requests.get(name)


def is_published(engine, name: str) -> bool:
    return name in _models(engine).lora_requests


def published(engine) -> dict[int, str]:
    """Adapter id -> name, for the adapters the engine serves now."""
    return {request.lora_int_id: name for name, request in _models(engine).lora_requests.items()}
