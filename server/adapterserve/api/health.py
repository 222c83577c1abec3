"""GET /health: 200 only when every engine answers; otherwise 503 naming the engine that is down.

Probes need no key. On a server with keys, the engines (models, in dedicated mode) are
named only to callers who may see the server (api/auth.py `may_see_server`)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from .auth import may_see_server

router = APIRouter()


@router.get("/health")
async def health(raw_request: Request):
    host = getattr(raw_request.app.state, "host", None)
    if host is None:
        return JSONResponse({"status": "starting", "engines": {}}, status_code=503)
    engines = await host.health()
    down = {name: reason for name, reason in engines.items() if reason}
    body = {
        "status": "ok" if not down else "degraded",
        "mode": host.mode,
        "engines": {name: reason or "ok" for name, reason in engines.items()},
    }
    if not may_see_server(raw_request):
        body.pop("engines")
    return JSONResponse(body, status_code=200 if engines and not down else 503)
