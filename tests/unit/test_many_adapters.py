"""A store of 10,000 adapter folders over fake engines: the server starts having validated
only `adapters_validated_at_start` of them, /v1/models lists them all, a listed one is
fetched and validated on its first request, a scan neither validates the listed ones nor
drops them, and a folder removed from the store leaves the listing."""

from __future__ import annotations

import shutil

import pytest
from fastapi.testclient import TestClient

from adapterserve.app import create_app
from adapterserve.hosting.shared import SharedBaseHost
from adapterserve.registry.snapshots import SnapshotStore
from adapterserve.registry.sources import local_stores
from adapterserve.registry.store import Registry
from adapterserve.registry.validation import Limits
from tests.adapter_factory import write_lora
from tests.fakes import FakeEngine
from tests.unit.conftest import ADMIN_KEY, LOCAL

COUNT, AT_START = 10_000, 16
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
def big_store(tmp_path, tiny_base):
    store = tmp_path / "many"
    model = write_lora(tmp_path / "model", tiny_base, rank=4)
    for i in range(COUNT):  # the same small adapter under 10,000 names
        folder = store / f"task-{i:05d}"
        folder.mkdir(parents=True)
        for file in model.iterdir():
            shutil.copyfile(file, folder / file.name)
    return store


@pytest.fixture
def many(settings, tiny_base, big_store, tmp_path):
    settings = settings.model_copy(update={"adapters_validated_at_start": AT_START})
    registry = Registry(base=tiny_base, sources=local_stores([big_store]), limits=Limits(max_lora_rank=16),
                        snapshots=SnapshotStore(tmp_path / "snapshots"), validated_at_start=AT_START)
    registry.scan()
    app = create_app(settings, host_factory=lambda s, observer: SharedBaseHost(
        s, tiny_base.path, tiny_base.name, registry, engine_factory=FakeEngine, observer=observer))
    with TestClient(app, base_url=LOCAL) as client:
        yield client, registry


def cards(client) -> dict[str, dict]:
    return {card["id"]: card for card in client.get("/v1/models").json()["data"]}


def test_ten_thousand_folders_start_with_a_few_validated_and_all_listed(many, tmp_path):
    client, registry = many
    assert len(registry.adapters) == AT_START and len(registry.listed) == COUNT - AT_START
    assert len(list((tmp_path / "snapshots").iterdir())) <= 2  # one snapshot (same content) and the fetch index
    listed = cards(client)
    assert len(listed) == COUNT + 1  # and the base
    assert listed["task-09999"]["kind"] == "adapter" and listed["task-09999"]["state"] == "listed"
    assert listed["task-00000"]["kind"] == "lora" and "state" not in listed["task-00000"]


def test_a_listed_adapter_is_validated_on_its_first_request(many):
    client, registry = many
    answer = client.post("/v1/chat/completions", json={"model": "task-05000", "messages": [{"role": "user", "content": "hi"}]})
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == "answer from task-05000"
    assert "task-05000" in registry.adapters and "task-05000" not in registry.listed
    assert cards(client)["task-05000"]["kind"] == "lora"


def test_a_scan_keeps_the_listed_unvalidated_and_drops_a_removed_folder(many, big_store):
    client, registry = many
    shutil.rmtree(big_store / "task-07777")
    write_lora(big_store / "task-00003", registry.base, rank=4, seed=9)  # a validated one changes
    scan = client.post("/admin/adapters/scan", headers=ADMIN)
    assert scan.status_code == 200 and scan.json()["changed"] == ["task-00003"]
    assert len(registry.adapters) == AT_START  # the changed one reloaded; none of the listed validated
    assert "task-07777" not in cards(client) and len(registry.listed) == COUNT - AT_START - 1


def test_the_start_validates_within_its_time_budget_and_lists_the_rest(tiny_base, big_store, tmp_path):
    from adapterserve.registry.store import Budget

    two = Budget(2, None)
    assert [two.take() for _ in range(3)] == [True, True, False]
    assert Budget(None, 0.0).take() is False and Budget(None, 60.0).take() is True
    registry = Registry(base=tiny_base, sources=local_stores([big_store]), limits=Limits(max_lora_rank=16),
                        snapshots=SnapshotStore(tmp_path / "snapshots"), validation_budget_s=1.0)
    registry.scan()
    # a second's validation reaches some of them (each a copy and a read), never all 10,000
    assert 0 < len(registry.adapters) < COUNT and len(registry.adapters) + len(registry.listed) == COUNT
