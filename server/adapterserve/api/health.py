"""GET /health: 200 only when every engine answers; otherwise 503 naming the engine that is down."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

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
    return JSONResponse(body, status_code=200 if engines and not down else 503)
