"""The series adapterserve records, by name, type and labels (docs/metrics.md's table
and the Grafana dashboard in deploy/ read them), in a registry of the app's own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from adapterserve.registry import kinds

LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Adapter loads take tens of ms on CPU; engine swaps tens of seconds.
LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
SWAP_BUCKETS = (1, 5, 10, 20, 30, 45, 60, 90, 120, 300)
# A fine-tuning job on CPU: tens of seconds (a small LoRA job) to hours.
JOB_BUCKETS = (10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)
JOB_STATES = ("validating_files", "queued", "running", "succeeded", "failed", "cancelled")


class Counters:
    def __init__(self, registry: CollectorRegistry):
        per_model = ["model", "endpoint"]
        self.requests = Counter(
            "adapterserve_requests", "HTTP requests by model, endpoint and status code.",
            ["model", "endpoint", "status"], registry=registry,
        )
        self.latency = Histogram(
            "adapterserve_request_duration_seconds",
            "End-to-end request time by model and endpoint (streams: until the last byte).",
            per_model, registry=registry, buckets=LATENCY_BUCKETS,
        )
        self.ttft = Histogram(
            "adapterserve_time_to_first_token_seconds",
            "Time from the engine receiving a request to its first generated token.",
            per_model, registry=registry, buckets=TOKEN_BUCKETS,
        )
        self.prompt_tokens = Counter(
            "adapterserve_prompt_tokens", "Prompt tokens processed, by model and endpoint.", per_model, registry=registry
        )
        self.generation_tokens = Counter(
            "adapterserve_generation_tokens", "Tokens generated, by model and endpoint.", per_model, registry=registry
        )
        self.adapter_load_seconds = Histogram(
            "adapterserve_adapter_load_seconds",
            "Time to load an adapter into its engine (registration, reload, admin load).",
            ["kind"], registry=registry, buckets=LOAD_BUCKETS,
        )
        self.adapter_loads = Counter(
            "adapterserve_adapter_loads", "Adapters that entered an engine's CPU cache.", ["kind"], registry=registry
        )
        self.adapter_evictions = Counter(
            "adapterserve_adapter_evictions", "Adapters that left an engine's CPU cache (LRU eviction or replacement).",
            ["kind"], registry=registry,
        )
        self.swap_seconds = Histogram(
            "adapterserve_model_swap_seconds",
            "Dedicated mode: time to swap a model's engine in (stop the LRU engine, start this one).",
            ["model"], registry=registry, buckets=SWAP_BUCKETS,
        )
        self.engine_restarts = Counter(
            "adapterserve_engine_restarts", "Engines restarted after they died, by engine.", ["engine"], registry=registry
        )
        self.tenant_requests = Counter(
            "adapterserve_tenant_requests", "HTTP requests by tenant (keys file) and status code.",
            ["tenant", "status"], registry=registry,
        )
        self.tenant_tokens = Counter(
            "adapterserve_tenant_tokens", "Tokens by tenant: prompt and generation.", ["tenant", "kind"], registry=registry,
        )
        self.tenant_rejections = Counter(
            "adapterserve_tenant_rejections", "Requests refused by tenant and reason: model_not_allowed, "
            "requests_per_minute, tokens_per_minute, concurrent_requests.", ["tenant", "reason"], registry=registry,
        )
        self.adapter_quarantines = Counter(
            "adapterserve_adapter_quarantines", "Adapters quarantined after their requests produced NaN logits.",
            ["kind"], registry=registry,
        )
        self.fine_tuning_jobs = Gauge(
            "adapterserve_fine_tuning_jobs", "Fine-tuning jobs by state (every tenant's), read from the jobs' store.",
            ["state"], registry=registry,
        )
        self.fine_tuning_tokens = Counter(
            "adapterserve_fine_tuning_trained_tokens", "Tokens trained on by fine-tuning jobs (each epoch counts).",
            registry=registry,
        )
        self.fine_tuning_job_seconds = Histogram(
            "adapterserve_fine_tuning_job_seconds", "Wall time of finished fine-tuning jobs, by the state they ended in.",
            ["state"], registry=registry, buckets=JOB_BUCKETS,
        )
        for state in ("succeeded", "failed", "cancelled"):  # the states a job ends in: zero series from the start
            self.fine_tuning_job_seconds.labels(state)
        for kind in kinds.ADAPTER_KINDS:  # zero series from the start: rate() needs a first sample
            self.adapter_loads.labels(kind)
            self.adapter_evictions.labels(kind)
            self.adapter_quarantines.labels(kind)
