"""A/B runs of server variants: the one tool for "is variant B faster than A on this CPU".

Each server is started fresh for each run, one at a time (2 cores: never two at once), in
the order A B C ... then back (A B B A with two rounds), so a drift of the machine's speed
weighs on all alike. A run warms the server up, asks each adapter once in order (vLLM puts
them in its slots in that order), then runs the scenarios with every mixed scenario
bracketed by base-only runs (base, mix 1, base, mix 3, base, ...): a mix's ratio is its
throughput over the mean of the base-only runs just before and after it. The workload is
`--requests` streamed chats of `--max-tokens` tokens (`ignore_eos`: every request makes
them all) at `--concurrency`, greedy. The CPU (model, flags, the dtype `auto` serves) is
recorded with every result.

Servers:
- `adapterserve` (its defaults) and `adapterserve:<variant>[+<variant>...]`, the variants
  in `VARIANTS` (flags and environment: `rank64`, `float32`, `bfloat16`, `loras<N>`,
  `preload`, `allcores`, `reserve1`, `eager`, `kernel1`, `pyop`, `thp`, `reference-ops`,
  `nokernel`, `handrules`, `metrics1`, `oneproc`, `workerproc`, `spin10k`, `passive`);
- `adapterserve@<commit>[:<variant>...]`: the same, with the server's code of another
  commit (`git archive` of it into a temporary folder, its `server/` first on the server's
  PYTHONPATH, in vLLM's processes too), for "is this change faster on this CPU": its
  native LoRA kernel and op build from that commit's sources into their own cache entries;
- `vllm` (vLLM's own server at its defaults on the base, with adapterserve's KV cache
  size), `vllm:eager`, and `vllm:lora` (`--enable-lora` with the stored adapters as
  `--lora-modules`, adapterserve's slot flags; vLLM's own CPU LoRA path: adapterserve's
  plugin is switched off in vLLM's processes).

Reproduce the figures of bench/RESULTS.md with, for example:

    python -m bench.ab run --servers adapterserve --scenarios base mix:1 mix:3 mix:8 mix:16 --rounds 2
    python -m bench.ab run --servers vllm adapterserve --scenarios base --rounds 2
    python -m bench.ab pool bench/results/ab-*.json

Writes bench/results/ab-<time>.json (or --out) and prints the pooled table.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import statistics
import subprocess
import sysconfig
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import httpx
import psutil

from adapterserve.compare.workload import run_workload
from adapterserve.server_process import ServerProcess
from bench.common import ADMIN, demo_adapters, machine, make_store, write_result

KV_BYTES = str(256 * 2**20)  # adapterserve's default KV cache: memory, not speed
BASE = "base"


def _preload() -> dict:
    """tcmalloc (Debian's libtcmalloc-minimal4) and Intel OpenMP (PyPI's intel-openmp), if present."""
    found = [next(iter(glob.glob("/usr/lib/*/libtcmalloc_minimal.so.4")), None),
             next(iter(glob.glob(str(Path(sysconfig.get_paths()["data"]) / "lib" / "libiomp5.so"))), None)]
    libraries = ":".join(f for f in found if f)
    if not libraries:
        raise SystemExit("no tcmalloc / libiomp5 to preload on this machine")
    return {"LD_PRELOAD": libraries}


# variant -> (server flags, environment of the server's processes)
VARIANTS: dict[str, tuple[list[str], dict]] = {
    "rank64": (["--max-lora-rank", "64"], {}),  # vLLM's usual slot rank, not fitted to the stores
    "float32": (["--dtype", "float32"], {}),
    "bfloat16": (["--dtype", "bfloat16"], {}),
    "allcores": ([], {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}),  # the worker's threads on every core
    "reserve1": (["--engine-reserved-cpus", "1"], {}),  # one core kept for the scheduler, as vLLM does
    "eager": (["--enforce-eager"], {}),  # no compiled execution
    "kernel1": ([], {"ADAPTERSERVE_LORA_KERNEL_THREADS": "1"}),  # the native LoRA kernel on one thread
    "pyop": ([], {"ADAPTERSERVE_LORA_OP": "0"}),  # the compiled graph's LoRA op in Python
    "thp": ([], {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}),  # malloc asks for transparent huge pages
    "reference-ops": (["--no-grouped-lora-ops"], {}),  # vLLM's own CPU LoRA ops
    "nokernel": (["--no-cpu-lora-kernel"], {}),  # the fused path without the native kernel
    "handrules": (["--no-cpu-lora-autotune"], {}),  # the CPU LoRA forms by the hand rules, not measured
    "metrics1": (["--metrics-refresh-s", "1"], {}),  # the metrics read every second (this tool's setting until s28)
    # each engine's model in its engine core's process (vLLM's uniprocessing executor), or in a worker of its own
    "oneproc": (["--no-engine-worker-process"], {}),
    "workerproc": (["--engine-worker-process"], {}),
    # OpenMP's idle threads: spin ~10x shorter before sleeping (libgomp's default 300,000), or sleep at once
    "spin10k": ([], {"GOMP_SPINCOUNT": "10000"}),
    "passive": ([], {"OMP_WAIT_POLICY": "PASSIVE"}),
}


def variant(name: str) -> tuple[list[str], dict]:
    if name.startswith("loras") and name[5:].isdigit():  # loras8: 8 engine slots
        return ["--max-loras", name[5:]], {}
    if name == "preload":
        return [], _preload()
    if name not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r}; known: {', '.join([*VARIANTS, 'loras<N>', 'preload'])}")
    return VARIANTS[name]


def server_code_of(commit: str) -> Path:
    """The `server/` folder of `commit` (of this repository), extracted once per commit."""
    repository = Path(__file__).resolve().parents[1]
    sha = subprocess.run(["git", "rev-parse", "--verify", f"{commit}^{{commit}}"], cwd=repository,
                         capture_output=True, text=True, check=True).stdout.strip()
    folder = Path(tempfile.gettempdir()) / "adapterserve-ab" / sha
    if not (folder / "server" / "adapterserve").is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        # the whole tree: the package links to folders beside it (demo_recipes -> adapters)
        archive = subprocess.run(["git", "archive", sha], cwd=repository, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder / "server"


def server(spec: str, base: Path, store: Path, names: list[str], log: Path) -> ServerProcess:
    """A fresh server of `spec` (see the module's docstring)."""
    kind, _, variants = spec.partition(":")
    kind, _, commit = kind.partition("@")
    if kind == "adapterserve":
        # the metrics' readings at the default interval, as `adapterserve serve` runs: each one
        # interrupts the worker between steps (its memory report) and walks the engines' page
        # tables, so reading every second (as this tool did up to the twenty-eighth session)
        # took CPU from the engine in both scenarios. The engines' record at the end is then
        # the last reading (up to that interval old).
        flags, env = ["--adapter-dirs", str(store), "--no-demo-adapters", "--admin-api-key", ADMIN], {}
        if commit:
            env["PYTHONPATH"] = str(server_code_of(commit))
        for name in filter(None, variants.split("+")):
            more_flags, more_env = variant(name)
            flags, env = flags + more_flags, {**env, **more_env}
        return ServerProcess(flags, log, env=env)
    if kind == "vllm":
        flags = ["--host", "127.0.0.1", "--model", str(base), "--served-model-name", base.name, "--kv-cache-memory-bytes", KV_BYTES]
        if variants == "eager":
            flags.append("--enforce-eager")
        elif variants == "lora":
            flags += ["--enable-lora", "--max-loras", "16", "--max-lora-rank", "8", "--lora-modules",
                      *(f"{n}={store / n}" for n in names)]
        elif variants:
            raise SystemExit(f"unknown vllm variant {variants!r}: eager or lora")
        # vLLM as shipped: adapterserve's plugin (installed for every vLLM process) switched off
        return ServerProcess(flags, log, {"ADAPTERSERVE_GROUPED_LORA": "0"}, entry=("vllm.entrypoints.openai.api_server",))
    raise SystemExit(f"unknown server {spec!r}: adapterserve[:variants] or vllm[:eager|lora]")


def schedule(scenarios: list[str]) -> list[str]:
    """Every mixed scenario bracketed by base-only runs: base, mix, base, mix, ..., base."""
    mixes = [s for s in scenarios if s != BASE]
    order = [BASE]
    for mix in mixes:
        order += [mix, BASE]
    return order


def models_of(scenario: str, base: str, names: list[str]) -> list[str]:
    if scenario == BASE:
        return [base]
    return names[: int(scenario.split(":", 1)[1])]


async def one_run(spec: str, base: Path, store: Path, names: list[str], args, log: Path) -> dict:
    process = server(spec, base, store, names, log).start()
    try:
        url = f"{process.url}/v1"
        mixes = [s for s in args.scenarios if s != BASE]
        used = names[: max([int(s.split(':')[1]) for s in mixes], default=0)]
        await run_workload(url, [base.name], 4, 4, 8, "warm-up")
        for name in used:  # into the engine's slots in this order
            await run_workload(url, [name], 1, 1, 1, "slot order")
        rows = []
        for scenario in schedule(args.scenarios):
            result = await run_workload(url, models_of(scenario, base.name, names), args.requests, args.concurrency,
                                        args.max_tokens, scenario)
            rows.append(result.row())
            print(spec, result.row(), flush=True)
        return {"server": spec, "rows": rows, "engines": _engines(process.url) if spec.startswith("adapterserve") else None,
                "memory": _memory(process)}
    finally:
        process.stop()


def _memory(process: ServerProcess) -> dict:
    """USS (MB) of the server's processes once its runs are done, by process title, and their sum."""
    by_title: dict[str, float] = defaultdict(float)
    for member in [psutil.Process(process.process.pid), *process.descendants()]:
        try:
            title = " ".join(member.cmdline())[:40]
            by_title[title] += member.memory_full_info().uss / 1e6
        except psutil.NoSuchProcess:
            continue
    return {"uss_mb": round(sum(by_title.values()), 1), "by_process": {k: round(v, 1) for k, v in by_title.items()}}


def _engines(url: str) -> list[dict] | None:
    try:
        return httpx.get(f"{url}/admin/engines", headers={"authorization": f"Bearer {ADMIN}"}, timeout=30).json()["engines"]
    except (httpx.HTTPError, ValueError, KeyError):
        return None


def ratios(rows: list[dict]) -> dict[str, float]:
    """Each mix's throughput over the mean of the base-only runs around it."""
    found = {}
    for i, row in enumerate(rows):
        if row["scenario"] != BASE and 0 < i < len(rows) - 1:
            around = statistics.mean([rows[i - 1]["tokens_per_second"], rows[i + 1]["tokens_per_second"]])
            found[row["scenario"]] = row["tokens_per_second"] / around if around else 0.0
    return found


def pooled_table(runs: list[dict]) -> str:
    """Per server: base-only tok/s (mean of every base run, and against the first server's),
    per mix: mean tok/s, the ratio of the means (mix over its bracketing base runs) and the
    median of the per-run ratios; TTFT p50 / p99 of base-only; runs pooled."""
    by_server: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        by_server[run["server"]].append(run)
    mixes = list(dict.fromkeys(r["scenario"] for run in runs for r in run["rows"] if r["scenario"] != BASE))
    header = ("| server | runs | base tok/s | vs first | base TTFT p50 / p99 ms | USS MB | "
              + " | ".join(f"{m} tok/s (ratio; median)" for m in mixes) + " |")
    lines = [header, "|---|---|---|---|---|---|" + "---|" * len(mixes)]
    first_base = None
    for spec, server_runs in by_server.items():
        bases = [r for run in server_runs for r in run["rows"] if r["scenario"] == BASE]
        base_tps = statistics.mean(r["tokens_per_second"] for r in bases)
        first_base = first_base or base_tps
        cells = []
        for mix in mixes:
            mixed = [r["tokens_per_second"] for run in server_runs for r in run["rows"] if r["scenario"] == mix]
            per_run = [ratios(run["rows"])[mix] for run in server_runs if mix in ratios(run["rows"])]
            if not mixed:
                cells.append("")
                continue
            around = [statistics.mean([run["rows"][i - 1]["tokens_per_second"], run["rows"][i + 1]["tokens_per_second"]])
                      for run in server_runs for i, r in enumerate(run["rows"]) if r["scenario"] == mix]
            cells.append(f"{statistics.mean(mixed):.1f} ({statistics.mean(mixed) / statistics.mean(around):.2f}; "
                         f"{statistics.median(per_run):.2f})")
        ttft = (f"{statistics.mean(r['ttft_p50_ms'] for r in bases):.0f} / {statistics.mean(r['ttft_p99_ms'] for r in bases):.0f}")
        memory = [run["memory"]["uss_mb"] for run in server_runs if run.get("memory")]  # recorded since s29
        uss = f"{statistics.mean(memory):.0f}" if memory else ""
        lines.append(f"| {spec} | {len(server_runs)} | {base_tps:.1f} | {base_tps / first_base:.2f} | {ttft} | {uss} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


async def run(args) -> None:
    base, demo = demo_adapters()
    mixes = [int(s.split(":", 1)[1]) for s in args.scenarios if s != BASE]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        store.mkdir()
        names = make_store(demo, store, max(mixes, default=0))
        for round_index in range(args.rounds):
            order = args.servers if round_index % 2 == 0 else args.servers[::-1]
            for spec in order:
                log = Path(tmp) / f"server-{len(runs)}.log"
                runs.append(await one_run(spec, base, store, names, args, log))
    report = {"machine": machine(), "workload": {k: v for k, v in vars(args).items() if k != "func"}, "runs": runs}
    path = write_result(args.out or f"ab-{time.strftime('%Y%m%d-%H%M%S')}.json", report)
    print(f"\n{report['machine']}\n{pooled_table(runs)}\n\nwritten to {path}")


def pool(args) -> None:
    reports = [json.loads(Path(p).read_text()) for p in args.files]
    for record in {json.dumps(r["machine"], sort_keys=True) for r in reports}:
        print(record)
    print(pooled_table([run for report in reports for run in report["runs"]]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(required=True)
    runner = commands.add_parser("run", help="run servers A B ... B A and write the result")
    runner.add_argument("--servers", nargs="+", default=["adapterserve"])
    runner.add_argument("--scenarios", nargs="+", default=[BASE, "mix:1", "mix:3", "mix:8", "mix:16"],
                        help="base, and mix:N (N distinct adapters round-robin)")
    runner.add_argument("--rounds", type=int, default=2, help="rounds over the servers, every other one reversed")
    runner.add_argument("--requests", type=int, default=48)
    runner.add_argument("--concurrency", type=int, default=16)
    runner.add_argument("--max-tokens", type=int, default=32)
    runner.add_argument("--out", help="file name under bench/results (default: ab-<time>.json)")
    runner.set_defaults(func=lambda a: asyncio.run(run(a)))
    pooler = commands.add_parser("pool", help="pool the runs of result files by server")
    pooler.add_argument("files", nargs="+")
    pooler.set_defaults(func=pool)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
