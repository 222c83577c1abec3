"""End to end: a real Prometheus server (Debian's `prometheus`, installed here when missing)
scrapes the live shared-mode and dedicated-mode servers; then every PromQL expression of
the Grafana dashboard runs against it through Prometheus's HTTP API. Each must parse and
return data (at least one number): a panel that shows nothing fails the test. The engines'
own memory figures are checked against the files here too."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from safetensors import safe_open

from adapterserve.server_process import free_port

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards" / "adapterserve.json"
SCRAPE_SECONDS = 2  # also the scrape timeout: /metrics answers from readings taken in the background


def ensure_prometheus() -> str:
    """The prometheus binary; installs Debian's package when it is not there (as CI does)."""
    found = shutil.which("prometheus")
    if found:
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "prometheus"]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True, capture_output=True)
        subprocess.run(install, env=env, check=True, capture_output=True)
    # The package enables a system service; this test runs its own instance on a free port.
    return shutil.which("prometheus") or "/usr/bin/prometheus"


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory, server, dedicated):
    binary = ensure_prometheus()
    folder = tmp_path_factory.mktemp("prometheus")
    targets = [url.removeprefix("http://") for url in (server.url, dedicated.url)]
    (folder / "prometheus.yml").write_text(json.dumps({
        "global": {"scrape_interval": f"{SCRAPE_SECONDS}s", "evaluation_interval": f"{SCRAPE_SECONDS}s"},
        "scrape_configs": [{"job_name": "adapterserve", "static_configs": [{"targets": targets}]}],
    }))
    port = free_port()
    log = open(folder / "prometheus.log", "wb")
    process = subprocess.Popen(
        [binary, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{url}/-/ready", timeout=2).status_code == 200, 60, "prometheus ready")
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the group this test started, nothing else
        process.wait(timeout=30)
        log.close()


def wait_for(check, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def query(prometheus: str, expr: str) -> dict:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=30)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
    return body["data"]


def numbers(data: dict) -> list[float]:
    return [float(item["value"][1]) for item in data["result"] if not math.isnan(float(item["value"][1]))]


# The dashboard's variables as Grafana fills them in with their default (All) value.
VARIABLES = {"$replica": ".*"}


def dashboard_queries() -> list[tuple[str, str]]:
    queries = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                expr = target["expr"]
                for variable, value in VARIABLES.items():
                    expr = expr.replace(variable, value)
                queries.append((inner["title"], expr))
    return queries


def traffic(server_url: str, dedicated_url: str) -> None:
    """Requests of every kind while Prometheus scrapes: streamed and not, chat and
    classification, adapters and base; in dedicated mode, three models for two engine
    slots, so at least one swap happens."""
    with httpx.Client(timeout=600) as http:
        for model in ("pirate", "french", "json"):
            for stream in (True, False):
                body = {"model": model, "stream": stream, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]}
                response = http.post(f"{server_url}/v1/chat/completions", json=body)
                assert response.status_code == 200, response.text
        assert http.post(f"{server_url}/v1/classify", json={"model": "sentiment", "input": ["Great."]}).status_code == 200
        for model in ("pirate", "french", "json"):
            body = {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}
            assert http.post(f"{dedicated_url}/v1/chat/completions", json=body).status_code == 200


def test_every_dashboard_query_returns_data(prometheus, server, dedicated):
    wait_for(lambda: numbers(query(prometheus, "count(up == 1)")) == [2.0], 60, "both servers scraped")
    traffic(server.url, dedicated.url)
    time.sleep(5 * SCRAPE_SECONDS)  # a few scrapes after the traffic, for rate()
    queries = dashboard_queries()
    assert len(queries) >= 15
    empty = []
    for title, expr in queries:
        if not numbers(query(prometheus, expr)):
            empty.append(f"{title}: {expr}")
    assert not empty, "panels without data:\n" + "\n".join(empty)


def test_the_engines_memory_agrees_with_the_files(server, base_path, demo_dir):
    """Measured from the live tensors: base weights are the safetensors' (x2 in float32),
    each adapter in the CPU cache is its file's tensors, the slots match the estimate."""
    from adapterserve.metrics.collector import slot_estimate
    from tests.reference import served_dtype

    body = httpx.get(f"{server.url}/metrics", timeout=30).text
    memory = {}
    for family in text_string_to_metric_families(body):
        if family.name == "adapterserve_engine_memory_bytes":
            memory = {(s.labels["engine"], s.labels["component"]): s.value for s in family.samples}
    with safe_open(str(base_path / "model.safetensors"), "pt") as handle:
        base_elements = sum(math.prod(handle.get_slice(k).get_shape()) for k in handle.keys())
    element = 4 if served_dtype() == "float32" else 2  # as the settings serve (ADAPTERSERVE_DTYPE too)
    weights = memory[("generate", "base_weights")]
    # vLLM adds small buffers (rotary caches): within 1%.
    assert abs(weights - base_elements * element) / (base_elements * element) < 0.01, (weights, base_elements * element)
    assert memory[("generate", "adapter_slots")] > 0 and memory[("generate", "adapter_cpu_cache")] > 0
    # the session server's settings (conftest): max_loras and max_lora_rank
    from tests.integration.conftest import MAX_LORA_RANK, MAX_LORAS

    estimate = slot_estimate(base_path, MAX_LORAS, MAX_LORA_RANK, element)
    assert abs(memory[("generate", "adapter_slots")] - estimate) / estimate < 0.01
