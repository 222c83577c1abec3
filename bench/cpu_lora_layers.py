"""Micro-benchmark of one decoder layer's LoRA work on the CPU, as vLLM runs it: the
four LoRA linear layers of a SmolLM2-135M layer (q/k/v, o, gate/up, down; hidden 576,
intermediate 1536), rank 8, 16 slots, in the model dtype given (fp32 by default; bf16 as
`dtype auto` serves on CPUs with AVX512-bf16 or AMX), `--threads` torch threads (1 by default; vLLM's CPU
worker runs one per core it binds), through `add_lora_linear` of

- vLLM's `PunicaWrapperCPU` with its reference ops (vLLM as shipped), and
- adapterserve's `FusedPunicaWrapperCPU` on the fused slot layout, in the form its plan
  picks, and forced dense and forced grouped (how `SPAN_DENSE_MAX_WORK` and
  `GROUPED_DTYPES` were chosen);
  for a bf16 model also with the slots laid out in float32 (`f32_slots_ms`: the path then
  computes in float32; set by hand with `ADAPTERSERVE_LORA_SLOT_DTYPE=float32`), and
  through the token-by-token kernel of `lora_kernel.cpp` (`kernel_ms`: how
  `punica.KERNEL_MAX_TOKENS` was chosen per dtype).

The mapping is made once per case (as vLLM does once per step), tokens spread
round-robin over the adapters. Reproduce with:

    .venv/bin/python -m bench.cpu_lora_layers [--dtype bfloat16] [--threads 1] [--out NAME.json]

Writes bench/results/cpu_lora_layers[-bfloat16].json (with the CPU) and prints the rows.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch


from vllm.lora.layers.utils import LoRAMapping  # noqa: E402
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU  # noqa: E402

from adapterserve.engine_plugins.cpu_lora import punica  # noqa: E402
from adapterserve.engine_plugins.cpu_lora.layout import lay_out  # noqa: E402

HIDDEN, INTERMEDIATE, RANK, SLOTS = 576, 1536, 8, 16
# (input size, output slices) of the four LoRA linear layers of one decoder layer
LAYERS = [(HIDDEN, (576, 192, 192)), (HIDDEN, (HIDDEN,)), (HIDDEN, (INTERMEDIATE, INTERMEDIATE)), (INTERMEDIATE, (HIDDEN,))]


def make_layers(fused: bool, seed: int, dtype=torch.float32, slot_dtype=None) -> list[SimpleNamespace]:
    generator = torch.Generator().manual_seed(seed)
    layers = []
    for in_features, slices in LAYERS:
        layer = SimpleNamespace(
            lora_a_stacked=tuple(torch.zeros(SLOTS, 1, RANK, in_features, dtype=dtype) for _ in slices),
            lora_b_stacked=tuple(torch.zeros(SLOTS, 1, out, RANK, dtype=dtype) for out in slices),
            output_slices=slices,
            in_features=in_features,
        )
        if fused:
            lay_out(layer, dtype=slot_dtype)
        for a, b in zip(layer.lora_a_stacked, layer.lora_b_stacked):
            a.copy_((torch.randn(a.shape, generator=generator) / 10).to(dtype))
            b.copy_((torch.randn(b.shape, generator=generator) / 10).to(dtype))
        layers.append(layer)
    return layers


def wrapper(cls, tokens: int, adapters: int):
    w = cls(max_num_batched_tokens=max(tokens, 256), max_batches=max(tokens, 256), device="cpu")
    ids = [1 + t % adapters for t in range(tokens)]
    mapping = LoRAMapping(tuple(ids), tuple(ids), is_prefill=tokens > 64)
    w.update_metadata(mapping, list(range(1, SLOTS + 1)), SLOTS + 1, 49152)
    return w


def run_layers(w, layers, inputs) -> list[torch.Tensor]:
    outputs = []
    for layer, x in zip(layers, inputs):
        y = torch.zeros(x.shape[0], sum(layer.output_slices), dtype=x.dtype)
        w.add_lora_linear(y, x, layer.lora_a_stacked, layer.lora_b_stacked, 1.0, layer.output_slices)
        outputs.append(y)
    return outputs


def timed(function, repeats: int) -> float:
    function()  # warm-up (the fused wrapper makes its plan here)
    began = time.perf_counter()
    for _ in range(repeats):
        function()
    return 1000 * (time.perf_counter() - began) / repeats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the kernel uses one)")
    parser.add_argument("--out", help="file name under bench/results (default: by dtype)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    reference_layers, fused_layers = make_layers(False, 0, dtype), make_layers(True, 0, dtype)
    f32_layers = make_layers(True, 0, dtype, torch.float32) if dtype != torch.float32 else None
    tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    rows = []
    for adapters in (1, 2, 3, 4, 8, 16):
        for tokens in (1, 16, 32, 64, 128, 256, 1024):
            if adapters > tokens:
                continue
            inputs = [torch.randn(tokens, layer.in_features).to(dtype) for layer in reference_layers]
            repeats = 200 if tokens <= 64 else 20 if tokens <= 256 else 3
            reference = wrapper(PunicaWrapperCPU, tokens, adapters)
            fused = wrapper(punica.FusedPunicaWrapperCPU, tokens, adapters)
            expected, got = run_layers(reference, reference_layers, inputs), run_layers(fused, fused_layers, inputs)
            for e, g in zip(expected, got):
                torch.testing.assert_close(g, e, **tolerance)
            row = {"adapters": adapters, "tokens": tokens}
            saved_limits = punica.KERNEL_MAX_TOKENS, punica.KERNEL_FROM_SLOTS
            row["vllm_ms"] = round(timed(lambda: run_layers(reference, reference_layers, inputs), repeats), 3)
            row["adapterserve_ms"] = round(timed(lambda: run_layers(fused, fused_layers, inputs), repeats), 3)
            if f32_layers is not None:
                f32 = wrapper(punica.FusedPunicaWrapperCPU, tokens, adapters)
                for e, g in zip(expected, run_layers(f32, f32_layers, inputs)):
                    torch.testing.assert_close(g, e, **tolerance)
                row["f32_slots_ms"] = round(timed(lambda: run_layers(f32, f32_layers, inputs), repeats), 3)
            punica.KERNEL_MAX_TOKENS = {dtype: 1 << 30}
            kernel = wrapper(punica.FusedPunicaWrapperCPU, tokens, adapters)
            for e, g in zip(expected, run_layers(kernel, fused_layers, inputs)):
                torch.testing.assert_close(g, e, **tolerance)
            assert kernel._plan.slot_of is not None
            row["kernel_ms"] = round(timed(lambda: run_layers(kernel, fused_layers, inputs), repeats), 3)
            punica.KERNEL_MAX_TOKENS, punica.KERNEL_FROM_SLOTS = {}, {}
            plan = fused._plan
            row["form"] = "kernel" if plan.slot_of is not None else "one adapter" if plan.single is not None else "dense" if plan.mask is not None else "grouped"
            for form, limit in (("dense", 10**9), ("grouped", 0)):
                if adapters > 1:
                    saved = punica.SPAN_DENSE_MAX_WORK, punica.GROUPED_DTYPES
                    punica.SPAN_DENSE_MAX_WORK, punica.GROUPED_DTYPES = limit, (dtype,)
                    forced = wrapper(punica.FusedPunicaWrapperCPU, tokens, adapters)
                    row[f"{form}_ms"] = round(timed(lambda: run_layers(forced, fused_layers, inputs), repeats), 3)
                    punica.SPAN_DENSE_MAX_WORK, punica.GROUPED_DTYPES = saved
            punica.KERNEL_MAX_TOKENS, punica.KERNEL_FROM_SLOTS = saved_limits
            row["speedup"] = round(row["vllm_ms"] / row["adapterserve_ms"], 2)
            rows.append(row)
            print(row, flush=True)
    from bench.common import machine

    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    name = args.out or ("cpu_lora_layers.json" if dtype == torch.float32 else f"cpu_lora_layers-{args.dtype}.json")
    (out / name).write_text(json.dumps(
        {"machine": machine(), "dtype": args.dtype, "threads": args.threads, "hidden": HIDDEN, "intermediate": INTERMEDIATE, "rank": RANK,
         "slots": SLOTS, "rows": rows}, indent=2,
    ) + "\n")


if __name__ == "__main__":
    main()
