"""The Host interface: where a model name goes, whatever the hosting mode.

A request names a model; the host answers with a Target (the engine that serves it and
the name that engine knows it by), or raises an APIError: 404 for an unknown model, 400
for a model that exists but is served by another endpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from adapterserve.errors import APIError
from adapterserve.registry.records import AdapterRecord

from .engine import Engine, EngineSpec

if TYPE_CHECKING:
    from adapterserve.config import Settings
    from adapterserve.registry.store import Registry

Endpoint = Literal["chat", "completion", "classify"]
ENDPOINT_PATHS = {
    "chat": "/v1/chat/completions",
    "completion": "/v1/completions",
    "classify": "/v1/classify",
}


@dataclass
class Target:
    """Where one request goes."""

    engine: Engine
    vllm_model: str  # the name vLLM's serving objects know (base name or adapter name)
    model: str  # the name the client asked for, normalised (no 'base:' prefix)
    record: AdapterRecord | None = None  # None: the base model itself (or a full model)


@dataclass
class ModelCard:
    """One entry of /v1/models, with adapterserve's extra fields."""

    id: str
    root: str
    parent: str | None
    kind: str  # "base", "lora", "head" or "full"
    created: int
    max_model_len: int | None = None
    rank: int | None = None
    size_bytes: int | None = None
    labels: list[str] | None = None

    def as_openai(self) -> dict:
        card = {
            "id": self.id,
            "object": "model",
            "created": self.created,
            "owned_by": "adapterserve",
            "root": self.root,
            "parent": self.parent,
            "kind": self.kind,
        }
        for key in ("max_model_len", "rank", "size_bytes", "labels"):
            value = getattr(self, key)
            if value is not None:
                card[key] = value
        return card


class Host(Protocol):
    """What the API, the admin endpoints and the metrics use of a hosting mode.

    The metrics install their observers before `start()` by setting the `observe_*`
    callables and wrapping `engine_factory` (every engine the host starts, restarts
    included, reports its traffic)."""

    mode: str  # "shared" or "dedicated"
    base_name: str
    settings: Settings
    created: int  # when the host was made (the `created` of /v1/models)
    registry: Registry | None  # the adapter registry (shared mode), None in dedicated mode
    restarts: dict[str, int]  # engine name -> restarts after it died
    engine_factory: Callable[[EngineSpec], Engine]
    observe_load: Callable[[str, float], None]  # (adapter kind, seconds)
    observe_restart: Callable[[str], None]  # (engine name)

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def resolve(self, model: str | None, endpoint: Endpoint) -> Target: ...

    def model_cards(self) -> list[ModelCard]: ...

    def engines(self) -> list[Engine]: ...

    async def health(self) -> dict[str, str | None]:
        """Engine name -> None when healthy, else the reason."""
        ...

    async def load_adapter(self, name: str) -> AdapterRecord: ...

    async def unload_adapter(self, name: str) -> None: ...

    async def reload_adapter(self, name: str) -> AdapterRecord: ...


def wrong_endpoint(model: str, kind: str, endpoint: Endpoint) -> APIError:
    """A model that exists but is served elsewhere: say where."""
    if kind == "head":
        where = ENDPOINT_PATHS["classify"]
        what = "a classification head adapter"
    else:
        where = f"{ENDPOINT_PATHS['chat']} or {ENDPOINT_PATHS['completion']}"
        what = "a text generation model" if kind in ("base", "full") else "a LoRA adapter"
    return APIError(
        400,
        f"The model `{model}` is {what} and is not served by {ENDPOINT_PATHS[endpoint]}; use {where}.",
        param="model",
        code="model_not_supported_by_endpoint",
    )


def missing_model() -> APIError:
    return APIError(400, "You must provide a model parameter.", param="model", code="missing_required_parameter")
