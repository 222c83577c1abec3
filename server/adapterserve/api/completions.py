"""POST /v1/completions, served by vLLM's own completion handler."""

from __future__ import annotations

from fastapi import APIRouter, Request

from .serving import serve_generation

router = APIRouter()


@router.post("/v1/completions")
async def create_completion(raw_request: Request):
    return await serve_generation(raw_request, "completion")
