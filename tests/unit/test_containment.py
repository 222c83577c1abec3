"""Containment over fake engines: the corpus of broken adapters never stops the server or
reaches an engine, the served copy is the server's own, a refused reload keeps the last
good version, hostile request bodies get OpenAI-shaped 4xx answers, and a dead engine is a
503 with Retry-After until the host has restarted it."""

from __future__ import annotations

import json
import shutil
import time

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from adapterserve.app import create_app
from adapterserve.hosting.shared import SharedBaseHost
from adapterserve.registry.records import is_safe_name
from adapterserve.registry.snapshots import SnapshotStore
from adapterserve.registry.store import Registry
from adapterserve.registry.sources import local_stores
from adapterserve.registry.validation import Limits
from tests.adapter_factory import build_broken_corpus, write_lora
from tests.fakes import FakeEngine
from tests.unit.conftest import ADMIN_KEY
from tests.unit.test_api import CHAT, MESSAGES, assert_error
from tests.unit.conftest import LOCAL

AUTH = {"authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
def corpus(tmp_path, tiny_base):
    store, outside = tmp_path / "corpus", tmp_path / "outside"
    expected = build_broken_corpus(store, tiny_base, outside, max_rank=16)
    write_lora(store / "good", tiny_base, rank=4)
    return store, expected


def app_client(settings, tiny_base, stores, tmp_path):
    registry = Registry(base=tiny_base, sources=local_stores(stores), limits=Limits(max_lora_rank=16, refuse_other_base=True),
                        snapshots=SnapshotStore(tmp_path / "snapshots"))
    registry.scan()
    host = lambda s, observer: SharedBaseHost(s, tiny_base.path, tiny_base.name, registry, engine_factory=FakeEngine, observer=observer)  # noqa: E731
    return TestClient(create_app(settings, host_factory=host), base_url=LOCAL)


def test_the_corpus_is_at_least_forty_cases(corpus):
    assert len(corpus[1]) >= 40


def test_the_server_starts_with_the_corpus_and_serves_the_good_adapter(settings, tiny_base, corpus, tmp_path):
    store, expected = corpus
    with app_client(settings, tiny_base, [store], tmp_path) as client:
        assert client.get("/health").status_code == 200
        assert {m["id"] for m in client.get("/v1/models").json()["data"]} == {"tiny-base", "good"}
        refused = {r["name"]: r["reason"] for r in client.get("/admin/adapters", headers=AUTH).json()["refused"]}
        for name, fragment in expected.items():
            assert fragment in refused[name], (name, refused.get(name))
        for name in expected:  # none of them can be loaded through the admin API
            if is_safe_name(name):
                for path in (f"/admin/adapters/{name}/load", f"/admin/adapters/{name}/reload"):
                    response = client.post(path, headers=AUTH)
                    assert response.status_code in (400, 404), (name, response.text)
                    assert_error(response, response.status_code)
            response = client.post("/v1/load_lora_adapter", json={"lora_name": name}, headers=AUTH)
            assert response.status_code in (400, 404), (name, response.text)
            assert_error(client.post(CHAT, json={"model": name, "messages": MESSAGES}), 404, code="model_not_found")
        assert client.post(CHAT, json={"model": "good", "messages": MESSAGES}).status_code == 200


def test_adapters_validate_reports_the_corpus_without_a_traceback(corpus, tiny_base, tmp_path):
    from adapterserve.cli import app

    store, expected = corpus
    result = CliRunner().invoke(app, ["adapters", "validate", str(store), "--base-model", str(tiny_base.path)],
                                env={"ADAPTERSERVE_CACHE_DIR": str(tmp_path / "cache"), "ADAPTERSERVE_BASE_MISMATCH": "refuse", "COLUMNS": "400"})
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert result.output.count("refused") >= len(expected)


def test_the_engine_loads_a_server_owned_copy(client, store, registry):
    record = registry.adapters["alpha"]
    assert record.source == (store / "alpha").resolve() and not record.path.is_relative_to(store)
    served = (record.path / "adapter_model.safetensors").read_bytes()
    (store / "alpha" / "adapter_model.safetensors").write_bytes(b"overwritten in place")
    shutil.rmtree(store / "beta")
    assert (record.path / "adapter_model.safetensors").read_bytes() == served
    assert registry.adapters["beta"].path.is_dir()
    for name in ("alpha", "beta"):
        assert client.post(CHAT, json={"model": name, "messages": MESSAGES}).status_code == 200


def test_a_refused_reload_keeps_the_last_good_version(client, store):
    weights = store / "alpha" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    error = assert_error(client.post("/admin/adapters/alpha/reload", headers=AUTH), 400, code="adapter_invalid")
    assert "truncated" in error["message"] and "last good version" in error["message"]
    assert client.post(CHAT, json={"model": "alpha", "messages": MESSAGES}).json()["choices"][0]["message"]["content"] == "answer from alpha"
    assert "alpha" in {m["id"] for m in client.get("/v1/models").json()["data"]}
    shutil.rmtree(store / "alpha")
    assert_error(client.post("/admin/adapters/alpha/reload", headers=AUTH), 404, code="adapter_not_found")
    assert client.post(CHAT, json={"model": "alpha", "messages": MESSAGES}).status_code == 200


def nested(depth: int):
    value = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "content, status, code",
    [
        (b"[" * 100_000, 400, "request_too_deep"),
        (json.dumps({"model": "alpha", "messages": MESSAGES, "x": nested(40)}).encode(), 400, "request_too_deep"),
        (json.dumps({"model": "alpha", "messages": MESSAGES, "pad": "x" * (9 * 1024 * 1024)}).encode(), 413, "request_too_large"),
        (json.dumps({"model": "alpha", "messages": None}).encode(), 400, None),
        (json.dumps({"model": "alpha", "messages": MESSAGES, "n": 10_000}).encode(), 400, None),
        (json.dumps({"model": "alpha", "messages": MESSAGES, "max_tokens": 10**9}).encode(), 400, None),
        (json.dumps({"model": "al\u0000pha", "messages": MESSAGES}).encode(), 404, "model_not_found"),
        (b"\xff\xfe\x00", 400, None),
        (b"   ", 400, None),
        # NaN and Infinity are not JSON
        (b'{"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, None),
        (b'{"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "top_p": -Infinity}', 400, None),
        # the ceilings hold whatever form vLLM's models convert from
        (json.dumps({"model": "alpha", "messages": MESSAGES, "n": "64", "temperature": 1}).encode(), 400, None),
        (json.dumps({"model": "alpha", "messages": MESSAGES, "n": 64.0, "temperature": 1}).encode(), 400, None),
        (json.dumps({"model": "alpha", "messages": MESSAGES, "max_tokens": "1000000"}).encode(), 400, None),
        (json.dumps({"model": "alpha", "messages": MESSAGES, "max_completion_tokens": 1e6}).encode(), 400, None),
    ],
)
def test_hostile_bodies_get_openai_errors(client, content, status, code):
    assert_error(client.post(CHAT, content=content, headers={"content-type": "application/json"}), status, code=code)


def test_the_ceilings_name_their_param_in_every_form(client):
    for field, value in (("n", "64"), ("n", 9.0), ("max_tokens", "99999"), ("max_completion_tokens", 10**6)):
        body = {"model": "alpha", "messages": MESSAGES, "temperature": 1, field: value}
        assert_error(client.post(CHAT, json=body), 400, param=field)


def test_prompts_per_request_are_bounded(client):
    many = {"model": "alpha", "prompt": ["hi"] * 33, "max_tokens": 1}
    assert_error(client.post("/v1/completions", json=many), 400, param="prompt")
    many_token_lists = {"model": "alpha", "prompt": [[1, 2]] * 33, "max_tokens": 1}
    assert_error(client.post("/v1/completions", json=many_token_lists), 400, param="prompt")
    assert client.post("/v1/completions", json={"model": "alpha", "prompt": ["hi"] * 32, "max_tokens": 1}).status_code == 200
    assert client.post("/v1/completions", json={"model": "alpha", "prompt": list(range(40)), "max_tokens": 1}).status_code == 200


def test_a_request_without_an_output_limit_gets_the_servers(client):
    client.post(CHAT, json={"model": "alpha", "messages": MESSAGES})
    seen = client.app.state.host.generate.serving("chat").requests[-1]
    assert seen.max_completion_tokens == min(client.app.state.settings.max_output_tokens, client.app.state.settings.max_model_len)


def test_other_host_names_are_refused_on_a_loopback_server(client):
    # DNS rebinding: a page of evil.example whose name now points at 127.0.0.1
    assert_error(client.post(CHAT, json={"model": "alpha", "messages": MESSAGES}, headers={"host": "evil.example"}), 400, code="invalid_host")
    assert_error(client.get("/v1/models", headers={"host": "evil.example:8000"}), 400, code="invalid_host")
    assert client.get("/v1/models", headers={"host": "127.0.0.1:8000"}).status_code == 200
    assert client.get("/v1/models", headers={"host": "[::1]:8000"}).status_code == 200


def test_a_nul_byte_in_lora_path_is_refused(client):
    response = client.post("/v1/load_lora_adapter", json={"lora_name": "alpha", "lora_path": "/tmp/\u0000x"}, headers=AUTH)
    assert_error(response, 403, param="lora_path")


def test_a_dead_engine_is_503_then_restarted_with_its_adapters(client):
    host = client.app.state.host
    before = host.generate
    before.client.errored = True  # what vLLM sets when its engine core dies
    response = client.post(CHAT, json={"model": "alpha", "messages": MESSAGES})
    assert_error(response, 503, code="engine_unavailable")
    assert response.headers["retry-after"].isdigit()
    assert client.get("/health").status_code == 503
    deadline = time.monotonic() + 10  # the first restart of an engine starts at once
    while host.generate is before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert host.generate is not before and host.restarts == {"generate": 1}
    assert client.get("/health").status_code == 200
    assert client.post(CHAT, json={"model": "alpha", "messages": MESSAGES}).json()["choices"][0]["message"]["content"] == "answer from alpha"
    assert 'adapterserve_engine_restarts_total{engine="generate"} 1.0' in client.get("/metrics").text


def test_an_adapter_whose_request_gave_nan_logits_is_quarantined_until_reloaded(client):
    host = client.app.state.host
    host.generate.on_nonfinite("alpha", "request-1")  # what the engine's output watch reports
    assert_error(client.post(CHAT, json={"model": "alpha", "messages": MESSAGES}), 400, "model", "model_quarantined")
    assert client.post(CHAT, json={"model": "beta", "messages": MESSAGES}).status_code == 200
    refused = {r["name"]: r["reason"] for r in client.get("/admin/adapters", headers=AUTH).json()["refused"]}
    assert "non-finite" in refused["alpha"]
    assert 'adapterserve_adapter_quarantines_total{kind="lora"} 1.0' in client.get("/metrics").text
    assert "alpha" not in {m["id"] for m in client.get("/v1/models").json()["data"]}
    assert client.post("/admin/adapters/alpha/reload", headers=AUTH).status_code == 200
    assert client.post(CHAT, json={"model": "alpha", "messages": MESSAGES}).status_code == 200


class _Queue:
    def __init__(self):
        self.items = []

    def put(self, item):
        self.items.append(item)


def test_outputs_with_nan_logits_never_reach_their_request():
    from types import SimpleNamespace

    from adapterserve.hosting.nonfinite import NonFiniteLogits, watch_nonfinite

    seen, reported = [], []
    states = {"a": SimpleNamespace(queue=_Queue(), lora_name="bad"), "b": SimpleNamespace(queue=_Queue(), lora_name=None)}
    processor = SimpleNamespace(request_states=states, process_outputs=lambda outputs, *rest, **kw: seen.extend(outputs))
    watch_nonfinite(SimpleNamespace(output_processor=processor), lambda adapter, rid: reported.append((adapter, rid)))
    good, bad = SimpleNamespace(request_id="b", num_nans_in_logits=0), SimpleNamespace(request_id="a", num_nans_in_logits=3)
    processor.process_outputs([good, bad], 0.0, None)
    assert seen == [good] and reported == [("bad", "a")]
    assert isinstance(states["a"].queue.items[0], NonFiniteLogits) and not states["b"].queue.items


def test_adapter_listings_print_config_text_as_text(tmp_path, tiny_base):
    """A served adapter's config strings reach the CLI's table: never read as markup."""
    from adapterserve.cli import app

    write_lora(tmp_path / "store" / "marked", tiny_base, rank=4, config_overrides={"base_model_name_or_path": "[/bold]x[/red]"})
    result = CliRunner().invoke(app, ["adapters", "list", "--adapter-dir", str(tmp_path / "store"), "--base-model", str(tiny_base.path)],
                                env={"ADAPTERSERVE_CACHE_DIR": str(tmp_path / "cache"), "COLUMNS": "400"})
    assert result.exit_code == 0 and result.exception is None, (result.output, result.exception)
    assert "[/bold]x[/red]" in result.output


def test_with_tenants_a_nan_request_fails_alone_and_the_adapter_keeps_serving(settings, registry, tiny_base, tmp_path):
    """A tenant cannot take a shared adapter offline for the others with a prompt that
    overflows it (quarantine_nonfinite unset: off with a keys file)."""
    from adapterserve.hosting.shared import SharedBaseHost
    from adapterserve.tenants.keys import KeyLimits, add

    keys = tmp_path / "keys.yaml"
    _, secret = add(keys, "team-b", ["alpha"], True, ["inference"], KeyLimits())
    app = create_app(
        settings.model_copy(update={"keys_file": keys}),
        host_factory=lambda s, observer: SharedBaseHost(s, tiny_base.path, tiny_base.name, registry, engine_factory=FakeEngine, observer=observer),
    )
    with TestClient(app, base_url=LOCAL) as client:
        client.app.state.host.generate.on_nonfinite("alpha", "request-1")  # team-a's overflowing request
        answer = client.post(CHAT, json={"model": "alpha", "messages": MESSAGES}, headers={"authorization": f"Bearer {secret}"})
        assert answer.status_code == 200  # team-b is still served
        assert "alpha" in {r["name"] for r in client.get("/admin/adapters", headers=AUTH).json()["adapters"]}
