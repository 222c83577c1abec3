"""The kinds of model a client can name, and what each kind means to the rest: the seam a
new adapter kind plugs into.

A kind says which engine role serves it (`generate` or `classify`; vLLM runs one runner
per engine), which vLLM runner that engine has, which endpoints answer it, how clients
and errors describe it, and whether it is an adapter (shared mode) or a whole model. The
hosts, the endpoint check, the metrics and validation ask this table instead of comparing
strings. `detect` picks an adapter's kind from its PEFT config; a new kind adds a row
here, its detection and its validation of what is particular to it (a head's labels:
`head_checks.head_labels`).
"""

from __future__ import annotations

from dataclasses import dataclass

GENERATION_ENDPOINTS = frozenset({"chat", "completion", "responses"})
CLASSIFY_ENDPOINTS = frozenset({"classify"})


@dataclass(frozen=True)
class Kind:
    name: str
    role: str  # the engine role that serves it: "generate" or "classify"
    runner: str  # that engine's vLLM runner
    endpoints: frozenset[str]  # the endpoints that answer it
    described: str  # how an error names a model of this kind
    adapter: bool  # an adapter over the shared base (else a whole model)


LORA = Kind("lora", "generate", "generate", GENERATION_ENDPOINTS, "a LoRA adapter", adapter=True)
HEAD = Kind("head", "classify", "pooling", CLASSIFY_ENDPOINTS, "a classification head adapter", adapter=True)
BASE = Kind("base", "generate", "generate", GENERATION_ENDPOINTS, "a text generation model", adapter=False)
FULL = Kind("full", "generate", "generate", GENERATION_ENDPOINTS, "a text generation model", adapter=False)
# dedicated mode's fully fine-tuned classifier is served like a head: its kind is "head"

KINDS: dict[str, Kind] = {k.name: k for k in (LORA, HEAD, BASE, FULL)}
ADAPTER_KINDS: tuple[str, ...] = tuple(k.name for k in KINDS.values() if k.adapter)
ROLES: tuple[str, ...] = ("generate", "classify")  # the engines of the shared mode, in start order


def of(name: str) -> Kind:
    return KINDS[name]


def for_role(role: str) -> tuple[str, ...]:
    """The adapter kinds an engine role serves (what its metrics label)."""
    return tuple(k.name for k in KINDS.values() if k.adapter and k.role == role)


def adapter_kind_for_runner(runner: str) -> str:
    """The adapter kind an engine of that vLLM runner serves (for per-engine metrics)."""
    return next(k.name for k in KINDS.values() if k.adapter and k.runner == runner)


def detect(config: dict, modules_to_save: list[str]) -> Kind:
    """An adapter's kind from its PEFT config: a sequence-classification task, or modules
    saved whole (the classification head), make it a head; otherwise it is a LoRA adapter."""
    if config.get("task_type") == "SEQ_CLS" or modules_to_save:
        return HEAD
    return LORA


def endpoint_paths(kind: Kind, paths: dict[str, str]) -> str:
    """Where a model of this kind is served, in words ("/v1/a, /v1/b or /v1/c")."""
    shown = [paths[e] for e in ("chat", "completion", "responses", "classify") if e in kind.endpoints]
    return shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} or {shown[-1]}"
