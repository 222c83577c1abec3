"""LoRA-mixed throughput against base-only on the same server, at `adapterserve serve`
defaults, for server variants one after the other:

- `rank64` (`--max-lora-rank 64`, vLLM's usual setting) versus `auto` (the default: slots
  fitted to the largest rank in the stores, 8 for the demo adapters), with the slot memory
  read from the engine's worker;
- `float32`, `bfloat16`: the default with the dtype set instead of auto;
- `loras<N>`, e.g. `loras8`: the default with N engine slots (`--max-loras N`);
- `preload`: the default with tcmalloc and Intel OpenMP preloaded in the engine processes
  (vLLM's CPU guide; `LD_PRELOAD`), where the libraries are on this machine;
- `allcores`: the default with no core reserved for vLLM's scheduler and the API server
  (`VLLM_CPU_NUM_OF_RESERVED_CPU=0`): the worker's threads bound to every core, where
  vLLM binds them to all cores but one (on at most 2 CPUs this is the default since
  `hosting/cpu_cores.py`);
- `reserve1`: the default with one core reserved (`--engine-reserved-cpus 1`), as vLLM
  does and as the server did on 2 CPUs before `hosting/cpu_cores.py`;
- `kernel1`: the default with the LoRA kernel on one thread (`ADAPTERSERVE_LORA_KERNEL_THREADS=1`,
  as it ran before it split a layer's tokens over PyTorch's OpenMP threads);
- `pyop`: the default with the compiled graph's LoRA op in Python (`ADAPTERSERVE_LORA_OP=0`,
  as it ran before the op's steady state moved to C++, `engine_plugins/cpu_lora/lora_op.cpp`);
- `thp`: the default with glibc's malloc asking for transparent huge pages in the engine
  processes (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`: oneDNN's packed weights, the KV
  cache and PyTorch's tensors come from malloc; the kernel's THP mode here is `madvise`);
- `eager`: the default without compiled execution (`--enforce-eager`, the default before
  compiled execution with LoRA, `engine_plugins/cpu_lora/compiled.py`).

A compiled variant's first start of a configuration compiles (~1-2 min per engine on 2
CPUs); throughput is measured after the server is up, so it does not count.

Reproduce with:

    .venv/bin/python bench/lora_rank_fit.py [--variants rank64 auto preload] [--adapters 1 3 8]
        [--rounds 2] [--requests 48 --concurrency 16 --max-tokens 32] [--out NAME.json] [--spread]

`--spread` adds a scenario of 3 adapters in engine slots far apart (0, 7, 15), as they end
up once adapters have come and gone.

Writes bench/results/lora_rank_fit.json (or --out) (with this machine's CPU and served dtype) and
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
import psutil
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lora_throughput import DEMO, base_and_mixed_rounds, make_store  # noqa: E402

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


def preload_libraries() -> str | None:
    """tcmalloc (Debian's libtcmalloc-minimal4) and Intel OpenMP (PyPI's intel-openmp), if present."""
    import glob
    import sysconfig

    found = [
        next(iter(glob.glob("/usr/lib/*/libtcmalloc_minimal.so.4")), None),
        next(iter(glob.glob(str(Path(sysconfig.get_paths()["data"]) / "lib" / "libiomp5.so"))), None),
    ]
    return ":".join(f for f in found if f) or None


def variant(name: str) -> tuple[list[str], dict]:
    """(server flags, environment) of a variant."""
    if name == "rank64":
        return ["--max-lora-rank", "64"], {}
    if name == "auto":
        return [], {}
    if name.startswith("loras") and name[5:].isdigit():  # e.g. loras8: the default with 8 engine slots
        return ["--max-loras", name[5:]], {}
    if name in ("float32", "bfloat16"):  # the default with the dtype set instead of auto
        return ["--dtype", name], {}
    if name == "preload":
        libraries = preload_libraries()
        if libraries is None:
            raise SystemExit("no tcmalloc / libiomp5 to preload on this machine")
        return [], {"LD_PRELOAD": libraries}
    if name == "allcores":
        return [], {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    if name == "reserve1":
        return ["--engine-reserved-cpus", "1"], {}
    if name == "eager":
        return ["--enforce-eager"], {}
    if name == "kernel1":
        return [], {"ADAPTERSERVE_LORA_KERNEL_THREADS": "1"}
    if name == "pyop":
        return [], {"ADAPTERSERVE_LORA_OP": "0"}
    if name == "thp":
        return [], {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    raise SystemExit(f"unknown variant {name}")


def anon_huge_pages_kib(pid: int) -> int:
    """Transparent huge pages held by the server's process tree (its engines'), in KiB."""
    total = 0
    root = psutil.Process(pid)
    for process in [root, *root.children(recursive=True)]:
        try:
            rollup = Path(f"/proc/{process.pid}/smaps_rollup").read_text()
        except OSError:
            continue
        total += sum(int(line.split()[1]) for line in rollup.splitlines() if line.startswith("AnonHugePages:"))
    return total


async def measure(name: str, store: Path, names: list[str], base: str, args, log: Path) -> dict:
    flags, env = variant(name)
    server = ServerProcess(
        ["--adapter-dirs", str(store), "--no-demo-adapters", "--metrics-refresh-s", "1", "--admin-api-key", ADMIN, *flags],
        log, env=env,
    ).start()
    try:
        engines = httpx.get(f"{server.url}/admin/engines", headers={"authorization": f"Bearer {ADMIN}"}, timeout=30).json()
        engine_rank = next(e["max_lora_rank"] for e in engines["engines"] if e["name"] == "generate")
        extra = ()
        if args.spread:  # 3 adapters in slots far apart (0, 7, 15): the slots of 16 adapters asked in order
            extra = (("3 adapters in slots 0, 7, 15", [names[0], names[7], names[15]]),)
        results = await base_and_mixed_rounds(f"{server.url}/v1", base, names, args, name, extra)
        time.sleep(2)  # a metrics reading after the workload
        return {
            "variant": name, "flags": flags, "env": env, "engine_max_lora_rank": engine_rank, "slot_bytes": slot_bytes(server.url),
            "anon_huge_pages_kib": anon_huge_pages_kib(server.process.pid), "results": results,
        }
    finally:
        server.stop()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", nargs="+", default=["rank64", "auto", "preload"])
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 3, 8])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", default="lora_rank_fit.json", help="file name under bench/results")
    parser.add_argument("--spread", action="store_true", help="also 3 adapters in slots far apart (16 adapters stored)")
    args = parser.parse_args()

    settings = load_settings()
    base_path = resolve_base_model(None, settings.models_dir)
    build_demo_adapters(settings.demo_recipes_dir, settings.cache_dir, base_path, DEMO)
    demo = demo_store(settings.cache_dir, base_path)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        store.mkdir()
        names = make_store(demo, store, max(*args.adapters, 16 if args.spread else 0))
        for name in args.variants:
            runs.append(await measure(name, store, names, base_path.name, args, Path(tmp) / f"server-{name}.log"))
    report = {"machine": machine(), "workload": vars(args), "server_flags": "defaults (--max-loras 16 --max-cpu-loras 16)", "runs": runs}
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / args.out).write_text(json.dumps(report, indent=2))
    print(f"\n{report['machine']}")
    scenarios = [row["scenario"] for row in runs[0]["results"][1:]]
    print("| variant | engine rank | slot memory MiB | base tok/s | " + " | ".join(f"{s} tok/s (vs base)" for s in scenarios) + " |")
    print("|---|---|---|---|" + "---|" * len(scenarios))
    for run in runs:
        base, *mixed = run["results"]
        cells = [f"{m['tokens_per_second']} ({m['tokens_per_second'] / base['tokens_per_second']:.2f})" for m in mixed]
        print(f"| {run['variant']} | {run['engine_max_lora_rank']} | {run['slot_bytes'] / 2**20:.1f} | {base['tokens_per_second']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    asyncio.run(main())
