"""Shared plumbing of the OpenAI endpoints: parse the body with vLLM's protocol models,
route it through the host, hand it to vLLM's serving object, and shape the answer.

Only `application/json` bodies are read (415 otherwise, as vLLM's own server answers):
a web page may send form-encoded or text/plain bodies to a server on localhost without
asking first (no CORS preflight), JSON it may not. NaN and Infinity are not JSON and are
refused. What one request may cost (`n`, output tokens, prompts or inputs per request)
is checked on the parsed request, after vLLM's models have converted "64" and 64.0 to 64.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

from adapterserve.errors import LimitExceeded, model_not_found
from adapterserve.hosting import serving
from adapterserve.hosting.protocol import Endpoint, Target

from .middleware import context_of
from .errors import APIError, from_validation_error, from_vllm_error, reshape_stream_chunk, streaming_error_line

log = logging.getLogger(__name__)


async def read_body(raw_request: Request, limit: int) -> bytes:
    """The body, read up to `limit` bytes: a longer one is a 413, whatever Content-Length said."""
    body = b"".join([chunk async for chunk in bounded_request(raw_request, limit).stream()])
    raw_request._body = body  # Starlette's cache: later reads (vLLM's handlers) get it
    return body


def bounded_request(raw_request: Request, limit: int) -> Request:
    """The request, whose body is read as it streams (not held here) and is a 413 once past
    `limit` bytes, whatever Content-Length said: for bodies parsed as they arrive (uploads)."""
    declared = raw_request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    received = 0

    async def receive():
        nonlocal received
        message = await raw_request.receive()
        received += len(message.get("body", b""))
        if received > limit:
            raise _too_large(limit)
        return message

    return Request(raw_request.scope, receive)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than {limit} bytes.", code="request_too_large")


def json_depth(value: Any) -> int:
    """Nesting depth of lists and objects, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in item if isinstance(child, (list, dict)))
    return deepest


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not a JSON value")


def check_json_content_type(raw_request: Request) -> None:
    media_type = raw_request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise APIError(
            415, "The request body must be JSON sent with 'Content-Type: application/json'.",
            code="unsupported_media_type",
        )


async def read_json_object(raw_request: Request) -> dict[str, Any]:
    """The body as a JSON object within the server's limits (type, size, nesting)."""
    settings = raw_request.app.state.settings
    check_json_content_type(raw_request)
    body = await read_body(raw_request, settings.max_request_body_bytes)
    if not body.strip():
        raise APIError(400, "The request body is empty; send a JSON object.")
    try:
        payload = json.loads(body, parse_constant=_not_json)
    except RecursionError:
        raise _too_deep(settings.max_json_depth) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"The request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise APIError(400, "The request body must be a JSON object.")
    if json_depth(payload) > settings.max_json_depth:
        raise _too_deep(settings.max_json_depth)
    return payload


def _too_deep(limit: int) -> APIError:
    return APIError(400, f"The request body is nested deeper than {limit} levels.", code="request_too_deep")


# the fields that bound a request's output tokens, per endpoint; the first one is set to the
# server's ceiling when the client sets none (vLLM would otherwise allow the whole context)
OUTPUT_TOKEN_FIELDS = {
    "chat": ("max_completion_tokens", "max_tokens"),
    "completion": ("max_tokens",),
    "responses": ("max_output_tokens",),
}


def check_ceilings(request: Any, endpoint: Endpoint, settings) -> None:
    """What one request may cost, on the parsed request: `n`, output tokens (a default
    ceiling where none is given: `max_output_tokens`, within the context), and prompts
    or inputs per request (each is a sequence the engine runs)."""
    values = vars(request)  # the parsed fields (a deprecated field's getter would warn)
    n = values.get("n")
    if isinstance(n, int) and n > settings.max_n:
        raise APIError(400, f"n must be at most {settings.max_n} on this server.", param="n")
    fields = OUTPUT_TOKEN_FIELDS.get(endpoint, ())
    for field in fields:
        value = values.get(field)
        if isinstance(value, int) and value > settings.max_output_tokens:
            raise APIError(400, f"{field} must be at most {settings.max_output_tokens} on this server.", param=field)
    if fields and all(values.get(field) is None for field in fields):
        setattr(request, fields[0], min(settings.max_output_tokens, settings.max_model_len))
    param = {"completion": "prompt", "classify": "input"}.get(endpoint)
    count = _sequences(values.get(param)) if param else 1
    if count > settings.max_inputs_per_request:
        raise APIError(
            400, f"'{param}' holds {count} items; at most {settings.max_inputs_per_request} per request on this server.",
            param=param,
        )


def _sequences(value: Any) -> int:
    """Prompts or inputs in a request's field: one text or token list, or a list of them."""
    if isinstance(value, list) and value and isinstance(value[0], (str, list, dict)):
        return len(value)
    return 1


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
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
        # vLLM's "before" validators index the raw body; a field of the wrong type (null
        # where a list belongs) fails there with a plain exception: the client's mistake.
        raise APIError(400, f"The request body is not a valid request: {type(exc).__name__}: {str(exc)[:200]}") from None


async def route(raw_request: Request, request: Any, endpoint: Endpoint) -> Target:
    """Resolve the model through the host (hosting/serving.py), with the request's key as
    the tenancy gate, and keep the target for the metrics and logs."""
    key = context_of(raw_request).key
    host = raw_request.app.state.host
    gate = KeyGate(raw_request, key, host.base_name) if key is not None else None
    target = await serving.resolve(host, request, endpoint, gate)
    context_of(raw_request).target = target  # for metrics and logs
    return target


def key_may_use(raw_request: Request, key, name: str, base_name: str | None, owners: dict[str, str] | None = None) -> bool:
    """Whether a tenant's key may use model `name`: a fine-tuned model belongs to the tenant
    whose job produced it (no entry in the keys file needed, and no other tenant's `*`
    reaches it); any other model as the keys file says. `owners`: the fine-tuned models'
    owners read once for many names (`fine_tuned_owners`)."""
    if owners is None:
        fine_tuning = raw_request.app.state.fine_tuning
        owner = fine_tuning.store.owner_of(name) if fine_tuning is not None else None
    else:
        owner = owners.get(name)
    if owner is not None:
        return owner == key.tenant
    return key.may_use(name, base_name)


def fine_tuned_owners(raw_request: Request) -> dict[str, str]:
    fine_tuning = raw_request.app.state.fine_tuning
    return fine_tuning.store.owners() if fine_tuning is not None else {}


class KeyGate:
    """A tenant's key as the serving gate: a model it may not use is answered exactly as an
    unknown model (given before the host looks at it), and the request counts against the
    key's limits before the host does any work for it (429 when over)."""

    def __init__(self, raw_request: Request, key, base_name: str | None):
        self.raw_request, self.key, self.base_name = raw_request, key, base_name

    def allow(self, name: str, asked: str) -> None:
        if not key_may_use(self.raw_request, self.key, name, self.base_name):
            context_of(self.raw_request).rejection = "model_not_allowed"
            log.info("tenant %s (key %s): model %r not allowed, answered as unknown", self.key.tenant, self.key.id, asked)
            raise model_not_found(asked)

    def admit(self) -> None:
        """Count the request against the key's limits (429 when over); the request
        middleware gives its place back when its answer has ended (api/tenancy.py)."""
        key = self.key
        try:
            self.raw_request.app.state.limiter.admit(key)
        except LimitExceeded as exc:
            context_of(self.raw_request).rejection = exc.reason
            log.info("tenant %s (key %s): 429, %s", key.tenant, key.id, exc.reason)
            raise
        context_of(self.raw_request).admitted = key


def generation_request_class(endpoint: Endpoint) -> type[BaseModel]:
    """vLLM's own request model of a generation endpoint."""
    if endpoint == "chat":
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as request_cls
    elif endpoint == "responses":
        from vllm.entrypoints.openai.responses.protocol import ResponsesRequest as request_cls
    else:
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest as request_cls
    return request_cls


async def serve_generation(raw_request: Request, endpoint: Endpoint) -> JSONResponse | StreamingResponse:
    """/v1/chat/completions, /v1/completions and /v1/responses: vLLM's request model and
    handler for the endpoint."""
    request = await parse_request(raw_request, generation_request_class(endpoint))
    check_ceilings(request, endpoint, raw_request.app.state.settings)
    target = await route(raw_request, request, endpoint)
    return answer(await run_with_vllm(target, endpoint, request, raw_request))


async def run_with_vllm(target: Target, endpoint: Endpoint, request: Any, raw_request: Request) -> Any:
    """vLLM's handler for the endpoint on the target's engine (hosting/serving.py), given
    up when the client disconnects first."""
    from vllm.entrypoints.serve.utils.api_utils import listen_for_disconnect

    host = raw_request.app.state.host
    return await serving.run(host, target, endpoint, request, raw_request, lambda: listen_for_disconnect(raw_request))


def answer(result: Any) -> JSONResponse | StreamingResponse:
    """vLLM's result -> the HTTP answer: an error body, a JSON body or an SSE stream."""
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    if isinstance(result, ErrorResponse):
        raise from_vllm_error(result)
    if isinstance(result, BaseModel):
        # by alias, in JSON form: as vLLM's own server answers (the Responses API's models use aliases)
        return JSONResponse(result.model_dump(mode="json", by_alias=True))
    return StreamingResponse(_openai_stream(result), media_type="text/event-stream")


async def _openai_stream(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    try:
        async for chunk in chunks:
            yield reshape_stream_chunk(chunk)
    except Exception as exc:  # the stream has started: report inside it, then end it
        yield streaming_error_line(500, f"stream failed: {type(exc).__name__}: {exc}")
        yield "data: [DONE]\n\n"
