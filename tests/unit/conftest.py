"""Unit-test fixtures: a tiny base written as safetensors, adapter stores, and an app whose
host is the real SharedBaseHost over fake engines (no vLLM processes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from adapterserve.app import create_app
from adapterserve.config import Settings
from adapterserve.hosting.shared import SharedBaseHost
from adapterserve.registry.records import BaseModelInfo
from adapterserve.registry.snapshots import SnapshotStore
from adapterserve.registry.store import Registry
from adapterserve.registry.sources import local_stores
from adapterserve.registry.validation import Limits
from tests.adapter_factory import write_lora
from tests.fakes import FakeEngine

HIDDEN, INTER, LAYERS = 16, 32, 2
ADMIN_KEY = "admin-secret"
# the unit apps listen on 127.0.0.1 by default: they answer loopback host names only
LOCAL = "http://localhost"


@pytest.fixture
def tiny_base(tmp_path) -> BaseModelInfo:
    folder = tmp_path / "tiny-base"
    folder.mkdir()
    tensors = {"model.embed_tokens.weight": torch.zeros(50, HIDDEN)}
    shapes = {
        "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (8, HIDDEN), "self_attn.v_proj": (8, HIDDEN),
        "self_attn.o_proj": (HIDDEN, HIDDEN), "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN),
        "mlp.down_proj": (HIDDEN, INTER),
    }
    for layer in range(LAYERS):
        for module, shape in shapes.items():
            tensors[f"model.layers.{layer}.{module}.weight"] = torch.zeros(*shape)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"hidden_size": HIDDEN, "model_type": "llama"}))
    (folder / "tokenizer_config.json").write_text("{}")
    return BaseModelInfo.read("tiny-base", folder)


@pytest.fixture
def store(tmp_path, tiny_base) -> Path:
    store = tmp_path / "store"
    for i, name in enumerate(["alpha", "beta", "engine-refuses"]):
        write_lora(store / name, tiny_base, rank=4, seed=i)
    return store


@pytest.fixture
def registry(tiny_base, store, tmp_path) -> Registry:
    registry = Registry(
        base=tiny_base, sources=local_stores([store]), limits=Limits(max_lora_rank=16), snapshots=SnapshotStore(tmp_path / "snapshots")
    )
    registry.scan()
    return registry


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(cache_dir=tmp_path / "cache", admin_api_key=ADMIN_KEY, demo_adapters=False)


@pytest.fixture
def client(settings, registry, tiny_base):
    def factory(s, observer):
        return SharedBaseHost(s, tiny_base.path, tiny_base.name, registry, engine_factory=FakeEngine, observer=observer)

    with TestClient(create_app(settings, host_factory=factory), base_url=LOCAL) as test_client:
        yield test_client


@pytest.fixture
def make_client(settings, registry, tiny_base):
    clients = []

    def make(**updates):
        app = create_app(
            settings.model_copy(update=updates),
            host_factory=lambda s, observer: SharedBaseHost(s, tiny_base.path, tiny_base.name, registry, engine_factory=FakeEngine, observer=observer),
        )
        client = TestClient(app, base_url=LOCAL)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)
