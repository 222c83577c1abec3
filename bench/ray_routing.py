"""Ray Serve: adapter-affine routing versus Ray's default routing, and the cost of the Ray hop.

1. Routing. Two engine replicas, 8 LoRA adapters, each replica's CPU cache holding 4
   (`--max-cpu-loras 4`, so one replica cannot hold them all and two can between them).
   The same workload (streamed chats spread over the 8 adapters) with the adapter's name as
   Ray Serve's multiplexed model id (`affine`, the default) and without it
   (`--no-ray-adapter-affinity`: Ray's default balancing). Reported: adapter loads into the
   engines per 100 requests (counted in the engines' workers, summed over the replicas),
   TTFT p50/p99 and throughput.
2. The Ray hop: one replica through Ray Serve versus the plain server, same settings, same
   workload (base only, and 3 adapters mixed).

Reproduce with (an idle machine; a local Ray cluster is started on free ports and stopped):

    .venv/bin/python -m bench.ray_routing [--requests 96 --concurrency 8 --max-tokens 16] [--rounds 2]

Writes bench/results/ray_routing.json (with this machine's CPU) and prints the tables.
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


from bench.common import machine  # noqa: E402
from bench.common import make_store, mean_row  # noqa: E402

from adapterserve.compare.workload import run_workload  # noqa: E402
from adapterserve.config import load_settings  # noqa: E402
from adapterserve.base_model import resolve_base_model  # noqa: E402
from adapterserve.server_process import RayCluster, ServerProcess  # noqa: E402
from adapterserve.training.demo import build_demo_adapters, demo_store  # noqa: E402

ADAPTERS = 8
CACHE = 4  # adapters one replica's engine holds (max_cpu_loras)
REFRESH_S = 2.0


def common_flags(store: Path) -> list[str]:
    return ["--adapter-dirs", str(store), "--no-demo-adapters", "--max-cpu-loras", str(CACHE),
            "--metrics-refresh-s", str(REFRESH_S), "--adapter-scan-interval-s", "0"]


def lora_loads(url: str) -> float:
    """LoRA adapter loads so far, summed over the engines (and replicas) of the server."""
    total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=60).text):
        if family.name == "adapterserve_adapter_loads":
            total += sum(s.value for s in family.samples if s.name.endswith("_total") and s.labels.get("kind") == "lora")
    return total


async def settled_loads(url: str) -> float:
    await asyncio.sleep(2.5 * REFRESH_S)  # the engines' counts are read every REFRESH_S
    return lora_loads(url)


def ray_server(cluster: RayCluster, store: Path, replicas: int, extra: list[str], log: Path) -> ServerProcess:
    server = ServerProcess(
        ["--ray", "--ray-address", cluster.address, "--replicas", str(replicas), *common_flags(store), *extra], log,
    ).start(timeout=900)
    # /health is 200 once one replica is up: wait for all of them
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        engines = httpx.get(f"{server.url}/health", timeout=30).json().get("engines", {})
        if len({name.split("/")[0] for name, state in engines.items() if state == "ok"}) >= replicas:
            return server
        time.sleep(2)
    server.stop()
    raise TimeoutError("replicas not up")


async def routing(url: str, names: list[str], args, label: str) -> dict:
    await run_workload(url + "/v1", names, len(names), len(names), 2, "warm-up")  # each adapter placed once
    rows, loads = [], []
    for _ in range(args.rounds):
        before = await settled_loads(url)
        result = await run_workload(url + "/v1", names, args.requests, args.concurrency, args.max_tokens, label)
        after = await settled_loads(url)
        rows.append(result.row())
        loads.append(100 * (after - before) / args.requests)
        print(label, result.row(), f"loads/100 requests {loads[-1]:.1f}", flush=True)
    return {**mean_row(label, rows), "adapter_loads_per_100_requests": round(sum(loads) / len(loads), 1),
            "rounds_loads_per_100_requests": [round(x, 1) for x in loads]}


async def hop(url: str, base: str, names: list[str], args, label: str) -> list[dict]:
    await run_workload(url + "/v1", [base], 4, 4, 8, "warm-up")
    scenarios = [("base only", [base]), ("3 adapters", names[:3])]
    rounds: dict[str, list[dict]] = {s: [] for s, _ in scenarios}
    for _ in range(args.rounds):
        for scenario, models in scenarios:
            result = await run_workload(url + "/v1", models, args.hop_requests, args.hop_concurrency, args.hop_max_tokens, scenario)
            rounds[scenario].append(result.row())
            print(label, result.row(), flush=True)
    return [{**mean_row(s, rows), "server": label} for s, rows in rounds.items()]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--hop-requests", type=int, default=48)
    parser.add_argument("--hop-concurrency", type=int, default=16)
    parser.add_argument("--hop-max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ray_routing.json")
    args = parser.parse_args()

    settings = load_settings()
    base_path = resolve_base_model(None, settings.models_dir)
    build_demo_adapters(settings.demo_recipes_dir, settings.cache_dir, base_path)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = root / "store"
        store.mkdir()
        names = make_store(demo_store(settings.cache_dir, base_path), store, ADAPTERS)
        cluster = RayCluster(root / "ray.log", num_cpus=2).start()
        results: dict = {"machine": machine(), "routing": [], "hop": []}
        try:
            for label, extra in (("affine", []), ("ray default", ["--no-ray-adapter-affinity"])):
                server = ray_server(cluster, store, 2, extra, root / f"{label}.log")
                try:
                    results["routing"].append(await routing(server.url, names, args, label))
                finally:
                    server.stop()
            server = ray_server(cluster, store, 1, [], root / "ray1.log")
            try:
                results["hop"] += await hop(server.url, base_path.name, names, args, "ray, 1 replica")
            finally:
                server.stop()
        finally:
            cluster.stop()
        plain = ServerProcess(common_flags(store), root / "plain.log").start()
        try:
            results["hop"] += await hop(plain.url, base_path.name, names, args, "plain server")
        finally:
            plain.stop()
    results["command"] = "python bench/ray_routing.py " + " ".join(sys.argv[1:])
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["machine"]))
    print("| routing | loads / 100 requests | TTFT p50 ms | TTFT p99 ms | tok/s |\n|---|---|---|---|---|")
    for row in results["routing"]:
        print(f"| {row['scenario']} | {row['adapter_loads_per_100_requests']} | {row['ttft_p50_ms']} | {row['ttft_p99_ms']} | {row['tokens_per_second']} |")
    print("| server | workload | tok/s | TTFT p50 ms | TTFT p99 ms |\n|---|---|---|---|---|")
    for row in results["hop"]:
        print(f"| {row['server']} | {row['scenario']} | {row['tokens_per_second']} | {row['ttft_p50_ms']} | {row['ttft_p99_ms']} |")


if __name__ == "__main__":
    asyncio.run(main())
