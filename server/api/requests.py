"""Shared plumbing of the OpenAI endpoints: parse the body with vLLM's protocol models,
route it through the host, hand it to vLLM's serving object, and shape the answer.

The body is parsed as JSON whatever the Content-Type says (`curl -d` sends form
encoding), so a quick curl works as it does against the OpenAI API.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

from server.hosting.base import Endpoint, Target

from .errors import APIError, from_validation_error, from_vllm_error, reshape_stream_chunk, streaming_error_line


async def read_json_object(raw_request: Request) -> dict[str, Any]:
    body = await raw_request.body()
    if not body:
        raise APIError(400, "The request body is empty; send a JSON object.")
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"The request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise APIError(400, "The request body must be a JSON object.")
    return payload


async def parse_request(raw_request: Request, model_cls: type[BaseModel]) -> BaseModel:
    return validate(await read_json_object(raw_request), model_cls.model_validate)


def validate(payload: dict, validator) -> Any:
    """Run vLLM's request validation; every failure is a 400 naming the param."""
    from vllm.exceptions import VLLMError

    try:
        return validator(payload)
    except ValidationError as exc:
        raise from_validation_error(exc) from None
    except VLLMError as exc:  # vLLM's model validators raise their own errors (with the param)
        from vllm.entrypoints.serve import create_error_response

        raise from_vllm_error(create_error_response(exc)) from None


async def route(raw_request: Request, request: Any, endpoint: Endpoint) -> Target:
    """Resolve the model through the host and point the request at vLLM's name for it."""
    target = await raw_request.app.state.host.resolve(request.model, endpoint)
    request.model = target.vllm_model
    raw_request.state.target = target  # for metrics and logs
    return target


async def serve_generation(raw_request: Request, endpoint: Endpoint) -> JSONResponse | StreamingResponse:
    """/v1/chat/completions and /v1/completions: vLLM's request model and handler for the endpoint."""
    if endpoint == "chat":
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as request_cls
    else:
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest as request_cls
    request = await parse_request(raw_request, request_cls)
    target = await route(raw_request, request, endpoint)
    handler = target.engine.serving(endpoint)
    create = handler.create_chat_completion if endpoint == "chat" else handler.create_completion
    return answer(await call_vllm(create(request, raw_request)))


async def call_vllm(awaitable) -> Any:
    """Await a vLLM serving call; an exception it raises becomes the status vLLM's own
    server would give it (400 for a client's mistake, 500 for a server fault)."""
    from vllm.entrypoints.serve import create_error_response

    try:
        return await awaitable
    except APIError:
        raise
    except Exception as exc:
        raise from_vllm_error(create_error_response(exc)) from None


def answer(result: Any) -> JSONResponse | StreamingResponse:
    """vLLM's result -> the HTTP answer: an error body, a JSON body or an SSE stream."""
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    if isinstance(result, ErrorResponse):
        raise from_vllm_error(result)
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump())
    return StreamingResponse(_openai_stream(result), media_type="text/event-stream")


async def _openai_stream(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    try:
        async for chunk in chunks:
            yield reshape_stream_chunk(chunk)
    except Exception as exc:  # the stream has started: report inside it, then end it
        yield streaming_error_line(500, f"stream failed: {type(exc).__name__}: {exc}")
        yield "data: [DONE]\n\n"
