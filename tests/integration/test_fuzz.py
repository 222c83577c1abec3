"""Fuzzing the real server from its own OpenAPI document: generated requests over every
operation (and hand-written hostile bodies) against the real engines. None may get a 5xx
or a dropped connection; errors carry the OpenAI body; the server is healthy at the end.

Generated values that make the engine work long (`max_tokens`, `n`) are drawn small.
Admin operations are sent without the admin key here, so that the fuzz cannot unload the
adapters other tests use; tests/unit/test_fuzz.py sends them with it."""

from __future__ import annotations

import json
import socket

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

from tests import fuzz
from tests.integration.conftest import DEMO, HEADS

pytestmark = pytest.mark.integration

EXAMPLES = 400


def check(response: httpx.Response, what) -> None:
    assert response.status_code < 500, (what, response.status_code, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, response.text


def test_generated_requests_never_get_a_5xx(server, base_name):
    openapi = httpx.get(f"{server.url}/openapi.json", timeout=60).json()
    models = [base_name, f"{base_name}:pirate", *DEMO, *HEADS, "random-0"]
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=server.url, timeout=120) as http:

        @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(fuzz.requests(openapi, models, cheap=True))
        def one(request):
            method, path, content, headers = request
            response = http.request(method, path, content=content, headers=headers)  # a dropped connection raises
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            check(response, (method, path, content[:300] if content else None))

        one()
    print("statuses:", dict(sorted(statuses.items())))
    assert statuses.get(200, 0) > 20
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_bodies_a_web_page_can_send_unasked_are_refused(server, base_name, content_type):
    body = json.dumps({"model": base_name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    headers = {"content-type": content_type} if content_type else {}
    response = httpx.post(f"{server.url}/v1/chat/completions", content=body, headers=headers, timeout=60)
    check(response, content_type)
    assert response.status_code == 415


def test_a_rebound_host_name_is_refused(server, base_name):
    body = {"model": base_name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers={"host": "attacker.example"}, timeout=60)
    check(response, "host")
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_host"


def nested(depth: int):
    value: object = "x"
    for _ in range(depth):
        value = {"a": [value]}
    return value


HOSTILE = {
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,
    "deep nesting in a field": json.dumps({"model": "pirate", "messages": [{"role": "user", "content": nested(200)}]}).encode(),
    "20 MB": b'{"model": "pirate", "messages": [{"role": "user", "content": "' + b"x" * (20 * 1024 * 1024) + b'"}]}',
    "NUL bytes": json.dumps({"model": "pi\u0000rate", "messages": [{"role": "user", "content": "a\u0000b"}]}).encode(),
    "NUL content": json.dumps({"model": "pirate", "messages": [{"role": "user", "content": "\u0000" * 50}], "max_tokens": 2}).encode(),
    "messages null": b'{"model": "pirate", "messages": null}',
    "messages a string": b'{"model": "pirate", "messages": "hello"}',
    "prompt of wrong tokens": b'{"model": "pirate", "prompt": [-1, 99999999], "max_tokens": 2}',
    "n huge": b'{"model": "pirate", "messages": [{"role": "user", "content": "hi"}], "n": 16384}',
    "max_tokens huge": b'{"model": "pirate", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000000000}',
    "temperature NaN": b'{"model": "pirate", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN, "max_tokens": 2}',
    "logit_bias hostile": b'{"model": "pirate", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"-5": 1e308}, "max_tokens": 2}',
    "not utf-8": b"\xff\xfe\xfd",
    "input null": b'{"model": "sentiment", "input": null}',
    "input nested": b'{"model": "sentiment", "input": [["a"]]}',
    # classification inputs vLLM's own server refuses with a 400
    "input with an empty string": b'{"model": "sentiment", "input": ["fine", ""]}',
    "input of 300 KB": b'{"model": "sentiment", "input": "' + b"word " * 60_000 + b'"}',
    "truncate_prompt_tokens huge": b'{"model": "sentiment", "input": "fine", "truncate_prompt_tokens": 1000000000}',
    "input tokens out of the vocabulary": b'{"model": "sentiment", "input": [5, 99999999]}',
    "input tokens negative": b'{"model": "sentiment", "input": [5, -3]}',
    "inputs 200": json.dumps({"model": "sentiment", "input": ["fine"] * 200}).encode(),
    # the ceilings, in the forms vLLM's models convert
    "n as a string": b'{"model": "pirate", "messages": [{"role": "user", "content": "hi"}], "n": "64", "temperature": 1}',
    "max_tokens as a float": b'{"model": "pirate", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e9}',
    "prompts 200": json.dumps({"model": "pirate", "prompt": ["hi"] * 200, "max_tokens": 1}).encode(),
}
PATHS = {"prompts 200": "/v1/completions"}
# Odd but valid requests: they may be served; the others must be refused with a 4xx.
MAY_BE_SERVED = {"NUL content", "logit_bias hostile"}


@pytest.mark.parametrize("name", HOSTILE)
def test_hand_written_hostile_bodies(server, name):
    path = PATHS.get(name) or ("/v1/classify" if b"sentiment" in HOSTILE[name] else "/v1/chat/completions")
    response = httpx.post(f"{server.url}{path}", content=HOSTILE[name], headers={"content-type": "application/json"}, timeout=120)
    check(response, name)
    if name not in MAY_BE_SERVED:
        assert 400 <= response.status_code < 500, (name, response.status_code, response.text[:300])
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200


def test_a_client_sending_its_headers_slowly_is_cut_off(server):
    """Slowloris: without a deadline the connection would stay open (uvicorn has none for
    headers); the session server runs with --header-timeout-s 10."""
    with socket.create_connection(("127.0.0.1", server.port)) as connection:
        connection.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never the blank line
        connection.settimeout(60)
        assert connection.recv(1024) == b""
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
