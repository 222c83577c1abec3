"""Prometheus metrics: adapterserve's own collectors beside vLLM's, on one /metrics page.

adapterserve's collectors live in a registry of their own, made per app (tests create many
apps in one process), and /metrics serves it together with the process-wide default
registry where vLLM's engines report.
"""

from __future__ import annotations

import time

import psutil
from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

# Model names are client input: only names the host serves become label values, the
# rest count as "other", so junk requests cannot create series.
OTHER = "other"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "adapterserve_requests",
            "HTTP requests by model, endpoint and status code.",
            ["model", "endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "adapterserve_request_duration_seconds",
            "End-to-end request time by model and endpoint (streams: until the last byte).",
            ["model", "endpoint"],
            registry=self.registry,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        self.swap_seconds = Histogram(
            "adapterserve_model_swap_seconds",
            "Dedicated mode: time to swap a model's engine in (stop the LRU engine, start this one).",
            ["model"],
            registry=self.registry,
            buckets=(1, 5, 10, 20, 30, 45, 60, 90, 120, 300),
        )
        self._host = None
        self.registry.register(_HostCollector(self))

    def bind_host(self, host) -> None:
        self._host = host
        if hasattr(host, "observe_swap"):
            host.observe_swap = lambda model, seconds: self.swap_seconds.labels(model).observe(seconds)

    def model_label(self, request: Request) -> str:
        target = getattr(request.state, "target", None)
        return target.model if target is not None else OTHER

    def attach(self, app: FastAPI) -> None:
        @app.middleware("http")
        async def _count(request: Request, call_next):
            if not request.url.path.startswith("/v1/"):
                return await call_next(request)
            began = time.perf_counter()
            response = await call_next(request)
            endpoint = request.url.path
            model = self.model_label(request)
            self.requests.labels(model, endpoint, str(response.status_code)).inc()
            self.latency.labels(model, endpoint).observe(time.perf_counter() - began)
            return response

        @app.get("/metrics", include_in_schema=False)
        async def _metrics() -> Response:
            body = generate_latest(REGISTRY) + generate_latest(self.registry)
            return Response(body, media_type=CONTENT_TYPE_LATEST)


class _HostCollector:
    """Reads the host's state at scrape time: adapters by kind, engine process memory."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self):
        host = self.metrics._host
        adapters = GaugeMetricFamily("adapterserve_adapters", "Registered adapters by kind.", labels=["kind"])
        memory = GaugeMetricFamily(
            "adapterserve_engine_process_memory_bytes",
            "Unique set size (USS) of each engine process.",
            labels=["engine", "pid", "process"],
        )
        if host is not None:
            registry = getattr(host, "registry", None)
            if registry is not None:
                for kind in ("lora", "head"):
                    adapters.add_metric([kind], sum(1 for r in registry.adapters.values() if r.kind == kind))
            for engine in host.engines():
                for pid in engine.process_ids():
                    try:
                        process = psutil.Process(pid)
                        memory.add_metric([engine.name, str(pid), process.name()], process.memory_full_info().uss)
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        continue
        yield adapters
        yield memory
