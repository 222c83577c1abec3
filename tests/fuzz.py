"""Request strategies generated from the server's own OpenAPI document, for the fuzz tests.

Every operation of /openapi.json becomes a strategy of (method, path, body): path
parameters from hostile text, bodies built from the operation's request schema with
each property either a value of its declared type or any JSON value (wrong types, null,
deep nesting, huge numbers, NUL bytes), plus bodies that are not JSON at all, mostly sent
as application/json (the only type the server reads) and sometimes as another type. Values
that would make a real engine generate for long (`max_tokens`, `n`) are drawn small when
`cheap` is set, so a fuzz run against the real engine stays short.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from hypothesis import strategies as st

TEXT = st.text(st.characters(codec="utf-8"), max_size=40) | st.sampled_from(["", "\x00", "a\x00b", "../../etc/passwd", "%s%n", "\ud7ff" * 3])
SCALARS = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.sampled_from([0, -1, 1, 2**31, 2**63, -(2**63)])
    | st.floats(allow_nan=False, allow_infinity=False) | TEXT
)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4), max_leaves=12)


@dataclass(frozen=True)
class Operation:
    method: str
    path: str  # with {placeholders}
    parameters: tuple[str, ...]
    body: dict | None  # the request body's JSON schema, $refs into `components`


def operations(openapi: dict) -> list[Operation]:
    found = []
    for path, methods in openapi["paths"].items():
        for method, operation in methods.items():
            parameters = tuple(p["name"] for p in operation.get("parameters", []) if p.get("in") == "path")
            body = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            found.append(Operation(method.upper(), path, parameters, body))
    return found


def _resolve(schema: dict, components: dict) -> dict:
    while "$ref" in schema:
        schema = components[schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def _typed(schema: dict, components: dict, depth: int = 0) -> st.SearchStrategy:
    """A value of the schema's declared type (roughly: enough to get past the first check)."""
    schema = _resolve(schema, components)
    options = schema.get("anyOf") or schema.get("oneOf")
    if options and depth < 3:
        return st.one_of(*(_typed(o, components, depth + 1) for o in options))
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "string":
        return TEXT
    if kind == "integer":
        return st.integers(-5, 100) | st.integers(-(2**64), 2**64)
    if kind == "number":
        return st.floats(-1e6, 1e6, allow_nan=False) | st.floats(allow_nan=False, allow_infinity=False)
    if kind == "boolean":
        return st.booleans()
    if kind == "array" and depth < 3:
        return st.lists(_typed(schema.get("items", {}), components, depth + 1), max_size=3)
    if kind == "object" and depth < 3 and schema.get("properties"):
        return _object(schema, components, depth + 1)
    return JSON


def _object(schema: dict, components: dict, depth: int, overrides: dict | None = None) -> st.SearchStrategy:
    properties = schema.get("properties", {})
    overrides = overrides or {}

    def value(name: str, sub: dict) -> st.SearchStrategy:
        good = overrides[name] if name in overrides else _typed(sub, components, depth)
        return st.one_of(good, good, good, JSON)  # mostly the declared type, sometimes anything

    required = {k: value(k, properties.get(k, {})) for k in schema.get("required", []) if k in properties}
    optional = {k: value(k, v) for k, v in properties.items() if k not in required}
    return st.fixed_dictionaries(required, optional=optional)


CONTENT_TYPES = st.sampled_from(["application/json"] * 6 + ["application/json; charset=utf-8", "text/plain", ""])


def requests(openapi: dict, models: list[str], cheap: bool = False) -> st.SearchStrategy:
    """(method, path, content bytes or None, headers) for every operation of the document."""
    components = openapi.get("components", {}).get("schemas", {})
    overrides = {
        "model": st.sampled_from(models) | TEXT,
        "lora_name": st.sampled_from(models) | TEXT,
        "messages": st.lists(
            st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]), "content": TEXT | JSON}),
            max_size=3,
        ) | JSON,
        "prompt": TEXT | st.lists(st.integers(-5, 60_000), max_size=5) | JSON,
        "input": TEXT | st.lists(TEXT, max_size=3) | st.lists(st.integers(-5, 60_000), max_size=5) | JSON,
        "truncate_prompt_tokens": st.integers(-2, 10) | st.integers(-(2**40), 2**40),
    }
    if cheap:
        overrides |= {"max_tokens": st.integers(-2, 4), "max_completion_tokens": st.integers(-2, 4), "n": st.integers(-1, 2),
                      "best_of": st.integers(-1, 2), "min_tokens": st.integers(-1, 2), "ignore_eos": st.just(False)}

    def for_operation(op: Operation) -> st.SearchStrategy:
        path = st.fixed_dictionaries({p: st.sampled_from(models) | TEXT for p in op.parameters}).map(
            lambda values: _fill(op.path, values)
        )
        if op.body is None:
            content = st.none() | JSON.map(_dumps)
        else:
            schema = _resolve(op.body, components)
            content = st.one_of(
                _object(schema, components, 0, overrides).map(_dumps),
                _object(schema, components, 0, overrides).map(_dumps),
                JSON.map(_dumps),
                st.binary(max_size=64),
            )
        headers = CONTENT_TYPES.map(lambda media_type: {"content-type": media_type} if media_type else {})
        return st.tuples(st.just(op.method), path, content, headers)

    return st.one_of(*(for_operation(op) for op in operations(openapi)))


def _dumps(value) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


def _fill(path: str, values: dict) -> str:
    from urllib.parse import quote

    for name, value in values.items():
        path = path.replace("{" + name + "}", quote(value, safe="") or "x")
    return path
