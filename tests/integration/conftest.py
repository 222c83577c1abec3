"""One real server (real vLLM engine) for the whole integration session, with the demo
adapters, extra random LoRA adapters, and a store of broken adapters."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from adapterserve.config import load_settings
from adapterserve.base_model import resolve_base_model
from adapterserve.registry.records import BaseModelInfo
from adapterserve.training.demo import demo_store
from tests.adapter_factory import build_broken_corpus, write_lora
from adapterserve.server_process import ServerProcess

ADMIN_KEY = "integration-admin"
MAX_LORAS = 4
MAX_LORA_RANK = 16
DEMO = ["french", "json", "pirate"]  # LoRA demos
HEADS = ["sentiment", "topic"]
RANDOM_ADAPTERS = [f"random-{i}" for i in range(5)]  # with the demos: 8 > MAX_LORAS
S3_BUCKET = "adapters"


def pytest_configure(config):
    """Engines run eager in this session unless a server asks for compiled execution (the
    session server does: it is the default). Compiling takes ~1-2 min per engine
    configuration at its first start on 2 CPUs, and the tests start over a dozen
    configurations; every server started here inherits this environment."""
    os.environ.setdefault("ADAPTERSERVE_ENFORCE_EAGER", "true")


@pytest.fixture(scope="session")
def base_path() -> Path:
    return resolve_base_model(None, load_settings().models_dir)


@pytest.fixture(scope="session")
def base_info(base_path) -> BaseModelInfo:
    return BaseModelInfo.read(base_path.name, base_path)


@pytest.fixture(scope="session")
def demo_dir(base_path) -> Path:
    store = demo_store(load_settings().cache_dir, base_path)
    missing = [name for name in DEMO + HEADS if not (store / name).is_dir()]
    if missing:
        pytest.fail(f"demo adapters not built: {missing}; run `make adapters`")
    return store


@pytest.fixture(scope="session")
def extra_store(tmp_path_factory, base_info, demo_dir) -> Path:
    store = tmp_path_factory.mktemp("store")
    for i, name in enumerate(RANDOM_ADAPTERS):
        # large random weights: each one's greedy text differs from the base from the start
        write_lora(store / name, base_info, rank=8, targets=("q_proj", "v_proj", "down_proj"), seed=100 + i, config_overrides={"lora_alpha": 64})
    shutil.copytree(demo_dir / "pirate", store / "mutable")  # reloaded with other weights by a test
    return store


@pytest.fixture(scope="session")
def broken_expected(tmp_path_factory, base_info) -> tuple[Path, dict[str, str]]:
    store = tmp_path_factory.mktemp("broken")
    outside = tmp_path_factory.mktemp("outside")
    return store, build_broken_corpus(store, base_info, outside, MAX_LORA_RANK)


@pytest.fixture(scope="session")
def server(tmp_path_factory, extra_store, broken_expected):
    broken_store, _ = broken_expected
    logs = tmp_path_factory.mktemp("logs")
    process = ServerProcess(
        [
            "--adapter-dirs", str(extra_store),
            "--adapter-dirs", str(broken_store),
            "--max-loras", str(MAX_LORAS),
            "--max-lora-rank", str(MAX_LORA_RANK),
            "--max-cpu-loras", "6",
            "--base-mismatch", "refuse",
            "--admin-api-key", ADMIN_KEY,
            "--metrics-refresh-s", "5",  # fresh memory readings for the Prometheus test
            "--header-timeout-s", "10",  # the slow-header test waits this long; above the keep-alive's 5
            "--no-enforce-eager",  # compiled, as the default serves (the other servers run eager)
        ],
        logs / "server.log",
    ).start()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def dedicated(tmp_path_factory, demo_dir):
    """Dedicated mode over the demo tasks merged into full models (5 models), at most 2
    engines up at once. Session-wide: test_dedicated, the dedicated fine-tuning test
    (which adds a sixth model) and the Prometheus test share it; its fine-tuning folder
    (files, jobs, fully fine-tuned models) is this session's own."""
    logs = tmp_path_factory.mktemp("dedicated")
    process = ServerProcess(
        ["--mode", "dedicated", "--max-resident-models", "2", "--admin-api-key", ADMIN_KEY, "--metrics-refresh-s", "5",
         "--fine-tuning-dir", str(tmp_path_factory.mktemp("dedicated-fine-tuning"))],
        logs / "server.log",
    ).start(timeout=900)
    yield process
    process.stop()


@pytest.fixture(scope="session")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="session")
def async_client(server):
    """A factory: an AsyncOpenAI client is bound to the event loop it first runs in, and
    each test runs its own loop (asyncio.run)."""
    import openai

    return lambda: openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="session")
def base_name(base_path) -> str:
    return base_path.name


@pytest.fixture(scope="session")
def tokenizer(base_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_path)


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3-compatible server (moto) for the session, with the bucket `adapters`."""
    from tests.s3_server import serving

    yield from serving(tmp_path_factory.mktemp("moto"), S3_BUCKET)
