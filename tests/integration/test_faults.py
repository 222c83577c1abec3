"""Faults with the real engines, on a server of their own (it gets killed): a store folder
deleted or truncated under a loaded and under an evicted adapter never reaches the engine;
a SIGKILLed engine core, and then a SIGKILLed worker, make requests for that engine 503
within 5 s while the other engine keeps serving (also while the engine starts again, ~30 s),
and the engine comes back by itself."""

from __future__ import annotations

import os
import shutil
import signal
import time

import httpx
import openai
import pytest

from adapterserve.server_process import ServerProcess
from tests.integration.conftest import ADMIN_KEY

pytestmark = pytest.mark.integration

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
QUESTION = [{"role": "user", "content": "What is the capital of Italy?"}]


@pytest.fixture(scope="module")
def faulty(tmp_path_factory, demo_dir):
    store = tmp_path_factory.mktemp("fault-store")
    for name in ("pirate", "french", "json", "sentiment"):
        shutil.copytree(demo_dir / name, store / name)
    process = ServerProcess(
        ["--no-demo-adapters", "--adapter-dirs", str(store), "--max-loras", "1", "--max-cpu-loras", "1",
         "--admin-api-key", ADMIN_KEY, "--engine-restart-backoff-s", "1", "--metrics-refresh-s", "2",
         # each engine's model in a worker process of its own (the default above 2 CPUs), to kill
         # it apart from its engine core; the core alone is what a killed engine is otherwise
         "--engine-worker-process",
         # no store scans: a deleted folder stays registered, served from its snapshot (the
         # scan would unregister it: test_lifecycle covers that)
         "--adapter-scan-interval-s", "0"],
        tmp_path_factory.mktemp("fault-logs") / "server.log",
    ).start()
    process.store = store
    yield process
    process.stop()


def answer(server, model, timeout=120):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=timeout)
    reply = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=12)
    return reply.choices[0].message.content


def classify(server, timeout=120):
    response = httpx.post(f"{server.url}/v1/classify", json={"model": "sentiment", "input": "A wonderful book."}, timeout=timeout)
    assert response.status_code == 200, response.text
    return response.json()["data"][0]["label"]


def test_store_folders_changed_under_loaded_and_evicted_adapters(faulty):
    before = {name: answer(faulty, name) for name in ("pirate", "french")}  # one CPU slot: pirate is evicted
    shutil.rmtree(faulty.store / "pirate")  # evicted: the engine will load it again
    weights = faulty.store / "french" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])  # loaded: truncated
    for _ in range(2):  # each request evicts the other adapter, so each one is loaded again
        for name in ("pirate", "french"):
            assert answer(faulty, name) == before[name]
    response = httpx.post(f"{faulty.url}/admin/adapters/french/reload", headers=ADMIN)
    assert response.status_code == 400 and "last good version" in response.json()["error"]["message"]
    assert answer(faulty, "french") == before["french"]
    assert httpx.get(f"{faulty.url}/health").status_code == 200


def engine_pids(server, name):
    engines = httpx.get(f"{server.url}/admin/engines", headers=ADMIN, timeout=10).json()["engines"]
    return next(e["pids"] for e in engines if e["name"] == name)


def restarts(server) -> float:
    for line in httpx.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        if line.startswith('adapterserve_engine_restarts_total{engine="generate"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("victim", ["engine core", "worker"])
def test_a_killed_engine_process_is_503_then_restarted(faulty, victim):
    expected = answer(faulty, "pirate")
    count = restarts(faulty)
    pids = engine_pids(faulty, "generate")
    assert len(pids) >= 2, pids  # the engine core, then its worker(s)
    os.kill(pids[0] if victim == "engine core" else pids[1], signal.SIGKILL)
    killed = time.monotonic()

    status = None
    while time.monotonic() - killed < 5:
        try:
            status = httpx.post(f"{faulty.url}/v1/chat/completions", json={"model": "pirate", "messages": QUESTION, "max_tokens": 4}, timeout=5)
        except httpx.TimeoutException:
            continue
        if status.status_code == 503:
            break
        time.sleep(0.2)
    assert status is not None and status.status_code == 503, status.text if status is not None else "no answer"
    assert status.json()["error"]["code"] == "engine_unavailable" and status.headers["retry-after"].isdigit()
    assert time.monotonic() - killed < 5
    assert classify(faulty) == "positive"  # the other engine keeps serving meanwhile
    health = httpx.get(f"{faulty.url}/health", timeout=10)
    assert health.status_code == 503 and health.json()["engines"]["generate"] != "ok"

    # While the new engine starts (~30-45 s here) the server keeps answering at once:
    # /health says the engine is not ready yet, and the other engine serves.
    served_meanwhile = 0
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if httpx.get(f"{faulty.url}/health", timeout=10).status_code == 200:
            break
        assert classify(faulty, timeout=10) == "positive"
        assert "adapterserve_engine_restarts_total" in httpx.get(f"{faulty.url}/metrics", timeout=10).text
        served_meanwhile += 1
        time.sleep(1)
    assert served_meanwhile >= 5, "the restart took too little time to show the server answering meanwhile"
    print(f"{victim}: back after {time.monotonic() - killed:.1f} s")
    assert httpx.get(f"{faulty.url}/health", timeout=120).status_code == 200
    assert answer(faulty, "pirate") == expected  # its adapters are registered again
    assert restarts(faulty) == count + 1
    assert set(engine_pids(faulty, "generate")).isdisjoint(pids)


def test_sigterm_in_the_middle_of_a_restart_leaves_no_engine_process(faulty):
    """Runs last: it stops the module's server. The server is told to stop while the new
    engine is being built; its stop waits for the construction and stops what it built."""
    import psutil

    pids = engine_pids(faulty, "generate")
    old = {p.pid for p in faulty.descendants()}  # both engines' processes before the kill
    os.kill(pids[0], signal.SIGKILL)  # the generate engine's core: its worker is orphaned

    def command(process) -> str:
        try:
            return " ".join(process.cmdline() or [process.name()])
        except psutil.Error:  # gone, or a zombie
            return ""

    def new_engine_core():
        return [p for p in faulty.descendants() if p.pid not in old and "EngineCore" in command(p)]

    deadline = time.monotonic() + 60
    while not new_engine_core() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert new_engine_core(), "the restart did not begin"
    children = [p for p in faulty.descendants() if "resource_tracker" not in command(p)]
    for pid in pids[1:]:  # the orphaned worker(s)
        try:
            children.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    code = faulty.stop(timeout=180)
    assert code in (0, -15), faulty.tail()
    alive = []
    for process in children:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append((process.pid, process.name()))
        except psutil.NoSuchProcess:
            pass
    assert not alive, f"engine processes left behind: {alive}"
