"""Tokens and time to first token per model, seen where vLLM's serving code meets its engine.

vLLM's own token counters are per engine, not per adapter. Every request of every
endpoint passes through the engine client's `generate` (or `encode` for classification),
with the adapter in `lora_request`; wrapping those two methods of a started engine's
client sees each request's tokens and first-token time, whatever the endpoint or
streaming. The endpoint and the tenant's key come from the request's context (request_context.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from adapterserve.request_context import current


@dataclass
class RequestTraffic:
    model: str
    endpoint: str
    prompt_tokens: int = 0
    generation_tokens: int = 0
    time_to_first_token: float | None = None
    tenant: str | None = None  # the request's key's tenant (with a keys file)
    key_id: str | None = None


Observer = Callable[[RequestTraffic], None]


def observe_client(client, base_name: str, observer: Observer) -> None:
    """Wrap `client.generate` and `client.encode` (instance attributes shadow the methods)."""
    client.generate = _observed(client.generate, base_name, observer, counts_generation=True)
    client.encode = _observed(client.encode, base_name, observer, counts_generation=False)


def _observed(method, base_name: str, observer: Observer, counts_generation: bool):
    async def observed(*args, **kwargs):
        lora = kwargs.get("lora_request")
        context = current()
        key = context.key
        traffic = RequestTraffic(
            model=lora.lora_name if lora is not None else base_name, endpoint=context.endpoint or "unknown",
            tenant=key.tenant if key is not None else None, key_id=key.id if key is not None else None,
        )
        params = args[1] if len(args) > 1 else kwargs.get("sampling_params")
        kind = getattr(params, "output_kind", None)
        began = time.perf_counter()
        # Per completion index: DELTA outputs carry new tokens, the other kinds all so far.
        tokens: dict[int, int] = {}
        try:
            async for output in method(*args, **kwargs):
                traffic.prompt_tokens = len(getattr(output, "prompt_token_ids", None) or []) or traffic.prompt_tokens
                if counts_generation:
                    _count_tokens(output, kind, tokens, traffic, began)
                yield output
        finally:
            traffic.generation_tokens = sum(tokens.values())
            observer(traffic)
            if context.traffic is not None:  # a Ray replica reports the tokens to its ingress
                context.traffic.append(traffic)

    return observed


def _count_tokens(output, kind, tokens: dict[int, int], traffic: RequestTraffic, began: float) -> None:
    from vllm.sampling_params import RequestOutputKind

    delta = kind == RequestOutputKind.DELTA
    new_tokens = False
    for completion in output.outputs:
        count = len(completion.token_ids or ())
        new_tokens = new_tokens or count > 0
        tokens[completion.index] = tokens.get(completion.index, 0) + count if delta else count
    if traffic.time_to_first_token is None and new_tokens:
        stats = getattr(output, "metrics", None)
        latency = getattr(stats, "first_token_latency", 0.0) if stats is not None else 0.0
        # The engine's own figure where it keeps stats (it also covers non-streamed
        # requests); else when the first tokens arrive, which only a stream tells apart
        # from the end (a FINAL_ONLY request's first output is its last).
        if latency > 0:
            traffic.time_to_first_token = latency
        elif kind != RequestOutputKind.FINAL_ONLY:
            traffic.time_to_first_token = time.perf_counter() - began
