"""Tenants in the app: the key store and limiter the requests use, and the middleware that
gives a request's place back to its key's concurrency limit when its response has ended
(streams: with their last byte)."""

from __future__ import annotations

from fastapi import FastAPI, Request

from adapterserve.tenants.keys import KeyStore
from adapterserve.tenants.limits import TenantLimiter


def install_tenants(app: FastAPI, settings, metrics) -> None:
    app.state.keys = KeyStore(settings.keys_file) if settings.keys_file is not None else None
    app.state.limiter = TenantLimiter()
    metrics.token_listeners.append(app.state.limiter.record_tokens)

    @app.middleware("http")
    async def _release_when_done(request: Request, call_next):
        response = await call_next(request)
        key = getattr(request.state, "admitted", None)
        if key is None:
            return response
        body = response.body_iterator

        async def released_body():
            try:
                async for chunk in body:
                    yield chunk
            finally:
                app.state.limiter.release(key)

        response.body_iterator = released_body()
        return response
