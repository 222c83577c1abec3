"""POST /v1/chat/completions, served by vLLM's own chat handler (the model's chat template)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from .serving import serve_generation

router = APIRouter()


@router.post("/v1/chat/completions")
async def create_chat_completion(raw_request: Request):
    return await serve_generation(raw_request, "chat")
