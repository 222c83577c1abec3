"""The shared request workload of the benchmarks: streamed chat requests at a fixed
concurrency through the official openai client, measuring output tokens per second and
time to first token (TTFT)."""

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
class Result:
    scenario: str
    requests: int
    concurrency: int
    output_tokens: int
    seconds: float
    tokens_per_second: float
    ttft_p50_ms: float
    ttft_p99_ms: float

    def row(self) -> dict:
        return asdict(self)


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
