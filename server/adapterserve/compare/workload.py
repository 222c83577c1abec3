"""The request workloads of `compare` and the benchmarks: streamed chat requests at a
fixed concurrency through the official openai client (output tokens per second, time to
first token), and classification requests (requests per second, latency)."""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import asdict, dataclass

PROMPTS = [
    "What is the capital of Italy?",
    "Name three colors.",
    "Why is the sky blue?",
    "Write a haiku about autumn.",
    "What do bees make?",
    "Describe a cat in one sentence.",
    "How many legs does a spider have?",
    "Give me a tip for learning to cook.",
]


@dataclass
class Run:
    """What every workload run reports."""

    scenario: str
    requests: int
    concurrency: int
    seconds: float

    def row(self) -> dict:
        return asdict(self)


@dataclass
class Result(Run):
    output_tokens: int
    tokens_per_second: float
    ttft_p50_ms: float
    ttft_p99_ms: float


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(share * (len(ordered) - 1))))]


async def run_workload(base_url: str, models: list[str], requests: int, concurrency: int, max_tokens: int, scenario: str) -> Result:
    """`requests` streamed chats spread round-robin over `models`, `concurrency` at a time."""
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)
    ttfts: list[float] = []
    tokens = 0

    async def one(i: int) -> None:
        nonlocal tokens
        async with gate:
            began = time.perf_counter()
            stream = await client.chat.completions.create(
                model=models[i % len(models)],
                messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},  # every request produces max_tokens tokens
            )
            first = None
            async for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - began
                if chunk.usage:
                    tokens += chunk.usage.completion_tokens
            ttfts.append(first if first is not None else time.perf_counter() - began)

    began = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(requests)))
    seconds = time.perf_counter() - began
    await client.close()
    return Result(
        scenario=scenario,
        requests=requests,
        concurrency=concurrency,
        output_tokens=tokens,
        seconds=round(seconds, 2),
        tokens_per_second=round(tokens / seconds, 1),
        ttft_p50_ms=round(1000 * statistics.median(ttfts), 1),
        ttft_p99_ms=round(1000 * percentile(ttfts, 0.99), 1),
    )


TEXTS = [
    "I loved this book, the characters were wonderful.",
    "Dull, slow and far too long.",
    "How long should I boil an egg?",
    "Which team won the cup last year?",
    "What causes the northern lights?",
    "Is Rome worth visiting in winter?",
]


@dataclass
class ClassifyResult(Run):
    requests_per_second: float
    latency_p50_ms: float
    latency_p99_ms: float


async def run_classify_workload(base_url: str, models: list[str], requests: int, concurrency: int, scenario: str) -> ClassifyResult:
    """`requests` POST /v1/classify (one short text each) spread round-robin over `models`."""
    import httpx

    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as http:

        async def one(i: int) -> None:
            async with gate:
                began = time.perf_counter()
                body = {"model": models[i % len(models)], "input": TEXTS[i % len(TEXTS)]}
                (await http.post("/classify", json=body)).raise_for_status()
                latencies.append(time.perf_counter() - began)

        began = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(requests)))
        seconds = time.perf_counter() - began
    return ClassifyResult(
        scenario=scenario,
        requests=requests,
        concurrency=concurrency,
        seconds=round(seconds, 2),
        requests_per_second=round(requests / seconds, 2),
        latency_p50_ms=round(1000 * statistics.median(latencies), 1),
        latency_p99_ms=round(1000 * percentile(latencies, 0.99), 1),
    )
