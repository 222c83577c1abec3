"""GET /metrics: the Prometheus page (vLLM's registry, adapterserve's, and on Ray Serve the
replicas'), behind a guard that refuses callers who may not read every tenant's series."""

from __future__ import annotations

from fastapi import Depends, FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST


def install_metrics_route(app: FastAPI, metrics, guard=None) -> None:
    @app.get("/metrics", include_in_schema=False, dependencies=[Depends(guard)] if guard is not None else [])
    async def _metrics() -> Response:
        return Response(await metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
