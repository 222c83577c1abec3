"""The /metrics exposition, parsed with prometheus-client's own parser: every metric the
docs/metrics.md documents, with its type and labels; memory figures that agree with the files; the
label cap; the hosting cost derivation; tokens and first-token time per model."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from safetensors import safe_open

from adapterserve.app import create_app
from adapterserve.hosting.shared import SharedBaseHost
from adapterserve.metrics import costs
from adapterserve.metrics.labels import OTHER, ModelLabels
from adapterserve.metrics.memory import folder_bytes
from adapterserve.metrics.traffic import RequestTraffic, observe_client
from tests.fakes import ReportingFakeEngine
from tests.unit.conftest import LOCAL

README = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def documented_metrics() -> dict[str, tuple[str, set[str]]]:
    """name -> (type, labels) from the metrics table of docs/metrics.md."""
    table = {}
    for line in README.read_text().splitlines():
        match = re.match(r"\| `(adapterserve_\w+)` \| (\w+) \| ([^|]*) \|", line)
        if match:
            labels = set(re.findall(r"`(\w+)`", match.group(3)))
            table[match.group(1)] = (match.group(2), labels)
    return table


def scrape(client) -> dict:
    families = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        if family.name.startswith("adapterserve_"):
            families[family.name] = family
    return families


def samples(family, suffix="") -> dict[tuple, float]:
    name = family.name + suffix
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples if s.name == name}


# Declared always, with series only on a GPU, in dedicated mode or with a keys file.
NOT_IN_SHARED_MODE_ON_CPU = {
    "adapterserve_engine_gpu_memory_bytes", "adapterserve_model_swap_seconds",
    "adapterserve_tenant_requests_total", "adapterserve_tenant_tokens_total", "adapterserve_tenant_rejections_total",
}


def exposed_name(name: str, kind: str) -> str:
    """The parser names counters without `_total`."""
    return name[: -len("_total")] if kind == "counter" else name


@pytest.fixture
def metrics_settings(settings):
    # float32 as stored by the tiny base: computed weight bytes must equal the file's.
    return settings.model_copy(update={"dtype": "float32", "metrics_max_models": 2})


@pytest.fixture
def reporting_client(metrics_settings, registry, tiny_base):
    def factory(s, observer):
        return SharedBaseHost(s, tiny_base.path, tiny_base.name, registry, engine_factory=ReportingFakeEngine, observer=observer)

    with TestClient(create_app(metrics_settings, host_factory=factory), base_url=LOCAL) as test_client:
        yield test_client


def chat(client, model):
    return client.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "hi"}]})


def test_every_documented_metric_is_exposed_with_its_type_and_labels(reporting_client):
    assert chat(reporting_client, "alpha").status_code == 200
    # What the engine client's observer reports for a request (the fake engine has no client
    # methods to wrap; test_tokens_and_first_token_time_per_model covers the wrapping).
    reporting_client.app.state.metrics.observe_traffic(RequestTraffic("alpha", "chat", 3, 4, 0.1))
    families = scrape(reporting_client)
    documented = documented_metrics()
    assert len(documented) >= 19
    for name, (kind, labels) in documented.items():
        family = families.get(exposed_name(name, kind))
        assert family is not None, f"{name} is documented but not exposed"
        assert family.type == kind, name
        if name in NOT_IN_SHARED_MODE_ON_CPU:
            assert not family.samples
            continue
        sample_labels = {key for s in family.samples for key in s.labels} - {"le"}
        assert sample_labels == labels, name
    # prometheus-client's `_created` timestamps are parsed as families of their own.
    undocumented = {f for f in families if not f.endswith("_created")} - {exposed_name(n, k) for n, (k, _) in documented.items()}
    assert not undocumented, f"exposed but not in docs/metrics.md: {undocumented}"


def test_base_weights_bytes_agree_with_the_safetensors_of_the_base(client, tiny_base, settings):
    # The plain fake engine gives no report: the figures are computed from the files.
    families = scrape(client)
    memory = samples(families["adapterserve_engine_memory_bytes"])
    with safe_open(str(tiny_base.path / "model.safetensors"), "pt") as handle:
        file_bytes = sum(handle.get_tensor(k).nbytes for k in handle.keys())
    weights = memory[(("component", "base_weights"), ("engine", "generate"))]
    # The tiny base is float32 on disk; the engine's dtype scales it.
    from adapterserve.dtypes import resolve_dtype

    scale = {"float32": 1, "bfloat16": 0.5}[resolve_dtype(settings.dtype)]
    assert weights == file_bytes * scale
    assert samples(families["adapterserve_engine_memory_measured"]) == {(("engine", "generate"),): 0.0}


def test_adapter_bytes_agree_with_the_adapter_files(reporting_client, store):
    families = scrape(reporting_client)
    memory = samples(families["adapterserve_engine_memory_bytes"])
    tensor_bytes = 0
    for name in ("alpha", "beta"):
        with safe_open(str(store / name / "adapter_model.safetensors"), "pt") as handle:
            tensor_bytes += sum(handle.get_tensor(k).nbytes for k in handle.keys())
    assert memory[(("component", "adapter_cpu_cache"), ("engine", "generate"))] == tensor_bytes
    assert memory[(("component", "base_weights"), ("engine", "generate"))] == 1000  # as reported
    storage = samples(families["adapterserve_task_storage_bytes"])
    assert storage[(("kind", "adapter"), ("task", "alpha"))] == folder_bytes(store / "alpha")
    assert samples(families["adapterserve_storage_bytes"])[(("component", "adapters"),)] == folder_bytes(store / "alpha") + folder_bytes(store / "beta")
    used = samples(families["adapterserve_kv_cache_used_bytes"])
    assert used == {(("engine", "generate"),): 1000.0}  # usage 0.25 of 4000


def test_adapters_by_tier(reporting_client):
    tiers = samples(scrape(reporting_client)["adapterserve_adapters"])
    # 'engine-refuses' was refused by the engine: two registered, both cached, both in slots
    assert tiers[(("kind", "lora"), ("tier", "registered"))] == 2
    assert tiers[(("kind", "lora"), ("tier", "cpu_cache"))] == 2
    assert tiers[(("kind", "lora"), ("tier", "engine_slot"))] == 2
    assert tiers[(("kind", "head"), ("tier", "registered"))] == 0


def test_loads_and_evictions_are_counted_from_the_engine_cache(reporting_client):
    families = scrape(reporting_client)
    assert samples(families["adapterserve_adapter_loads"], "_total")[(("kind", "lora"),)] == 2
    assert samples(families["adapterserve_adapter_load_seconds"], "_count")[(("kind", "lora"),)] == 2
    engine = reporting_client.app.state.host.generate
    engine.client.loaded.pop(next(iter(engine.client.loaded)))  # the engine's LRU dropped one
    reporting_client.app.state.metrics.measured_at = 0  # force a fresh reading
    families = scrape(reporting_client)
    assert samples(families["adapterserve_adapter_evictions"], "_total")[(("kind", "lora"),)] == 1


def test_model_labels_are_capped_and_unknown_models_never_create_series(reporting_client, store, tiny_base):
    from tests.adapter_factory import write_lora

    for name in ("gamma", "delta"):
        write_lora(store / name, tiny_base, rank=4, seed=7)
        assert reporting_client.post(f"/admin/adapters/{name}/load", headers={"Authorization": "Bearer admin-secret"}).status_code == 200
    for model in ("alpha", "beta", "gamma", "no-such-model"):
        chat(reporting_client, model)
    requests = samples(scrape(reporting_client)["adapterserve_requests"], "_total")
    models = {dict(key)["model"] for key in requests}
    assert models == {"alpha", "beta", OTHER}  # cap 2; gamma and the unknown name are `other`
    for _ in range(5):  # gamma becomes far busier than the least busy labelled model
        chat(reporting_client, "gamma")
    requests = samples(scrape(reporting_client)["adapterserve_requests"], "_total")
    models = {dict(key)["model"] for key in requests}
    assert "gamma" in models and len(models - {OTHER}) == 2


def test_label_cap_keeps_the_busiest():
    displaced = []
    labels = ModelLabels(2, on_displaced=displaced.append)
    assert labels.count("a") == "a" and labels.count("b") == "b"
    assert labels.count("c") == OTHER  # 1 request is not more than twice b's 1
    for _ in range(2):
        labels.count("b")
    assert labels.count("c") == OTHER and labels.count("c") == "c"  # c: 3 > 2 x a's 1
    assert displaced == ["a"] and labels.label("a") == OTHER
    assert labels.count(None) == OTHER


def test_hosting_cost_derivation():
    tasks = [costs.Task("t1", "lora", 10), costs.Task("t2", "lora", 20), costs.Task("h", "head", 5)]
    engine = {costs.GENERATE: 1000, costs.POOLING: 900}
    slots = {costs.GENERATE: 100, costs.POOLING: 50}
    assert costs.dedicated_bytes(tasks, engine) == 1000 + 1000 + 900
    assert costs.shared_bytes(tasks, engine, slots) == (1000 + 100) + (900 + 50) + 35
    assert costs.shared_bytes(tasks[:2], engine, slots) == 1100 + 30  # no head: no pooling engine
    # Slots: A (rank x in) and B (out x rank) per 2-D weight, the tied embedding twice.
    shapes = {"embed_tokens.weight": (100, 8), "q_proj.weight": (8, 8), "norm.weight": (8,)}
    assert costs.lora_slot_estimate(shapes, True, max_loras=2, max_rank=4, element_bytes=2) == 2 * 4 * (108 * 2 + 16) * 2


def test_hosting_memory_series(reporting_client):
    hosting = samples(scrape(reporting_client)["adapterserve_hosting_memory_bytes"])
    assert set(hosting) == {
        (("basis", "measured"), ("mode", "shared")),
        (("basis", "derived"), ("mode", "shared")),
        (("basis", "derived"), ("mode", "dedicated")),
    }


class _Outputs:
    """A stand-in for AsyncLLM.generate's stream of RequestOutputs."""

    def __init__(self, chunks, metrics=None):
        self.chunks = chunks
        self.metrics = metrics

    async def generate(self, prompt, sampling_params, request_id, lora_request=None):
        for index, tokens in enumerate(self.chunks):
            yield SimpleNamespace(
                prompt_token_ids=[1, 2, 3],
                outputs=[SimpleNamespace(index=0, token_ids=tokens)],
                metrics=self.metrics,
            )

    async def encode(self, *args, **kwargs):
        yield SimpleNamespace(prompt_token_ids=[1, 2], outputs=None)


@pytest.mark.parametrize("kind, chunks, expected", [
    ("DELTA", [[5], [6, 7], [8]], 4),
    ("CUMULATIVE", [[5], [5, 6], [5, 6, 7]], 3),
    ("FINAL_ONLY", [[5, 6, 7, 8, 9]], 5),
])
def test_tokens_and_first_token_time_per_model(kind, chunks, expected):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    seen: list[RequestTraffic] = []
    client = _Outputs(chunks)
    observe_client(client, "base", seen.append)
    params = SamplingParams(output_kind=RequestOutputKind[kind])

    async def run():
        async for _ in client.generate("p", params, "id-1", lora_request=SimpleNamespace(lora_name="pirate")):
            pass
        async for _ in client.encode("p", None, "id-2"):
            pass

    asyncio.run(run())
    generated, encoded = seen
    assert (generated.model, generated.prompt_tokens, generated.generation_tokens) == ("pirate", 3, expected)
    # A non-streamed request's first output is its last: no first-token time without the engine's own
    assert (generated.time_to_first_token is None) == (kind == "FINAL_ONLY")
    assert (encoded.model, encoded.prompt_tokens, encoded.generation_tokens) == ("base", 2, 0)
