"""The domain errors: what went wrong, in the terms of hosting, adapters and tenants.

A leaf module: it imports neither FastAPI nor vLLM, and knows no HTTP status. The hosts,
the registry, the tenants and the Ray replicas raise these; `api/errors.py` maps each
class to its status in one table and renders the OpenAI error body
({"error": {"message", "type", "param", "code"}}). A class says what kind of failure it
is; `code` says which one, as the OpenAI API names it for clients.
"""

from __future__ import annotations

from typing import Any

RETRY_AFTER_SECONDS = 10  # an engine restarts in ~30 s; clients poll a few times meanwhile


class DomainError(Exception):
    """A failure a client or an admin is told about, with its message, the request field
    it concerns (`param`), a machine-readable `code`, and when to retry (if it may)."""

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, retry_after_s: float | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def fields(self) -> dict[str, Any]:
        """As plain data (what crosses to a Ray ingress): see `from_fields`."""
        return {"kind": type(self).__name__, "message": self.message, "param": self.param, "code": self.code,
                "retry_after_s": self.retry_after_s, **self._extra()}

    def _extra(self) -> dict[str, Any]:
        return {}


class InvalidRequest(DomainError):
    """The request cannot be served as it is (a missing field, a model on the wrong endpoint,
    an adapter that fails validation, an operation this mode does not have)."""


class UnknownModel(DomainError):
    """No model by that name, or none the caller may use: both answer the same."""


class NotFound(DomainError):
    """An admin operation names an adapter that is not there (not loaded, not pinned)."""


class Conflict(DomainError):
    """The operation contradicts the adapter's state (already loaded, too many pinned)."""


class Forbidden(DomainError):
    """The caller is known but may not do this."""


class LimitExceeded(DomainError):
    """A tenant's key is over one of its limits; `reason` names which (for the metrics)."""

    def __init__(self, reason: str, message: str, retry_after_s: float):
        super().__init__(message, code="rate_limit_exceeded", retry_after_s=retry_after_s)
        self.reason = reason

    def _extra(self) -> dict[str, Any]:
        return {"reason": self.reason}


class Unavailable(DomainError):
    """The model cannot be served right now (its engine is down or still starting): retry."""


class ServingFailed(DomainError):
    """The request was accepted and failed while it ran (an adapter's non-finite values)."""


class ClientGone(DomainError):
    """The client went away before its answer was ready (its work was cancelled)."""


class EngineRejected(DomainError):
    """vLLM's own answer to a request it refused or failed, with vLLM's classification of
    it (`vllm_status`, the code of its ErrorResponse): kept as vLLM's server would give it."""

    def __init__(self, message: str, *, vllm_status: int, param: str | None = None, code: str | None = None):
        super().__init__(message, param=param, code=code)
        self.vllm_status = int(vllm_status)

    def _extra(self) -> dict[str, Any]:
        return {"vllm_status": self.vllm_status}


KINDS: dict[str, type[DomainError]] = {
    cls.__name__: cls
    for cls in (InvalidRequest, UnknownModel, NotFound, Conflict, Forbidden, LimitExceeded, Unavailable, ServingFailed, ClientGone,
                EngineRejected)
}


def from_fields(fields: dict[str, Any]) -> DomainError:
    """The error `DomainError.fields()` described, raised again on the other side."""
    fields = dict(fields)
    cls = KINDS.get(fields.pop("kind", ""), ServingFailed)
    if cls is LimitExceeded:
        return LimitExceeded(fields.get("reason", ""), fields["message"], fields.get("retry_after_s") or 1)
    if cls is EngineRejected:
        return EngineRejected(fields["message"], vllm_status=fields.get("vllm_status", 500), param=fields.get("param"),
                              code=fields.get("code"))
    return cls(fields["message"], param=fields.get("param"), code=fields.get("code"),
               retry_after_s=fields.get("retry_after_s"))


def model_not_found(name: str) -> UnknownModel:
    return UnknownModel(f"The model `{name}` does not exist or you do not have access to it.", param="model", code="model_not_found")


def missing_model() -> InvalidRequest:
    return InvalidRequest("You must provide a model parameter.", param="model", code="missing_required_parameter")


def engine_unavailable(engine: str) -> Unavailable:
    """A request for an engine that is down (dead, or restarting)."""
    return Unavailable(
        f"The engine `{engine}` is down and is being restarted; retry shortly.",
        code="engine_unavailable", retry_after_s=RETRY_AFTER_SECONDS,
    )


def adapter_not_loaded(name: str) -> NotFound:
    return NotFound(f"The adapter `{name}` is not loaded.", param="lora_name", code="adapter_not_found")


def not_in_dedicated_mode() -> InvalidRequest:
    return InvalidRequest("The server runs in dedicated mode: it hosts whole models, not adapters.", code="not_supported_in_mode")
