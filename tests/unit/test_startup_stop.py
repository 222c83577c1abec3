"""A stop asked for during start-up ends it at once: the app's lifespan stops a host
whose engines are still starting, and a building host is not waited for."""

from __future__ import annotations

import asyncio
import threading
import time

from adapterserve.app import create_app, request_stop
from adapterserve.config import Settings
from adapterserve.hosting.protocol import HostObserver


class NeverReadyHost:
    """A host whose engines take forever to start (a first compile, as far as a test cares)."""

    base_name, mode = "never", "shared"

    def __init__(self):
        self.stopped = False
        self.started = False
        self.start_cancelled = False

    async def start(self):
        self.started = True
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.start_cancelled = True
            raise

    async def stop(self):
        self.stopped = True


def run_lifespan_and_stop(app, after_s: float) -> float:
    """Enter the app's lifespan, ask for a stop `after_s` later; seconds until it returned."""
    async def scenario():
        loop = asyncio.get_running_loop()
        loop.call_later(after_s, request_stop, app)
        began = time.monotonic()
        async with app.router.lifespan_context(app):
            pass
        return time.monotonic() - began

    return asyncio.run(asyncio.wait_for(scenario(), timeout=30))


def test_a_stop_while_the_engines_start_stops_the_host_at_once():
    host = NeverReadyHost()
    app = create_app(Settings(demo_adapters=False), host_factory=lambda settings, observer: host)
    took = run_lifespan_and_stop(app, 0.3)
    assert took < 2
    assert host.start_cancelled and host.stopped
    assert app.state.host is None  # nothing was served


def test_a_stop_while_the_host_is_built_does_not_wait_for_the_build():
    release = threading.Event()
    built = []

    def slow_factory(settings: Settings, observer: HostObserver):
        release.wait(60)  # validating and copying a large store, say
        built.append(NeverReadyHost())
        return built[-1]

    app = create_app(Settings(demo_adapters=False), host_factory=slow_factory)
    took = run_lifespan_and_stop(app, 0.3)
    release.set()
    assert took < 2
    for _ in range(20):
        if built:
            break
        time.sleep(0.05)
    assert built and not built[0].started  # the host built after the stop is never started
