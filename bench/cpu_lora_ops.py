"""Micro-benchmark of the CPU LoRA ops: vLLM's reference (per-token gather) versus
adapterserve's (dense for small batches, grouped for large ones), across token counts,
4 and 16 adapters, rank 8: shrink 576 -> 8 and expand 8 -> 1536 (SmolLM2's up_proj).
Reproduce with:

    .venv/bin/python -m bench.cpu_lora_ops

Writes bench/results/cpu_lora_ops.json and prints the table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


from vllm.lora.ops.torch_ops import lora_ops as reference  # noqa: E402

from adapterserve.engine_plugins.cpu_lora import ops as grouped  # noqa: E402

HIDDEN, OUT, RANK = 576, 1536, 8


def timed(function, repeats: int) -> float:
    function()  # warm-up
    began = time.perf_counter()
    for _ in range(repeats):
        function()
    return 1000 * (time.perf_counter() - began) / repeats


def main() -> None:
    torch.set_num_threads(1)  # as vLLM's CPU worker runs
    rows = []
    for adapters in (4, 16):
        for tokens in (1, 16, 32, 64, 128, 256, 1024, 2048):
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(tokens, HIDDEN).to(dtype)
                a = torch.randn(adapters, 1, RANK, HIDDEN).to(dtype)
                b = torch.randn(adapters, 1, OUT, RANK).to(dtype)
                idx = torch.arange(tokens) % adapters
                shrunk = torch.zeros(tokens, RANK, dtype=dtype)
                out = torch.zeros(tokens, OUT, dtype=dtype)
                repeats = 50 if tokens <= 256 else 3
                row = {"adapters": adapters, "tokens": tokens, "dtype": str(dtype).split(".")[1]}
                for name, module in (("reference", reference), ("adapterserve", grouped)):
                    row[f"{name}_shrink_ms"] = round(timed(lambda: module.bgmv_shrink(x, a, shrunk, idx, 1.0), repeats), 3)
                    row[f"{name}_expand_ms"] = round(timed(lambda: module.bgmv_expand(shrunk, b, out, idx, True), repeats), 3)
                row["speedup"] = round(
                    (row["reference_shrink_ms"] + row["reference_expand_ms"]) / (row["adapterserve_shrink_ms"] + row["adapterserve_expand_ms"]), 2
                )
                rows.append(row)
                print(row, flush=True)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "cpu_lora_ops.json").write_text(json.dumps({"hidden": HIDDEN, "out": OUT, "rank": RANK, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
