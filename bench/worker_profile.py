"""Where the served engine's worker spends its CPU: base-only against N adapters mixed.

Starts `adapterserve serve` at its defaults (compiled, the CPU LoRA path as it serves)
over a store of 16 copies of the demo adapters, puts them in the engine's slots, then
for each scenario samples the worker process with Linux `perf` (`perf record -F 999 -p`)
while the bench's workload (48 streamed chats x 32 tokens, concurrency 16) runs `--rounds`
times (the sampling starts a second before the first round and ends with the last).
The samples are counted per library and per symbol and scaled per 1,000 generated tokens:
a sample is ~1 ms of one thread's CPU (a thread asleep is not sampled), so the difference
between two scenarios is the CPU the adapters cost, and where; beside the throughput
under sampling, it shows whether the time went to the worker's CPU or elsewhere.

With `--sampler py-spy` the worker's Python is sampled instead (`py-spy record --nonblocking`,
250 Hz, threads at work only): samples per Python function, its own and with what it
calls, per 1,000 tokens; where `perf` shows the time in `libpython`, this shows whose.

Needs `perf` (linux-tools) and a kernel that lets this user sample its own processes
(`/proc/sys/kernel/perf_event_paranoid` at most 2), or py-spy (a dev dependency). Sampling slows the server by a few
percent; the throughputs printed are for the per-token scaling, not for `bench/RESULTS.md`'s
tables (those come from `bench.ab`).

    .venv/bin/python -m bench.worker_profile [--scenarios base mix:1 mix:16] [--rounds 3] [--sampler perf|py-spy] [--keep DIR] [--out worker_profile.json]

Writes bench/results/<out> (with the CPU) and prints the top differences.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from adapterserve.compare.workload import run_workload
from bench.ab import models_of, server
from bench.common import demo_adapters, machine, make_store, write_result

ADAPTERS = 16
TOP = 25


def samples_by_symbol(data: Path) -> collections.Counter:
    """`perf report`'s sample counts per (library, symbol)."""
    text = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--sort", "dso,sym", "--stdio", "-g", "none", "-n"],
                          capture_output=True, text=True, check=True).stdout
    counts: collections.Counter = collections.Counter()
    for line in text.splitlines():
        match = re.match(r"\s*[\d.]+%\s+(\d+)\s+(.+?)\s+\[.\]\s+(.*)", line)  # a library's name may hold spaces ([JIT] tid N)
        if match:
            counts[f"{match[2]}\t{match[3][:100].strip()}"] += int(match[1])
    return counts


def python_samples(collapsed: Path) -> collections.Counter:
    """py-spy's raw stacks as samples per Python function: "self\t<function>" for the
    innermost frame, "total\t<function>" for every function on the stack (once)."""
    counts: collections.Counter = collections.Counter()
    for line in collapsed.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        # frames are "name (file:line)": one function, whatever the line
        frames = [re.sub(r":\d+\)$", ")", f).replace(str(Path(sys.prefix)), "") for f in stack.split(";") if f]
        if frames:
            counts[f"self\t{frames[-1]}"] += int(n)
            for frame in set(frames):
                counts[f"total\t{frame}"] += int(n)
    return counts


def sampler(kind: str, pid: int, out: Path) -> subprocess.Popen:
    if kind == "perf":
        command = ["perf", "record", "-F", "999", "-g", "-p", str(pid), "-o", str(out)]
    else:
        command = [str(Path(sys.executable).with_name("py-spy")), "record", "--nonblocking", "-r", "250", "-f", "raw",
                   "-p", str(pid), "-o", str(out)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def by_library(counts: collections.Counter) -> collections.Counter:
    libraries: collections.Counter = collections.Counter()
    for key, n in counts.items():
        library = key.split("\t", 1)[0]
        libraries[re.sub(r"-[0-9a-f]{16}\.so$|(?<=\[JIT\]) tid \d+", lambda m: ".so" if m[0].endswith(".so") else "", library)] += n
    return libraries


async def profile(args) -> dict:
    base, demo = demo_adapters()
    scenarios = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        store.mkdir()
        names = make_store(demo, store, ADAPTERS)
        process = server("adapterserve", base, store, names, Path(tmp) / "server.log").start()
        try:
            url = f"{process.url}/v1"
            await run_workload(url, [base.name], 4, 4, 8, "warm-up")
            for name in names:  # into the engine's slots in this order
                await run_workload(url, [name], 1, 1, 1, "slot order")
            # the process that runs the model: vLLM's worker, or the engine core itself where the
            # model runs in it (the default on at most 2 CPUs since the twenty-ninth session)
            engine = [p for p in process.descendants() if "Worker" in p.name() or "EngineCor" in p.name()]
            worker = next((p for p in engine if "Worker" in p.name()), engine[0])
            for scenario in args.scenarios:
                data = Path(tmp) / f"perf-{scenario.replace(':', '-')}.data"
                recorder = sampler(args.sampler, worker.pid, data)
                await asyncio.sleep(1)  # the sampler attaches
                tokens, began = 0, time.monotonic()
                for _ in range(args.rounds):  # sampled from the first round's start to the last one's end
                    result = await run_workload(url, models_of(scenario, base.name, names), 48, 16, 32, scenario)
                    tokens += result.row()["output_tokens"]
                seconds = time.monotonic() - began
                recorder.send_signal(signal.SIGINT)
                recorder.wait(timeout=120)
                if args.keep:  # for `perf annotate` afterwards
                    Path(args.keep).mkdir(parents=True, exist_ok=True)
                    shutil.copy(data, Path(args.keep) / data.name)
                scenarios[scenario] = {"tokens": tokens, "tokens_per_second": round(tokens / seconds, 1)}
                if args.sampler == "perf":
                    counts = samples_by_symbol(data)
                    per_1000 = {k: round(1000 * n / tokens, 1) for k, n in counts.most_common()}
                    scenarios[scenario] |= {"samples": sum(counts.values()),
                                            "libraries_per_1000_tokens": {k: round(1000 * n / tokens, 1) for k, n in by_library(counts).most_common()},
                                            "symbols_per_1000_tokens": dict(list(per_1000.items())[:200])}
                else:
                    counts = python_samples(data)
                    for kind in ("self", "total"):
                        mine = collections.Counter({k.split("\t", 1)[1]: n for k, n in counts.items() if k.startswith(kind)})
                        scenarios[scenario][f"python_{kind}_per_1000_tokens"] = {
                            k: round(1000 * n / tokens, 1) for k, n in mine.most_common(200)}
                print(scenario, scenarios[scenario]["tokens_per_second"], "tok/s", flush=True)
        finally:
            process.stop()
    return scenarios


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenarios", nargs="+", default=["base", "mix:1", "mix:16"])
    parser.add_argument("--rounds", type=int, default=3, help="workload rounds sampled per scenario")
    parser.add_argument("--sampler", choices=["perf", "py-spy"], default="perf", help="native samples, or the worker's Python")
    parser.add_argument("--keep", help="a folder to keep each scenario's sampler data in (perf.data: `perf annotate -i`)")
    parser.add_argument("--out", default="worker_profile.json", help="file name under bench/results")
    args = parser.parse_args()
    scenarios = asyncio.run(profile(args))
    path = write_result(args.out, {"machine": machine(), "workload": vars(args), "scenarios": scenarios})
    first = args.scenarios[0]
    print(f"\n{machine()}\nsamples (~ms of one thread) per 1,000 tokens; written to {path}")
    levels = ("libraries_per_1000_tokens", "symbols_per_1000_tokens") if args.sampler == "perf" else (
        "python_self_per_1000_tokens", "python_total_per_1000_tokens")
    for scenario in args.scenarios[1:]:
        for level in levels:
            mine, theirs = scenarios[scenario][level], scenarios[first][level]
            delta = sorted(((mine.get(k, 0) - theirs.get(k, 0), k) for k in set(mine) | set(theirs)), reverse=True)
            print(f"\n| {scenario} against {first}: {level.removesuffix('_per_1000_tokens')} | {first} | {scenario} | difference |\n|---|---|---|---|")
            for difference, key in delta[:12 if level.startswith("libraries") else TOP]:
                print(f"| {key.replace(chr(9), ' ')[:90]} | {theirs.get(key, 0)} | {mine.get(key, 0)} | {difference:+.1f} |")
            if level.startswith("libraries"):
                print(f"| all | {sum(theirs.values()):.0f} | {sum(mine.values()):.0f} | {sum(mine.values()) - sum(theirs.values()):+.0f} |")


if __name__ == "__main__":
    main()
