"""The replicas as the API sees them through the host protocol: one engine whose serving
objects send each request to a replica (`ReplicaSetEngine`), the answers that come back
(`RemoteBody`, `RemoteResponse`), and the registry as the admin endpoints read it from
the replicas' catalog (`RegistryView`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from . import wire

if TYPE_CHECKING:
    from .replica_set import ReplicaSetHost

ENGINE_NAME = "replicas"


class RemoteBody(BaseModel):
    """A JSON answer produced by a replica, handed to the API as vLLM's results are."""

    model_config = ConfigDict(extra="allow")


class RemoteResponse:
    """A classification answer from a replica: status and body, as vLLM's JSONResponse."""

    def __init__(self, status_code: int, body: bytes):
        self.status_code = status_code
        self.body = body


class RegistryView:
    """The registry as the admin endpoints read it, from the catalog."""

    def __init__(self, catalog: wire.Catalog):
        self.adapters = catalog.records
        self.problems = catalog.problems
        self.stores = list(catalog.stores)

    def locate(self, name: str):
        """The source holding `name` (every replica opens the same sources)."""
        from adapterserve.registry.sources import first_holding, open_source

        return first_holding([open_source(s) for s in self.stores], name)


class ReplicaSetEngine:
    """The replicas as one engine for the API: `serving(kind)` sends the request to one."""

    spec = None
    client = None
    startup_seconds = None
    on_started = None

    def __init__(self, host: "ReplicaSetHost"):
        self.host = host

    @property
    def name(self) -> str:
        return ENGINE_NAME

    @property
    def running(self) -> bool:
        return True  # Ray replaces a dead replica; a call that meets one is a 503

    def process_ids(self) -> list[int]:
        return []

    def unfinished_requests(self) -> int:
        return 0  # the replicas' requests: Ray Serve's own queues (its autoscaling reads them)

    def serving(self, kind: str) -> Any:
        if kind == "classify":
            return self.host.classify
        return _Generation(self.host, kind)

    async def check_health(self) -> str | None:
        return None

    async def start(self) -> None:
        return None

    def stop(self, wait_s: float = 30.0) -> None:
        return None

    async def stop_async(self, wait_s: float = 30.0) -> None:
        return None


class _Generation:
    """vLLM's chat and completion serving objects, as the API calls them."""

    def __init__(self, host: "ReplicaSetHost", endpoint: str):
        self.host, self.endpoint = host, endpoint

    async def create_chat_completion(self, request, raw_request):
        return await self.host.generate("chat", request, raw_request)

    async def create_completion(self, request, raw_request):
        return await self.host.generate("completion", request, raw_request)

    async def create_responses(self, request, raw_request):
        return await self.host.generate("responses", request, raw_request)


def forwarded_headers(raw_request) -> dict[str, str]:
    """The request headers vLLM reads (request id, tracing), never credentials."""
    keep = ("x-request-id", "traceparent", "tracestate")
    return {k: v for k, v in raw_request.headers.items() if k.lower() in keep}
