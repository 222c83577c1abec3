"""LoRA serving throughput and TTFT: base-only vs 1, 2, 4, 8 and 16 distinct adapters
mixed on the same workload, with adapterserve's CPU LoRA ops and with vLLM's reference
ops (one server each, one after the other); a cold adapter (on disk only) vs a warm one;
and the naive transformers+peft loop. Reproduce with:

    .venv/bin/python bench/lora_throughput.py [--ops grouped reference] [--adapters 1 2 4 8 16] [--rounds 2]
        [--requests 48 --concurrency 16 --max-tokens 64]

Writes bench/results/lora_throughput.json and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from naive_peft import run_naive  # noqa: E402
from adapterserve.compare.workload import run_workload  # noqa: E402

from adapterserve.config import load_settings  # noqa: E402
from adapterserve.models import resolve_base_model  # noqa: E402
from adapterserve.process import ServerProcess  # noqa: E402
from adapterserve.training.demo import build_demo_adapters, demo_store  # noqa: E402

DEMO = ["pirate", "french", "json"]
ADMIN = "bench-admin"


def make_store(demo: Path, root: Path, count: int) -> list[str]:
    """`count` adapters: copies of the trained demo adapters under distinct names (vLLM
    treats each name as its own adapter with its own slot and cache entry)."""
    names = []
    for i in range(count):
        name = f"{DEMO[i % len(DEMO)]}-{i:02d}"
        shutil.copytree(demo / DEMO[i % len(DEMO)], root / name)
        names.append(name)
    return names


async def cold_vs_warm(server: ServerProcess, store: Path, demo: Path) -> dict:
    """An adapter added to the store while serving: admin load, first request, second request."""
    shutil.copytree(demo / "pirate", store / "late-arrival")
    began = time.perf_counter()
    response = httpx.post(f"{server.url}/admin/adapters/late-arrival/load", headers={"authorization": f"Bearer {ADMIN}"}, timeout=120)
    response.raise_for_status()
    load_ms = 1000 * (time.perf_counter() - began)
    first = await run_workload(f"{server.url}/v1", ["late-arrival"], 1, 1, 8, "cold")
    second = await run_workload(f"{server.url}/v1", ["late-arrival"], 1, 1, 8, "warm")
    return {"admin_load_ms": round(load_ms, 1), "first_request_ttft_ms": first.ttft_p50_ms, "warm_request_ttft_ms": second.ttft_p50_ms}


SCENARIOS = [1, 2, 4, 8, 16]  # adapters mixed (round-robin over the requests)


def mean_row(scenario: str, rows: list[dict]) -> dict:
    """One scenario over the rounds: mean throughput and TTFT, and each round's throughput."""
    def mean(key: str) -> float:
        return round(sum(row[key] for row in rows) / len(rows), 1)

    return {"scenario": scenario, "tokens_per_second": mean("tokens_per_second"), "ttft_p50_ms": mean("ttft_p50_ms"),
            "ttft_p99_ms": mean("ttft_p99_ms"), "rounds_tokens_per_second": [row["tokens_per_second"] for row in rows]}


async def base_and_mixed_rounds(url: str, base: str, names: list[str], args, label: str,
                                extra: tuple[tuple[str, list[str]], ...] = ()) -> list[dict]:
    """Base-only, then 1..n adapters mixed, then the `extra` scenarios, `args.rounds` times
    (so that the machine's drift hits base and adapters alike); the mean row of each scenario.
    The adapters are first asked one at a time in the order of `names`, so that the engine
    puts them in its slots in that order (vLLM takes the first free slot)."""
    await run_workload(url, [base], 4, 4, 8, "warm-up")
    for name in names:
        await run_workload(url, [name], 1, 1, 1, "slot order")
    scenarios = [("base only", [base])] + [(f"{n} adapters", names[:n]) for n in args.adapters] + list(extra)
    rounds: dict[str, list[dict]] = {scenario: [] for scenario, _ in scenarios}
    for _ in range(args.rounds):
        for scenario, models in scenarios:
            result = await run_workload(url, models, args.requests, args.concurrency, args.max_tokens, scenario)
            rounds[scenario].append(result.row())
            print(label, result.row(), flush=True)
    return [mean_row(scenario, rows) for scenario, rows in rounds.items()]


async def serve_and_measure(ops: str, store: Path, names: list[str], base: str, args, log: Path, demo: Path) -> dict:
    server = ServerProcess(
        ["--adapter-dirs", str(store), "--no-demo-adapters", "--max-loras", "16", "--max-cpu-loras", "32",
         "--max-lora-rank", "8", "--admin-api-key", ADMIN,
         "--grouped-lora-ops" if ops == "grouped" else "--no-grouped-lora-ops"],
        log,
    ).start()
    try:
        results = await base_and_mixed_rounds(f"{server.url}/v1", base, names, args, ops)
        cold = await cold_vs_warm(server, store, demo) if ops == "grouped" else None
        if cold:
            print(cold, flush=True)
        return {"results": results, "cold_vs_warm": cold}
    finally:
        server.stop()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--naive-requests", type=int, default=8)
    parser.add_argument("--ops", nargs="+", choices=["grouped", "reference"], default=["grouped", "reference"], help="CPU LoRA ops in the engine")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of all scenarios per server (means are reported)")
    parser.add_argument("--adapters", type=int, nargs="+", default=SCENARIOS, help="adapters mixed, one scenario each")
    parser.add_argument("--out", default="lora_throughput.json", help="file name under bench/results/")
    args = parser.parse_args()

    settings = load_settings()
    base_path = resolve_base_model(None, settings.models_dir)
    build_demo_adapters(settings.demo_recipes_dir, settings.cache_dir, base_path, DEMO)
    demo = demo_store(settings.cache_dir, base_path)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        store.mkdir()
        names = make_store(demo, store, max(args.adapters))
        for ops in args.ops:
            runs[ops] = await serve_and_measure(ops, store, names, base_path.name, args, Path(tmp) / f"server-{ops}.log", demo)
            shutil.rmtree(store / "late-arrival", ignore_errors=True)
    naive = None if args.skip_naive else run_naive(base_path, {n: demo / n for n in DEMO}, args.naive_requests, args.max_tokens)
    print(naive, flush=True)
    report = {
        "workload": vars(args),
        "server_flags": "--max-loras 16 --max-cpu-loras 32 --max-lora-rank 8",
        "runs": runs,
        "naive": naive,
    }
    (out / args.out).write_text(json.dumps(report, indent=2))
    header = "| scenario | " + " | ".join(f"{ops} tok/s (vs base) | {ops} TTFT p50 / p99 ms" for ops in runs) + " |"
    print("\n" + header + "\n|---|" + "---|---|" * len(runs))
    for i, row in enumerate(next(iter(runs.values()))["results"]):
        cells = []
        for run in runs.values():
            r, base_tps = run["results"][i], run["results"][0]["tokens_per_second"]
            cells += [f"{r['tokens_per_second']} ({r['tokens_per_second'] / base_tps:.2f})", f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f}"]
        print(f"| {row['scenario']} | " + " | ".join(cells) + " |")
    if naive:
        print(f"| {naive['scenario']} | {naive['tokens_per_second']} | |")


if __name__ == "__main__":
    asyncio.run(main())
