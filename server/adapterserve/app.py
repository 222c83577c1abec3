"""The FastAPI app: `create_app(settings)` builds it; its lifespan owns the host and engines.

Nothing is created at import time. The host (and with it every vLLM engine) is started
when the app starts and shut down when it stops, so SIGTERM to the server leaves no
engine process behind.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from .api import admin, chat, classify, completions, health, models
from .api.tenancy import install_tenants
from .api.auth import require_api_key
from .api.errors import install_error_handlers
from .api.openapi import install_openapi
from .config import Settings
from .hosting.protocol import Host, HostObserver
from .metrics import Metrics

log = logging.getLogger(__name__)

# (settings, the observer the metrics give the host) -> the host
HostFactory = Callable[[Settings, HostObserver], Host]


@asynccontextmanager
async def lifespan(app: FastAPI):
    factory: HostFactory = app.state.host_factory
    try:
        host = factory(app.state.settings, app.state.metrics.observer())
    except Exception as exc:
        log.error("adapterserve cannot start: %s", exc)
        raise
    try:
        await host.start()
        app.state.host = host
        pages = getattr(host, "metrics_pages", None)
        if pages is not None:  # Ray Serve: the replicas measure their engines themselves
            app.state.metrics.federate(pages)
        else:
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
    if host_factory is None:
        from .hosting.builder import build_host as host_factory
    app.state.host_factory = host_factory
    app.state.host = None
    app.state.metrics = Metrics.from_settings(settings)
    install_tenants(app, settings, app.state.metrics)
    install_error_handlers(app)
    for module in (chat, completions, classify, models):
        app.include_router(module.router, dependencies=[Depends(require_api_key)])
    app.include_router(admin.router)
    app.include_router(health.router)
    app.state.metrics.attach(app)
    install_openapi(app)
    return app
