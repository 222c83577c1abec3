"""The adapter lifecycle with the real engine, on a server of its own: folders discovered
on request and by the scan, removed while a request runs, changed into broken weights;
unload that frees the engine's CPU cache; a pinned adapter that a cycling workload never
evicts; and the routing series parsed the way the Gateway API Inference Extension does."""

from __future__ import annotations

import shutil
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapterserve.server_process import ServerProcess
from tests.integration.conftest import ADMIN_KEY

pytestmark = pytest.mark.integration

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
QUESTION = [{"role": "user", "content": "What is the capital of Italy?"}]
SCAN_S = 2
CYCLING = ["french", "json", "french-b", "json-b"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_dir):
    store = tmp_path_factory.mktemp("lifecycle-store")
    for name in ("pirate", "french", "json"):
        shutil.copytree(demo_dir / name, store / name)
    for name in ("french", "json"):  # the same weights under another name: another adapter
        shutil.copytree(demo_dir / name, store / f"{name}-b")
    process = ServerProcess(
        ["--no-demo-adapters", "--adapter-dirs", str(store), "--max-loras", "2", "--max-cpu-loras", "3",
         "--pinned-adapters", "pirate", "--adapter-scan-interval-s", str(SCAN_S), "--metrics-refresh-s", "1",
         "--admin-api-key", ADMIN_KEY],
        tmp_path_factory.mktemp("lifecycle-logs") / "server.log",
    ).start()
    process.store = store
    process.demo_dir = demo_dir
    yield process
    process.stop()


def client(server, timeout=120):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=timeout)


def answer(server, model, max_tokens=12):
    reply = client(server).chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=max_tokens)
    return reply.choices[0].message.content


def listed(server) -> set[str]:
    return {m.id for m in client(server).models.list().data}


def generate_engine(server) -> dict:
    engines = httpx.get(f"{server.url}/admin/engines", headers=ADMIN, timeout=10).json()["engines"]
    return next(e for e in engines if e["name"] == "generate")


def wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"not within {timeout} s: {what}")


def metric_families(server) -> dict:
    return {f.name: f for f in text_string_to_metric_families(httpx.get(f"{server.url}/metrics", timeout=10).text)}


def lora_info_like_the_gateway(server) -> tuple[set[str], set[str], int, int]:
    """As the Gateway API Inference Extension's extractor reads it: the highest-valued
    `vllm:lora_requests_info` series, its adapter labels split on commas."""
    family = metric_families(server)["vllm:lora_requests_info"]
    newest = max(family.samples, key=lambda s: s.value)
    running = {a for a in newest.labels["running_lora_adapters"].split(",") if a}
    waiting = {a for a in newest.labels["waiting_lora_adapters"].split(",") if a}
    return running, waiting, int(newest.labels["max_lora"]), len(family.samples)


def loaded_adapters(server) -> dict[tuple[str, str], dict]:
    family = metric_families(server)["vllm:lora_adapter_loaded"]
    return {(s.labels["adapter_name"], s.labels["level"]): s.labels for s in family.samples if s.value == 1}


def test_a_folder_copied_in_answers_its_first_request_and_the_scan_lists_another(server):
    expected = answer(server, "french")
    shutil.copytree(server.demo_dir / "french", server.store / "late")
    assert answer(server, "late") == expected  # registered on the spot by its first request
    assert "late" in listed(server)
    shutil.copytree(server.demo_dir / "json", server.store / "scanned")
    wait_for(lambda: "scanned" in listed(server), 5 * SCAN_S, "the scan lists the new folder")


def test_a_removed_folder_finishes_its_request_then_is_404(server):
    outcome = {}

    def stream():
        chunks = client(server).chat.completions.create(
            model="late", messages=QUESTION, temperature=0, max_tokens=48, stream=True,
            extra_body={"ignore_eos": True, "min_tokens": 48},
        )
        outcome["text"] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    worker = threading.Thread(target=stream)
    worker.start()
    time.sleep(1.0)  # under way
    shutil.rmtree(server.store / "late")
    worker.join(timeout=120)
    assert outcome.get("text"), "the in-flight request finished with its output"
    wait_for(lambda: "late" not in listed(server), 5 * SCAN_S, "the removed folder is no longer listed")
    with pytest.raises(openai.NotFoundError):
        answer(server, "late")


def test_a_reloaded_folder_with_broken_weights_keeps_the_last_good_version(server):
    expected = answer(server, "json")
    weights = server.store / "json" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    def refused():
        problems = httpx.get(f"{server.url}/admin/adapters", headers=ADMIN, timeout=10).json()["refused"]
        return any(p["name"] == "json" and "last good one serves" in p["reason"] for p in problems)

    wait_for(refused, 5 * SCAN_S, "the scan refuses the broken version")
    assert answer(server, "json") == expected


def test_unload_frees_the_adapter_from_the_engine(server):
    answer(server, "scanned")
    lora_id = generate_engine(server)["adapter_ids"]["scanned"]
    wait_for(lambda: lora_id in (generate_engine(server)["cpu_cache_ids"] or []), 10, "the adapter is in the CPU cache")
    assert httpx.post(f"{server.url}/admin/adapters/scanned/unload", headers=ADMIN, timeout=30).status_code == 200
    wait_for(lambda: lora_id not in (generate_engine(server)["cpu_cache_ids"] or []), 15, "the engine's CPU cache no longer holds it")
    wait_for(lambda: not any(name == "scanned" for name, _ in loaded_adapters(server)), 10, "the tier metrics show it gone")
    assert "scanned" not in listed(server)


def test_a_pinned_adapter_is_never_evicted_by_a_cycling_workload(server):
    pirate = generate_engine(server)["adapter_ids"]["pirate"]
    evictions_before = _evictions(server)
    for _ in range(2):
        for name in CYCLING:  # four adapters through the two CPU cache entries pirate leaves
            answer(server, name, max_tokens=4)
            used = generate_engine(server)["adapter_ids"][name]
            # a reading taken after this request (it holds the adapter just used)
            wait_for(lambda: used in (generate_engine(server)["cpu_cache_ids"] or []), 10, f"{name} in the CPU cache")
            assert pirate in generate_engine(server)["cpu_cache_ids"], f"pirate evicted after {name}"
    assert _evictions(server) - evictions_before >= len(CYCLING)  # the others were evicted meanwhile
    wait_for(lambda: _evictions(server) - evictions_before >= len(CYCLING), 5, "evictions counted")
    labels = loaded_adapters(server)[("pirate", "cpu")]
    assert labels["pinned"] == "true" and int(labels["rank"]) > 0
    assert all(l["pinned"] == "false" for (name, _), l in loaded_adapters(server).items() if name != "pirate")


def _evictions(server) -> float:
    family = metric_families(server)["adapterserve_adapter_evictions"]
    return sum(s.value for s in family.samples if s.name.endswith("_total") and s.labels["kind"] == "lora")


def test_routing_series_as_the_gateway_reads_them_busy_and_idle(server):
    running_seen: set[str] = set()
    stop = threading.Event()

    def load(name):
        while not stop.is_set():
            client(server).chat.completions.create(model=name, messages=QUESTION, temperature=0, max_tokens=24)

    workers = [threading.Thread(target=load, args=(name,)) for name in ("french", "pirate", "french-b")]
    for worker in workers:
        worker.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(running_seen) < 2:
            running, waiting, max_lora, series = lora_info_like_the_gateway(server)
            assert series == 1 and max_lora == 2
            assert (running | waiting) <= {"french", "pirate", "french-b"}
            assert len(running) <= max_lora
            running_seen |= running
            time.sleep(0.2)
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=120)
    assert len(running_seen) >= 2, running_seen
    # idle: nothing running or waiting, still one series; loaded adapters are still reported
    wait_for(lambda: lora_info_like_the_gateway(server)[:2] == (set(), set()), 10, "idle")
    assert lora_info_like_the_gateway(server)[3] == 1
    engine = generate_engine(server)
    names = {lora_id: name for name, lora_id in engine["adapter_ids"].items()}
    wait_for(
        lambda: {n for n, level in loaded_adapters(server) if level == "cpu"}
        == {names[i] for i in generate_engine(server)["cpu_cache_ids"] if i in names},
        10, "vllm:lora_adapter_loaded matches the engine's CPU cache",
    )
    families = metric_families(server)
    assert families["vllm:max_gpu_lora_adapters"].samples[0].value == 2
    timed = [s.value for s in families["vllm:lora_adapter_load_seconds"].samples if s.name.endswith("_count")]
    assert timed and timed[0] >= len(CYCLING)  # loads were timed in the worker
