"""The Responses API and tool calling through the official openai client, with adapters,
on the session's server: the adapter changes the answer, the Responses API gives what chat
gives, errors and metrics are chat's. (Tenancy for both: test_tenants.py.)"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

pytestmark = pytest.mark.integration

# a question whose greedy answer holds in every dtype and mode (test_openai_api.py says why)
QUESTION = "Name the capital of France."
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "strict": True,  # the arguments follow the schema (vLLM pins them by structured output)
    "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": False,
    },
}
WEATHER_QUESTION = [{"role": "user", "content": "What's the weather in Paris?"}]


def respond(client, model, **extra):
    return client.responses.create(model=model, input=QUESTION, temperature=0, max_output_tokens=24, **extra)


def test_the_responses_api_answers_with_the_adapter(client, base_name):
    base, pirate = respond(client, base_name), respond(client, "pirate")
    assert "Paris" in base.output_text
    assert pirate.output_text != base.output_text
    assert "Arr" in pirate.output_text  # the demo pirate adapter's voice
    assert pirate.model == "pirate" and pirate.status == "completed"
    assert pirate.usage.output_tokens > 0 and pirate.usage.input_tokens > 0


def test_the_responses_api_gives_what_chat_gives(client):
    chat = client.chat.completions.create(
        model="french", messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=24,
    )
    assert respond(client, "french").output_text == chat.choices[0].message.content


def test_a_streamed_response_assembles_to_the_whole_one(client):
    whole = respond(client, "pirate").output_text
    events = list(respond(client, "pirate", stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole


def test_responses_errors_are_chats(client, base_name):
    with pytest.raises(openai.NotFoundError) as unknown:
        respond(client, "no-such-adapter")
    assert unknown.value.response.json()["error"]["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as head:
        respond(client, "sentiment")  # a classification head
    assert "/v1/classify" in head.value.response.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as too_many:
        client.responses.create(model=base_name, input=QUESTION, max_output_tokens=10**6)
    assert too_many.value.response.json()["error"]["param"] == "max_output_tokens"


def call_the_tool(client, model, tool_choice):
    reply = client.chat.completions.create(
        model=model, messages=WEATHER_QUESTION, tools=[{"type": "function", "function": WEATHER}],
        tool_choice=tool_choice, temperature=0, max_tokens=64,
    )
    (call,) = reply.choices[0].message.tool_calls
    assert reply.model == model and call.type == "function" and call.function.name == "get_weather"
    return json.loads(call.function.arguments)


def test_a_named_tool_choice_is_answered_with_a_tool_call_per_adapter(client, base_name):
    named = {"type": "function", "function": {"name": "get_weather"}}
    base = call_the_tool(client, base_name, named)
    pirate = call_the_tool(client, "pirate", named)
    assert base == {"city": "Paris"}
    # the adapter fills the same schema; not necessarily otherwise than the base: the question
    # pins "Paris" (on an AMX Xeon the pirate's greedy call is the base's). That the adapter
    # changes what is generated: test_the_responses_api_answers_with_the_adapter.
    assert set(pirate) == {"city"}
    assert set(call_the_tool(client, "french", "required")) == {"city"}


def test_a_function_call_through_the_responses_api(client):
    tool = {"type": "function", **WEATHER}
    response = client.responses.create(
        model="pirate", input=WEATHER_QUESTION[0]["content"], tools=[tool],
        tool_choice={"type": "function", "name": "get_weather"}, temperature=0, max_output_tokens=64,
    )
    (call,) = [item for item in response.output if item.type == "function_call"]
    assert call.name == "get_weather" and set(json.loads(call.arguments)) == {"city"}


def test_responses_are_counted_per_model_and_endpoint(server, client):
    respond(client, "json")
    metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    assert 'adapterserve_requests_total{endpoint="responses",model="json",status="200"}' in metrics
