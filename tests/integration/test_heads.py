"""Head adapters over the frozen base, served per request by the pooling engine."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

pytestmark = pytest.mark.integration

POSITIVE = [
    "A triumph. The prose sings and the plot never lets go.",
    "Funny, tender and wise; I recommend it to everyone I know.",
    "The best fantasy book I have read in a decade.",
    "Gorgeous writing and unforgettable characters.",
    "I was hooked from the first page and loved the ending.",
    "A warm, clever story that stayed with me for weeks.",
    "Brilliant from cover to cover, a real pleasure to read.",
    "I adored every chapter of this charming little book.",
]
NEGATIVE = [
    "Tedious and confusing; I gave up halfway through.",
    "The plot makes no sense and the dialogue is painful.",
    "Boring, predictable and far too long.",
    "A disappointing mess with flat, lifeless characters.",
    "I want my money back, this book was dreadful.",
    "Clumsy writing and a silly ending ruined it for me.",
    "Dull from the first page to the last, a total waste.",
    "I hated the characters and could not finish it.",
]
TOPIC_QUESTIONS = {
    "science": "What is the boiling point of mercury?",
    "sports": "Who is the best tennis player of all time?",
    "cooking": "How do I make a tomato sauce for pasta?",
    "travel": "What should I pack for a trip to Thailand?",
}


def classify(server, model, inputs):
    response = httpx.post(f"{server.url}/v1/classify", json={"model": model, "input": inputs}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_sentiment_head_on_held_out_reviews(server):
    body = classify(server, "sentiment", POSITIVE + NEGATIVE)
    predicted = [item["label"] for item in body["data"]]
    truth = ["positive"] * len(POSITIVE) + ["negative"] * len(NEGATIVE)
    accuracy = sum(p == t for p, t in zip(predicted, truth)) / len(truth)
    print(f"sentiment held-out accuracy: {accuracy:.2f} on {len(truth)} reviews")
    assert accuracy >= 0.8, list(zip(predicted, truth))
    item = body["data"][0]
    assert item["labels"] == ["negative", "positive"] and item["num_classes"] == 2
    assert abs(sum(item["probs"]) - 1) < 1e-3 and item["label"] == item["labels"][item["label_index"]]
    assert body["usage"]["prompt_tokens"] > 0 and body["model"] == "sentiment"


def test_probabilities_match_transformers_peft(server, base_path, demo_dir):
    from peft import PeftModel

    from adapterserve.training.heads import load_classifier

    texts = [POSITIVE[0], NEGATIVE[0], TOPIC_QUESTIONS["science"]]
    served = classify(server, "sentiment", texts)["data"]
    model, tokenizer = load_classifier(base_path, ["negative", "positive"])
    model = PeftModel.from_pretrained(model, demo_dir / "sentiment").eval()
    for text, item in zip(texts, served):
        with torch.no_grad():
            logits = model(**tokenizer([text], return_tensors="pt")).logits[0]
        reference = torch.softmax(logits.float(), -1).tolist()
        assert max(abs(a - b) for a, b in zip(item["probs"], reference)) < 1e-2, (text, item["probs"], reference)


def test_two_heads_with_different_label_counts_in_one_burst(server):
    questions = list(TOPIC_QUESTIONS.values())

    async def burst():
        async with httpx.AsyncClient(timeout=120) as http:
            calls = []
            for i in range(8):
                model, inputs = ("topic", questions) if i % 2 else ("sentiment", POSITIVE[:2] + NEGATIVE[:2])
                calls.append(http.post(f"{server.url}/v1/classify", json={"model": model, "input": inputs}))
            return await asyncio.gather(*calls)

    responses = asyncio.run(burst())
    for response in responses:
        assert response.status_code == 200, response.text
        body = response.json()
        if body["model"] == "topic":
            assert all(item["labels"] == ["science", "sports", "cooking", "travel"] and len(item["probs"]) == 4 for item in body["data"])
            predicted = [item["label"] for item in body["data"]]
            print("topic predictions:", dict(zip(TOPIC_QUESTIONS, predicted)))
            assert sum(p == t for p, t in zip(predicted, TOPIC_QUESTIONS)) >= 2  # chance is 1 of 4
        else:
            assert all(len(item["probs"]) == 2 for item in body["data"])


def test_heads_are_listed_with_their_labels(client):
    cards = {card.id: card.model_dump() for card in client.models.list()}
    assert cards["sentiment"]["kind"] == "head" and cards["sentiment"]["labels"] == ["negative", "positive"]
    assert cards["topic"]["labels"] == ["science", "sports", "cooking", "travel"]


@pytest.mark.parametrize(
    "path, body, fragment",
    [
        ("/v1/chat/completions", {"model": "sentiment", "messages": [{"role": "user", "content": "hi"}]}, "/v1/classify"),
        ("/v1/completions", {"model": "topic", "prompt": "hi"}, "/v1/classify"),
        ("/v1/classify", {"model": "pirate", "input": "hi"}, "/v1/chat/completions"),
        ("/v1/classify", {"model": "sentiment", "input": []}, "empty"),
    ],
)
def test_wrong_endpoint_and_empty_input_are_400(server, path, body, fragment):
    response = httpx.post(f"{server.url}{path}", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert fragment in error["message"]
    assert error["param"] in ("model", "input")


def test_health_lists_both_engines(server):
    assert httpx.get(f"{server.url}/health").json()["engines"] == {"generate": "ok", "classify": "ok"}
