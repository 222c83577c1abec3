"""With the real engine: greedy output with the grouped CPU LoRA ops equals greedy output
with vLLM's reference ops, for each demo adapter, and base requests batched with adapters
keep the base's output (the reference applies the last slot's adapter to them)."""

from __future__ import annotations

import asyncio
import shutil

import openai
import pytest

from server.process import ServerProcess
from tests.integration.conftest import DEMO

pytestmark = pytest.mark.integration

QUESTIONS = ["What is the capital of Italy?", "Name three colors."]


@pytest.fixture(scope="module")
def reference_ops_server(tmp_path_factory, demo_dir):
    store = tmp_path_factory.mktemp("lora-only")
    for name in DEMO:
        shutil.copytree(demo_dir / name, store / name)
    process = ServerProcess(
        ["--no-demo-adapters", "--adapter-dirs", str(store), "--no-grouped-lora-ops"],
        tmp_path_factory.mktemp("logs") / "server.log",
    ).start()
    yield process
    process.stop()


def greedy(client, model, question):
    response = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=16,
        extra_body={"return_token_ids": True},
    )
    return response.choices[0].token_ids


@pytest.mark.parametrize("name", DEMO)
def test_grouped_ops_give_the_reference_ops_greedy_output(client, reference_ops_server, name):
    reference_client = openai.OpenAI(base_url=f"{reference_ops_server.url}/v1", api_key="x", max_retries=0, timeout=300)
    for question in QUESTIONS:
        assert greedy(client, name, question) == greedy(reference_client, name, question), (name, question)


def test_base_requests_batched_with_adapters_keep_the_base_output(client, async_client, base_name):
    """All 4 slots busy with adapters and base requests in the same batches."""
    alone = greedy(client, base_name, QUESTIONS[0])

    async def burst():
        http = async_client()

        async def one(model):
            response = await http.chat.completions.create(
                model=model, messages=[{"role": "user", "content": QUESTIONS[0]}], temperature=0, max_tokens=16,
                extra_body={"return_token_ids": True},
            )
            return model, response.choices[0].token_ids

        models = [*DEMO, "random-1", base_name] * 3
        async with http:
            return await asyncio.gather(*(one(m) for m in models))

    for model, tokens in asyncio.run(burst()):
        if model == base_name:
            assert tokens[:8] == alone[:8]


def test_the_engine_applies_lora_layers_fused(client, server):
    """The greedy tests above ran on the fused path, not on vLLM's wrapper."""
    log = server.log_path.read_text()
    assert "fused CPU LoRA layers: active" in log
    assert "NOT laid out" not in log
