"""The Host the Ray Serve ingress serves through: a set of engine replicas behind a handle.

Names are resolved from a catalog that one replica publishes (refreshed every
`metrics_refresh_s`, after every admin operation, and for a name the catalog does not
know: that name is resolved by a replica, which may discover it in the stores). The
replica that serves a request resolves it again with its own host: the catalog only saves
a round trip, it never decides alone.

Routing: a request for an adapter carries the adapter's name as Ray Serve's multiplexed
model id, so Ray sends it to a replica that holds the adapter (or to the least busy one,
which then loads it); base-model requests carry none and are balanced over all replicas.
Admin operations, health, metrics and engine reports go to every replica (broadcast).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any


from adapterserve.errors import Conflict, DomainError, Unavailable, engine_unavailable, model_not_found
from adapterserve.hosting.protocol import HostObserver, ModelCard, Target, check_endpoint, missing_model, requested_name

from . import wire
from .remote_engine import ENGINE_NAME, RegistryView, RemoteBody, RemoteResponse, ReplicaSetEngine, forwarded_headers

log = logging.getLogger(__name__)

# A broadcast waits this long for every replica (a replica starting its engines answers
# only once started: it is left out of that answer, not waited for).
BROADCAST_TIMEOUT_S = 30.0


class ReplicaSetHost:
    """Host protocol over the replicas of a Ray Serve deployment (the EngineReplica)."""

    mode = "shared"
    remote_engines = True
    base_path = None

    def __init__(self, settings, handle, observer: HostObserver | None = None, adapter_affinity: bool = True):
        self.settings = settings
        self.handle = handle  # DeploymentHandle of the engine replicas
        self.observer = observer or HostObserver()
        self.adapter_affinity = adapter_affinity
        self.created = int(time.time())
        self.engine = ReplicaSetEngine(self)
        self.restarts: dict[str, int] = {}  # replicas restart their own engines (their metrics count it)
        self.catalog: wire.Catalog | None = None
        self._refresher: asyncio.Task | None = None

    # --- catalog -------------------------------------------------------------------
    @property
    def base_name(self) -> str:
        return self.catalog.base_name if self.catalog else ""

    @property
    def fine_tuning_base(self) -> str:
        return self.base_name

    def fine_tuning_launcher(self):
        """Where fine-tuning jobs train on Ray Serve: Ray tasks (finetuning/service.py asks)."""
        from .fine_tuning import RayLauncher

        return RayLauncher(self.settings)

    @property
    def registry(self) -> RegistryView:
        return RegistryView(self.catalog)

    @property
    def pinned(self) -> set[str]:
        return set(self.catalog.pinned) if self.catalog else set()

    @property
    def lora_rank(self) -> int:
        return self.catalog.lora_rank if self.catalog else 0

    @property
    def weights_path(self) -> Path:
        return Path(self.settings.base_model or ".")

    async def refresh_catalog(self) -> None:
        self.catalog = await self.handle.catalog.remote()

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.metrics_refresh_s)
            try:
                await self.refresh_catalog()
            except Exception as exc:  # a replica restarting: keep the last catalog
                log.warning("refreshing the catalog failed: %s", exc)

    async def start(self) -> None:
        await self.refresh_catalog()
        self._refresher = asyncio.create_task(self._refresh_forever())

    async def stop(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            self._refresher = None

    # --- requests --------------------------------------------------------------------
    def _options(self, model: str, **options):
        """Handle options for a request of `model`: adapters carry their name as the
        multiplexed model id (unless affinity is off); the base carries none."""
        if self.adapter_affinity and model != self.base_name:
            options["multiplexed_model_id"] = model
        return self.handle.options(**options)

    async def resolve(self, model: str | None, endpoint) -> Target:
        if not model:
            raise missing_model()
        name = requested_name(model, self.base_name)
        if name == self.base_name:
            check_endpoint(model, "base", endpoint)
            return Target(engine=self.engine, vllm_model=name, model=name)
        record = self.catalog.records.get(name) if self.catalog else None
        if record is None:  # not in the catalog: a replica decides (and may discover it)
            record = wire.unwrap(await self._call(self._options(name).resolve.remote(model, endpoint)))
            if record is None:
                raise model_not_found(model)
            if self.catalog is not None:  # discovered by the replica: known here until the next refresh says otherwise
                self.catalog.records[name] = record
        check_endpoint(model, record.kind, endpoint)
        return Target(engine=self.engine, vllm_model=name, model=name, record=record)

    async def _call(self, response):
        """Await a replica call; a replica that died under it is a 503 (Ray replaces it)."""
        try:
            return await response
        except DomainError:
            raise
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception as exc:
            log.warning("a replica call failed: %s: %s", type(exc).__name__, exc)
            raise engine_unavailable(ENGINE_NAME) from None

    async def generate(self, endpoint: str, request, raw_request):
        """Send a chat or completion request to a replica: a JSON body, or a stream."""
        stream = self._options(request.model, stream=True).generate.remote(
            endpoint, request, forwarded_headers(raw_request)
        )
        try:
            first = await self._call(stream.__anext__())
        except BaseException:
            stream.cancel()
            raise
        kind, value = first
        if kind == wire.ERROR:
            stream.cancel()
            raise wire.error_from_fields(value)
        if kind == wire.VLLM_ERROR:  # vLLM's own refusal: the API shapes it as for a local engine
            stream.cancel()
            from vllm.entrypoints.serve.engine.protocol import ErrorResponse

            return ErrorResponse.model_validate(value)
        if kind == "json":
            async for _kind, usage in stream:  # the usage item ends it
                self.observer.tokens_used(*usage)
            return RemoteBody.model_validate(value)
        return self._chunks(stream)

    async def _chunks(self, stream):
        """The rest of a replica's stream, as the SSE chunks vLLM's serving yields; the
        closing usage item goes to the tenant accounting. The last chunk (`[DONE]`, or the
        Responses API's last event) is held back until the usage is counted: a client that
        sends its next request as soon as its stream ends is then held to its limits."""
        held = None
        try:
            async for kind, value in stream:
                if kind == "usage":
                    self.observer.tokens_used(*value)
                    continue
                if held is not None:
                    yield held
                held = value
            if held is not None:
                yield held
        finally:
            stream.cancel()

    async def classify(self, request, raw_request) -> RemoteResponse:
        reply = await self._call(self._options(request.model).classify.remote(request, forwarded_headers(raw_request)))
        status, body, usage = wire.unwrap(reply)
        self.observer.tokens_used(*usage)
        return RemoteResponse(status, body)

    def model_cards(self) -> list[ModelCard]:
        return list(self.catalog.cards) if self.catalog else []

    def tasks(self) -> list:
        return []  # the replicas account for their tasks in their own metrics

    def published_adapters(self, engine) -> dict[int, str]:
        return {}

    def engines(self) -> list:
        return []  # the engines are in the replicas: see engine_reports

    def nonfinite_state(self, model: str) -> None:
        return None  # each replica answers its adapters' non-finite values itself

    # --- every replica -----------------------------------------------------------------
    async def broadcast(self, method: str, *args) -> list[Any]:
        """Call `method` on every running replica; exceptions are returned, not raised."""
        response = self.handle.broadcast(method, *args)
        return await response.results_async(timeout_s=BROADCAST_TIMEOUT_S, return_exceptions=True)

    async def _admin(self, op: str, name: str | None = None) -> Any:
        """An admin operation on every replica: a success only if every replica did it (one
        that had already done it answers 409, which counts as done); when some did and some
        did not, a 503 that says which did not (the operation can be sent again); when none
        did, the first error."""
        replies = await self.broadcast("admin", op, name)
        values, already, failures = [], [], []
        for index, reply in enumerate(replies):
            if isinstance(reply, BaseException):
                log.warning("admin %s %s: replica #%d failed: %s", op, name, index, reply)
                failures.append((index, f"{type(reply).__name__}: {str(reply)[:200]}", None))
                continue
            status, value = reply
            if status == wire.OK:
                values.append(value)
            elif value.get("kind") == Conflict.__name__:
                already.append(value)
            else:
                failures.append((index, str(value.get("message", ""))[:200], value))
        try:
            await self.refresh_catalog()
        except Exception as exc:
            log.warning("refreshing the catalog failed: %s", exc)
        if failures and (values or already):
            detail = "; ".join(f"replica #{index}: {reason}" for index, reason, _ in failures)
            raise Unavailable(
                f"`{op}` was done on {len(values) + len(already)} of {len(replies)} replicas, not on: {detail}. "
                "Send it again.", code="not_done_on_every_replica", retry_after_s=5,
            )
        if values:
            return values[0]
        if already:
            raise wire.error_from_fields(already[0])
        if failures and failures[0][2] is not None:
            raise wire.error_from_fields(failures[0][2])
        raise engine_unavailable(ENGINE_NAME)

    async def load_adapter(self, name: str):
        return await self._admin("load", name)

    async def unload_adapter(self, name: str) -> None:
        await self._admin("unload", name)

    async def reload_adapter(self, name: str):
        return await self._admin("reload", name)

    async def pin_adapter(self, name: str):
        return await self._admin("pin", name)

    async def unpin_adapter(self, name: str):
        return await self._admin("unpin", name)

    async def rescan(self):
        return await self._admin("rescan")

    async def health(self) -> dict[str, str | None]:
        """Every replica's engines, named `<replica>/<engine>`."""
        merged: dict[str, str | None] = {}
        for reply in await self.broadcast("health"):
            if isinstance(reply, BaseException):
                merged[f"replica-unreachable-{len(merged)}"] = f"{type(reply).__name__}: {str(reply)[:200]}"
                continue
            replica, engines = reply
            merged.update({f"{replica}/{engine}": reason for engine, reason in engines.items()})
        return merged

    async def engine_reports(self) -> list[dict]:
        reports = []
        for reply in await self.broadcast("engine_reports"):
            if not isinstance(reply, BaseException):
                reports.extend(reply)
        return reports

    async def metrics_pages(self) -> list[tuple[str, str]]:
        """(replica, its Prometheus exposition text) for every replica that answered."""
        return [reply for reply in await self.broadcast("metrics_text") if not isinstance(reply, BaseException)]

