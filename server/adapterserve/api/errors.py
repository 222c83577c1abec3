"""Rendering errors as HTTP: one OpenAI error body everywhere, and one mapping from
exceptions (the hosts' `APIError`, FastAPI's, vLLM's) to statuses.

Body: {"error": {"message": str, "type": str, "param": str | null, "code": str | null}},
as the OpenAI API sends it, for every status (400, 401, 403, 404, 409, 503, 500) and
for errors inside an SSE stream. vLLM's own errors (whose `code` is the HTTP status)
are reshaped into it.
"""

from __future__ import annotations

import json
import logging
import re
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapterserve.errors import (  # noqa: F401 (re-exported for the endpoints)
    RETRY_AFTER_SECONDS,
    APIError,
    engine_unavailable,
    error_body,
    error_type_for,
    model_not_found,
)

log = logging.getLogger(__name__)

def render(error: APIError) -> JSONResponse:
    """The HTTP response for an error the hosts or the API raised."""
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def clean_param(param: str | None) -> str | None:
    """vLLM and FastAPI name fields as 'body.max_tokens'; clients know 'max_tokens'."""
    if param and param.startswith("body."):
        return param[len("body."):]
    if param == "body":
        return None
    return param


# vLLM words most parameter errors as "<field> must ..." without naming the param.
_FIELD_FIRST = re.compile(r"^([a-z][a-z0-9_]*) (?:must|should|cannot|is not|has to)\b")


def from_vllm_error(error: Any) -> APIError:
    """Reshape vLLM's ErrorResponse (code = HTTP status) into an APIError."""
    info = error.error
    status = int(info.code) if isinstance(info.code, int) else 500
    code = None
    message = info.message
    param = clean_param(info.param)
    if status == 400 and param is None and (match := _FIELD_FIRST.match(message)):
        param = match.group(1)
    if status == 400 and "maximum context length" in message:
        code = "context_length_exceeded"
    return APIError(status, message, param=param, code=code)


def from_validation_error(exc: ValidationError | RequestValidationError) -> APIError:
    """A 400 naming the first offending field, worded as vLLM's own server does."""
    from vllm.entrypoints.serve.exception_handling.handlers.validation import (
        _format_error,
        clean_loc_for_param,
    )
    from vllm.exceptions import VLLMValidationError

    errors = exc.errors()
    param = None
    for err in errors:
        ctx_error = (err.get("ctx") or {}).get("error") if isinstance(err, dict) else None
        if isinstance(ctx_error, VLLMValidationError):
            param = ctx_error.parameter
            break
    if param is None and errors and isinstance(errors[0], dict) and errors[0].get("loc"):
        param = clean_loc_for_param(tuple(errors[0]["loc"]))
    lines = [_format_error(err) for err in errors[:10]]
    message = f"{len(errors)} validation error(s): " + "; ".join(lines) if lines else "Validation error"
    return APIError(400, message, param=clean_param(param))


def streaming_error_line(status: int, message: str) -> str:
    return f"data: {json.dumps(error_body(status, message))}\n\n"


def reshape_stream_chunk(chunk: str) -> str:
    """vLLM reports an error inside an SSE stream as 'data: {"error": {... "code": 400}}';
    rewrite such a chunk into the OpenAI body, pass every other chunk through."""
    if not chunk.startswith('data: {"error"'):
        return chunk
    try:
        payload = json.loads(chunk[len("data: "):])
        info = payload["error"]
        status = int(info.get("code") or 500)
        return f"data: {json.dumps(error_body(status, info.get('message', 'error'), param=clean_param(info.get('param'))))}\n\n"
    except (ValueError, KeyError, TypeError):
        return chunk


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves the server as an OpenAI error body; nothing escapes as HTML."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return render(exc)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError):
        return render(from_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        return render(APIError(exc.status_code, message))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        log.exception("unhandled error")
        return render(APIError(500, f"Internal server error: {type(exc).__name__}"))
