"""The interfaces between the hosts and the rest: Host, Engine, HostObserver, HostedTask.

A request names a model; the host answers with a Target (the engine that serves it and
the name that engine knows it by), or raises a domain error (errors.py): UnknownModel,
InvalidRequest for a model that exists but is served by another endpoint, Unavailable
while its engine is down. The API, the admin endpoints, the metrics and the Ray replicas
use the hosts only through these (nothing outside hosting/ reaches past them:
tests/unit/test_structure.py); the metrics observe a host through the HostObserver it is
given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from adapterserve.errors import InvalidRequest, missing_model  # noqa: F401 (missing_model: for the hosts)
from adapterserve.finetuning.naming import adapter_of
from adapterserve.registry import kinds
from adapterserve.registry.records import AdapterRecord

from .engine import EngineSpec

if TYPE_CHECKING:
    from adapterserve.config import Settings
    from adapterserve.registry.store import Registry

GiB = 1024**3
# What one engine holds beyond its weights and KV cache: the torch runtime and vLLM in each
# of its processes, activations. Measured on this project's 2-core CPU machines with
# SmolLM2-135M: ~1.6 GiB USS per engine = 0.25 weights + 0.25 KV cache + ~1.1 the rest with
# a worker process beside the engine core; ~0.75 the rest with the model in the engine
# core's process (one interpreter fewer; hosting/cpu_cores.py). The dedicated mode's memory
# budget and the metrics' estimates both use it.
WORKER_PROCESS_RUNTIME_BYTES = int(1.1 * GiB)
ONE_PROCESS_RUNTIME_BYTES = int(0.75 * GiB)


def engine_runtime_bytes(settings: "Settings") -> int:
    from .cpu_cores import worker_process

    return WORKER_PROCESS_RUNTIME_BYTES if worker_process(settings.engine_worker_process) else ONE_PROCESS_RUNTIME_BYTES


Endpoint = Literal["chat", "completion", "responses", "classify"]
ENDPOINT_PATHS = {
    "chat": "/v1/chat/completions",
    "completion": "/v1/completions",
    "responses": "/v1/responses",
    "classify": "/v1/classify",
}


class Engine(Protocol):
    """One engine as the hosts, the API and the metrics use it (VllmEngine in engine.py;
    the tests' FakeEngine)."""

    spec: EngineSpec
    client: Any  # vLLM's AsyncLLM once started, else None
    startup_seconds: float | None
    on_started: Callable[["Engine"], None] | None  # called once the client exists
    on_nonfinite: Callable[[str | None, str], None]  # (adapter or None, request id)

    @property
    def name(self) -> str: ...

    @property
    def running(self) -> bool: ...

    async def start(self) -> None: ...

    def stop(self, wait_s: float = 30.0) -> None: ...

    async def stop_async(self, wait_s: float = 30.0) -> None: ...

    async def check_health(self) -> str | None: ...

    def process_ids(self) -> list[int]: ...

    def unfinished_requests(self) -> int:
        """Requests the engine has taken and not finished yet (0 when it is not started)."""
        ...

    def serving(self, kind: str) -> Any:
        """vLLM's serving object of that kind ("chat", "completion", "responses", "classify", "models")."""
        ...


def _ignore(*args) -> None:
    return None


@dataclass
class HostObserver:
    """What a host reports while it runs; the metrics pass one in (the default ignores all)."""

    engine_started: Callable[[Engine], None] = _ignore  # every start, restarts and swaps included
    adapter_loaded: Callable[[str, float], None] = _ignore  # (adapter kind, seconds)
    adapter_quarantined: Callable[[str], None] = _ignore  # (adapter kind)
    engine_restarted: Callable[[str], None] = _ignore  # (engine name)
    model_swapped: Callable[[str, float], None] = _ignore  # (model, seconds)
    # (prompt tokens, generated tokens) of the current request, from a host whose engines
    # run elsewhere (Ray Serve replicas): counted for the request's tenant and key limits
    tokens_used: Callable[[int, int], None] = _ignore


@dataclass(frozen=True)
class HostedTask:
    """A model a client can name, as the metrics account for it: an adapter (shared mode)
    or a full model (dedicated mode). Sizes are read once, when the task is registered."""

    name: str
    kind: str  # "lora", "head" or "full"
    storage: str  # "adapter" (its folder) or "full_model" (the whole model's folder)
    storage_bytes: int
    adapter_elements: int  # elements of its adapter weights (dedicated: of the merged adapter; 0 if unknown)
    rank: int = 0  # the LoRA rank its engine slot holds (0: a full model)
    pinned: bool = False  # kept in its engine, never evicted


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
    kind: str  # "base", "lora", "head", "full", or "adapter" (listed, kind not known yet)
    created: int
    max_model_len: int | None = None
    rank: int | None = None
    size_bytes: int | None = None
    labels: list[str] | None = None
    state: str | None = None  # "listed": in a source, fetched and validated on its first request

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
        for key in ("max_model_len", "rank", "size_bytes", "labels", "state"):
            value = getattr(self, key)
            if value is not None:
                card[key] = value
        return card


class Host(Protocol):
    """What the API, the admin endpoints and the metrics use of a hosting mode.

    A host is made with its settings and a HostObserver (the app factory passes the
    metrics' one); the host calls the observer, nobody patches the host."""

    mode: str  # "shared" or "dedicated"
    base_name: str | None  # None in the dedicated mode: every hosted model is a task, none is "the base"
    fine_tuning_base: str | None  # the base `ft:<base>:<suffix>:<id>` names (fine-tuning jobs' models), if any
    settings: Settings
    created: int  # when the host was made (the `created` of /v1/models)
    registry: Registry | None  # the adapter registry (shared mode), None in dedicated mode
    restarts: dict[str, int]  # engine name -> restarts after it died
    base_path: Path | None  # the shared base's folder; None in dedicated mode
    weights_path: Path  # a folder one engine of this host loads (for estimates)
    lora_rank: int  # the max LoRA rank of the engines' slots (fitted to the stores, or as set)
    pinned: set[str]  # adapters kept in their engine, never evicted
    remote_engines: bool  # the engines run elsewhere (Ray Serve replicas): `engines()` is empty

    def tasks(self) -> list[HostedTask]: ...

    def published_adapters(self, engine: Engine) -> dict[int, str]:
        """Adapter id -> name for the adapters the engine serves now."""
        ...

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

    async def pin_adapter(self, name: str) -> AdapterRecord: ...

    async def unpin_adapter(self, name: str) -> AdapterRecord: ...

    async def rescan(self):
        """Scan the stores now: register new folders, reload changed ones, drop removed ones."""
        ...

    def nonfinite_state(self, model: str) -> str | None:
        """Whether `model`'s requests produced non-finite values: "quarantined" (it serves no
        more), "reported" (it serves on: tenants share it), or None."""
        ...

    async def engine_reports(self) -> list[dict] | None:
        """What the engines report of themselves (/admin/engines), for a host whose engines
        run elsewhere (Ray Serve replicas); None: the server reads its own engines."""
        ...

    async def metrics_pages(self) -> list[tuple[str, str]] | None:
        """(replica, Prometheus page) of engines whose processes run elsewhere (Ray
        replicas), or None: the server's own registry holds its engines' metrics."""
        ...


def requested_name(model: str, base_name: str | None, fine_tuning_base: str | None = None) -> str:
    """The name a client's `model` means: `<base>:<adapter>` (the form some clients send)
    is the adapter, `ft:<base>:<suffix>:<id>` the adapter (or full model) its fine-tuning
    job registered, anything else is itself. `fine_tuning_base`: the base fine-tuning jobs
    train from where it is not `base_name` (a dedicated host has no base, and may have one
    to train from)."""
    fine_tuned = adapter_of(model, fine_tuning_base or base_name) if (fine_tuning_base or base_name) else None
    if fine_tuned is not None:
        return fine_tuned
    if base_name is None:
        return model
    prefix = f"{base_name}:"
    return model[len(prefix):] if model.startswith(prefix) and len(model) > len(prefix) else model


def check_endpoint(model: str, kind: str, endpoint: Endpoint) -> None:
    """Each kind is answered by its endpoints only (registry/kinds.py): heads by
    /v1/classify, the base, LoRA adapters and full models by the generation endpoints."""
    if endpoint not in kinds.of(kind).endpoints:
        raise wrong_endpoint(model, kind, endpoint)


def wrong_endpoint(model: str, kind: str, endpoint: Endpoint) -> InvalidRequest:
    """A model that exists but is served elsewhere: say where."""
    served = kinds.of(kind)
    return InvalidRequest(
        f"The model `{model}` is {served.described} and is not served by {ENDPOINT_PATHS[endpoint]}; "
        f"use {kinds.endpoint_paths(served, ENDPOINT_PATHS)}.",
        param="model", code="model_not_supported_by_endpoint",
    )
