"""The FastAPI app: `create_app(settings)` builds it; its lifespan owns the host and engines.

Nothing is created at import time. The host (and with it every vLLM engine) is started
when the app starts and shut down when it stops, so SIGTERM to the server leaves no
engine process behind.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI

from .api import admin, chat, classify, completions, health, models
from .api.auth import require_api_key
from .api.errors import install_error_handlers
from .api.openapi import install_openapi
from .config import Settings
from .hosting.base import Host
from .metrics import Metrics

log = logging.getLogger(__name__)

HostFactory = Callable[[Settings], Host]


def build_host(settings: Settings) -> Host:
    """The real host for these settings: prepares the base, builds and validates adapters."""
    import os

    from .cpu_lora.plugin import ENV_SWITCH

    # vLLM loads the grouped-LoRA plugin in each engine process; they inherit this switch.
    os.environ[ENV_SWITCH] = "1" if settings.grouped_lora_ops else "0"
    from .hosting.shared import SharedBaseHost
    from .models import resolve_base_model
    from .registry.records import BaseModelInfo
    from .registry.store import open_registry

    base_path = resolve_base_model(settings.base_model, settings.models_dir)
    if settings.mode.value == "dedicated" and settings.dedicated_models:
        from .hosting.dedicated import DedicatedHost, discover_models

        return DedicatedHost(settings, discover_models(settings.dedicated_models))
    base_name = settings.served_model_name or Path(base_path).name
    stores = [Path(p) for p in settings.adapter_dirs]
    if settings.demo_adapters:
        from .training.demo import ensure_demo_adapters

        stores.append(ensure_demo_adapters(settings, base_path))
    registry = open_registry(settings, stores, base=BaseModelInfo.read(base_name, base_path), serving=True)
    if settings.mode.value == "dedicated":
        return build_dedicated_host(settings, base_path, registry)
    return SharedBaseHost(settings, base_path, base_name, registry)


def build_dedicated_host(settings: Settings, base_path: Path, registry) -> Host:
    """The given full models, or by default every demo adapter merged into a full model."""
    from .hosting.dedicated import DedicatedHost, discover_models
    from .training.merge import merge_adapters, merged_store

    paths = list(settings.dedicated_models)
    if not paths:
        merged = merge_adapters(base_path, list(registry.adapters.values()), merged_store(settings.cache_dir, base_path))
        paths = list(merged.values())
    return DedicatedHost(settings, discover_models(paths))


@asynccontextmanager
async def lifespan(app: FastAPI):
    factory: HostFactory = app.state.host_factory
    try:
        host = factory(app.state.settings)
        if hasattr(host, "check_budget"):
            host.check_budget()
    except Exception as exc:
        log.error("adapterserve cannot start: %s", exc)
        raise
    app.state.metrics.instrument(host)
    try:
        await host.start()
        app.state.host = host
        await app.state.metrics.bind_host(host)
        log.info("serving %s in %s mode", host.base_name, host.mode)
        yield
    finally:
        app.state.host = None
        await app.state.metrics.unbind_host()
        await host.stop()


def create_app(settings: Settings, host_factory: HostFactory | None = None) -> FastAPI:
    app = FastAPI(title="adapterserve", lifespan=lifespan)
    app.state.settings = settings
    app.state.host_factory = host_factory or build_host
    app.state.host = None
    app.state.metrics = Metrics.from_settings(settings)
    install_error_handlers(app)
    for module in (chat, completions, classify, models):
        app.include_router(module.router, dependencies=[Depends(require_api_key)])
    app.include_router(admin.router)
    app.include_router(health.router)
    app.state.metrics.attach(app)
    install_openapi(app)
    return app
