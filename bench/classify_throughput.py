"""Classification requests per second with 1 and 4 head adapters over the one base,
versus one transformers+peft classifier switching heads per request. Reproduce with:

    .venv/bin/python -m bench.classify_throughput [--requests 256 --concurrency 8]

The 4 heads are the two demo heads and copies of them under other names. Writes
bench/results/classify_throughput.json and prints the table.

    .venv/bin/python -m bench.classify_throughput --vs-dedicated [--rounds 8] [--out NAME.json]

instead compares one head over the shared base (`adapterserve serve`, the demo head
`sentiment` only) with a dedicated classifier engine serving the full model merged from
it (`adapterserve serve --mode dedicated`); writes bench/results/classify_vs_dedicated.json
(or --out). Both servers run side by side and take turns, in the order A B, B A per
round: one idles while the other is measured. (Until the eighteenth session each round
started the servers one after the other; the machine's speed drifted by a third between
rounds, more than the difference measured.)

Each server first answers a burst of warm-up requests (its adapter loaded into a slot, every
batch size seen once); 256 requests take ~5-10 s: 64 (~2 s) moved one run by a third.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path

import httpx


from adapterserve.compare.workload import TEXTS  # noqa: E402
from adapterserve.config import load_settings  # noqa: E402
from adapterserve.base_model import resolve_base_model  # noqa: E402
from adapterserve.server_process import ServerProcess  # noqa: E402
from adapterserve.training.demo import build_demo_adapters, demo_store  # noqa: E402

HEADS = ["sentiment", "topic"]


async def served_rps(url: str, models: list[str], requests: int, concurrency: int) -> float:
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=300) as http:
        async def one(i: int) -> None:
            async with gate:
                body = {"model": models[i % len(models)], "input": TEXTS[i % len(TEXTS)]}
                (await http.post(f"{url}/v1/classify", json=body)).raise_for_status()

        await asyncio.gather(*(one(i) for i in range(2 * concurrency)))  # warm-up
        began = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(requests)))
        return requests / (time.perf_counter() - began)


def naive_rps(base_path: Path, heads: dict[str, Path], requests: int) -> float:
    import torch
    from peft import PeftModel

    from adapterserve.training.heads import load_classifier

    labels = {name: json.loads((path / "labels.json").read_text())["labels"] for name, path in heads.items()}
    # one model per label count: transformers' score layer has a fixed size
    models = {}
    for name, path in heads.items():
        key = len(labels[name])
        if key not in models:
            model, tokenizer = load_classifier(base_path, labels[name])
            models[key] = PeftModel.from_pretrained(model, path, adapter_name=name).eval()
        else:
            models[key].load_adapter(path, adapter_name=name)
    names = list(heads)
    began = time.perf_counter()
    for i in range(requests):
        name = names[i % len(names)]
        model = models[len(labels[name])]
        model.set_adapter(name)
        with torch.no_grad():
            model(**tokenizer([TEXTS[i % len(TEXTS)]], return_tensors="pt"))
    return requests / (time.perf_counter() - began)


def head_and_merged(settings, base_path: Path, demo: Path, head: str, tmp: Path):
    """A store in `tmp` holding only the demo head `head`, its registry record, and the
    full classifier merged from it (cached): what both sides of a head-versus-dedicated
    comparison serve."""
    from adapterserve.registry.store import open_registry
    from adapterserve.training.merge import merge_adapters, merged_store

    store = tmp / "store"
    store.mkdir()
    shutil.copytree(demo / head, store / head)
    record = open_registry(settings, [store]).adapters[head]
    merged = merge_adapters(base_path, [record], merged_store(settings.cache_dir, base_path))[head]
    return store, record, merged


async def versus_dedicated(args, settings, base_path: Path, demo: Path) -> dict:
    """One head: shared mode against a dedicated engine on the merged model, A B B A."""
    from bench.common import machine

    head = HEADS[0]
    with tempfile.TemporaryDirectory() as tmp:
        store, _, merged = head_and_merged(settings, base_path, demo, head, Path(tmp))
        flags = {
            "shared": ["--adapter-dirs", str(store), "--no-demo-adapters"],
            "dedicated": ["--mode", "dedicated", "--dedicated-models", str(merged)],
        }
        results: dict[str, list[float]] = {mode: [] for mode in flags}
        servers = {mode: ServerProcess(flags[mode], Path(tmp) / f"{mode}.log").launch() for mode in flags}
        try:
            for server in servers.values():
                server.wait_healthy()
            for i in range(args.rounds):
                for mode in list(flags) if i % 2 == 0 else list(flags)[::-1]:
                    results[mode].append(round(await served_rps(servers[mode].url, [head], args.requests, args.concurrency), 1))
                    print(mode, results[mode][-1], flush=True)
        finally:
            for server in servers.values():
                server.stop()
    mean = {mode: round(sum(r) / len(r), 1) for mode, r in results.items()}
    ratios = sorted(s / d for s, d in zip(results["shared"], results["dedicated"]))
    return {"machine": machine(), "workload": vars(args), "head": head, "requests_per_second": results, "mean": mean,
            "shared_over_dedicated": {"of_means": round(mean["shared"] / mean["dedicated"], 3),
                                      "median_of_rounds": round(ratios[len(ratios) // 2], 3)}}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--vs-dedicated", action="store_true", help="one head: shared mode vs a dedicated engine")
    parser.add_argument("--rounds", type=int, default=8, help="with --vs-dedicated: rounds of A B / B A")
    parser.add_argument("--out", default="classify_vs_dedicated.json", help="with --vs-dedicated: file in bench/results")
    args = parser.parse_args()
    settings = load_settings()
    base_path = resolve_base_model(None, settings.models_dir)
    build_demo_adapters(settings.demo_recipes_dir, settings.cache_dir, base_path, HEADS)
    demo = demo_store(settings.cache_dir, base_path)
    if args.vs_dedicated:
        report = await versus_dedicated(args, settings, base_path, demo)
        (Path(__file__).parent / "results" / args.out).write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2))
        return
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        store.mkdir()
        four = []
        for i in range(4):
            name = f"{HEADS[i % 2]}-{i}"
            shutil.copytree(demo / HEADS[i % 2], store / name)
            four.append(name)
        server = ServerProcess(["--adapter-dirs", str(store), "--no-demo-adapters"], Path(tmp) / "server.log").start()
        try:
            one_head = await served_rps(server.url, four[:1], args.requests, args.concurrency)
            four_heads = await served_rps(server.url, four, args.requests, args.concurrency)
        finally:
            server.stop()
        naive_one = naive_rps(base_path, {four[0]: store / four[0]}, args.requests)
        naive_four = naive_rps(base_path, {name: store / name for name in four}, args.requests)
    report = {
        "workload": vars(args),
        "served_1_head_rps": round(one_head, 1),
        "served_4_heads_rps": round(four_heads, 1),
        "naive_1_head_rps": round(naive_one, 1),
        "naive_4_heads_rps": round(naive_four, 1),
    }
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "classify_throughput.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
