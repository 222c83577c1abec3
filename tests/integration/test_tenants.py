"""Tenants with the real engines, on a server of their own with a keys file: a matrix of
tenants x every served model x every endpoint (chat, completions, responses, chat with
tools, classification, model cards) (allowed calls succeed, the others are
indistinguishable from an unknown model, listings leak nothing); limits per key (429 with
Retry-After while another tenant is served); keys added and revoked while it runs; files,
fine-tuning jobs and the models they produce belong to the tenant whose key made them."""

from __future__ import annotations

import fnmatch
import io
import threading

import httpx
import openai
import pytest

from adapterserve.server_process import ServerProcess
from adapterserve.tenants.keys import KeyLimits, add, revoke
from tests.integration.conftest import ADMIN_KEY

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "Hi"}]
LORAS = ["french", "json", "pirate"]
HEADS = ["sentiment", "topic"]
UNKNOWN = "no-such-model-anywhere"
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}
NAMED_TOOL = {"type": "function", "function": {"name": "lookup"}}
# tenant -> (models patterns, base allowed, scopes)
TENANTS = {
    "team-a": (["pirate", "french"], True, ["inference"]),
    "team-b": (["json", "sentiment"], False, ["inference"]),
    "team-c": (["fr*", "topic"], True, ["inference", "admin"]),
}


@pytest.fixture(scope="module")
def tenants(tmp_path_factory, demo_dir):
    folder = tmp_path_factory.mktemp("tenants")
    keys_file = folder / "keys.yaml"
    secrets = {}
    for tenant, (models, base, scopes) in TENANTS.items():
        secrets[tenant] = add(keys_file, tenant, models, base, scopes, KeyLimits())[1]
    secrets["limited"] = add(keys_file, "limited", ["pirate"], True, ["inference"], KeyLimits(requests_per_minute=3))[1]
    secrets["thrifty"] = add(keys_file, "thrifty", ["pirate"], True, ["inference"], KeyLimits(tokens_per_minute=20))[1]
    process = ServerProcess(
        ["--keys-file", str(keys_file), "--admin-api-key", ADMIN_KEY, "--max-loras", "4", "--max-lora-rank", "16",
         "--fine-tuning-dir", str(folder / "fine-tuning")],  # files and jobs of this module only
        folder / "server.log",
    ).start()
    process.keys_file = keys_file
    process.secrets = secrets
    yield process
    process.stop()


def openai_client(server, secret):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=secret, max_retries=0, timeout=120)


def call(server, secret, endpoint, model):
    """(status, error body or None) of one call, through the openai client where it has the endpoint."""
    client = openai_client(server, secret)
    try:
        if endpoint == "chat":
            client.chat.completions.create(model=model, messages=QUESTION, max_tokens=1)
        elif endpoint == "completion":
            client.completions.create(model=model, prompt="Hi", max_tokens=1)
        elif endpoint == "responses":
            client.responses.create(model=model, input="Hi", max_output_tokens=1)
        elif endpoint == "tools":  # chat with tools and a named tool_choice
            client.chat.completions.create(model=model, messages=QUESTION, max_tokens=1, tools=[TOOL], tool_choice=NAMED_TOOL)
        elif endpoint == "model":
            client.models.retrieve(model)
        else:  # classification is not in the OpenAI API
            response = httpx.post(
                f"{server.url}/v1/classify", json={"model": model, "input": "Great!"},
                headers={"authorization": f"Bearer {secret}"}, timeout=120,
            )
            return response.status_code, (response.json() if response.status_code != 200 else None)
    except openai.APIStatusError as exc:
        return exc.status_code, exc.response.json()
    return 200, None


def allowed(tenant, model, base_name):
    import fnmatch

    models, base, _ = TENANTS[tenant]
    return base if model == base_name else any(fnmatch.fnmatchcase(model, p) for p in models)


def expected_status(model, endpoint, base_name):
    """What the endpoint answers a model the key may use (as without tenants)."""
    if endpoint == "model":
        return 200
    is_head = model in HEADS
    return 200 if is_head == (endpoint == "classify") else 400


def test_every_tenant_every_model_every_endpoint(tenants, base_name):
    served = [base_name, *LORAS, *HEADS]
    leaks = []
    for tenant in TENANTS:
        secret = tenants.secrets[tenant]
        for endpoint in ("chat", "completion", "responses", "tools", "classify", "model"):
            unknown_status, unknown_body = call(tenants, secret, endpoint, UNKNOWN)
            assert unknown_status == 404, unknown_body
            for model in served:
                status, body = call(tenants, secret, endpoint, model)
                if allowed(tenant, model, base_name):
                    assert status == expected_status(model, endpoint, base_name), (tenant, endpoint, model, body)
                else:  # exactly what an unknown model gets, its name aside
                    same = status == unknown_status and body == _renamed(unknown_body, UNKNOWN, model)
                    if not same:
                        leaks.append((tenant, endpoint, model, status, body))
        listed = {m.id for m in openai_client(tenants, secret).models.list().data}
        assert listed == {m for m in served if allowed(tenant, m, base_name)}, (tenant, listed)
    assert leaks == []


def _renamed(body, old, new):
    import json

    return json.loads(json.dumps(body).replace(old, new))


def test_admin_needs_the_admin_scope(tenants):
    def admin(secret):
        return httpx.get(f"{tenants.url}/admin/adapters", headers={"authorization": f"Bearer {secret}"}, timeout=30)

    assert admin(tenants.secrets["team-a"]).status_code == 403
    assert admin(tenants.secrets["team-c"]).status_code == 200  # the admin scope
    assert admin(ADMIN_KEY).status_code == 200
    assert admin("as-not-a-key").status_code == 401


def test_a_tenant_over_its_limits_gets_429_while_another_is_served(tenants, base_name):
    limited = openai_client(tenants, tenants.secrets["limited"])
    for _ in range(3):
        limited.chat.completions.create(model="pirate", messages=QUESTION, max_tokens=1)
    outcome = {}

    def other_tenant():  # at the same time, unaffected
        reply = openai_client(tenants, tenants.secrets["team-a"]).chat.completions.create(model="pirate", messages=QUESTION, max_tokens=1)
        outcome["other"] = reply.choices[0].finish_reason

    worker = threading.Thread(target=other_tenant)
    worker.start()
    with pytest.raises(openai.RateLimitError) as refused:
        limited.chat.completions.create(model="pirate", messages=QUESTION, max_tokens=1)
    worker.join(timeout=120)
    assert outcome.get("other") is not None
    assert int(refused.value.response.headers["retry-after"]) >= 1
    assert refused.value.response.json()["error"]["code"] == "rate_limit_exceeded"
    with pytest.raises(openai.RateLimitError):  # the Responses API counts against the same limits
        limited.responses.create(model="pirate", input="Hi", max_output_tokens=1)

    thrifty = openai_client(tenants, tenants.secrets["thrifty"])
    thrifty.chat.completions.create(model="pirate", messages=QUESTION, max_tokens=16)  # > 20 tokens with the prompt
    with pytest.raises(openai.RateLimitError):
        thrifty.chat.completions.create(model="pirate", messages=QUESTION, max_tokens=1)

    assert httpx.get(f"{tenants.url}/metrics", headers={"authorization": f"Bearer {tenants.secrets['team-c']}"}, timeout=30).status_code == 401
    metrics = httpx.get(f"{tenants.url}/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=30).text
    assert 'adapterserve_tenant_rejections_total{reason="requests_per_minute",tenant="limited"} 2.0' in metrics
    assert 'adapterserve_tenant_rejections_total{reason="tokens_per_minute",tenant="thrifty"} 1.0' in metrics
    assert 'adapterserve_tenant_tokens_total{kind="generation",tenant="thrifty"}' in metrics


def test_a_key_added_then_revoked_while_serving(tenants):
    entry, secret = add(tenants.keys_file, "newcomer", ["json"], False, ["inference"], KeyLimits())
    client = openai_client(tenants, secret)
    assert client.chat.completions.create(model="json", messages=QUESTION, max_tokens=1).choices
    assert {m.id for m in client.models.list().data} == {"json"}
    revoke(tenants.keys_file, key_id=entry.id)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="json", messages=QUESTION, max_tokens=1)
    with pytest.raises(openai.AuthenticationError):  # a stream that starts after the revocation
        client.chat.completions.create(model="json", messages=QUESTION, max_tokens=4, stream=True)
    assert openai_client(tenants, tenants.secrets["team-b"]).models.list().data  # the others keep working


# Dedicated mode has no base model: a key's `base: true` grants none of the hosted models
# (the first model's name was once taken for the base: d-a could use french).
DEDICATED_MODELS = ["french", "pirate", "sentiment"]
DEDICATED_TENANTS = {
    "d-a": (["pirate", "sentiment"], True, ["inference"]),
    "d-b": (["fr*"], False, ["inference"]),
    "d-c": (["*"], False, ["inference"]),
}


@pytest.fixture(scope="module")
def dedicated_tenants(tmp_path_factory, dedicated, base_path):
    # `dedicated` (the session's dedicated server) has merged the demo adapters into full models
    from adapterserve.config import load_settings
    from adapterserve.training.merge import merged_store

    folder = tmp_path_factory.mktemp("dedicated-tenants")
    keys_file = folder / "keys.yaml"
    secrets = {tenant: add(keys_file, tenant, models, base, scopes, KeyLimits())[1] for tenant, (models, base, scopes) in DEDICATED_TENANTS.items()}
    store = merged_store(load_settings().cache_dir, base_path)
    process = ServerProcess(
        ["--mode", "dedicated", "--keys-file", str(keys_file), "--admin-api-key", ADMIN_KEY,
         *[arg for name in DEDICATED_MODELS for arg in ("--dedicated-models", str(store / name))]],
        folder / "server.log",
    ).start(timeout=900)
    process.secrets = secrets
    yield process
    process.stop()


def test_every_tenant_every_model_every_endpoint_in_dedicated_mode(dedicated_tenants):
    leaks = []
    for tenant, (models, _, _) in DEDICATED_TENANTS.items():
        secret = dedicated_tenants.secrets[tenant]
        may = {m for m in DEDICATED_MODELS if any(fnmatch.fnmatchcase(m, p) for p in models)}
        for endpoint in ("chat", "completion", "classify", "model"):
            unknown_status, unknown_body = call(dedicated_tenants, secret, endpoint, UNKNOWN)
            assert unknown_status == 404, unknown_body
            for model in DEDICATED_MODELS:
                status, body = call(dedicated_tenants, secret, endpoint, model)
                if model in may:
                    assert status == expected_status(model, endpoint, None), (tenant, endpoint, model, body)
                elif not (status == unknown_status and body == _renamed(unknown_body, UNKNOWN, model)):
                    leaks.append((tenant, endpoint, model, status, body))
        listed = {m.id for m in openai_client(dedicated_tenants, secret).models.list().data}
        assert listed == may, (tenant, listed)
    assert leaks == []
    health = httpx.get(f"{dedicated_tenants.url}/health", headers={"authorization": f"Bearer {dedicated_tenants.secrets['d-c']}"}, timeout=30)
    assert "engines" not in health.json()  # the hosted models are not named to a tenant


def test_files_jobs_and_fine_tuned_models_belong_to_the_tenant_that_made_them(tenants, base_name):
    from tests.integration.test_fine_tuning import dataset, wait_for

    a, b, c = (openai_client(tenants, tenants.secrets[t]) for t in ("team-a", "team-b", "team-c"))
    file = a.files.create(file=("mine.jsonl", io.BytesIO(dataset(12))), purpose="fine-tune")
    with pytest.raises(openai.NotFoundError):  # team-b's key may not use the base: it may not train it either
        b.fine_tuning.jobs.create(model=base_name, training_file=file.id)
    job = a.fine_tuning.jobs.create(model=base_name, training_file=file.id, suffix="mine",
                                    method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}})
    done = wait_for(a, job.id, {"succeeded", "failed", "cancelled"})
    assert done.status == "succeeded", done.error
    name = "ft-mine-" + job.id.rsplit("-", 1)[1][:12]

    for other in (b, c):  # team-c may use the base and `fr*`: still not another tenant's model
        assert other.files.list().data == [] and other.fine_tuning.jobs.list().data == []
        for read in (lambda: other.files.retrieve(file.id), lambda: other.files.content(file.id),
                     lambda: other.fine_tuning.jobs.retrieve(job.id), lambda: other.fine_tuning.jobs.list_events(job.id)):
            with pytest.raises(openai.NotFoundError):
                read()
        for model in (done.fine_tuned_model, name):
            status, body = call(tenants, other.api_key, "chat", model)
            assert status == 404 and body["error"]["code"] == "model_not_found", body
        assert name not in {m.id for m in other.models.list().data}
    for model in (done.fine_tuned_model, name):  # the owner, with no edit to the keys file
        assert call(tenants, a.api_key, "chat", model) == (200, None)
    assert name in {m.id for m in a.models.list().data}
    assert [f.id for f in a.files.list().data] == [file.id]
