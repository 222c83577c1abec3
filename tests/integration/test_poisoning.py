"""Poisoning: adapters that pass validation but are built to hurt (huge values, products
that overflow the served dtype, deltas on a few layers only) are served beside the demo
adapters, with the fused CPU LoRA path on and off. Requests to them run batched with
requests to the base and the demo adapters; afterwards the base and every other adapter
give token for token the same greedy output as before, and the engine is healthy. A
poison request that drives its logits to NaN ends with an error and quarantines its
adapter; it never answers an empty 200."""

from __future__ import annotations

import asyncio
import shutil

import httpx
import openai
import pytest
import torch

from adapterserve.server_process import ServerProcess
from tests.adapter_factory import lora_tensors, write_lora
from tests.integration.conftest import DEMO
from tests.reference import assert_matches, greedy_of, greedy_request

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "What is the capital of Italy?"}]
POISON = ["huge-values", "overflowing-products", "few-layers", "huge-few-layers"]


def scaled(base_info, targets, value, seed, layers=None, b_value=None):
    """Random-sign tensors of magnitude `value` (B: `b_value`, default the same)."""
    tensors = lora_tensors(base_info, 8, targets, seed=seed)
    for key in list(tensors):
        if layers is not None and not any(f".layers.{i}." in key for i in layers):
            del tensors[key]
            continue
        magnitude = b_value if b_value is not None and ".lora_B." in key else value
        tensors[key] = torch.sign(tensors[key]) * magnitude
    return tensors


@pytest.fixture(scope="module")
def poison_store(tmp_path_factory, demo_dir, base_info):
    store = tmp_path_factory.mktemp("poison-store")
    for name in DEMO:
        shutil.copytree(demo_dir / name, store / name)
    everything = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    # finite in every float dtype, but x @ A @ B overflows within the first layer
    write_lora(store / "huge-values", base_info, targets=everything, tensors=scaled(base_info, everything, 1e18, 1))
    # A near the float32/bf16 maximum (B small, so that B times the scaling stays finite):
    # every shrink through it is inf
    write_lora(store / "overflowing-products", base_info, targets=("q_proj", "v_proj"),
               tensors=scaled(base_info, ["q_proj", "v_proj"], 3e38, 2, b_value=1.0))
    # a delta on two layers only: the other layers' slots stay empty
    write_lora(store / "few-layers", base_info, targets=("q_proj", "down_proj"),
               tensors=scaled(base_info, ["q_proj", "down_proj"], 0.5, 3, layers=(0, 7)))
    write_lora(store / "huge-few-layers", base_info, targets=("down_proj",),
               tensors=scaled(base_info, ["down_proj"], 1e15, 4, layers=(3,)))
    return store


@pytest.fixture(scope="module")
def poisoned_servers(tmp_path_factory, poison_store):
    """A server over the poisoned store per LoRA path, started side by side."""
    servers = {}
    try:
        for path in ("fused", "reference"):
            flags = ["--no-demo-adapters", "--adapter-dirs", str(poison_store), "--max-lora-rank", "16"]
            if path == "reference":
                flags.append("--no-grouped-lora-ops")
            servers[path] = ServerProcess(flags, tmp_path_factory.mktemp(f"poison-{path}") / "server.log").launch()
        for process in servers.values():
            process.wait_healthy()
        yield servers
    finally:
        for process in servers.values():
            process.stop()


@pytest.fixture(params=["fused", "reference"])
def poisoned_server(request, poisoned_servers):
    return poisoned_servers[request.param]


def test_poison_never_changes_the_others(poisoned_server, base_name):
    client = openai.OpenAI(base_url=f"{poisoned_server.url}/v1", api_key="x", max_retries=0, timeout=300)
    served = {card.id for card in client.models.list()}
    assert set(POISON) <= served, served  # they are loadable: validation let them through
    others = [base_name, *DEMO]
    before = {m: greedy_of(client.chat.completions.create(**greedy_request(m, QUESTION, 12))) for m in others}

    async def burst():
        async with openai.AsyncOpenAI(base_url=f"{poisoned_server.url}/v1", api_key="x", max_retries=0, timeout=300) as http:
            async def one(model):
                try:
                    response = await http.chat.completions.create(**greedy_request(model, QUESTION, 12))
                    return model, 200, response
                except openai.APIStatusError as exc:
                    return model, exc.status_code, exc.response.json()

            return await asyncio.gather(*(one(m) for _ in range(2) for m in [*POISON, *others]))

    outcomes = asyncio.run(burst())
    for model, status, result in outcomes:
        if model in POISON:
            # garbage is allowed, silence is not: an error (NaN caught), or an answer with tokens
            assert status in (200, 400, 500), (model, status, result)
            if status == 200:
                assert result.choices[0].token_ids, (model, "an empty answer with status 200")
            else:
                assert result["error"]["code"] in ("adapter_quarantined", "model_quarantined"), result
        else:
            assert status == 200, (model, status, result)
            assert_matches(result.choices[0].token_ids, before[model], 12, f"{model} batched with poison")

    after = {m: greedy_of(client.chat.completions.create(**greedy_request(m, QUESTION, 12))) for m in others}
    for model in others:
        assert after[model].tokens == before[model].tokens, model
    assert httpx.get(f"{poisoned_server.url}/health", timeout=30).status_code == 200
    log = poisoned_server.log_path.read_text()
    print({m: s for m, s, _ in outcomes if m in POISON}, "quarantined" in log)
