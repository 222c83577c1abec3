"""The API over fake engines: routing, the OpenAI error body, auth, admin."""

from __future__ import annotations

import json

import pytest

from tests.unit.conftest import ADMIN_KEY
from tests.unit.conftest import LOCAL

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]


def assert_error(response, status, param=None, code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


def test_chat_routes_to_the_named_adapter(client):
    for model, expected in [("alpha", "alpha"), ("tiny-base:beta", "beta"), ("tiny-base", "tiny-base")]:
        response = client.post(CHAT, json={"model": model, "messages": MESSAGES})
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == f"answer from {expected}"


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded", "text/plain", "multipart/form-data"])
def test_only_json_bodies_are_read(client, content_type):
    # the content types a web page may send to localhost without a CORS preflight (and none)
    body = json.dumps({"model": "alpha", "messages": MESSAGES})
    headers = {"content-type": content_type} if content_type else {}
    assert_error(client.post(CHAT, content=body, headers=headers), 415, code="unsupported_media_type")
    ok = client.post(CHAT, content=body, headers={"content-type": "application/json; charset=utf-8"})
    assert ok.status_code == 200, ok.text


def test_unknown_model_is_404_model_not_found(client):
    error = assert_error(client.post(CHAT, json={"model": "nope", "messages": MESSAGES}), 404, "model", "model_not_found")
    assert "nope" in error["message"]
    assert_error(client.post(CHAT, json={"model": "tiny-base:nope", "messages": MESSAGES}), 404, "model", "model_not_found")


def test_engine_refused_adapter_is_not_served_and_others_are(client):
    assert_error(client.post(CHAT, json={"model": "engine-refuses", "messages": MESSAGES}), 404, "model")
    assert client.post(CHAT, json={"model": "alpha", "messages": MESSAGES}).status_code == 200
    refused = client.get("/admin/adapters", headers={"authorization": f"Bearer {ADMIN_KEY}"}).json()["refused"]
    assert [r["name"] for r in refused] == ["engine-refuses"]
    assert "could not load" in refused[0]["reason"]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": MESSAGES}, "model"),
        ({"model": "alpha"}, "messages"),
        ({"model": "alpha", "messages": MESSAGES, "n": "many"}, "n"),
        ({"model": "alpha", "messages": "hi"}, "messages"),
    ],
)
def test_invalid_requests_are_400_with_param(client, body, param):
    assert_error(client.post(CHAT, json=body), 400, param)


def test_malformed_json_is_400(client):
    error = assert_error(client.post(CHAT, content=b'{"model": "alpha", ', headers={"content-type": "application/json"}), 400)
    assert "not valid JSON" in error["message"]
    assert_error(client.post(CHAT, content=b"[1, 2]", headers={"content-type": "application/json"}), 400)


def test_stream_errors_use_the_openai_body(client):
    response = client.post(CHAT, json={"model": "alpha", "messages": MESSAGES, "stream": True})
    lines = [line for line in response.text.split("\n\n") if line]
    error = json.loads(lines[-2][len("data: "):])["error"]
    assert error == {"message": "boom", "type": "invalid_request_error", "param": None, "code": None}
    assert lines[-1] == "data: [DONE]"


def test_models_lists_base_and_adapters_with_extra_fields(client):
    data = client.get("/v1/models").json()["data"]
    by_id = {card["id"]: card for card in data}
    assert set(by_id) == {"tiny-base", "alpha", "beta"}
    assert by_id["tiny-base"]["kind"] == "base" and by_id["tiny-base"]["parent"] is None
    assert by_id["alpha"]["parent"] == "tiny-base"
    assert by_id["alpha"]["kind"] == "lora" and by_id["alpha"]["rank"] == 4 and by_id["alpha"]["size_bytes"] > 0
    assert "/" not in by_id["alpha"]["root"]  # no server paths leak
    assert client.get("/v1/models/alpha").json()["id"] == "alpha"
    assert_error(client.get("/v1/models/nope"), 404, code="model_not_found")


def test_health_reports_each_engine(client):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json()["engines"] == {"generate": "ok"}


def test_unknown_route_is_openai_shaped(client):
    assert_error(client.get("/v1/nothing-here"), 404)


def test_api_key_is_enforced_when_set(settings, registry, tiny_base):
    from fastapi.testclient import TestClient

    from adapterserve.app import create_app
    from adapterserve.hosting.shared import SharedBaseHost
    from tests.fakes import FakeEngine

    settings = settings.model_copy(update={"api_key": __import__("pydantic").SecretStr("user-key")})
    app = create_app(settings, host_factory=lambda s, observer: SharedBaseHost(s, tiny_base.path, tiny_base.name, registry, engine_factory=FakeEngine, observer=observer))
    with TestClient(app, base_url=LOCAL) as client:
        assert_error(client.post(CHAT, json={"model": "alpha", "messages": MESSAGES}), 401, code="invalid_api_key")
        ok = client.post(CHAT, json={"model": "alpha", "messages": MESSAGES}, headers={"authorization": "Bearer user-key"})
        assert ok.status_code == 200
        assert client.get("/health").status_code == 200  # probes need no key
        assert "engines" not in client.get("/health").json()  # ...and are told nothing more
        assert client.get("/health", headers={"authorization": "Bearer user-key"}).json()["engines"] == {"generate": "ok"}
        assert_error(client.get("/metrics"), 401, code="invalid_api_key")
        assert client.get("/metrics", headers={"authorization": "Bearer user-key"}).status_code == 200


class TestAdmin:
    auth = {"authorization": f"Bearer {ADMIN_KEY}"}

    def test_without_the_key_is_401(self, client):
        assert_error(client.post("/admin/adapters/alpha/unload"), 401, code="invalid_api_key")
        assert_error(client.post("/v1/unload_lora_adapter", json={"lora_name": "alpha"}, headers={"authorization": "Bearer wrong"}), 401)

    def test_unload_then_404_then_load_again(self, client):
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "alpha"}, headers=self.auth).status_code == 200
        assert_error(client.post(CHAT, json={"model": "alpha", "messages": MESSAGES}), 404, code="model_not_found")
        assert "alpha" not in {m["id"] for m in client.get("/v1/models").json()["data"]}
        assert_error(client.post("/admin/adapters/alpha/unload", headers=self.auth), 404)
        assert client.post("/admin/adapters/alpha/load", headers=self.auth).status_code == 200
        assert client.post(CHAT, json={"model": "alpha", "messages": MESSAGES}).status_code == 200
        assert_error(client.post("/admin/adapters/alpha/load", headers=self.auth), 409)

    def test_load_of_a_folder_added_later_without_discovery(self, settings, registry, store, tiny_base):
        from fastapi.testclient import TestClient

        from adapterserve.app import create_app
        from adapterserve.hosting.shared import SharedBaseHost
        from tests.adapter_factory import write_lora
        from tests.fakes import FakeEngine

        settings = settings.model_copy(update={"discover_on_request": False})
        app = create_app(settings, host_factory=lambda s, observer: SharedBaseHost(s, tiny_base.path, tiny_base.name, registry, engine_factory=FakeEngine, observer=observer))
        with TestClient(app, base_url=LOCAL) as client:
            write_lora(store / "gamma", tiny_base, rank=4)
            assert_error(client.post(CHAT, json={"model": "gamma", "messages": MESSAGES}), 404)
            response = client.post("/v1/load_lora_adapter", json={"lora_name": "gamma", "lora_path": str(store / "gamma")}, headers=self.auth)
            assert response.status_code == 200, response.text
            assert client.post(CHAT, json={"model": "gamma", "messages": MESSAGES}).json()["choices"][0]["message"]["content"] == "answer from gamma"

    def test_a_path_outside_the_stores_is_refused(self, client, tmp_path, tiny_base):
        from tests.adapter_factory import write_lora

        write_lora(tmp_path / "elsewhere" / "alpha2", tiny_base, rank=4)
        response = client.post(
            "/v1/load_lora_adapter",
            json={"lora_name": "alpha2", "lora_path": str(tmp_path / "elsewhere" / "alpha2")},
            headers=self.auth,
        )
        assert_error(response, 403, param="lora_path", code="path_not_allowed")
        assert_error(client.post("/admin/adapters/bad%20name!/load", headers=self.auth), 400)
        assert_error(client.post("/admin/adapters/missing/load", headers=self.auth), 404)

    def test_admin_disabled_without_a_configured_key(self, settings, registry, tiny_base):
        from fastapi.testclient import TestClient

        from adapterserve.app import create_app
        from adapterserve.hosting.shared import SharedBaseHost
        from tests.fakes import FakeEngine

        app = create_app(settings.model_copy(update={"admin_api_key": None}), host_factory=lambda s, observer: SharedBaseHost(s, tiny_base.path, tiny_base.name, registry, engine_factory=FakeEngine, observer=observer))
        with TestClient(app, base_url=LOCAL) as client:
            assert_error(client.post("/admin/adapters/alpha/unload", headers=self.auth), 403)


def test_vllm_errors_are_reshaped_with_their_param():
    from vllm.entrypoints.serve import create_error_response

    from adapterserve.api.errors import from_vllm_error

    error = from_vllm_error(create_error_response("n must be at least 1, got 0."))
    assert (error.status, error.param, error.body()["error"]["type"]) == (400, "n", "invalid_request_error")
    error = from_vllm_error(create_error_response("This model's maximum context length is 2048 tokens."))
    assert error.code == "context_length_exceeded" and error.param is None
    error = from_vllm_error(create_error_response(RuntimeError("engine failed")))
    assert error.status == 500 and error.body()["error"]["type"] == "server_error"


def test_completions_route_to_the_named_adapter(client):
    response = client.post("/v1/completions", json={"model": "tiny-base:beta", "prompt": "hi"})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == "completion from beta"
    assert_error(client.post("/v1/completions", json={"model": "beta"}), 400, "prompt")


@pytest.mark.parametrize("model, name", [
    ("base:pirate", "pirate"), ("base:", "base:"), ("base", "base"), ("pirate", "pirate"), ("other:pirate", "other:pirate"),
])
def test_a_base_prefixed_name_means_the_adapter(model, name):
    from adapterserve.hosting.protocol import requested_name

    assert requested_name(model, "base") == name


@pytest.mark.parametrize("kind, endpoint, served", [
    ("head", "classify", True), ("head", "chat", False), ("lora", "completion", True), ("lora", "classify", False),
    ("base", "chat", True), ("base", "classify", False), ("full", "completion", True),
])
def test_each_kind_of_model_has_its_endpoints(kind, endpoint, served):
    from adapterserve.api.errors import as_api_error as http
    from adapterserve.errors import DomainError
    from adapterserve.hosting.protocol import check_endpoint

    if served:
        check_endpoint("m", kind, endpoint)
        return
    with pytest.raises(DomainError) as raised:
        check_endpoint("m", kind, endpoint)
    assert (http(raised.value).status, raised.value.code) == (400, "model_not_supported_by_endpoint")


def test_a_throttled_key_makes_the_host_do_no_work(settings, registry, store, tiny_base, tmp_path):
    """The key's limits are checked before the host resolves the model: a key over its
    limit naming a folder not registered yet gets its 429 with nothing validated."""
    from fastapi.testclient import TestClient

    from adapterserve.app import create_app
    from adapterserve.hosting.shared import SharedBaseHost
    from adapterserve.tenants.keys import KeyLimits, add
    from tests.adapter_factory import write_lora
    from tests.fakes import FakeEngine

    keys = tmp_path / "keys.yaml"
    _, secret = add(keys, "tight", ["*"], True, ["inference"], KeyLimits(requests_per_minute=1))
    settings = settings.model_copy(update={"keys_file": keys})
    app = create_app(settings, host_factory=lambda s, observer: SharedBaseHost(s, tiny_base.path, tiny_base.name, registry, engine_factory=FakeEngine, observer=observer))
    auth = {"authorization": f"Bearer {secret}"}
    with TestClient(app, base_url=LOCAL) as client:
        assert client.post(CHAT, json={"model": "alpha", "messages": MESSAGES}, headers=auth).status_code == 200
        write_lora(store / "newcomer", tiny_base, rank=4, seed=9)  # discoverable on request
        assert_error(client.post(CHAT, json={"model": "newcomer", "messages": MESSAGES}, headers=auth), 429, code="rate_limit_exceeded")
        assert "newcomer" not in registry.adapters  # not validated, not copied, not registered


def test_a_tenants_admin_key_administers_its_own_models_only(settings, registry, tiny_base, tmp_path):
    from fastapi.testclient import TestClient

    from adapterserve.app import create_app
    from adapterserve.hosting.shared import SharedBaseHost
    from adapterserve.tenants.keys import KeyLimits, add
    from tests.fakes import FakeEngine

    keys = tmp_path / "keys.yaml"
    _, secret = add(keys, "team-a", ["alpha"], True, ["inference", "admin"], KeyLimits())
    settings = settings.model_copy(update={"keys_file": keys})
    app = create_app(settings, host_factory=lambda s, observer: SharedBaseHost(s, tiny_base.path, tiny_base.name, registry, engine_factory=FakeEngine, observer=observer))
    tenant, admin = {"authorization": f"Bearer {secret}"}, {"authorization": f"Bearer {ADMIN_KEY}"}
    with TestClient(app, base_url=LOCAL) as client:
        listed = client.get("/admin/adapters", headers=tenant).json()
        assert [a["name"] for a in listed["adapters"]] == ["alpha"] and listed["stores"] == []
        assert {r["name"] for r in listed["refused"]} <= {"alpha"}
        for path in ("/admin/adapters/beta/unload", "/admin/adapters/beta/reload", "/admin/adapters/beta/pin"):
            assert_error(client.post(path, headers=tenant), 404, code="adapter_not_found")  # as if it did not exist
        assert_error(client.post("/v1/unload_lora_adapter", json={"lora_name": "beta"}, headers=tenant), 404, code="adapter_not_found")
        assert client.post(CHAT, json={"model": "beta", "messages": MESSAGES}, headers=admin).status_code == 200  # untouched
        assert client.post("/admin/adapters/alpha/unload", headers=tenant).status_code == 200
        assert_error(client.post("/admin/adapters/scan", headers=tenant), 403, code="insufficient_scope")
        assert_error(client.get("/admin/engines", headers=tenant), 403, code="insufficient_scope")
        assert {a["name"] for a in client.get("/admin/adapters", headers=admin).json()["adapters"]} >= {"beta"}
        assert client.post("/admin/adapters/scan", headers=admin).status_code == 200


def test_metrics_and_health_details_with_tenants(settings, registry, tiny_base, tmp_path):
    """With a keys file, a tenant's key reads neither /metrics (every tenant's adapters and
    traffic) nor /health's engines; a key with the metrics scope and the admin key do."""
    from fastapi.testclient import TestClient

    from adapterserve.app import create_app
    from adapterserve.hosting.shared import SharedBaseHost
    from adapterserve.tenants.keys import KeyLimits, add
    from tests.fakes import FakeEngine

    keys = tmp_path / "keys.yaml"
    _, tenant = add(keys, "team-a", ["alpha"], True, ["inference", "admin"], KeyLimits())
    _, scraper = add(keys, "prometheus", [], False, ["metrics"], KeyLimits())
    settings = settings.model_copy(update={"keys_file": keys})
    app = create_app(settings, host_factory=lambda s, observer: SharedBaseHost(s, tiny_base.path, tiny_base.name, registry, engine_factory=FakeEngine, observer=observer))
    with TestClient(app, base_url=LOCAL) as client:
        for secret in (None, tenant):
            headers = {"authorization": f"Bearer {secret}"} if secret else {}
            assert_error(client.get("/metrics", headers=headers), 401)
            assert "engines" not in client.get("/health", headers=headers).json()
        for secret in (scraper, ADMIN_KEY):
            headers = {"authorization": f"Bearer {secret}"}
            assert client.get("/metrics", headers=headers).status_code == 200
            assert client.get("/health", headers=headers).json()["engines"] == {"generate": "ok"}
        assert_error(client.post(CHAT, json={"model": "alpha", "messages": MESSAGES}, headers={"authorization": f"Bearer {scraper}"}), 403)
