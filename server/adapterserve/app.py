"""The FastAPI app: `create_app(settings)` builds it; its lifespan owns the host and engines.

Nothing is created at import time. The host (and with it every vLLM engine) is started
when the app starts and shut down when it stops, so SIGTERM to the server leaves no
engine process behind.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from .api import admin, chat, classify, completions, files, fine_tuning, health, models, responses
from .api.tenancy import install_tenants
from .api.auth import require_api_key, require_server_view
from .api.errors import install_error_handlers
from .api.hosts import AllowedHosts, default_allowed_hosts
from .api.metrics_route import install_metrics_route
from .api.middleware import RequestContextMiddleware
from .api.openapi import install_openapi
from .config import Settings
from .finetuning.service import open_fine_tuning
from .hosting.protocol import Host, HostObserver
from .metrics import Metrics

log = logging.getLogger(__name__)

# (settings, the observer the metrics give the host) -> the host
HostFactory = Callable[[Settings, HostObserver], Host]


@asynccontextmanager
async def lifespan(app: FastAPI):
    """Prepare (in a child process, when something is missing), build the host, start its
    engines, serve, stop. A stop asked for during any of the start-up steps (`request_stop`:
    SIGTERM or SIGINT) ends that step at once, engines under construction included, and
    the server exits without serving."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    app.state.request_stop = lambda: loop.call_soon_threadsafe(stopping.set)
    host: Host | None = None
    try:
        if app.state.prepare is not None and not await _unless_stopped(app.state.prepare(app.state.settings), stopping):
            yield
            return
        factory: HostFactory = app.state.host_factory
        built = await _unless_stopped(_in_daemon_thread(factory, app.state.settings, app.state.metrics.observer()), stopping)
        if not built:
            yield
            return
        host = built[0]
        if not await _unless_stopped(host.start(), stopping):
            log.info("stopped during start-up")
            yield
            return
        app.state.host = host
        app.state.fine_tuning = await open_fine_tuning(app.state.settings, host)
        if app.state.fine_tuning is not None:
            app.state.metrics.bind_fine_tuning(app.state.fine_tuning)
        if host.remote_engines:  # Ray Serve: the replicas measure their engines themselves
            app.state.metrics.federate(host.metrics_pages)
        else:
            await app.state.metrics.bind_host(host)
        log.info("serving %s in %s mode", host.base_name or ", ".join(card.id for card in host.model_cards()), host.mode)
        yield
    except Exception as exc:
        log.error("adapterserve cannot start: %s", exc)
        raise
    finally:
        app.state.host = None
        if getattr(app.state, "fine_tuning", None) is not None:
            await app.state.fine_tuning.stop()
            app.state.fine_tuning = None
        await app.state.metrics.unbind_host()
        if host is not None:
            await host.stop()


def request_stop(app: FastAPI) -> None:
    """Ask a starting server to stop (the CLI's server calls it on SIGTERM and SIGINT);
    after start-up, uvicorn's own graceful shutdown applies."""
    stop = getattr(app.state, "request_stop", None)
    if stop is not None:
        stop()


async def _unless_stopped(step: Awaitable, stopping: asyncio.Event) -> tuple | None:
    """Run a start-up step until it ends or a stop is asked for: `(its result,)`, or None
    when the stop came first (the step is cancelled and awaited: a cancelled preparation
    stops its child process; engines under construction are stopped with the host)."""
    work = asyncio.ensure_future(step)
    stopped = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if work.done() and not stopping.is_set():
        return (work.result(),)
    work.cancel()
    try:
        await work
    except BaseException:  # cancelled, or failed because it was being stopped
        pass
    return None


def _in_daemon_thread(function, *args) -> asyncio.Future:
    """`function(*args)` in a daemon thread: building the host validates and copies adapter
    folders, which must neither hold the event loop (a stop could not be heard) nor, once
    abandoned by a stop, keep the process from exiting (asyncio.to_thread's threads are
    joined at exit)."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(outcome: BaseException | None, result=None) -> None:
        if future.done():  # abandoned by a stop
            return
        if outcome is None:
            future.set_result(result)
        else:
            future.set_exception(outcome)

    def run() -> None:
        try:
            result = function(*args)
        except BaseException as exc:
            outcome = (exc, None)
        else:
            outcome = (None, result)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:  # the loop has closed: the server stopped meanwhile
            pass

    threading.Thread(target=run, name="host-build", daemon=True).start()
    return future


def create_app(settings: Settings, host_factory: HostFactory | None = None) -> FastAPI:
    app = FastAPI(title="adapterserve", lifespan=lifespan)
    app.state.settings = settings
    app.state.prepare = None  # start-up's slow disk work, for the real host only
    if host_factory is None:
        from .hosting.builder import build_host as host_factory
        from .hosting.preparation import prepare

        app.state.prepare = prepare
    app.state.host_factory = host_factory
    app.state.host = None
    app.state.fine_tuning = None  # opened by the lifespan (shared mode on this machine)
    app.state.metrics = Metrics.from_settings(settings)
    metrics = app.state.metrics
    # what the request middleware tells when a request's status is known, and when it ends
    on_status, on_end = [metrics.request_answered], [metrics.request_ended]
    install_tenants(app, settings, metrics, on_end)
    install_error_handlers(app)
    for module in (chat, completions, responses, classify, models, files, fine_tuning):
        app.include_router(module.router, dependencies=[Depends(require_api_key)])
    app.include_router(admin.router)
    app.include_router(health.router)
    install_metrics_route(app, metrics, guard=require_server_view)
    install_openapi(app)
    app.add_middleware(RequestContextMiddleware, on_status=on_status, on_end=on_end)
    app.add_middleware(AllowedHosts, hosts=settings.allowed_hosts or default_allowed_hosts(settings.host))
    return app
