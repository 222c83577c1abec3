"""The Ray Serve application of adapterserve: `build` for a Serve config's `import_path`
(`adapterserve.rayserve.app:build`), `run_local` for `adapterserve serve --ray`.

    ingress (1 replica, no CPU reserved)  ->  EngineReplica x N (ray_replica_cpus each)

The base model and the demo adapters are prepared once, before the replicas start, so N
replicas never build the same files at once.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

from adapterserve.config import Settings, load_settings

log = logging.getLogger(__name__)

APP_NAME = "adapterserve"
# Requests one replica accepts at once before Ray queues them at the router: the engine
# batches up to max_num_seqs, and twice that keeps its queue full (Ray's default is 5).
QUEUE_FACTOR = 2
INGRESS_MAX_ONGOING = 1000


def plain_settings(settings: Settings) -> Settings:
    """The same values as a plain Settings (a YAML-backed subclass is made per file)."""
    return Settings.model_construct(**settings.model_dump())


def prepare(settings: Settings) -> None:
    """The embedded base and the demo adapters, built now if missing."""
    from adapterserve.base_model import resolve_base_model

    base_path = resolve_base_model(settings.base_model, settings.models_dir)
    if settings.demo_adapters:
        from adapterserve.training.demo import ensure_demo_adapters

        ensure_demo_adapters(settings, base_path)


def application(settings: Settings):
    """The bound application: the ingress over the engine replicas."""
    from ray import serve

    from . import ingress, replica

    settings = plain_settings(settings)
    max_adapters = settings.ray_max_adapters_per_replica or settings.max_cpu_loras
    engines = serve.deployment(
        replica.deployment(max_adapters),
        name="EngineReplica",
        num_replicas=settings.replicas,
        ray_actor_options={"num_cpus": settings.ray_replica_cpus},
        max_ongoing_requests=QUEUE_FACTOR * settings.max_num_seqs,
        graceful_shutdown_timeout_s=30,
        health_check_period_s=10,
    )
    front = serve.deployment(
        ingress.deployment(),
        name="Ingress",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=INGRESS_MAX_ONGOING,
    )
    return front.bind(engines.bind(settings), settings, settings.ray_adapter_affinity)


def build(args: dict[str, Any]):
    """Application builder for Serve configs: `args` are settings (the keys of the YAML
    settings file), plus `config`: a settings file to start from."""
    args = dict(args or {})
    config = args.pop("config", None)
    settings = load_settings(Path(config) if config else None, **args)
    prepare(settings)
    return application(settings)


def run_local(settings: Settings) -> None:
    """`adapterserve serve --ray`: deploy on a Ray cluster (a local one unless
    --ray-address), serve HTTP on --host/--port until SIGINT or SIGTERM, then take the
    application down (and the local cluster with it)."""
    import ray
    from ray import serve

    prepare(settings)
    ray.init(address=settings.ray_address, include_dashboard=False, configure_logging=False)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(application(settings), name=APP_NAME, route_prefix="/", blocking=False)
        log.info("adapterserve on Ray Serve: http://%s:%d (%d engine replicas)", settings.host, settings.port, settings.replicas)
        stop.wait()
    finally:
        log.info("taking the Ray Serve application down")
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
