"""The engine replica: one shared-mode host (its own engines over the same stores) and its
metrics, called by the ingress through a Ray Serve handle.

Adapter placement: a request for an adapter arrives with the adapter's name as Ray Serve's
multiplexed model id, and takes a lease on it here (`serve.multiplexed`, at most
`max_adapters` per replica: the engine's CPU cache). The replica reports its leases to
Ray's router, which sends the next requests for that adapter to it. When Ray evicts a
lease (least recently used), the adapter's weights leave this replica's engine. At start
every unpinned adapter is taken out of the engine (registration loads each one once, to
check it): adapters enter a replica's engine when its traffic does.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from adapterserve.errors import DomainError
from adapterserve.hosting import serving

from . import wire

log = logging.getLogger(__name__)


class AdapterLease:
    """What Ray Serve's multiplexing holds per adapter; its release evicts the adapter."""

    def __init__(self, replica: "EngineReplica", name: str):
        self.replica, self.name, self.released = replica, name, False

    def __del__(self):  # Ray calls it on eviction (from a thread); the GC may call it again
        if self.released:
            return
        self.released = True
        try:
            self.replica.release(self)
        except Exception:  # the replica is shutting down: nothing left to evict
            pass


class EngineReplica:
    """Ray Serve calls: generate (streamed), classify, resolve, catalog, admin, health,
    engine_reports, metrics_text. `deployment()` adds the multiplexed `lease`."""

    async def __init__(self, settings):
        from ray import serve

        from adapterserve.hosting.builder import build_host
        from adapterserve.metrics import Metrics

        self.settings = settings
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.loop = asyncio.get_running_loop()
        self.metrics = Metrics.from_settings(settings)
        self.host = await asyncio.to_thread(build_host, settings, self.metrics.observer())
        try:
            await self.host.start()
        except BaseException:  # Ray retries the replica: leave no engine of this attempt
            await self.host.stop()
            raise
        await self.metrics.bind_host(self.host)
        self.leases: dict[str, AdapterLease] = {}  # adapter -> its current lease
        self._evicting: set[asyncio.Task] = set()
        for name in list(self.host.registry.adapters):
            await self.host.evict(name)
        log.info("replica %s (pid %d) serves %s", self.replica, os.getpid(), self.host.base_name)

    async def __del__(self):  # Ray calls it when it stops the replica
        if "host" in vars(self):  # (not when the constructor failed before making it)
            await self.metrics.unbind_host()
            await self.host.stop()

    # --- adapter leases ------------------------------------------------------------------
    async def _take_lease(self, name: str) -> AdapterLease:
        lease = self.leases[name] = AdapterLease(self, name)
        return lease

    async def _lease_for(self, target) -> None:
        """Take (or refresh) the lease of the request's adapter, if Ray sent its name."""
        from ray import serve

        name = serve.get_multiplexed_model_id()
        if name and target.record is not None and name == target.model:
            await self.lease(name)

    def release(self, lease: AdapterLease) -> None:
        """A lease ended (from any thread): evict its adapter, unless leased again since."""
        def evict() -> None:
            if self.leases.get(lease.name) is not lease:
                return  # leased again: the new lease keeps it
            del self.leases[lease.name]
            task = self.loop.create_task(self._evict(lease.name))
            self._evicting.add(task)
            task.add_done_callback(self._evicting.discard)

        self.loop.call_soon_threadsafe(evict)

    async def _evict(self, name: str) -> None:
        if name not in self.leases:
            await self.host.evict(name)

    # --- requests ------------------------------------------------------------------------
    async def generate(self, endpoint: str, request, headers: dict[str, str]):
        """A chat or completion request: yields ("json", body), or ("stream", None) then
        ("chunk", sse) per chunk, or ("error", fields); after an answer, ("usage", tokens)
        for the ingress's tenant accounting."""
        from pydantic import BaseModel
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse

        sink = _collect_traffic(endpoint)
        try:
            target = await serving.resolve(self.host, request, endpoint)
            await self._lease_for(target)
            # no disconnect to listen for: a client that goes away cancels the Ray call
            result = await serving.run(self.host, target, endpoint, request, serving.RequestMeta(headers))
        except DomainError as exc:
            yield wire.error(exc)
            return
        if isinstance(result, ErrorResponse):
            yield wire.VLLM_ERROR, result.model_dump(mode="json")
            return
        if isinstance(result, BaseModel):
            yield "json", result.model_dump(mode="json", by_alias=True)
        else:
            yield "stream", None
            async for chunk in result:
                yield "chunk", chunk
        yield "usage", _usage(sink)

    async def classify(self, request, headers: dict[str, str]):
        """A classification request: ("ok", (status, body)) as vLLM's handler answered."""
        sink = _collect_traffic("classify")

        async def run():
            target = await serving.resolve(self.host, request, "classify")
            await self._lease_for(target)
            response = await serving.run(self.host, target, "classify", request, serving.RequestMeta(headers))
            if not hasattr(response, "body"):  # vLLM's handler raised: its ErrorResponse (a bad input is a 400)
                raise serving.rejected(response)
            return response.status_code, bytes(response.body), _usage(sink)

        return await wire.replying(run())

    async def resolve(self, model: str, endpoint: str):
        """A name the ingress's catalog does not know: its record (discovered on request if
        its folder is in a store), or the error the single-machine server would give."""
        async def run():
            return (await self.host.resolve(model, endpoint)).record

        return await wire.replying(run())

    # --- the whole application -------------------------------------------------------------
    async def catalog(self) -> wire.Catalog:
        host = self.host
        return wire.Catalog(
            base_name=host.base_name, cards=host.model_cards(), records=dict(host.registry.adapters),
            problems=list(host.registry.problems), stores=[str(s) for s in host.registry.stores],
            pinned=set(host.pinned), lora_rank=host.lora_rank, replica=self.replica,
        )

    async def admin(self, op: str, name: str | None):
        host = self.host
        calls = {
            "load": host.load_adapter, "unload": host.unload_adapter, "reload": host.reload_adapter,
            "pin": host.pin_adapter, "unpin": host.unpin_adapter,
        }
        if op == "rescan":
            return await wire.replying(host.rescan())
        return await wire.replying(calls[op](name))

    async def health(self) -> tuple[str, dict[str, Any]]:
        return self.replica, await self.host.health()

    async def engine_reports(self) -> list[dict]:
        from adapterserve.metrics.engines import engine_reports

        return [{**report, "replica": self.replica, "replica_pid": os.getpid(), "leased": sorted(self.leases)}
                for report in engine_reports(self.host, self.metrics)]

    async def metrics_text(self) -> tuple[str, str]:
        return self.replica, (await self.metrics.exposition()).decode()


def _collect_traffic(endpoint: str) -> list:
    """Collect what the engine client's observer sees of this request (metrics/traffic.py)."""
    from adapterserve.request_context import RequestContext, begin

    return begin(RequestContext(endpoint=endpoint, traffic=[])).traffic


def _usage(sink: list) -> tuple[int, int]:
    return sum(t.prompt_tokens for t in sink), sum(t.generation_tokens for t in sink)


def deployment(max_adapters: int) -> type:
    """The replica class with its multiplexed lease, at most `max_adapters` per replica."""
    from ray import serve

    class AdapterReplica(EngineReplica):
        @serve.multiplexed(max_num_models_per_replica=max_adapters)
        async def lease(self, name: str) -> AdapterLease:
            return await self._take_lease(name)

    AdapterReplica.__name__ = AdapterReplica.__qualname__ = "EngineReplica"
    return AdapterReplica
