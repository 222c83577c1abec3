"""The adapter lifecycle over fake engines: discovery on request and by scan, unload that
frees the engine, pinning, and engine slots fitted to the stores' largest rank."""

from __future__ import annotations

import asyncio
import shutil
import time

import pytest
from fastapi.testclient import TestClient

from adapterserve.app import create_app
from adapterserve.hosting.shared import SharedBaseHost
from tests.adapter_factory import write_lora
from tests.fakes import FakeEngine
from tests.unit.conftest import ADMIN_KEY
from tests.unit.conftest import LOCAL

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


def chat(client, model):
    return client.post(CHAT, json={"model": model, "messages": MESSAGES})


def served(client) -> set[str]:
    return {m["id"] for m in client.get("/v1/models").json()["data"]}


def engine_of(client):
    return client.app.state.host.generate


def until(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_a_folder_added_while_serving_answers_its_first_request(client, store, tiny_base):
    write_lora(store / "gamma", tiny_base, rank=4, seed=7)
    assert "gamma" not in served(client)
    response = chat(client, "gamma")
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "answer from gamma"
    assert "gamma" in served(client)


def test_a_request_looks_its_adapter_up_in_the_stores_off_the_event_loop(client, store, tiny_base, monkeypatch):
    """In an S3 store a lookup is a LIST request, taking up to its timeouts while the store
    hangs: made on the event loop, every other request would wait for it."""
    registry = client.app.state.host.registry
    looked_up, locate = [], registry.locate

    def watched(name):
        try:
            asyncio.get_running_loop()
            looked_up.append((name, "on the event loop"))
        except RuntimeError:
            looked_up.append((name, "in a worker thread"))
        return locate(name)

    monkeypatch.setattr(registry, "locate", watched)
    write_lora(store / "gamma", tiny_base, rank=4, seed=7)
    assert chat(client, "gamma").status_code == 200
    assert chat(client, "nowhere").status_code == 404
    # each lookup is a LIST in S3: the unlocked pre-check, then once under the name's lock
    assert [name for name, _ in looked_up] == ["gamma", "gamma", "nowhere"]
    # an admin's load with vLLM's lora_path: the path checked against the store's, then loaded
    write_lora(store / "epsilon", tiny_base, rank=4, seed=8)
    loaded = client.post("/v1/load_lora_adapter", json={"lora_name": "epsilon", "lora_path": str(store / "epsilon")},
                         headers=ADMIN)
    assert loaded.status_code == 200, loaded.text
    assert [name for name, _ in looked_up][3:] == ["epsilon", "epsilon"]
    # a name in no store: looked up once under the lock, not again to be validated
    missing = client.post("/v1/load_lora_adapter", json={"lora_name": "zeta"}, headers=ADMIN)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "adapter_not_found", missing.text
    assert [name for name, _ in looked_up][5:] == ["zeta"]
    assert {where for _, where in looked_up} == {"in a worker thread"}


def test_names_in_no_store_are_looked_up_once_a_while_and_a_few_at_a_time(client, store, tiny_base, monkeypatch):
    """Any client can name anything, and each lookup is a LIST request in S3 (up to its
    timeouts, in one of the event loop's few worker threads): a name found in no store is
    not looked up again for a while, and a flood of made-up names is looked up two at a
    time, each once (hosting/lookups.py)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from adapterserve.hosting import lookups

    registry, gate = client.app.state.host.registry, client.app.state.host.catalog.lookups
    looked_up, running, most, lock, locate = [], [0], [0], threading.Lock(), registry.locate

    def slow(name):  # a store that takes 50 ms a LIST
        with lock:
            looked_up.append(name)
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        try:
            return locate(name)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(registry, "locate", slow)
    assert [chat(client, "nowhere").status_code for _ in range(3)] == [404] * 3
    assert looked_up == ["nowhere"]
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda i: chat(client, f"made-up-{i}").status_code, range(24)))
    assert codes == [404] * 24 and len(looked_up) == 25
    assert most[0] == lookups.CONCURRENT_LOOKUPS  # up to 6 at once without its turns (the worker threads)
    with ThreadPoolExecutor(8) as pool:  # one made-up name, many times at once: the requests that waited their turn ask no more
        assert list(pool.map(lambda i: chat(client, "again").status_code, range(8))) == [404] * 8
    assert looked_up.count("again") <= lookups.CONCURRENT_LOOKUPS
    write_lora(store / "nowhere", tiny_base, rank=4, seed=9)  # added after its name was missed
    assert chat(client, "nowhere").status_code == 404 and looked_up.count("nowhere") == 1  # remembered
    gate.ttl_s = 0.0  # the miss has expired
    assert chat(client, "nowhere").status_code == 200 and "nowhere" in served(client)


def test_a_broken_folder_named_by_a_request_is_404_and_reported_to_admins(client, store, tiny_base):
    write_lora(store / "broken", tiny_base, rank=4)
    (store / "broken" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    for _ in range(2):  # the second time answers from the recorded refusal
        response = chat(client, "broken")
        assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    refused = {p["name"]: p["reason"] for p in client.get("/admin/adapters", headers=ADMIN).json()["refused"]}
    assert "broken" in refused
    assert chat(client, "../store/alpha").status_code == 404  # never a path


def test_the_scan_registers_new_reloads_changed_and_drops_removed_folders(client, store, tiny_base):
    before = engine_of(client).serving("models").lora_requests["alpha"].lora_int_id
    write_lora(store / "delta", tiny_base, rank=4, seed=11)
    write_lora(store / "alpha", tiny_base, rank=4, seed=12)  # new weights
    shutil.rmtree(store / "beta")
    changes = client.post("/admin/adapters/scan", headers=ADMIN).json()
    assert changes == {"added": ["delta"], "changed": ["alpha"], "removed": ["beta"]}
    assert served(client) >= {"alpha", "delta"} and "beta" not in served(client)
    assert chat(client, "beta").status_code == 404
    assert engine_of(client).serving("models").lora_requests["alpha"].lora_int_id != before
    until(lambda: before not in engine_of(client).client.loaded)  # the old version was freed
    # nothing changed: nothing to do
    assert client.post("/admin/adapters/scan", headers=ADMIN).json() == {"added": [], "changed": [], "removed": []}


def test_a_changed_folder_that_breaks_keeps_the_last_good_version(client, store):
    weights = store / "alpha" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert client.post("/admin/adapters/scan", headers=ADMIN).json()["changed"] == ["alpha"]
    assert chat(client, "alpha").status_code == 200
    refused = {p["name"]: p["reason"] for p in client.get("/admin/adapters", headers=ADMIN).json()["refused"]}
    assert "last good one serves" in refused["alpha"]


def test_unload_frees_the_engine_and_stays_unloaded(client):
    engine = engine_of(client)
    alpha = engine.serving("models").lora_requests["alpha"].lora_int_id
    assert alpha in engine.client.loaded
    assert client.post("/admin/adapters/alpha/unload", headers=ADMIN).status_code == 200
    until(lambda: alpha not in engine.client.loaded)
    assert chat(client, "alpha").status_code == 404  # not discovered again by a request
    assert client.post("/admin/adapters/scan", headers=ADMIN).json()["added"] == []  # nor by the scan
    assert client.post("/admin/adapters/alpha/load", headers=ADMIN).status_code == 200
    assert chat(client, "alpha").status_code == 200


def test_pinning_through_the_admin_api_and_its_limit(make_client):
    client = make_client(max_cpu_loras=2)
    engine = engine_of(client)
    response = client.post("/admin/adapters/alpha/pin", headers=ADMIN)
    assert response.status_code == 200, response.text
    alpha = engine.serving("models").lora_requests["alpha"].lora_int_id
    assert alpha in engine.client.pinned
    listed = {a["name"]: a["pinned"] for a in client.get("/admin/adapters", headers=ADMIN).json()["adapters"]}
    assert listed == {"alpha": True, "beta": False}
    refused = client.post("/admin/adapters/beta/pin", headers=ADMIN)
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "too_many_pinned"
    assert client.post("/admin/adapters/alpha/unpin", headers=ADMIN).status_code == 200
    until(lambda: alpha not in engine.client.loaded)  # the pinned version is freed
    assert engine.serving("models").lora_requests["alpha"].lora_int_id not in engine.client.pinned
    assert client.post("/admin/adapters/alpha/unpin", headers=ADMIN).status_code == 404


def test_pinned_in_the_settings_are_pinned_at_start(make_client):
    client = make_client(pinned_adapters=["beta"], max_cpu_loras=2)
    engine = engine_of(client)
    assert engine.serving("models").lora_requests["beta"].lora_int_id in engine.client.pinned


def test_pinning_the_whole_cpu_cache_is_refused_at_start(make_client):
    with pytest.raises(ValueError, match="pin fewer than max_cpu_loras"):
        make_client(pinned_adapters=["alpha", "beta"], max_cpu_loras=2)


def test_slots_fit_the_largest_rank_and_a_larger_adapter_is_refused_with_the_setting(client, store, tiny_base):
    host = client.app.state.host
    assert host.lora_rank == 8  # rank-4 adapters: vLLM's smallest slot that holds them
    assert engine_of(client).spec.max_lora_rank == 8
    write_lora(store / "wide", tiny_base, rank=16)
    assert chat(client, "wide").status_code == 404
    refused = {p["name"]: p["reason"] for p in client.get("/admin/adapters", headers=ADMIN).json()["refused"]}
    assert "above the engine's max_lora_rank 8" in refused["wide"] and "--max-lora-rank 16" in refused["wide"]


def test_a_fixed_rank_is_used_as_set(make_client):
    client = make_client(max_lora_rank="32")
    assert engine_of(client).spec.max_lora_rank == 32


def test_max_lora_rank_must_be_auto_or_a_vllm_rank():
    from pydantic import ValidationError

    from adapterserve.config import Settings

    with pytest.raises(ValidationError):
        Settings(max_lora_rank="12")
    assert Settings(max_lora_rank=64).fixed_lora_rank == 64
    assert Settings().fixed_lora_rank is None


def test_an_unload_holds_across_a_restart_until_loaded_again(settings, store, tiny_base, tmp_path):
    from adapterserve.registry.snapshots import SnapshotStore
    from adapterserve.registry.store import Registry
    from adapterserve.registry.sources import local_stores
    from adapterserve.registry.validation import Limits

    def server():  # a fresh process, as far as the host knows: the stores scanned anew
        registry = Registry(base=tiny_base, sources=local_stores([store]), limits=Limits(max_lora_rank=16), snapshots=SnapshotStore(tmp_path / "snapshots"))
        registry.scan()
        app = create_app(settings, host_factory=lambda s, observer: SharedBaseHost(s, tiny_base.path, tiny_base.name, registry, engine_factory=FakeEngine, observer=observer))
        return TestClient(app, base_url=LOCAL)

    with server() as client:
        assert client.post("/admin/adapters/alpha/unload", headers=ADMIN).status_code == 200
    with server() as client:  # restarted
        assert chat(client, "alpha").status_code == 404 and chat(client, "beta").status_code == 200
        assert "alpha" not in {m["id"] for m in client.get("/v1/models").json()["data"]}
        assert client.post("/admin/adapters/alpha/load", headers=ADMIN).status_code == 200
    with server() as client:  # loaded again: served after the next restart too
        assert chat(client, "alpha").status_code == 200


def test_the_first_head_while_serving_starts_the_classification_engine(client, store, tiny_base):
    # a classification fine-tuning job on a server that had no heads at start publishes one so
    from tests.adapter_factory import _head

    host = client.app.state.host
    assert host.classify is None
    _head(store, tiny_base, "mood", (2, tiny_base.hidden_size), labels=["bad", "good"])
    loaded = client.post("/admin/adapters/mood/load", headers=ADMIN)
    assert loaded.status_code == 200, loaded.text
    assert host.classify is not None and host.classify.running and "mood" in host.published_adapters(host.classify).values()
    _head(store, tiny_base, "tone", (3, tiny_base.hidden_size), labels=["a", "b", "c"])
    assert client.post("/admin/adapters/tone/load", headers=ADMIN).status_code == 200  # into the same engine
    assert [e.name for e in host.engines()].count(host.classify.name) == 1


def test_a_folder_changed_while_the_start_validates_it_is_reloaded_by_the_next_scan(make_client, registry, store, tiny_base, monkeypatch):
    """The start's scan validates every folder, which may take minutes over many adapters;
    a folder changed meanwhile must not have its new version taken for the one validated
    (it would serve the old weights until the folder changed again)."""
    import adapterserve.registry.store as store_module

    validate = store_module.validate_from

    def validate_then_change(source, name, *args, **kwargs):
        record = validate(source, name, *args, **kwargs)
        if name == "alpha":  # an upload lands right after alpha's validation
            write_lora(store / "alpha", tiny_base, rank=4, seed=21)
        return record

    monkeypatch.setattr(store_module, "validate_from", validate_then_change)
    registry.scan()
    monkeypatch.setattr(store_module, "validate_from", validate)
    client = make_client()
    before = engine_of(client).serving("models").lora_requests["alpha"].lora_int_id
    assert client.post("/admin/adapters/scan", headers=ADMIN).json()["changed"] == ["alpha"]
    assert engine_of(client).serving("models").lora_requests["alpha"].lora_int_id != before
