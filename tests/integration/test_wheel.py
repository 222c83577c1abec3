"""What ships is what is tested: the wheel built from the tracked files, installed as the
Dockerfile installs it (not editable, into an environment of its own, with the images'
extras; tests/wheel_env.py), serves from `/` with the image's command: a chat with a demo
adapter, a classification with a demo head, /metrics and /health. The Ray Serve app
imports there too."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import openai
import pytest

from adapterserve.config import load_settings
from adapterserve.server_process import ServerProcess
from tests.wheel_env import build_wheel, clean_environment, installed_environment

pytestmark = pytest.mark.integration

KEY = "wheel-test-key"  # deploy/README.md: how the image is given its keys
DEMO_RECIPES = ("pirate", "french", "json", "sentiment", "topic")


@pytest.fixture(scope="module")
def environment(tmp_path_factory) -> Path:
    wheel = build_wheel(tmp_path_factory.mktemp("wheel"))
    return installed_environment(wheel, load_settings().cache_dir / "test-envs")


def run_outside(environment: Path, *command: str) -> subprocess.CompletedProcess:
    """A command of the installed environment, run from `/` (far from the checkout)."""
    return subprocess.run(
        [str(environment / "bin" / command[0]), *command[1:]], cwd="/", env=clean_environment(),
        capture_output=True, text=True, timeout=600,
    )


@pytest.fixture(scope="module")
def image_server(environment, tmp_path_factory):
    # the image's CMD (`adapterserve serve --host 0.0.0.0 --port 8000`), on a free port, with
    # a key as deploy/ says to give one; eager, as every server of this session but one
    # (a first compile of this configuration would add minutes)
    process = ServerProcess(
        ["--host", "0.0.0.0"], tmp_path_factory.mktemp("wheel-server") / "server.log",
        program=(str(environment / "bin" / "adapterserve"), "serve"), cwd=Path("/"),
        base_env=clean_environment(), env={"ADAPTERSERVE_API_KEY": KEY},
    ).start()
    yield process
    process.stop()


def test_the_installed_package_is_the_wheel_not_the_checkout(environment):
    found = run_outside(environment, "python", "-c", (
        "import adapterserve, adapterserve.app, adapterserve.tenants, adapterserve.rayserve.app, adapterserve.rayserve.replica_set; "
        "from adapterserve.config import Settings; print(adapterserve.__file__); print(Settings().demo_recipes_dir)"
    ))
    assert found.returncode == 0, found.stderr[-3000:]
    package, recipes = found.stdout.strip().splitlines()[-2:]
    assert Path(package).is_relative_to(environment) and Path(recipes).is_relative_to(environment)
    listed = run_outside(environment, "adapterserve", "adapters", "list")
    assert listed.returncode == 0, listed.stderr[-3000:]
    for name in DEMO_RECIPES:  # the demo store, built from the recipes the wheel carries
        assert name in listed.stdout, listed.stdout


def test_the_installed_server_answers_chat_classification_metrics_and_health(image_server):
    client = openai.OpenAI(base_url=f"{image_server.url}/v1", api_key=KEY, max_retries=0, timeout=120)
    question = [{"role": "user", "content": "What is the capital of Italy?"}]
    pirate = client.chat.completions.create(model="pirate", messages=question, temperature=0, max_tokens=24)
    assert "Arr" in pirate.choices[0].message.content and "Rome" in pirate.choices[0].message.content

    review = {"model": "sentiment", "input": ["I adored every chapter of this charming little book.", "I want my money back, this book was dreadful."]}
    classified = httpx.post(f"{image_server.url}/v1/classify", json=review, headers={"authorization": f"Bearer {KEY}"}, timeout=120)
    assert classified.status_code == 200, classified.text
    assert [item["label"] for item in classified.json()["data"]] == ["positive", "negative"]

    with_key = {"authorization": f"Bearer {KEY}"}
    assert httpx.get(f"{image_server.url}/health", timeout=30).json() == {"status": "ok", "mode": "shared"}  # a probe
    health = httpx.get(f"{image_server.url}/health", headers=with_key, timeout=30)
    assert health.status_code == 200 and health.json()["engines"] == {"generate": "ok", "classify": "ok"}
    assert httpx.get(f"{image_server.url}/metrics", timeout=30).status_code == 401
    metrics = httpx.get(f"{image_server.url}/metrics", headers=with_key, timeout=30).text
    assert 'adapterserve_requests_total{endpoint="chat",model="pirate",status="200"} 1.0' in metrics
    assert 'adapterserve_requests_total{endpoint="classify",model="sentiment",status="200"} 1.0' in metrics

    with pytest.raises(openai.AuthenticationError):  # the key is required
        openai.OpenAI(base_url=f"{image_server.url}/v1", api_key="wrong", max_retries=0).models.list()
