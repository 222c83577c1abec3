"""Bearer-key checks: a tenant's key from the keys file (tenants/keys.py), or without a
keys file one optional key for the API; the admin key, or a tenant key with the admin
scope, for the admin endpoints. Secrets are compared in constant time."""

from __future__ import annotations

import hmac

from fastapi import Request
from pydantic import SecretStr

from .errors import APIError
from .middleware import context_of

UNAUTHORIZED = "Incorrect or missing API key. Send 'Authorization: Bearer <key>'."


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(given: str | None, expected: SecretStr) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.get_secret_value().encode())


def _is_admin_key(request: Request) -> bool:
    expected = request.app.state.settings.admin_api_key
    return expected is not None and _matches(_bearer(request), expected)


async def require_api_key(request: Request) -> None:
    """Every /v1 endpoint. With a keys file, the request's tenant key (kept on the request
    for the model checks and the limits); the admin key sees everything."""
    settings, keys = request.app.state.settings, request.app.state.keys
    context = context_of(request)
    context.key = None
    if _is_admin_key(request):
        return
    if keys is not None:
        key = keys.lookup(_bearer(request))
        if key is None:
            raise APIError(401, UNAUTHORIZED, code="invalid_api_key")
        if "inference" not in key.scopes:
            raise APIError(403, "This API key may not call the inference API.", code="insufficient_scope")
        context.key = key  # the engine's traffic observer runs in this request's context
        return
    if settings.api_key is not None and not _matches(_bearer(request), settings.api_key):
        raise APIError(401, UNAUTHORIZED, code="invalid_api_key")


def may_see_server(request: Request) -> bool:
    """Whether the caller may read what spans tenants (/metrics: every adapter's name and
    traffic, tenants, process ids; /health's engines, which in dedicated mode are models):
    anyone on a server without keys; else the admin or metrics key, the API key of a
    single-key server, or a keys-file key with the metrics scope."""
    settings, keys = request.app.state.settings, request.app.state.keys
    if settings.api_key is None and keys is None:
        return True
    token = _bearer(request)
    single_key = settings.api_key if keys is None else None
    if any(expected is not None and _matches(token, expected) for expected in (settings.admin_api_key, settings.metrics_api_key, single_key)):
        return True
    key = keys.lookup(token) if keys is not None else None
    return key is not None and "metrics" in key.scopes


async def require_server_view(request: Request) -> None:
    """/metrics: see `may_see_server`."""
    if not may_see_server(request):
        raise APIError(401, "Incorrect or missing metrics key. Send 'Authorization: Bearer <metrics key>'.", code="invalid_api_key")


async def require_admin_key(request: Request) -> None:
    """Admin endpoints: the admin key (everything), or a tenant key with the admin scope
    (kept on the request as `admin_tenant`: it administers its own models only); closed
    when neither is configured."""
    settings, keys = request.app.state.settings, request.app.state.keys
    context_of(request).admin_tenant = None
    if settings.admin_api_key is None and keys is None:
        raise APIError(403, "The admin API is disabled: start the server with an admin API key.", code="admin_disabled")
    if _is_admin_key(request):
        return
    key = keys.lookup(_bearer(request)) if keys is not None else None
    if key is None:
        raise APIError(401, "Incorrect or missing admin API key. Send 'Authorization: Bearer <admin key>'.", code="invalid_api_key")
    if "admin" not in key.scopes:
        raise APIError(403, "This API key has no admin scope.", code="insufficient_scope")
    context_of(request).admin_tenant = key
