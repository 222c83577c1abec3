"""The errors the hosts raise, as data: a status and the OpenAI error body.

A leaf module: it imports neither FastAPI nor vLLM, so the hosts, the registry and the
API can all import it; `api/errors.py` renders these as HTTP responses.
Body: {"error": {"message": str, "type": str, "param": str | null, "code": str | null}}.
"""

from __future__ import annotations

from typing import Any

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


def error_type_for(status: int) -> str:
    return _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")


class APIError(Exception):
    """An error the API answers with its status and OpenAI body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
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


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    return {
        "error": {
            "message": message,
            "type": error_type_for(status),
            "param": param,
            "code": code,
        }
    }


def model_not_found(name: str) -> APIError:
    return APIError(
        404,
        f"The model `{name}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


RETRY_AFTER_SECONDS = 10  # an engine restarts in ~30 s; clients poll a few times meanwhile


def engine_unavailable(engine: str) -> APIError:
    """A request for an engine that is down (dead, or restarting)."""
    return APIError(
        503, f"The engine `{engine}` is down and is being restarted; retry shortly.",
        code="engine_unavailable", headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )
