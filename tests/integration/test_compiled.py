"""Compiled execution with LoRA enabled, the default, with the real engine.

The session server is compiled (tests/integration/conftest.py), so the LoRA tests that use
it (adapters against transformers + peft, mixed batches, containment, faults) run on the
compiled path. Here: that its engines really compile with LoRA enabled, and that a later
start of the same engine configuration loads the compiled forward pass back from vLLM's
cache instead of compiling again, and serves the same tokens from it.
"""

from __future__ import annotations

import shutil

import openai
import pytest

from adapterserve.server_process import ServerProcess
from tests.integration.conftest import DEMO, MAX_LORA_RANK, MAX_LORAS
from tests.reference import served_greedy

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "What is the capital of Italy?"}]
COMPILED_WITH_LORA = "compiled execution kept with LoRA enabled"
LOADED_FROM_CACHE = "Directly load AOT compilation"


def test_the_session_server_compiles_its_engines_with_lora(server):
    log = server.log_path.read_text()
    assert COMPILED_WITH_LORA in log
    assert "'mode': <CompilationMode.DYNAMO_TRACE_ONCE: 2>" in log
    assert "enforce_eager=True" not in log


@pytest.fixture(scope="module")
def restarted(server, tmp_path_factory, demo_dir):
    """A second server whose generate engine has the session server's configuration (the
    same LoRA limits, flags and dtype; only the LoRA demo adapters, so no pooling engine):
    vLLM's compile cache holds its forward pass from the session server's start."""
    store = tmp_path_factory.mktemp("compiled-store")
    for name in DEMO:
        shutil.copytree(demo_dir / name, store / name)
    logs = tmp_path_factory.mktemp("compiled-restart")
    process = ServerProcess(
        ["--no-demo-adapters", "--adapter-dirs", str(store), "--max-loras", str(MAX_LORAS),
         "--max-lora-rank", str(MAX_LORA_RANK), "--max-cpu-loras", "6", "--no-enforce-eager"],
        logs / "server.log",
    ).start()
    yield process
    process.stop()


def test_a_later_start_loads_the_compiled_forward_pass_and_serves_the_same_tokens(restarted, client):
    log = restarted.log_path.read_text()
    assert COMPILED_WITH_LORA in log
    assert LOADED_FROM_CACHE in log, restarted.tail(60)
    assert "Compiling model again due to a load failure" not in log
    again = openai.OpenAI(base_url=f"{restarted.url}/v1", api_key="x", max_retries=0, timeout=300)
    for name in DEMO:  # one request at a time on both: the same batch shapes, the same compiled code
        assert served_greedy(again, name, QUESTION).tokens == served_greedy(client, name, QUESTION).tokens, name
