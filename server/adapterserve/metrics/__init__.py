"""Prometheus metrics: adapterserve's own collectors beside vLLM's, on one /metrics page.

adapterserve's collectors live in a registry of their own, made per app (tests create many
apps in one process), and /metrics serves it together with the process-wide default
registry where vLLM's engines report. The names, types and labels are listed in the
docs/metrics.md; the Grafana dashboard in deploy/ reads them.

- Traffic: requests and end-to-end time per model and endpoint (told by the API's
  middleware: `request_answered`, `request_ended`); tokens
  and time to first token per model and endpoint (server/adapterserve/metrics/traffic.py).
- Memory: engines by component, their processes, adapters by tier, storage, hosting cost;
  refreshed every `metrics_refresh_s` in the background (server/adapterserve/metrics/memory.py).
- Adapter loads and evictions: the engines' CPU caches compared between refreshes; load
  time of every load the host asks for; model swaps in dedicated mode.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

from adapterserve.engine_plugins.heap import release_free_memory
from adapterserve.hosting.protocol import HostObserver
from adapterserve.registry import kinds
from adapterserve.registry.safetensors_header import safetensors_elements

from .collector import HostCollector
from .counters import Counters
from .labels import OTHER, ModelLabels
from .lora_routing import LoraRoutingCollector, WithoutVllmLoraInfo, WorkerLoadCounts
from .memory import EngineMemory, folder_bytes, measure_engine
from .traffic import RequestTraffic, observe_client

log = logging.getLogger(__name__)

class Metrics:
    def __init__(self, max_models: int = 50, refresh_seconds: float = 5.0) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.refresh_seconds = refresh_seconds
        self.model_labels = ModelLabels(max_models, on_displaced=self._drop_model_series)
        self.counters = counters = Counters(self.registry)
        # the series the rest of this class records into
        for name, metric in vars(counters).items():
            setattr(self, name, metric)
        self.tenant_labels = ModelLabels(max_models)  # tenant label values, capped like the models'
        self.token_listeners: list = []  # called with (key id, tokens) after each request (the limits)
        self.host = None
        self.base_storage_bytes = 0
        self.memory: list[EngineMemory] = []
        self.measured_at = 0.0
        self._cached: dict[str, set[int]] = {}  # engine -> adapter ids in its CPU cache
        self.worker_loads = WorkerLoadCounts()
        self._refresher: asyncio.Task | None = None
        self.pages = None  # see federate()
        self._refresh_lock = asyncio.Lock()
        self.registry.register(HostCollector(self))
        self.registry.register(LoraRoutingCollector(self))

    @classmethod
    def from_settings(cls, settings) -> "Metrics":
        return cls(max_models=settings.metrics_max_models, refresh_seconds=settings.metrics_refresh_s)

    # --- binding to the host ---------------------------------------------------
    def observer(self) -> HostObserver:
        """What the host reports to, passed to it when it is made: every engine it starts
        (restarts and swaps included) reports its traffic here."""
        return HostObserver(
            engine_started=lambda engine: observe_client(engine.client, engine.spec.served_model_name, self.observe_traffic),
            adapter_loaded=lambda kind, seconds: self.adapter_load_seconds.labels(kind).observe(seconds),
            adapter_quarantined=lambda kind: self.adapter_quarantines.labels(kind).inc(),
            engine_restarted=lambda engine: self.engine_restarts.labels(engine).inc(),  # few engines: no cap needed
            model_swapped=lambda model, seconds: self.swap_seconds.labels(self.model_labels.label(model)).observe(seconds),
            tokens_used=self._tokens_used,
        )

    def _tokens_used(self, prompt_tokens: int, generation_tokens: int) -> None:
        """Tokens counted by another process (a Ray Serve replica), for this request's key."""
        from adapterserve.request_context import current

        key = current().key
        if key is not None:
            self._observe_tenant(key.tenant, key.id, prompt_tokens, generation_tokens)

    def bind_fine_tuning(self, fine_tuning) -> None:
        """The fine-tuning jobs' series: the jobs by state read from their store at each
        scrape; the runner reports tokens trained and jobs finished."""
        from adapterserve.finetuning.runner import RunnerObserver

        from .counters import JOB_STATES

        for state in JOB_STATES:
            self.fine_tuning_jobs.labels(state).set_function(lambda state=state: fine_tuning.store.count(state))
        fine_tuning.runner.observer = RunnerObserver(
            tokens_trained=self.fine_tuning_tokens.inc,
            job_finished=lambda state, seconds: self.fine_tuning_job_seconds.labels(state).observe(seconds),
        )

    async def bind_host(self, host) -> None:
        """After the host started: measure now, then every `refresh_seconds`."""
        self.host = host
        # the base does not change while the host runs: its folder is read once
        self.base_storage_bytes = folder_bytes(host.base_path) if host.base_path is not None else 0
        for engine in host.engines():  # zero series from the start, as for the loads
            self.engine_restarts.labels(engine.name)
        await self.refresh()
        self._refresher = asyncio.create_task(self._refresh_forever())

    async def unbind_host(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            self._refresher = None
        self.host = None

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_seconds)
            try:
                await self.refresh()
            except Exception:  # never let a failed reading stop the readings
                log.exception("reading the engines' memory failed")

    async def refresh(self) -> None:
        """Read every engine's memory; count adapters that entered or left a CPU cache."""
        host = self.host
        if host is None:
            return
        async with self._refresh_lock:
            release_free_memory()  # this process's; each engine's report does the same in its processes
            readings, clients = [], {}
            for engine in host.engines():
                readings.append(await measure_engine(engine, host.settings, self._weights_elements(engine.spec.model_path)))
                clients[engine.name] = id(engine.client)
            for memory in readings:
                if not memory.measured:
                    continue
                kind = kinds.adapter_kind_for_runner(memory.runner)
                now, before = set(memory.cached_adapters), self._cached.get(memory.name, set())
                if memory.lora_counts is not None:  # counted in the worker: nothing missed between readings
                    loads, evictions = self.worker_loads.increments(memory.name, clients[memory.name], memory.lora_counts)
                else:  # an engine without the counts: what changed since the last reading
                    loads, evictions = len(now - before), len(before - now)
                self.adapter_loads.labels(kind).inc(loads)
                self.adapter_evictions.labels(kind).inc(evictions)
                self._cached[memory.name] = now
            self.memory = readings
            self.measured_at = time.time()

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def _weights_elements(model_path) -> int:
        """Elements of the weights an engine loads, from its safetensors headers (read once
        per folder: an engine's weights do not change while it runs)."""
        return safetensors_elements(model_path)

    # --- traffic -----------------------------------------------------------------
    def observe_traffic(self, traffic: RequestTraffic) -> None:
        model = self.model_labels.label(traffic.model)
        self.prompt_tokens.labels(model, traffic.endpoint).inc(traffic.prompt_tokens)
        self.generation_tokens.labels(model, traffic.endpoint).inc(traffic.generation_tokens)
        if traffic.time_to_first_token is not None:
            self.ttft.labels(model, traffic.endpoint).observe(traffic.time_to_first_token)
        self._observe_tenant(traffic.tenant, traffic.key_id, traffic.prompt_tokens, traffic.generation_tokens)

    def _observe_tenant(self, tenant: str | None, key_id: str | None, prompt_tokens: int, generation_tokens: int) -> None:
        if tenant is not None:
            label = self.tenant_labels.label(tenant)
            self.tenant_tokens.labels(label, "prompt").inc(prompt_tokens)
            self.tenant_tokens.labels(label, "generation").inc(generation_tokens)
        if key_id is not None:
            for listener in self.token_listeners:
                listener(key_id, prompt_tokens + generation_tokens)

    def _drop_model_series(self, model: str) -> None:
        for metric in (self.requests, self.latency, self.ttft, self.prompt_tokens, self.generation_tokens, self.swap_seconds):
            metric.remove_by_labels({"model": model})

    # --- requests (api/middleware.py calls these) ------------------------------------
    def request_answered(self, context, status: int) -> None:
        """An API request's status is known: count it (per model, and per tenant)."""
        if context.endpoint is None:
            return
        target = context.target
        model = self.model_labels.count(target.model) if target is not None else OTHER
        self.requests.labels(model, context.endpoint, str(status)).inc()
        if context.key is not None:
            tenant = self.tenant_labels.count(context.key.tenant)
            self.tenant_requests.labels(tenant, str(status)).inc()
            if context.rejection is not None:
                self.tenant_rejections.labels(tenant, context.rejection).inc()

    def request_ended(self, context, status: int, seconds: float) -> None:
        """An API request's answer ended (streams: with their last byte)."""
        if context.endpoint is None:
            return
        target = context.target
        model = self.model_labels.label(target.model) if target is not None else OTHER
        self.latency.labels(model, context.endpoint).observe(seconds)

    def federate(self, pages) -> None:
        """Serve other processes' pages too (Ray Serve replicas): `pages` is an async
        callable giving (replica, exposition text) pairs; each sample gets its replica label."""
        self.pages = pages

    async def exposition(self) -> bytes:
        """The /metrics page: vLLM's registry and ours (and the replicas' pages, if federated)."""
        # The readings refresh in the background; a scrape reads them itself only when
        # they are stale (the refresher is behind), so scrapes stay fast.
        if self.host is not None and time.time() - self.measured_at > 2 * self.refresh_seconds:
            try:
                await self.refresh()
            except Exception:
                log.exception("reading the engines' memory failed")
        # vLLM's own vllm:lora_requests_info is replaced by a bounded one (lora_routing.py)
        body = generate_latest(WithoutVllmLoraInfo(REGISTRY)) + generate_latest(self.registry)
        if self.pages is not None:
            from .federation import merge_pages

            body = merge_pages(body, await self.pages())
        return body
