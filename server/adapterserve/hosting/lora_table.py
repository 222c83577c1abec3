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

from collections.abc import Awaitable, Callable


def _models(engine):
    return engine.serving("models")


async def publish(engine, request, load: Callable[[object], Awaitable[object]]) -> None:
    """Load `request` into the engine with `load`, then serve it under its name. Requests
    already running keep the id they started with; vLLM's CPU LRU evicts the old weights
    in time, as its own unload does."""
    models = _models(engine)
    async with models.lora_resolver_lock[request.lora_name]:
        await load(request)
        models.lora_requests[request.lora_name] = request


async def unpublish(engine, name: str) -> None:
    models = _models(engine)
    async with models.lora_resolver_lock[name]:
        models.lora_requests.pop(name, None)


def withdraw(engine, name: str) -> None:
    """Stop serving `name` at once, from synchronous code (no await: atomic on the loop)."""
    _models(engine).lora_requests.pop(name, None)


def is_published(engine, name: str) -> bool:
    return name in _models(engine).lora_requests


def published(engine) -> dict[int, str]:
    """Adapter id -> name, for the adapters the engine serves now."""
    return {request.lora_int_id: name for name, request in _models(engine).lora_requests.items()}
