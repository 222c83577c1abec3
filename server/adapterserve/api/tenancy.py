"""Tenants in the app: the key store and limiter the requests use, and giving a request's
place back to its key's concurrency limit when its answer has ended (streams: before
their last message; api/middleware.py calls `release` then)."""

from __future__ import annotations

from fastapi import FastAPI

from adapterserve.request_context import RequestContext
from adapterserve.tenants.keys import KeyStore
from adapterserve.tenants.limits import TenantLimiter


def install_tenants(app: FastAPI, settings, metrics, on_end: list) -> None:
    """`on_end`: the request middleware's end listeners (api/middleware.py)."""
    app.state.keys = KeyStore(settings.keys_file) if settings.keys_file is not None else None
    app.state.limiter = limiter = TenantLimiter()
    metrics.token_listeners.append(limiter.record_tokens)

    def release(context: RequestContext, status: int, seconds: float) -> None:
        if context.admitted is not None:
            limiter.release(context.admitted)

    on_end.append(release)
