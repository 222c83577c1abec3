"""adapterserve versus vLLM's own OpenAI server (`vllm serve`) on the same base, the same
4 LoRA adapters, the same engine flags and the same workload: the project's overhead as a
measured ratio. Reproduce with:

    .venv/bin/python bench/vllm_serve_overhead.py [--rounds 2 --requests 48 --concurrency 16 --max-tokens 64]

vLLM's server runs as `python -m vllm.entrypoints.openai.api_server` (what `vllm serve`
starts) with the flags adapterserve gives its own engine (EngineSpec.cli_args), plus
`--lora-modules`. The servers run one after the other, never together (2 cores), each
round freshly started, in the order A B B A (then again), so a drift of the machine's
speed during the run weighs on both alike. Both have adapterserve's CPU LoRA ops: the
plugin is installed for every vLLM process. Writes bench/results/vllm_serve_overhead.json
and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_throughput import DEMO, make_store  # noqa: E402

from adapterserve.compare.workload import run_workload  # noqa: E402
from adapterserve.config import load_settings  # noqa: E402
from adapterserve.hosting.engine import EngineSpec  # noqa: E402
from adapterserve.models import resolve_base_model  # noqa: E402
from adapterserve.process import ServerProcess  # noqa: E402
from adapterserve.training.demo import build_demo_adapters, demo_store  # noqa: E402

ADAPTERS = 4
ENGINE_FLAGS = {"max_loras": 4, "max_lora_rank": 8, "max_cpu_loras": 16}


async def measure(server: ServerProcess, names: list[str], args, label: str) -> dict:
    server.start()
    try:
        url = f"{server.url}/v1"
        await run_workload(url, names, 4, 4, 8, "warm-up")
        result = (await run_workload(url, names, args.requests, args.concurrency, args.max_tokens, label)).row()
    finally:
        server.stop()
    print(result, flush=True)
    return result


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=4, help="rounds of both servers, alternating which goes first")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    settings = load_settings(**ENGINE_FLAGS)
    base_path = resolve_base_model(None, settings.models_dir)
    build_demo_adapters(settings.demo_recipes_dir, settings.cache_dir, base_path, DEMO)
    demo = demo_store(settings.cache_dir, base_path)
    spec = EngineSpec.from_settings(settings, "generate", base_path, base_path.name, enable_lora=True)
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        store.mkdir()
        names = make_store(demo, store, ADAPTERS)

        def server(label: str) -> ServerProcess:
            if label == "adapterserve":
                flags = [f"--{k.replace('_', '-')}={v}" for k, v in ENGINE_FLAGS.items()]
                return ServerProcess(["--adapter-dirs", str(store), "--no-demo-adapters", *flags], Path(tmp) / "adapterserve.log")
            return ServerProcess(
                ["--host", "127.0.0.1", *spec.cli_args(), "--lora-modules", *(f"{n}={store / n}" for n in names)],
                Path(tmp) / "vllm.log",
                entry=("vllm.entrypoints.openai.api_server",),
            )

        labels = ["adapterserve", "vllm serve"]
        results = {label: [] for label in labels}
        for i in range(args.rounds):
            for label in labels if i % 2 == 0 else labels[::-1]:  # A B, then B A: drift weighs on both
                results[label].append(await measure(server(label), names, args, f"{label} #{len(results[label]) + 1}"))
    mean = {label: statistics.mean(r["tokens_per_second"] for r in rows) for label, rows in results.items()}
    report = {
        "workload": vars(args), "adapters": ADAPTERS, "engine_flags": spec.cli_args(), "results": results,
        "mean_tokens_per_second": mean, "ratio": round(mean["adapterserve"] / mean["vllm serve"], 3),
    }
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "vllm_serve_overhead.json").write_text(json.dumps(report, indent=2))
    print("\n| server | tok/s per round | mean tok/s | TTFT p50 ms (per round) |\n|---|---|---|---|")
    for label, rows in results.items():
        print(f"| {label} | {', '.join(str(r['tokens_per_second']) for r in rows)} | {mean[label]:.1f} | {', '.join(str(r['ttft_p50_ms']) for r in rows)} |")
    print(f"\nadapterserve / vllm serve = {report['ratio']}")


if __name__ == "__main__":
    asyncio.run(main())
