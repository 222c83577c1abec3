"""Classification requests per second with 1 and 4 head adapters over the one base,
versus one transformers+peft classifier switching heads per request. Reproduce with:

    .venv/bin/python bench/classify_throughput.py [--requests 64 --concurrency 8]

The 4 heads are the two demo heads and copies of them under other names. Writes
bench/results/classify_throughput.json and prints the table.
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

from adapterserve.compare.workload import TEXTS  # noqa: E402
from adapterserve.config import load_settings  # noqa: E402
from adapterserve.models import resolve_base_model  # noqa: E402
from adapterserve.process import ServerProcess  # noqa: E402
from adapterserve.training.demo import build_demo_adapters, demo_store  # noqa: E402

HEADS = ["sentiment", "topic"]


async def served_rps(url: str, models: list[str], requests: int, concurrency: int) -> float:
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=300) as http:
        async def one(i: int) -> None:
            async with gate:
                body = {"model": models[i % len(models)], "input": TEXTS[i % len(TEXTS)]}
                (await http.post(f"{url}/v1/classify", json=body)).raise_for_status()

        await one(0)  # warm-up
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


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    settings = load_settings()
    base_path = resolve_base_model(None, settings.models_dir)
    build_demo_adapters(settings.demo_recipes_dir, settings.cache_dir, base_path, HEADS)
    demo = demo_store(settings.cache_dir, base_path)
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
