"""The OpenAPI document, with the request bodies the endpoints accept.

The endpoints read their bodies themselves (to parse any Content-Type as JSON, to bound
size and depth, and to hand vLLM's own request models to vLLM's handlers), so FastAPI
cannot see the bodies. This fills them in from the same vLLM models, when the document
is first asked for (never at import time: vLLM is heavy to import). Clients and the fuzz
tests read the result from /openapi.json.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi


def _chat():
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    return ChatCompletionRequest


def _completion():
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    return CompletionRequest


def _responses():
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest

    return ResponsesRequest


def _classify():
    from vllm.entrypoints.pooling.classify.protocol import ClassificationRequest

    return ClassificationRequest


def _load_lora():
    from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

    return LoadLoRAAdapterRequest


def _unload_lora():
    from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest

    return UnloadLoRAAdapterRequest


REQUEST_BODIES: dict[str, Callable[[], type]] = {
    "/v1/chat/completions": _chat,
    "/v1/completions": _completion,
    "/v1/responses": _responses,
    "/v1/classify": _classify,
    "/v1/load_lora_adapter": _load_lora,
    "/v1/unload_lora_adapter": _unload_lora,
}


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict:
        if app.openapi_schema is None:
            from pydantic import TypeAdapter

            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for path, model in REQUEST_BODIES.items():
                operation = schema["paths"].get(path, {}).get("post")
                if operation is None:
                    continue
                body = TypeAdapter(model()).json_schema(ref_template="#/components/schemas/{model}")
                components.update(body.pop("$defs", {}))
                operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
