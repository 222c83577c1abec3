"""POST /v1/completions, served by vLLM's own completion handler."""

from __future__ import annotations

from fastapi import APIRouter, Request

from .requests import answer, call_vllm, parse_request, route

router = APIRouter()


@router.post("/v1/completions")
async def create_completion(raw_request: Request):
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    request = await parse_request(raw_request, CompletionRequest)
    target = await route(raw_request, request, "completion")
    return answer(await call_vllm(target.engine.serving("completion").create_completion(request, raw_request)))
