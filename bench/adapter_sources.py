"""Adapters from sources at scale, on the real server:

- listing: S3Source listing a 10,000-adapter prefix of a local S3 server (moto);
- ready: the server's start with 10,000 adapter folders in a local store (256 validated,
  the rest listed), and how many /v1/models lists;
- cold first request of a never-seen adapter: from S3, from the local store, then again
  after a restart (the fetch cache: no fetch), against a warm request;
- 1,000 distinct adapters under a concurrent workload: errors, and answers that are not
  the adapter's own (each adapter is a copy of a demo adapter, whose greedy answer is known).

    python -m bench.adapter_sources [--listing 10000] [--folders 10000] [--distinct 1000] [--cold 8]

Writes bench/results/adapter_sources-<cpu>.json, with the CPU it ran on.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from adapterserve.server_process import ServerProcess
from tests.s3_server import S3Server, upload_folder

from .common import ADMIN, DEMO, cpu_kind, demo_adapters, machine, write_result

QUESTION = [{"role": "user", "content": "What is the capital of Italy?"}]


def linked_store(demo: Path, root: Path, count: int) -> list[str]:
    """`count` adapter folders, copies of the demo adapters by hard link (no disk used)."""
    names = []
    for i in range(count):
        name, source = f"task-{i:05d}", demo / DEMO[i % len(DEMO)]
        (root / name).mkdir(parents=True)
        for file in source.iterdir():
            os.link(file, root / name / file.name)
        names.append(name)
    return names


def listing_seconds(s3: S3Server, count: int) -> dict:
    client = s3.client()
    client.create_bucket(Bucket="listing")
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: client.put_object(Bucket="listing", Key=f"all/t-{i:05d}/adapter_config.json", Body=b"{}"),
                      range(count)))
    from adapterserve.registry.sources import open_source

    times = []
    for _ in range(3):
        began = time.perf_counter()
        listed = open_source("s3://listing/all").signatures()
        times.append(time.perf_counter() - began)
    assert len(listed) == count
    return {"adapters": count, "seconds_median": round(statistics.median(times), 2), "seconds": [round(t, 2) for t in times]}


def chat(url: str, model: str, max_tokens: int = 8) -> tuple[float, str]:
    began = time.perf_counter()
    answer = httpx.post(f"{url}/v1/chat/completions", json={"model": model, "messages": QUESTION, "temperature": 0,
                                                            "max_tokens": max_tokens}, timeout=600)
    answer.raise_for_status()
    return time.perf_counter() - began, answer.json()["choices"][0]["message"]["content"]


def serve(args: list[str], logs: Path, env: dict, name: str) -> tuple[ServerProcess, float]:
    began = time.perf_counter()
    process = ServerProcess(["--enforce-eager", "--no-demo-adapters", "--admin-api-key", ADMIN,
                             "--adapter-scan-interval-s", "0", *args], logs / f"{name}.log", env=env).start(timeout=900)
    return process, time.perf_counter() - began


async def distinct_workload(url: str, names: list[str], expected: dict[str, str], concurrency: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)
    errors, wrong = [], []

    async def one(i: int, name: str) -> None:
        async with gate:
            try:
                answer = await client.chat.completions.create(model=name, messages=QUESTION, temperature=0, max_tokens=8)
            except Exception as exc:  # counted: the point is that there are none
                errors.append(f"{name}: {type(exc).__name__}")
                return
            if answer.model != name or answer.choices[0].message.content != expected[DEMO[i % len(DEMO)]]:
                wrong.append(name)

    began = time.perf_counter()
    await asyncio.gather(*(one(i, name) for i, name in enumerate(names)))
    await client.close()
    return {"adapters": len(names), "concurrency": concurrency, "seconds": round(time.perf_counter() - began, 1),
            "errors": len(errors), "wrong_model_answers": len(wrong), "error_samples": errors[:5]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listing", type=int, default=10_000)
    parser.add_argument("--folders", type=int, default=10_000)
    parser.add_argument("--distinct", type=int, default=1_000)
    parser.add_argument("--cold", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    _, demo = demo_adapters()
    work = Path(tempfile.mkdtemp(prefix="bench-sources-"))
    s3 = S3Server(work / "moto.log").start()
    os.environ.update(s3.env)  # this process lists the bucket too, as the server does
    report: dict = {"machine": machine(), "server": "adapterserve serve --enforce-eager (defaults otherwise)"}
    try:
        report["listing"] = listing_seconds(s3, args.listing)
        print("listing", report["listing"], flush=True)

        store = work / "store"
        names = linked_store(demo, store, max(args.folders, args.distinct + args.cold))
        client = s3.client()
        client.create_bucket(Bucket="cold")
        run = format(int(time.time()), "x")  # fresh names: never in the fetch cache of an earlier run
        cold = [f"s3-{run}-{i:02d}" for i in range(args.cold)]
        for i, name in enumerate(cold):
            upload_folder(client, "cold", f"adapters/{name}", demo / DEMO[i % len(DEMO)])
        sources = ["--adapter-dirs", str(store), "--adapter-sources", "s3://cold/adapters"]
        process, ready_s = serve(sources, work, s3.env, "first")
        try:
            listed = len(httpx.get(f"{process.url}/v1/models", timeout=60).json()["data"]) - 1
            report["ready"] = {"folders": len(names) + len(cold), "seconds_to_ready": round(ready_s, 1), "listed_in_v1_models": listed}
            print("ready", report["ready"], flush=True)
            expected = {demo_name: chat(process.url, names[i])[1] for i, demo_name in enumerate(DEMO)}
            first_s3 = [chat(process.url, name)[0] for name in cold]
            first_local = [chat(process.url, name)[0] for name in names[-args.cold:]]
            warm = [chat(process.url, name)[0] for name in cold]
            report["distinct"] = asyncio.run(distinct_workload(process.url, names[:args.distinct], expected, args.concurrency))
            print("distinct", report["distinct"], flush=True)
        finally:
            process.stop()
        process, _ = serve(sources, work, s3.env, "restarted")
        try:
            from_cache = [chat(process.url, name)[0] for name in cold]
        finally:
            process.stop()
        ms = lambda values: round(1000 * statistics.median(values))  # noqa: E731
        report["first_request_ms"] = {
            "s3_never_seen": ms(first_s3), "local_never_seen": ms(first_local), "s3_from_the_fetch_cache": ms(from_cache),
            "warm": ms(warm), "adapters": args.cold, "max_tokens": 8,
        }
        print("first request", report["first_request_ms"], flush=True)
    finally:
        s3.stop()
    kind = cpu_kind(report["machine"]).split(" ")[0].lower()
    print("written", write_result(f"adapter_sources-{kind}.json", report))


if __name__ == "__main__":
    main()
