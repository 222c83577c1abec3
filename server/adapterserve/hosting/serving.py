"""Serving a parsed request, wherever it arrived: the FastAPI routes (api/) and the Ray
Serve replicas (rayserve/replica.py) both call these two steps.

1. `resolve`: the host resolves the request's model to a Target (engine + vLLM's name
   for it). A tenancy gate, when given, is asked first (a key that may not use the model
   gets exactly an unknown model's answer, and a throttled key makes the host validate,
   copy or swap nothing), and again for the name the host resolved to.
2. `run`: vLLM's own handler for the endpoint on the target's engine. The call is
   cancelled when the client disconnects first, as vLLM's own server does
   (`with_cancellation`): cancelling it aborts the request in the engine. A failure is
   vLLM's ErrorResponse, kept as vLLM's server would answer it, except a failure of an
   engine that died (Unavailable: 503 with Retry-After) and of an adapter whose request
   produced non-finite values (ServingFailed, saying whether it was quarantined).

vLLM's handlers read two things of the HTTP request: its headers (request id, tracing,
priority) and a `state` they write metadata to. The API passes its Starlette request;
a replica passes the forwarded headers as `RequestMeta`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Protocol

from pydantic import BaseModel

from adapterserve.errors import ClientGone, DomainError, EngineRejected, InvalidRequest, ServingFailed, engine_unavailable

from .protocol import Endpoint, Host, Target, requested_name


ENDPOINT_NAMES = {"chat": "/v1/chat/completions", "completion": "/v1/completions", "responses": "/v1/responses",
                  "classify": "/v1/classify"}


@dataclass
class RequestMeta:
    """What vLLM's handlers read of the HTTP request a request came in (see above)."""

    headers: Mapping[str, str]
    state: SimpleNamespace = field(default_factory=SimpleNamespace)


class Gate(Protocol):
    """A tenant's key, as serving asks it (api/tenancy.py implements it)."""

    def allow(self, name: str, asked: str) -> None:
        """Raise UnknownModel for `asked` unless the key may use the model `name`."""

    def admit(self) -> None:
        """Count the request against the key's limits (LimitExceeded when over)."""


async def resolve(host: Host, request: Any, endpoint: Endpoint, gate: Gate | None = None) -> Target:
    """Resolve the request's model and point the request at vLLM's name for it."""
    if gate is not None and isinstance(request.model, str):
        gate.allow(requested_name(request.model, host.base_name, host.fine_tuning_base), request.model)
        gate.admit()  # before the host does any work for it (discovery, a swap)
    target = await host.resolve(request.model, endpoint)
    if gate is not None:
        gate.allow(target.model, request.model)
    request.model = target.vllm_model
    return target


def _handler_call(target: Target, endpoint: Endpoint, request: Any, meta: Any):
    handler = target.engine.serving(endpoint)
    if handler is None:  # vLLM builds no handler for a task the model does not have
        if not target.engine.running:
            raise engine_unavailable(target.engine.name)
        raise InvalidRequest(
            f"The model `{target.model}` does not support the {ENDPOINT_NAMES.get(endpoint, endpoint)} endpoint.",
            param="model", code="unsupported_endpoint",
        )
    if endpoint == "chat":
        return handler.create_chat_completion(request, meta)
    if endpoint == "completion":
        return handler.create_completion(request, meta)
    if endpoint == "responses":
        return handler.create_responses(request, meta)
    return handler(request, meta)  # classify: vLLM's ServingClassification is called


async def run(
    host: Host, target: Target, endpoint: Endpoint, request: Any, meta: Any,
    disconnected: Callable[[], Awaitable[Any]] | None = None,
) -> Any:
    """vLLM's answer: a response model, an ErrorResponse, a classification JSONResponse,
    or an async iterator of SSE text (for every endpoint: the Responses API's events as
    vLLM's server writes them)."""
    from vllm.entrypoints.serve import create_error_response
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    call = _handler_call(target, endpoint, request, meta)  # raises at once when there is no handler
    work = asyncio.ensure_future(call)
    watch = asyncio.ensure_future(disconnected()) if disconnected is not None else None
    try:
        await asyncio.wait({t for t in (work, watch) if t is not None}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work, watch):
            if task is not None and not task.done():
                task.cancel()
    if not work.done() or work.cancelled():
        raise ClientGone("The client closed the request.", code="client_closed_request")
    try:
        result = work.result()
    except DomainError:
        raise  # already what went wrong (a Ray replica's answer, a host's refusal)
    except Exception as exc:
        result = create_error_response(exc)
    if isinstance(result, ErrorResponse) and _status(result) >= 500:
        _raise_serving_failure(host, target)
    elif endpoint == "classify" and getattr(result, "status_code", 200) >= 500 and not target.engine.running:
        raise engine_unavailable(target.engine.name)
    if endpoint == "responses" and not isinstance(result, BaseModel):  # (an ErrorResponse is one too)
        return _response_events(result)
    return result


def _raise_serving_failure(host: Host, target: Target) -> None:
    """A server-side failure: the engine died, or the adapter produced non-finite values."""
    if not target.engine.running:
        raise engine_unavailable(target.engine.name)
    state = host.nonfinite_state(target.model) if target.record is not None else None
    if state is not None:
        quarantined = state == "quarantined"
        raise ServingFailed(
            f"The adapter `{target.model}` produced non-finite values (NaN logits); the request was stopped"
            + (" and the adapter quarantined." if quarantined else "."), param="model",
            code="adapter_quarantined" if quarantined else "adapter_nonfinite",
        )


def _status(error: Any) -> int:
    code = error.error.code
    return int(code) if isinstance(code, int) else 500


def rejected(error: Any) -> EngineRejected:
    """vLLM's ErrorResponse as a domain error (for a caller with no HTTP layer of its own)."""
    info = error.error
    return EngineRejected(info.message, vllm_status=_status(error), param=info.param)


async def _response_events(events: AsyncIterator[Any]) -> AsyncIterator[str]:
    """The Responses API's stream events as SSE (`event:` and `data:` lines), as vLLM's own
    router writes them (events that arrive as SSE already pass as they are)."""
    async for event in events:
        if isinstance(event, str):
            yield event
            continue
        kind = getattr(event, "type", "unknown")
        yield f"event: {kind}\ndata: {event.model_dump_json(indent=None, by_alias=True)}\n\n"
