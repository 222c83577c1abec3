"""Where the LoRA time goes inside the engine: vLLM's `LLM` in this process (no API server,
no engine-core process: `VLLM_ENABLE_V1_MULTIPROCESSING=0`), the fused CPU LoRA path of
the plugin, and every call of `punica.apply_layer` timed by form (the kernel, single adapter,
dense, grouped) and phase (decode: at most 16 tokens; prefill: more).

The workload of `bench/ab.py` without the server: 48 chats x 32 tokens (`ignore_eos`,
greedy), at most 16 sequences at a time, base-only then 1, 3 and 8 demo-adapter copies
(distinct adapters) mixed round-robin, `--rounds` times. The engine: `--dtype` (default
auto, as `adapterserve serve` resolves it on this CPU), 16 slots fitted to rank 8, eager.

Reproduce with:

    .venv/bin/python -m bench.lora_step_profile [--rounds 2] [--dtype auto] [--out lora_step_profile.json]

Writes bench/results/<out> (with the CPU) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the worker in this process, where the timer is

from bench.common import machine  # noqa: E402
from bench.common import DEMO  # noqa: E402

from adapterserve.compare.workload import PROMPTS  # noqa: E402
from adapterserve.config import load_settings  # noqa: E402
from adapterserve.dtypes import resolve_dtype  # noqa: E402
from adapterserve.base_model import resolve_base_model  # noqa: E402
from adapterserve.training.demo import build_demo_adapters, demo_store  # noqa: E402

DECODE_MAX_TOKENS = 16  # the batch: at most 16 sequences, one token each in a decode step


class LayerTimer:
    """Wraps `punica.apply_layer`: calls and seconds per (form, phase)."""

    def __init__(self) -> None:
        from adapterserve.engine_plugins.cpu_lora import punica

        self.calls: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])
        apply_layer = punica.apply_layer

        def timed(plan, y, x, *args, **kwargs):
            began = time.perf_counter()
            applied = apply_layer(plan, y, x, *args, **kwargs)
            form = plan.form
            phase = "decode" if x.shape[0] <= DECODE_MAX_TOKENS else "prefill"
            entry = self.calls[(form, phase)]
            entry[0] += 1
            entry[1] += time.perf_counter() - began
            return applied

        punica.apply_layer = timed

    def take(self) -> dict[str, dict]:
        taken = {
            f"{form} {phase}": {"calls": int(n), "seconds": round(s, 3), "us_per_call": round(s / n * 1e6, 1)}
            for (form, phase), (n, s) in sorted(self.calls.items())
        }
        self.calls.clear()
        return taken


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 3, 8])
    parser.add_argument("--dtype", default="auto", help="auto (resolved as the server does), float32 or bfloat16")
    parser.add_argument("--out", default="lora_step_profile.json", help="file name under bench/results")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    settings = load_settings()
    base = resolve_base_model(None, settings.models_dir)
    build_demo_adapters(settings.demo_recipes_dir, settings.cache_dir, base, DEMO)
    demo = demo_store(settings.cache_dir, base)
    llm = LLM(
        str(base), enable_lora=True, max_loras=16, max_lora_rank=8, enforce_eager=True, dtype=resolve_dtype(args.dtype),
        kv_cache_memory_bytes=256 << 20, max_model_len=4096, max_num_seqs=16,
    )
    timer = LayerTimer()  # after the engine is built: the plugin is installed by then
    tokenizer = llm.get_tokenizer()
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], tokenize=False, add_generation_prompt=True)
        for i in range(48)
    ]
    sampling = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)

    def requests(count: int):
        """48 requests round-robin over `count` distinct adapters (copies of the demo ones)."""
        if count == 0:
            return None
        return [
            LoRARequest(f"{DEMO[i % count % len(DEMO)]}-{i % count:02d}", 1 + i % count, str(demo / DEMO[i % count % len(DEMO)]))
            for i in range(48)
        ]

    llm.generate(prompts[:8], sampling, lora_request=requests(3)[:8], use_tqdm=False)  # warm-up, adapters loaded
    timer.take()
    rows = []
    for round_ in range(args.rounds):
        for count in [0, *args.adapters]:
            began = time.perf_counter()
            llm.generate(prompts, sampling, lora_request=requests(count), use_tqdm=False)
            seconds = time.perf_counter() - began
            rows.append({"round": round_, "adapters": count, "seconds": round(seconds, 2),
                         "tokens_per_second": round(48 * 32 / seconds, 1), "apply_layer": timer.take()})
            print(rows[-1], flush=True)
    report = {"machine": machine(), "workload": {**vars(args), "dtype": resolve_dtype(args.dtype)}, "rows": rows}
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / args.out).write_text(json.dumps(report, indent=2))
    print(f"\n{report['machine']}")
    print("| adapters | tok/s per round | vs base (same round) | LoRA layer calls s per round | decode us per call |")
    print("|---|---|---|---|---|")
    for count in [0, *args.adapters]:
        mine = [r for r in rows if r["adapters"] == count]
        bases = [r for r in rows if r["adapters"] == 0]
        ratios = [m["tokens_per_second"] / b["tokens_per_second"] for m, b in zip(mine, bases)]
        layer_s = [sum(v["seconds"] for v in m["apply_layer"].values()) for m in mine]
        decode = [v["us_per_call"] for m in mine for k, v in m["apply_layer"].items() if k.endswith("decode")]
        print(f"| {count} | {', '.join(str(m['tokens_per_second']) for m in mine)} | {', '.join(f'{r:.2f}' for r in ratios)} "
              f"| {', '.join(f'{s:.2f}' for s in layer_s)} | {', '.join(f'{d:.0f}' for d in decode)} |")


if __name__ == "__main__":
    main()
