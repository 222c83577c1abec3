"""A fake engine with the real Engine's interface, for unit tests without vLLM processes.

Its serving objects answer with vLLM's own protocol objects; the text they produce names
the adapter the request was routed to, so routing is visible in the output.
"""

from __future__ import annotations

import json

from adapterserve.hosting.engine import EngineSpec


class FakeModels:
    """vLLM's serving models as the hosts use them: the table and its per-name locks."""

    def __init__(self):
        import asyncio
        from collections import defaultdict

        self.lora_requests = {}
        self.lora_resolver_lock = defaultdict(asyncio.Lock)


class FakeEngineCore:
    """Answers the worker-report utility in its real format: every loaded adapter in the
    CPU cache at its tensor bytes, the first `slots` of them in slots."""

    def __init__(self, client, slots=2, answers_reports=True):
        self.client = client
        self.slots = slots
        self.answers_reports = answers_reports

    async def call_utility_async(self, method, *args):
        from safetensors import safe_open

        if method == "adapterserve_pin_lora":
            return [await self.client.pin_lora(*args)]
        assert method == "adapterserve_engine_report"
        if not self.answers_reports:
            raise RuntimeError("this fake engine has no memory report")
        cache = {}
        for lora_id, request in self.client.loaded.items():
            with safe_open(f"{request.lora_path}/adapter_model.safetensors", "pt") as handle:
                cache[lora_id] = sum(handle.get_tensor(k).nbytes for k in handle.keys())
        ids = list(cache)[: self.slots]
        return {
            "kv_cache_usage": 0.25,
            "workers": [{
                "pid": 0, "weights_bytes": 1000, "lora_slot_bytes": 300, "kv_cache_bytes": 4000,
                "cpu_cache": cache, "slots": ids + [None] * (self.slots - len(ids)),
            }],
        }


class FakeClient:
    def __init__(self, fail_names=(), reports=False):
        self.loaded = {}
        self.fail_names = set(fail_names)
        self.errored = False
        self.engine_core = FakeEngineCore(self) if reports else FakeEngineCore(self, answers_reports=False)

    async def add_lora(self, request):
        if request.lora_name in self.fail_names:
            raise RuntimeError(f"cannot load {request.lora_name}")
        self.loaded[request.lora_int_id] = request
        return True

    async def remove_lora(self, lora_id):
        return self.loaded.pop(lora_id, None) is not None

    async def pin_lora(self, lora_id):
        self.pinned = getattr(self, "pinned", set()) | {lora_id}
        return True


class FakeChat:
    def __init__(self, engine):
        self.engine = engine
        self.requests = []  # what the API handed over, as vLLM's handler would get it

    async def create_chat_completion(self, request, raw_request):
        self.requests.append(request)
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
        self.requests.append(request)
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
    """Implements the Engine protocol (hosting/protocol.py) without processes."""

    started_count = 0  # across instances: how many engine starts a test caused

    def __init__(self, spec: EngineSpec):
        self.spec = spec
        self.client = None
        self._models = FakeModels()
        self._chat = FakeChat(self)
        self.started = False
        self.startup_seconds = 0.0
        self.on_started = None  # the fake client has no generate() for the metrics to wrap
        self.on_nonfinite = lambda adapter, request_id: None

    @property
    def name(self):
        return self.spec.name

    async def start(self):
        self.client = FakeClient(fail_names={"engine-refuses"})
        self.started = True
        FakeEngine.started_count += 1

    def stop(self, wait_s=30.0):
        self.client = None

    async def stop_async(self, wait_s=30.0):
        self.stop()

    @property
    def running(self):
        return self.client is not None and not self.client.errored

    async def check_health(self):
        if self.client is None:
            return "not started"
        return "engine dead: killed" if self.client.errored else None

    def process_ids(self):
        return []

    def unfinished_requests(self):
        return 0

    def serving(self, kind):
        return {"models": self._models, "chat": self._chat, "completion": self._chat}.get(kind)


class ReportingFakeEngine(FakeEngine):
    """A fake engine that also answers the memory report (see FakeEngineCore)."""

    async def start(self):
        await super().start()
        self.client = FakeClient(fail_names={"engine-refuses"}, reports=True)

    def process_ids(self):
        import os

        return [os.getpid()]  # the test process stands in for the engine's processes
