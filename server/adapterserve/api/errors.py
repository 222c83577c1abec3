"""Rendering errors as HTTP: one OpenAI error body everywhere, and one mapping from
exceptions (the domain's errors through `STATUS_BY_ERROR`, FastAPI's, vLLM's) to statuses.

Body: {"error": {"message": str, "type": str, "param": str | null, "code": str | null}},
as the OpenAI API sends it, for every status (400, 401, 403, 404, 409, 503, 500) and
for errors inside an SSE stream. vLLM's own errors (whose `code` is the HTTP status)
are reshaped into it.
"""

from __future__ import annotations

import json
import logging
import math
import re
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapterserve import errors as domain
from adapterserve.errors import DomainError

log = logging.getLogger(__name__)

# The OpenAI API's error types by status.
_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    499: "invalid_request_error",
    501: "not_implemented_error",
    503: "service_unavailable_error",
}

# The one table from the domain's errors (errors.py) to HTTP statuses.
STATUS_BY_ERROR: dict[type[DomainError], int] = {
    domain.InvalidRequest: 400,
    domain.UnknownModel: 404,
    domain.NotFound: 404,
    domain.Conflict: 409,
    domain.Forbidden: 403,
    domain.LimitExceeded: 429,
    domain.Unavailable: 503,
    domain.ServingFailed: 500,
    domain.ClientGone: 499,  # nginx's "client closed request": only logs and metrics see it
}


def error_type_for(status: int) -> str:
    return _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type_for(status), "param": param, "code": code}}


class APIError(Exception):
    """An error the API answers with its status and OpenAI body (the API's own refusals,
    and every domain error once mapped: `as_api_error`)."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def status_of(error: DomainError) -> int:
    if isinstance(error, domain.EngineRejected):
        return error.vllm_status  # as vLLM's own server would answer it
    return next((status for cls, status in STATUS_BY_ERROR.items() if isinstance(error, cls)), 500)


def as_api_error(error: DomainError) -> APIError:
    if isinstance(error, domain.EngineRejected) and error.code is None:
        return _vllm_shaped(error.vllm_status, error.message, error.param)
    headers = {}
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_s)))
    return APIError(status_of(error), error.message, param=error.param, code=error.code, headers=headers)


def render(error: APIError | DomainError) -> JSONResponse:
    """The HTTP response for an error the hosts or the API raised."""
    if isinstance(error, DomainError):
        error = as_api_error(error)
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
    return _vllm_shaped(int(info.code) if isinstance(info.code, int) else 500, info.message, info.param)


def _vllm_shaped(status: int, message: str, param: str | None) -> APIError:
    code = None
    param = clean_param(param)
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

    @app.exception_handler(DomainError)
    async def _domain_error(_: Request, exc: DomainError):
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
