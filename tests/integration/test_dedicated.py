"""Dedicated mode against real engines: parity with the shared mode, LRU swaps with fewer
resident engines than models (a resident model answers while another swaps in), and a
killed engine that is reported and restarted while the others keep serving."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import ADMIN_KEY, DEMO
from tests.reference import assert_matches, greedy, load_reference, near_tie, served_dtype

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "What is the capital of Italy?"}]
REVIEWS = ["A warm, clever story that stayed with me for weeks.", "Dull from the first page to the last."]
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
# The merged model's weights are W + BA rounded to bf16 once; the shared mode adds BA at
# run time. Computing in bf16 adds its own rounding on both sides (measured on an
# AVX512-bf16 Xeon: 0.0178 apart), in float32 they agree within 1e-2.
PROBABILITY_TOLERANCE = {"float32": 1e-2, "bfloat16": 3e-2}


@pytest.fixture(scope="module")
def dedicated_client(dedicated):
    return openai.OpenAI(base_url=f"{dedicated.url}/v1", api_key="unused", max_retries=0, timeout=300)


def tokens(client, model):
    response = client.chat.completions.create(
        model=model, messages=QUESTION, temperature=0, max_tokens=16, extra_body={"return_token_ids": True}
    )
    return response.choices[0].token_ids


def test_same_names_and_endpoints(dedicated_client):
    cards = {card.id: card.model_dump() for card in dedicated_client.models.list()}
    assert set(cards) == {"french", "json", "pirate", "sentiment", "topic"}
    assert cards["sentiment"]["kind"] == "head" and cards["pirate"]["kind"] == "full"
    with pytest.raises(openai.NotFoundError):
        dedicated_client.chat.completions.create(model="nope", messages=QUESTION)


@pytest.mark.parametrize("name", DEMO)
def test_greedy_parity_with_the_shared_mode(dedicated_client, client, tokenizer, base_path, demo_dir, name):
    prompt_ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)
    prompt_ids = list(prompt_ids["input_ids"] if hasattr(prompt_ids, "keys") else prompt_ids)
    reference = greedy(load_reference(base_path, demo_dir / name), prompt_ids, 16, tokenizer.eos_token_id)
    shared, full = tokens(client, name), tokens(dedicated_client, name)
    assert_matches(shared, reference, 16, f"shared {name}")
    assert_matches(full, reference, 16, f"dedicated {name}")
    if shared != full:  # allowed only where the reference itself is a near-tie
        first = next(i for i, (a, b) in enumerate(zip(shared, full)) if a != b)
        assert reference.gaps[first] < near_tie(), (name, first, reference.gaps[first])


def test_head_probabilities_agree_with_the_shared_mode(dedicated, server):
    def probs(url):
        response = httpx.post(f"{url}/v1/classify", json={"model": "sentiment", "input": REVIEWS}, timeout=300)
        assert response.status_code == 200, response.text
        return [item["probs"] for item in response.json()["data"]]

    tolerance = PROBABILITY_TOLERANCE[served_dtype()]
    for full, shared in zip(probs(dedicated.url), probs(server.url)):
        assert max(abs(a - b) for a, b in zip(full, shared)) < tolerance, (full, shared)
        assert full.index(max(full)) == shared.index(max(shared))  # the same label


def swaps_so_far(url: str) -> float:
    """Engines started for a model so far (the swap histogram's counts; none before the first)."""
    return sum(sample.value for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
               for sample in family.samples if sample.name == "adapterserve_model_swap_seconds_count")


def test_cycling_through_more_models_than_resident_engines(dedicated, dedicated_client):
    # resident before: pirate (the parity tests' last) and the sentiment head; the next test
    # swaps pirate back in after this one evicts it
    before = swaps_so_far(dedicated.url)
    for name in ["pirate", "french", "json"]:
        assert tokens(dedicated_client, name)
        engines = httpx.get(f"{dedicated.url}/admin/engines", headers=ADMIN).json()["engines"]
        assert len(engines) <= 2 and name in {e["name"] for e in engines}
    assert swaps_so_far(dedicated.url) - before >= 2  # french and json swapped in, each evicting one
    assert "adapterserve_model_swap_seconds_sum" in httpx.get(f"{dedicated.url}/metrics").text


def test_a_resident_model_answers_while_another_swaps_in(dedicated, dedicated_client):
    tokens(dedicated_client, "json")
    tokens(dedicated_client, "french")  # resident now: json, then french (the most recent)
    swapped_in = {}
    swap = threading.Thread(target=lambda: swapped_in.setdefault("pirate", tokens(dedicated_client, "pirate")))
    swap.start()  # evicts json, then starts pirate's engine (~30 s)
    quick = dedicated_client.with_options(timeout=20)
    answered_meanwhile = 0
    while swap.is_alive():
        assert tokens(quick, "french")
        answered_meanwhile += 1
    swap.join()
    assert swapped_in.get("pirate"), "the swapped-in model answered"
    assert answered_meanwhile >= 3, "french answered at once while pirate's engine started"


def test_a_killed_engine_is_reported_restarted_and_others_keep_serving(dedicated, dedicated_client):
    engines = {e["name"]: e for e in httpx.get(f"{dedicated.url}/admin/engines", headers=ADMIN).json()["engines"]}
    assert len(engines) == 2
    victim, survivor = sorted(engines)
    os.kill(engines[victim]["pids"][0], signal.SIGKILL)  # the victim's engine core process

    deadline, health = time.monotonic() + 60, None
    while time.monotonic() < deadline:
        try:
            health = httpx.get(f"{dedicated.url}/health", timeout=30)
        except httpx.TimeoutException:
            continue
        if health.status_code == 503:
            break
        time.sleep(0.5)
    assert health.status_code == 503 and health.json()["engines"][victim] != "ok", health.text
    assert tokens(dedicated_client, survivor)  # the other model answers meanwhile

    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # throughout the restart, the server answers at once
        if httpx.get(f"{dedicated.url}/health", timeout=10).status_code == 200:
            break
        assert tokens(dedicated_client.with_options(timeout=20), survivor)
        time.sleep(2)
    assert httpx.get(f"{dedicated.url}/health").json()["engines"][victim] == "ok"
    assert tokens(dedicated_client, victim)
