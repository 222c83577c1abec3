"""POST /v1/chat/completions, served by vLLM's own chat handler (the model's chat template)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from .requests import answer, call_vllm, parse_request, route

router = APIRouter()


@router.post("/v1/chat/completions")
async def create_chat_completion(raw_request: Request):
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    request = await parse_request(raw_request, ChatCompletionRequest)
    target = await route(raw_request, request, "chat")
    return answer(await call_vllm(target.engine.serving("chat").create_chat_completion(request, raw_request)))
