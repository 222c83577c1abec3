"""POST /v1/classify: a head adapter labels each input.

vLLM's own classification handler computes the probabilities (request and response as
vLLM's /classify); adapterserve adds each head's label names and the label index.
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import TypeAdapter

from .errors import APIError, from_vllm_error
from .serving import check_ceilings, read_json_object, route, run_with_vllm, validate

router = APIRouter()


def _check_input(payload: dict) -> None:
    value = payload.get("input")
    if value is None:
        raise APIError(400, "'input' is required: a string or a list of strings.", param="input")
    if isinstance(value, list) and not value:
        raise APIError(400, "'input' must not be an empty list.", param="input")
    if isinstance(value, str) and not value.strip():
        raise APIError(400, "'input' must not be empty.", param="input")


@router.post("/v1/classify")
async def create_classification(raw_request: Request):
    from vllm.entrypoints.pooling.classify.protocol import ClassificationRequest

    payload = await read_json_object(raw_request)
    if "messages" not in payload:
        _check_input(payload)
    request = validate(payload, TypeAdapter(ClassificationRequest).validate_python)
    check_ceilings(request, "classify", raw_request.app.state.settings)
    target = await route(raw_request, request, "classify")
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    response = await run_with_vllm(target, "classify", request, raw_request)
    if isinstance(response, ErrorResponse):  # vLLM's handler raised: its status and message (a bad input is a 400)
        raise from_vllm_error(response)
    body = json.loads(response.body)
    if response.status_code != 200 or "error" in body:
        raise from_vllm_error(ErrorResponse.model_validate(body))
    labels = target.record.labels if target.record else []
    for item in body.get("data", []):
        probs = item.get("probs") or []
        best = max(range(len(probs)), key=probs.__getitem__) if probs else None
        item["label_index"] = best
        if best is not None and best < len(labels):
            item["label"] = labels[best]
        item["labels"] = labels[: len(probs)]
    body["model"] = target.model
    return JSONResponse(body)
