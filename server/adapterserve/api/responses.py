"""POST /v1/responses: OpenAI's Responses API, served by vLLM's own handler with the same
routing, tenancy, limits, errors and metrics as chat.

Stored responses (`GET /v1/responses/{id}`, `previous_response_id`, `background`) are not
served: vLLM keeps them in one engine's memory, unbounded and unseen by tenancy, so its
store stays off (vLLM then answers every request with `store` false)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from .serving import serve_generation

router = APIRouter()


@router.post("/v1/responses")
async def create_response(raw_request: Request):
    return await serve_generation(raw_request, "responses")
