"""What the benchmarks share: the CPU they ran on, the demo adapters as a store of N
distinct adapters, the chat workload's rounds, and where results are written."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

from adapterserve.compare.workload import run_workload
from adapterserve.dtypes import resolve_dtype

DEMO = ["pirate", "french", "json"]
ADMIN = "bench-admin"
RESULTS = Path(__file__).parent / "results"
CPU_FLAGS = ["avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "amx_int8"]


def machine() -> dict:
    """The CPU this ran on (figures differ by kind: AVX2-only, AVX512-bf16, AMX), its
    flags that matter here, and the dtype `auto` serves on it."""
    text = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    cores = sum(1 for line in text.splitlines() if line.startswith("processor"))
    return {"cpu": model, "cpus": cores, "flags": [f for f in CPU_FLAGS if f in flags], "dtype_auto": resolve_dtype("auto")}


def cpu_kind(record: dict) -> str:
    """A short name for the CPU kind of a `machine()` record (the RESULTS.md sections)."""
    flags = set(record.get("flags", []))
    if "amx_bf16" in flags:
        return "AMX (avx512_bf16 + amx_bf16)"
    if "avx512_bf16" in flags:
        return "AVX512-bf16"
    if "avx512f" in flags:
        return "AVX512 (no bf16)"
    return "AVX2-only"


def demo_adapters() -> tuple[Path, Path]:
    """(base folder, demo store): the embedded base and the demo adapters, built if missing."""
    from adapterserve.base_model import resolve_base_model
    from adapterserve.config import load_settings
    from adapterserve.training.demo import build_demo_adapters, demo_store

    settings = load_settings()
    base_path = resolve_base_model(None, settings.models_dir)
    build_demo_adapters(settings.demo_recipes_dir, settings.cache_dir, base_path, DEMO)
    return base_path, demo_store(settings.cache_dir, base_path)


def make_store(demo: Path, root: Path, count: int) -> list[str]:
    """`count` adapters: copies of the trained demo adapters under distinct names (vLLM
    treats each name as its own adapter with its own slot and cache entry)."""
    names = []
    for i in range(count):
        name = f"{DEMO[i % len(DEMO)]}-{i:02d}"
        shutil.copytree(demo / DEMO[i % len(DEMO)], root / name)
        names.append(name)
    return names


def mean_row(scenario: str, rows: list[dict]) -> dict:
    """One scenario over the rounds: mean throughput and TTFT, and each round's throughput."""
    def mean(key: str) -> float:
        return round(statistics.mean(row[key] for row in rows), 1)

    return {"scenario": scenario, "tokens_per_second": mean("tokens_per_second"), "ttft_p50_ms": mean("ttft_p50_ms"),
            "ttft_p99_ms": mean("ttft_p99_ms"), "rounds_tokens_per_second": [row["tokens_per_second"] for row in rows]}


async def base_and_mixed_rounds(url: str, base: str, names: list[str], args, label: str,
                                extra: tuple[tuple[str, list[str]], ...] = ()) -> list[dict]:
    """Base-only, then 1..n adapters mixed (`args.adapters`), then the `extra` scenarios,
    `args.rounds` times (so that the machine's drift hits base and adapters alike); the
    mean row of each scenario. The adapters are first asked one at a time in the order of
    `names`, so that the engine puts them in its slots in that order."""
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


def write_result(name: str, report: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(report, indent=2))
    return path
