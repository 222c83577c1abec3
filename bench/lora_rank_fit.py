"""Fitted LoRA slots: `--max-lora-rank 64` (vLLM's usual setting) versus `auto` (fitted to
the largest rank in the stores: 8 for the demo adapters). Slot memory read from the
engine's worker, and LoRA-mixed throughput against base-only on the same server.
Reproduce with:

    .venv/bin/python bench/lora_rank_fit.py [--ranks 64 auto] [--adapters 4] [--rounds 2]
        [--requests 48 --concurrency 16 --max-tokens 64]

Writes bench/results/lora_rank_fit.json (with this machine's CPU and served dtype) and
prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lora_throughput import DEMO, make_store, mean_row  # noqa: E402

from adapterserve.compare.workload import run_workload  # noqa: E402
from adapterserve.config import load_settings  # noqa: E402
from adapterserve.dtypes import resolve_dtype  # noqa: E402
from adapterserve.models import resolve_base_model  # noqa: E402
from adapterserve.process import ServerProcess  # noqa: E402
from adapterserve.training.demo import build_demo_adapters, demo_store  # noqa: E402

ADMIN = "bench-admin"


def machine() -> dict:
    """The CPU this ran on: benchmark figures differ by kind (AVX2-only or AVX512-bf16)."""
    text = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    wanted = ["avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile"]
    return {"cpu": model, "flags": [f for f in wanted if f in flags], "dtype_auto": resolve_dtype("auto")}


def slot_bytes(url: str) -> float:
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        if family.name == "adapterserve_engine_memory_bytes":
            return next(s.value for s in family.samples if s.labels == {"engine": "generate", "component": "adapter_slots"})
    raise RuntimeError("no adapter_slots reading")


async def measure(rank: str, store: Path, names: list[str], base: str, args, log: Path) -> dict:
    server = ServerProcess(
        ["--adapter-dirs", str(store), "--no-demo-adapters", "--max-loras", "4", "--max-cpu-loras", "16",
         "--max-lora-rank", rank, "--metrics-refresh-s", "1", "--admin-api-key", ADMIN],
        log,
    ).start()
    try:
        engines = httpx.get(f"{server.url}/admin/engines", headers={"authorization": f"Bearer {ADMIN}"}, timeout=30).json()
        engine_rank = next(e["max_lora_rank"] for e in engines["engines"] if e["name"] == "generate")
        url = f"{server.url}/v1"
        await run_workload(url, [base], 4, 4, 8, "warm-up")
        scenarios = [("base only", [base]), (f"{args.adapters} adapters", names[: args.adapters])]
        rounds: dict[str, list[dict]] = {scenario: [] for scenario, _ in scenarios}
        for _ in range(args.rounds):
            for scenario, models in scenarios:
                result = await run_workload(url, models, args.requests, args.concurrency, args.max_tokens, scenario)
                rounds[scenario].append(result.row())
                print(rank, result.row(), flush=True)
        time.sleep(2)  # a metrics reading after the workload
        return {
            "setting": rank, "engine_max_lora_rank": engine_rank, "slot_bytes": slot_bytes(server.url),
            "results": [mean_row(scenario, rows) for scenario, rows in rounds.items()],
        }
    finally:
        server.stop()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", nargs="+", default=["64", "auto"])
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    settings = load_settings()
    base_path = resolve_base_model(None, settings.models_dir)
    build_demo_adapters(settings.demo_recipes_dir, settings.cache_dir, base_path, DEMO)
    demo = demo_store(settings.cache_dir, base_path)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        store.mkdir()
        names = make_store(demo, store, args.adapters)
        for rank in args.ranks:
            runs.append(await measure(rank, store, names, base_path.name, args, Path(tmp) / f"server-{rank}.log"))
    report = {"machine": machine(), "workload": vars(args), "server_flags": "--max-loras 4 --max-cpu-loras 16", "runs": runs}
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "lora_rank_fit.json").write_text(json.dumps(report, indent=2))
    print(f"\n{report['machine']}")
    print("| --max-lora-rank | engine rank | slot memory MiB | base tok/s | LoRA-mixed tok/s (vs base) | LoRA TTFT p50 / p99 ms |")
    print("|---|---|---|---|---|---|")
    for run in runs:
        base, mixed = run["results"]
        print(
            f"| {run['setting']} | {run['engine_max_lora_rank']} | {run['slot_bytes'] / 2**20:.1f} | {base['tokens_per_second']} | "
            f"{mixed['tokens_per_second']} ({mixed['tokens_per_second'] / base['tokens_per_second']:.2f}) | "
            f"{mixed['ttft_p50_ms']:.0f} / {mixed['ttft_p99_ms']:.0f} |"
        )


if __name__ == "__main__":
    asyncio.run(main())
