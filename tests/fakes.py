"""A fake engine with the real Engine's interface, for unit tests without vLLM processes.

Its serving objects answer with vLLM's own protocol objects; the text they produce names
the adapter the request was routed to, so routing is visible in the output.
"""

from __future__ import annotations

import json

from server.hosting.engine import EngineSpec


class FakeModels:
    def __init__(self):
        self.lora_requests = {}


class FakeClient:
    def __init__(self, fail_names=()):
        self.loaded = {}
        self.fail_names = set(fail_names)
        self.errored = False

    async def add_lora(self, request):
        if request.lora_name in self.fail_names:
            raise RuntimeError(f"cannot load {request.lora_name}")
        self.loaded[request.lora_int_id] = request
        return True


class FakeChat:
    def __init__(self, engine):
        self.engine = engine

    async def create_chat_completion(self, request, raw_request):
        from vllm.entrypoints.openai.chat_completion.protocol import (
            ChatCompletionResponse,
            ChatCompletionResponseChoice,
            ChatMessage,
        )
        from vllm.entrypoints.serve.engine.protocol import UsageInfo

        text = f"answer from {request.model}"
        if request.stream:
            return self._stream(request.model, text)
        return ChatCompletionResponse(
            model=request.model,
            choices=[ChatCompletionResponseChoice(index=0, message=ChatMessage(role="assistant", content=text))],
            usage=UsageInfo(prompt_tokens=3, completion_tokens=3, total_tokens=6),
        )

    async def create_completion(self, request, raw_request):
        from vllm.entrypoints.openai.completion.protocol import CompletionResponse, CompletionResponseChoice
        from vllm.entrypoints.serve.engine.protocol import UsageInfo

        return CompletionResponse(
            model=request.model,
            choices=[CompletionResponseChoice(index=0, text=f"completion from {request.model}", finish_reason="length")],
            usage=UsageInfo(prompt_tokens=2, completion_tokens=3, total_tokens=5),
        )

    async def _stream(self, model, text):
        for word in text.split(" "):
            yield "data: " + json.dumps({"model": model, "choices": [{"index": 0, "delta": {"content": word}}]}) + "\n\n"
        yield 'data: {"error": {"message": "boom", "type": "BadRequestError", "param": null, "code": 400}}\n\n'
        yield "data: [DONE]\n\n"


class FakeEngine:
    """Honours the Engine interface the hosts and the API use."""

    started_count = 0  # across instances: how many engine starts a test caused

    def __init__(self, spec: EngineSpec):
        self.spec = spec
        self.client = None
        self._models = FakeModels()
        self._chat = FakeChat(self)
        self.started = False
        self.startup_seconds = 0.0

    @property
    def name(self):
        return self.spec.name

    async def start(self):
        self.client = FakeClient(fail_names={"engine-refuses"})
        self.started = True
        FakeEngine.started_count += 1

    def stop(self):
        self.client = None

    @property
    def running(self):
        return self.client is not None and not self.client.errored

    async def check_health(self):
        if self.client is None:
            return "not started"
        return "engine dead: killed" if self.client.errored else None

    def process_ids(self):
        return []

    def serving(self, kind):
        return {"models": self._models, "chat": self._chat, "completion": self._chat}.get(kind)
