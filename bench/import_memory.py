"""What importing the API process's libraries costs in memory, before it serves anything.

The shared mode's API process holds ~580 MB (USS, `adapterserve compare`), paid once, and
issue 41 asks what of it is not needed. This bench imports, in a fresh interpreter each
time, what that process imports, stage by stage (torch, transformers, vLLM, vLLM's
OpenAI layer, adapterserve's app), and reads `/proc/self/smaps_rollup` after each stage:
USS (private pages), of which anonymous (Python's objects, native libraries' heaps and
relocated data: what no other process can share), and the number of modules. It also
counts, by top-level package, the modules that vLLM's OpenAI layer adds to `import vllm`.

    .venv/bin/python -m bench.import_memory [--out import_memory.json]

Writes bench/results/<out> (with the CPU) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from bench.common import machine, write_result

STAGES = [
    ("python", []),
    ("torch", ["torch"]),
    ("transformers", ["transformers"]),
    ("vllm", ["vllm"]),
    ("vLLM's OpenAI layer", ["vllm.entrypoints.openai.api_server"]),
    ("adapterserve's app", ["adapterserve.app"]),
]

PROBE = r"""
import collections, importlib, json, sys
def memory():
    fields = {}
    for line in open("/proc/self/smaps_rollup"):
        key, _, value = line.partition(":")
        if key in ("Rss", "Private_Clean", "Private_Dirty", "Anonymous"):
            fields[key] = int(value.split()[0]) / 1024
    return {"rss_mb": round(fields["Rss"]), "uss_mb": round(fields["Private_Clean"] + fields["Private_Dirty"]),
            "anonymous_mb": round(fields["Anonymous"]), "modules": len(sys.modules)}
added = None
for name in sys.argv[1:]:
    if name == "vllm.entrypoints.openai.api_server":
        before = set(sys.modules)
    importlib.import_module(name)
    if name == "vllm.entrypoints.openai.api_server":
        added = collections.Counter(m.split(".")[0] for m in set(sys.modules) - before).most_common(15)
print(json.dumps(memory() | ({"openai_layer_adds": added} if added else {})))
"""


def measure(modules: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, *modules], capture_output=True, text=True, timeout=600, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="import_memory.json", help="file name under bench/results")
    args = parser.parse_args()
    rows, modules = [], []
    for stage, more in STAGES:
        modules += more
        rows.append({"stage": stage, "imports": list(modules)} | measure(modules))
        print(rows[-1]["stage"], {k: v for k, v in rows[-1].items() if k.endswith(("_mb", "modules"))}, flush=True)
    report = {"machine": machine(), "rows": rows}
    path = write_result(args.out, report)
    print(f"\n{report['machine']}\n{path}")
    print("| imported (cumulative) | RSS MB | USS MB | of it anonymous MB | modules |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['stage']} | {row['rss_mb']} | {row['uss_mb']} | {row['anonymous_mb']} | {row['modules']} |")
    adds = next((row["openai_layer_adds"] for row in rows if "openai_layer_adds" in row), [])
    print("vLLM's OpenAI layer adds, by package:", ", ".join(f"{name} {count}" for name, count in adds))


if __name__ == "__main__":
    main()
