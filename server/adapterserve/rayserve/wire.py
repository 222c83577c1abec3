"""What crosses between the ingress and the engine replicas, as plain picklable data.

Replies are ("ok", value) or ("error", the fields of a domain error): an exception raised
in a replica would reach the ingress wrapped by Ray, so errors travel as data and are
raised again on the ingress side (errors.py: `DomainError.fields`, `from_fields`).
"""

from __future__ import annotations

from typing import Any

from adapterserve.errors import DomainError, from_fields

OK, ERROR = "ok", "error"
VLLM_ERROR = "vllm_error"  # vLLM's ErrorResponse, as its JSON (the ingress shapes it)


def error_fields(exc: DomainError) -> dict[str, Any]:
    return exc.fields()


def error_from_fields(fields: dict[str, Any]) -> DomainError:
    return from_fields(fields)


def ok(value: Any = None) -> tuple[str, Any]:
    return OK, value


def error(exc: DomainError) -> tuple[str, Any]:
    return ERROR, error_fields(exc)


def unwrap(reply: tuple[str, Any]) -> Any:
    """The value of a reply, or its error raised as the domain error it was."""
    status, value = reply
    if status == ERROR:
        raise error_from_fields(value)
    return value


async def replying(call) -> tuple[str, Any]:
    """Await `call` (a coroutine) and turn its result or domain error into a reply."""
    try:
        return ok(await call)
    except DomainError as exc:
        return error(exc)


class Catalog:
    """What one replica serves, as the ingress needs it to resolve names and answer
    /v1/models and /admin/adapters without a round trip per request. Every replica opens
    the same stores, so any one of them answers for the application."""

    def __init__(self, *, base_name: str, cards: list, records: dict, problems: list, stores: list, pinned: set,
                 lora_rank: int, replica: str):
        self.base_name = base_name
        self.cards = cards  # ModelCard, servable now
        self.records = records  # name -> AdapterRecord, registered
        self.problems = problems  # registry Problems (refused folders)
        self.stores = stores
        self.pinned = pinned
        self.lora_rank = lora_rank
        self.replica = replica  # which replica answered
