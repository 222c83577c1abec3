"""LoRA adapters hot-swapped per request over the one base, against the real engine."""

from __future__ import annotations

import asyncio
import shutil

import httpx
import openai
import pytest

from tests.integration.conftest import ADMIN_KEY, DEMO, RANDOM_ADAPTERS
from tests.reference import assert_matches, greedy, load_reference, served_greedy

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "What is the capital of Italy?"}]
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


def greedy_text(client, model, messages=QUESTION, max_tokens=16):
    response = client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=max_tokens, extra_body={"return_token_ids": True}
    )
    return response.choices[0].message.content, response.choices[0].token_ids


def test_each_demo_adapter_changes_the_output_visibly(client, base_name):
    base_text, _ = greedy_text(client, base_name, max_tokens=24)
    texts = {name: greedy_text(client, name, max_tokens=24)[0] for name in DEMO}
    assert len({base_text, *texts.values()}) == 4, texts
    assert texts["pirate"].startswith("Arr"), texts["pirate"]
    assert texts["json"].lstrip().startswith("{"), texts["json"]
    assert any(word in texts["french"] for word in ("La ", "capitale", "est")), texts["french"]


def test_base_prefix_form_selects_the_same_adapter(client, base_name):
    assert greedy_text(client, f"{base_name}:pirate")[0] == greedy_text(client, "pirate")[0]


@pytest.mark.parametrize("name", DEMO)
def test_adapter_greedy_matches_transformers_peft(client, tokenizer, base_path, demo_dir, name):
    _, server_tokens = greedy_text(client, name)
    prompt_ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)
    prompt_ids = list(prompt_ids["input_ids"] if hasattr(prompt_ids, "keys") else prompt_ids)
    reference = greedy(load_reference(base_path, demo_dir / name), prompt_ids, 16, tokenizer.eos_token_id)
    assert_matches(server_tokens, reference, 16, f"adapter {name}")


def test_models_lists_every_adapter_with_its_fields(client, base_name):
    cards = {card.id: card.model_dump() for card in client.models.list()}
    for name in [*DEMO, *RANDOM_ADAPTERS]:
        card = cards[name]
        assert card["parent"] == base_name and card["kind"] == "lora"
        assert card["rank"] > 0 and card["size_bytes"] > 0


def test_concurrent_requests_over_more_adapters_than_slots(client, async_client):
    names = [*DEMO, *RANDOM_ADAPTERS]  # 8 adapters, 4 engine slots
    alone = {name: served_greedy(client, name, QUESTION, max_tokens=8) for name in names}
    # the adapters' outputs differ from each other: a request served by the wrong adapter
    # (or by none) is caught below, where one token clearly wins
    assert len({tuple(g.tokens[:4]) for g in alone.values()}) == len(names), alone

    async def one(http, name):
        response = await http.chat.completions.create(
            model=name, messages=QUESTION, temperature=0, max_tokens=8, extra_body={"return_token_ids": True}
        )
        return name, response.choices[0].token_ids

    async def burst():
        async with async_client() as http:
            return await asyncio.gather(*(one(http, names[i % len(names)]) for i in range(32)))

    results = asyncio.run(burst())
    assert len(results) == 32
    for name, tokens in results:
        # batched with other adapters, each request still gets its own adapter's output
        # (in bf16 batching may round a near-tie the other way, nothing more)
        assert_matches(tokens, alone[name], 4, f"{name} batched")


def test_unload_then_404_then_load(client, server):
    assert greedy_text(client, "random-0")[0]
    response = httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": "random-0"}, headers=ADMIN)
    assert response.status_code == 200, response.text
    with pytest.raises(openai.NotFoundError):
        greedy_text(client, "random-0")
    response = httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "random-0"}, headers=ADMIN)
    assert response.status_code == 200, response.text
    assert greedy_text(client, "random-0")[0]


def test_admin_needs_the_key(server):
    response = httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": "pirate"})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    response = httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/etc"}, headers=ADMIN)
    assert response.status_code == 403


def test_reload_picks_up_new_weights(client, server, extra_store, demo_dir):
    before, _ = greedy_text(client, "mutable")
    assert before == greedy_text(client, "pirate")[0]
    folder = extra_store / "mutable"
    shutil.copy(demo_dir / "json" / "adapter_model.safetensors", folder / "adapter_model.safetensors")
    shutil.copy(demo_dir / "json" / "adapter_config.json", folder / "adapter_config.json")
    response = httpx.post(f"{server.url}/admin/adapters/mutable/reload", headers=ADMIN)
    assert response.status_code == 200, response.text
    after, _ = greedy_text(client, "mutable")
    assert after == greedy_text(client, "json")[0] != before


def test_broken_adapters_are_refused_and_the_rest_served(client, server, broken_expected):
    _, expected = broken_expected
    refused = httpx.get(f"{server.url}/admin/adapters", headers=ADMIN).json()["refused"]
    reasons = {item["name"]: item["reason"] for item in refused}
    for name, fragment in expected.items():
        assert name in reasons, f"{name} was not refused"
        assert fragment in reasons[name], (name, reasons[name])
    served = {card.id for card in client.models.list()}
    assert not served & set(expected)
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert greedy_text(client, "pirate")[0].startswith("Arr")
