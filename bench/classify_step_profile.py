"""Where a classification step's time goes: one head adapter over the base against the
dedicated classifier merged from it, both vLLM pooling engines in this process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`, no API server), configured as `adapterserve serve`
configures them (compiled, 16 slots fitted to rank 8, `dtype auto`).

The two engines take turns, `--rounds` times in the order A B C, C B A, each turn `--requests`
classifications of `--batch` texts at a time (1: one request per step, where the fixed
cost of a step weighs most); the third turn (C) is the head's engine classifying with
the base's own classifier, no adapter in the step: what enabling LoRA costs a step where
every LoRA layer is idle. (With the compiled graph's C++ op, `lora_op.cpp`, a layer call
the op repeats without Python is not counted among the LoRA layer calls.) Served, the API process, the client and the machine's drift
blur a few percent (bench/RESULTS.md); here both engines meet the same moments, and each
step's phases in the model runner are timed (`execute_model`, the forward pass, input
preparation with the adapters' mapping, pooling with the heads), and every LoRA layer
call of the fused wrapper (`punica.apply_layer`: applied, or found with nothing to add).

Reproduce with:

    .venv/bin/python -m bench.classify_step_profile [--batch 1] [--rounds 10] [--out classify_step_profile.json]

Writes bench/results/<out> (with the CPU) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engines in this process, where the timers are

from bench.classify_throughput import head_and_merged  # noqa: E402
from bench.common import machine  # noqa: E402

from adapterserve.compare.workload import TEXTS  # noqa: E402
from adapterserve.config import load_settings  # noqa: E402
from adapterserve.dtypes import resolve_dtype  # noqa: E402
from adapterserve.base_model import resolve_base_model  # noqa: E402
from adapterserve.training.demo import build_demo_adapters, demo_store  # noqa: E402

HEAD = "sentiment"
PHASES = ["execute_model", "_model_forward", "_prepare_inputs", "_pool"]


def model_runner(llm):
    executor = llm.llm_engine.engine_core.engine_core.model_executor
    worker = executor.driver_worker
    return getattr(worker, "worker", worker).model_runner


def time_phases(runner, seconds: dict, turn: dict) -> None:
    """Wrap the runner's phase methods (instance attributes) to add up their seconds, under
    the name of the turn running (`turn["name"]`: two turns may share an engine)."""
    for name in PHASES:
        method = getattr(runner, name)

        def timed(*args, _method=method, _name=name, **kwargs):
            began = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                seconds[turn["name"]][_name] += time.perf_counter() - began

        setattr(runner, name, timed)


def time_lora_layers(calls: dict) -> None:
    """Count and time `punica.apply_layer` by outcome (applied, or nothing to add)."""
    from adapterserve.engine_plugins.cpu_lora import punica

    apply_layer = punica.apply_layer

    def timed(*args, **kwargs):
        began = time.perf_counter()
        applied = apply_layer(*args, **kwargs)
        entry = calls["applied" if applied else "nothing to add"]
        entry[0] += 1
        entry[1] += time.perf_counter() - began
        return applied

    punica.apply_layer = timed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=1, help="texts per classify call (one engine step)")
    parser.add_argument("--requests", type=int, default=64, help="classify calls per turn")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", default="classify_step_profile.json", help="file name under bench/results")
    args = parser.parse_args()

    from vllm import LLM
    from vllm.lora.request import LoRARequest

    settings = load_settings()
    base = resolve_base_model(None, settings.models_dir)
    build_demo_adapters(settings.demo_recipes_dir, settings.cache_dir, base, [HEAD])
    demo = demo_store(settings.cache_dir, base)
    with tempfile.TemporaryDirectory() as tmp:
        _, record, merged = head_and_merged(settings, base, demo, HEAD, Path(tmp))
    common = dict(runner="pooling", convert="classify", dtype=resolve_dtype("auto"), kv_cache_memory_bytes=256 << 20,
                  max_model_len=settings.max_model_len, max_num_seqs=settings.max_num_seqs)
    engines = {
        "head": (LLM(str(base), enable_lora=True, max_loras=16, max_lora_rank=8, max_cpu_loras=16,
                     hf_overrides={"num_labels": len(record.labels)}, max_lora_cls_labels=settings.max_cls_labels, **common),
                 LoRARequest(HEAD, 1, str(demo / HEAD))),
        "dedicated": (LLM(str(merged), **common), None),
    }
    # the LoRA engine on the base alone (no adapter in the step): what enabling LoRA costs
    # the step when every layer is idle, apart from the head's own work
    engines["lora engine, no adapter"] = (engines["head"][0], None)
    phases = {name: defaultdict(float) for name in engines}
    current = {"name": None}
    for name in ("head", "dedicated"):
        time_phases(model_runner(engines[name][0]), phases, current)
    layer_calls: dict[str, list] = defaultdict(lambda: [0, 0.0])
    time_lora_layers(layer_calls)
    latencies: dict[str, list[float]] = {name: [] for name in engines}

    def turn(name: str, requests: int, record: bool = True):
        llm, lora = engines[name]
        current["name"] = name
        for i in range(requests):
            texts = [TEXTS[(i * args.batch + j) % len(TEXTS)] for j in range(args.batch)]
            began = time.perf_counter()
            outputs = llm.classify(texts, lora_request=[lora] * args.batch if lora else None, use_tqdm=False)
            if record:
                latencies[name].append(time.perf_counter() - began)
        return outputs

    warm = {name: turn(name, 16, record=False) for name in engines}  # the head loaded into a slot, graphs warm
    probabilities = {name: [round(p, 4) for p in out[0].outputs.probs] for name, out in warm.items() if name in ("head", "dedicated")}
    for name in engines:
        phases[name].clear()
    layer_calls.clear()
    for round_ in range(args.rounds):
        for name in list(engines) if round_ % 2 == 0 else list(engines)[::-1]:  # A B C, C B A
            turn(name, args.requests)
    median_ms = {name: round(statistics.median(v) * 1000, 2) for name, v in latencies.items()}
    report = {
        "machine": machine(),
        "workload": {**vars(args), "dtype": resolve_dtype("auto"), "head": HEAD},
        "probabilities_first_text": probabilities,
        "median_ms_per_call": median_ms,
        "head_speed_vs_dedicated": round(median_ms["dedicated"] / median_ms["head"], 3),
        "lora_engine_no_adapter_speed_vs_dedicated": round(median_ms["dedicated"] / median_ms["lora engine, no adapter"], 3),
        "ms_per_call_by_phase": {name: {k: round(v / len(latencies[name]) * 1000, 3) for k, v in p.items()} for name, p in phases.items()},
        "lora_layer_calls_per_call": {k: {"calls": round(n / len(latencies["head"]), 1), "us_each": round(s / n * 1e6, 1)}
                                      for k, (n, s) in layer_calls.items()},
    }
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / args.out).write_text(json.dumps(report, indent=2))
    print(f"\n{report['machine']}\nfirst text's probabilities: {probabilities}")
    print(f"| engine | median ms per call | {' | '.join(PHASES)} (ms per call) |")
    print("|---|---|" + "---|" * len(PHASES))
    for name in engines:
        row = report["ms_per_call_by_phase"][name]
        print(f"| {name} | {median_ms[name]} | {' | '.join(str(row.get(p, '-')) for p in PHASES)} |")
    print(f"head adapter speed / dedicated: {report['head_speed_vs_dedicated']}")
    print(f"LoRA engine without adapter / dedicated: {report['lora_engine_no_adapter_speed_vs_dedicated']}")
    print(f"LoRA layer calls per classify call: {report['lora_layer_calls_per_call']}")


if __name__ == "__main__":
    main()
