"""Bearer-key checks: one optional key for the API, one for the admin endpoints."""

from __future__ import annotations

import hmac

from fastapi import Request
from pydantic import SecretStr

from .errors import APIError


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(given: str | None, expected: SecretStr) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.get_secret_value().encode())


async def require_api_key(request: Request) -> None:
    """Every /v1 endpoint: the API key, when one is configured."""
    settings = request.app.state.settings
    if settings.api_key is None:
        return
    if settings.admin_api_key is not None and _matches(_bearer(request), settings.admin_api_key):
        return
    if not _matches(_bearer(request), settings.api_key):
        raise APIError(401, "Incorrect or missing API key. Send 'Authorization: Bearer <key>'.", code="invalid_api_key")


async def require_admin_key(request: Request) -> None:
    """Admin endpoints: the admin key, always; without a configured key they are closed."""
    settings = request.app.state.settings
    if settings.admin_api_key is None:
        raise APIError(403, "The admin API is disabled: start the server with an admin API key.", code="admin_disabled")
    if not _matches(_bearer(request), settings.admin_api_key):
        raise APIError(401, "Incorrect or missing admin API key. Send 'Authorization: Bearer <admin key>'.", code="invalid_api_key")
