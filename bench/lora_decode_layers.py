"""A decode step's LoRA layers on the CPU at hand: alone, cold, between the base's matmuls, against their bytes.

A decode step of 16 sequences over N distinct adapters must read every one of those
adapters' weights in every LoRA layer, whatever the form applying them: N x (rank x (in +
out) per module, per layer) bytes, while the base's weights (270 MB in bf16 for
SmolLM2-135M) pass through the caches between two uses of a layer's slots. This bench
applies one decode step's LoRA work over every LoRA layer of the base (its real shapes,
rank 8, 16 slots, the slots of each layer in their own memory) with the form the plan
chooses for it (`punica.make_step_plan`: the autotuner's choice, or the hand rules'),
through `punica.apply_layer` from Python as the eager engine calls it (the compiled
engine's C++ op calls the same kernel without Python), and times it

- warm: the same step again at once (the adapters' bytes in the caches, as the
  autotuner measures);
- cold: after reading a buffer the size of the base's weights;
- between matmuls: each LoRA layer right after its base layer's own matmul (oneDNN, the
  base's dtype, random weights of the base's shapes), as in a served step; the LoRA time
  is that step's time less the same step without LoRA;

beside this machine's read bandwidth with the engine's threads. (The compiled engine
calls the kernel from its C++ op, without Python's ~10 us a call: `bench.worker_profile`
measures the served step itself.)

`--against REV` builds the kernel of another commit (`git show REV:...lora_kernel.cpp`, the
same ABI) beside this one and times both in the same process, each measurement of one
taken right after the same of the other, over more repeats: a change of the kernel
measured without a server's noise, in one run.

    .venv/bin/python -m bench.lora_decode_layers [--against REV] [--out lora_decode_layers.json]

Writes bench/results/<out> (with the CPU) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bench.common import demo_adapters, machine, write_result

TOKENS = 16  # a decode step at the bench's concurrency
ADAPTERS = (1, 2, 4, 8, 16)
SLOTS = 16  # adapterserve's default --max-loras
RANK = 8  # the demo adapters' rank
REPEATS = 15


def layer_shapes(config: dict, dtype: str):
    """The LoRA layers of one decoder layer, as the fused layout holds them (vLLM merges
    q, k, v into one layer of three slices and gate, up into one of two)."""
    from adapterserve.engine_plugins.cpu_lora.autotune import Shape

    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    kv = config.get("num_key_value_heads", config["num_attention_heads"]) * head_dim
    return [Shape(hidden, (config["num_attention_heads"] * head_dim, kv, kv), RANK, SLOTS, dtype),
            Shape(config["num_attention_heads"] * head_dim, (hidden,), RANK, SLOTS, dtype),
            Shape(hidden, (inter, inter), RANK, SLOTS, dtype),
            Shape(inter, (hidden,), RANK, SLOTS, dtype)]


def read_bandwidth_gbs(buffer: torch.Tensor) -> float:
    """GB/s of a float32 sum over `buffer` (larger than the caches), the median of 5."""
    buffer.sum()
    times = []
    for _ in range(5):
        began = time.perf_counter()
        buffer.sum()
        times.append(time.perf_counter() - began)
    return buffer.numel() * buffer.element_size() / statistics.median(times) / 1e9


def kernel_of_commit(rev: str):
    """The kernel as built from commit `rev`'s source (the same flags, its own cache key)."""
    import ctypes
    import hashlib
    import subprocess
    from pathlib import Path

    from adapterserve.engine_plugins.cpu_lora import native

    relative = native.SOURCE.resolve().relative_to(Path(__file__).resolve().parents[1])
    source = subprocess.run(["git", "show", f"{rev}:{relative}"], capture_output=True, text=True, check=True).stdout
    # kept beside the built kernels under a name of its content, so a second run reuses the build
    path = native.owned_directory(native.kernel_dir()) / f"source-{hashlib.sha256(source.encode()).hexdigest()[:16]}.cpp"
    path.write_text(source)
    own, native.SOURCE = native.SOURCE, path
    try:
        library = ctypes.CDLL(str(native.built_kernel_path()))
    finally:
        native.SOURCE = own
    library.adapterserve_lora_kernel_version.restype = ctypes.c_int64
    if library.adapterserve_lora_kernel_version() != native.ABI_VERSION:
        raise SystemExit(f"{rev}'s kernel has another ABI than this one's")
    return native.LoraKernel(library, native.threads_from_env())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="auto", help="auto (as the server resolves it here), float32 or bfloat16")
    parser.add_argument("--against", metavar="REV", help="also time this commit's kernel, interleaved with this one's")
    parser.add_argument("--out", default="lora_decode_layers.json", help="file name under bench/results")
    args = parser.parse_args()

    from adapterserve.dtypes import resolve_dtype
    from adapterserve.engine_plugins.cpu_lora import autotune, measurement, punica
    from adapterserve.engine_plugins.cpu_lora.native import load_kernel

    dtype = resolve_dtype(args.dtype)
    base, _ = demo_adapters()
    config = json.loads((base / "config.json").read_text())
    shapes = layer_shapes(config, dtype)
    kernel = load_kernel()
    kernels = {"this": kernel} | ({args.against: kernel_of_commit(args.against)} if args.against else {})
    generator = torch.Generator().manual_seed(0)
    layers = []  # every decoder layer's LoRA layers, each with its own slots (and each kernel's arguments)
    for _ in range(config["num_hidden_layers"]):
        for shape in shapes:
            slots = measurement.synthetic_slots(shape, generator)
            layers.append((shape, slots, {name: punica.kernel_args(k, slots) for name, k in kernels.items()}))
    torch_dtype = getattr(torch, dtype)
    inputs = {s: (torch.randn(TOKENS, s.in_features, generator=generator).to(torch_dtype),
                  torch.zeros(TOKENS, sum(s.slices), dtype=torch_dtype)) for s in shapes}
    base_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    flush = torch.ones(base_bytes // 4, dtype=torch.float32)  # as many bytes as the base's weights
    bandwidth = read_bandwidth_gbs(flush)
    bytes_per_adapter = sum(RANK * (s.in_features * len(s.slices) + sum(s.slices)) for s in shapes) \
        * config["num_hidden_layers"] * torch.empty(0, dtype=torch_dtype).element_size()
    for shape in shapes:  # what the engine notes as it lays its layers out
        autotune.note_shape(shape)
    tuning = autotune.tuning_for(torch_dtype, kernel)  # the server's choice (kept per CPU, or measured now)

    weights = [torch.randn(sum(shape.slices), shape.in_features, generator=generator).to(torch_dtype) for shape, _, _ in layers]

    def one_step(plan, which: str = "this", base: bool = False, lora: bool = True, flushed: bool = False) -> float:
        if flushed:
            flush.sum()
        began = time.perf_counter()
        for (shape, slots, kernel_args), weight in zip(layers, weights):
            x, y = inputs[shape]
            if base:
                torch.nn.functional.linear(x, weight, out=y)
            if lora:
                punica.apply_layer(plan, y, x, slots, 1.0, shape.slices, kernel_args[which])
        return 1000 * (time.perf_counter() - began)

    def medians(plan, repeats: int, **step) -> dict[str, float]:
        """Each kernel's median, its measurements interleaved with the others'."""
        times = {name: [] for name in kernels}
        for _ in range(repeats):
            for name in kernels:
                times[name].append(one_step(plan, name, **step))
        return {name: statistics.median(t) for name, t in times.items()}

    repeats = REPEATS * (3 if args.against else 1)
    rows = []
    for adapters in ADAPTERS:
        indices = torch.arange(TOKENS) % adapters
        plan = punica.make_step_plan(indices, torch_dtype, kernel is not None, bf16_form=bool(kernel and kernel.bf16_form),
                                     tuning=tuning)
        for name in kernels:
            one_step(plan, name)
            one_step(plan, name, base=True)
        warm, cold = medians(plan, repeats), medians(plan, repeats, flushed=True)
        base_alone = statistics.median(one_step(plan, base=True, lora=False) for _ in range(repeats))
        between = medians(plan, repeats, base=True)
        megabytes = adapters * bytes_per_adapter / 1e6
        for name in kernels:
            row = {"kernel": name, "adapters": adapters, "form": plan.form, "adapter_mb_per_step": round(megabytes, 1),
                   "warm_ms": round(warm[name], 2), "cold_ms": round(cold[name], 2),
                   "between_matmuls_ms": round(between[name] - base_alone, 2), "base_matmuls_ms": round(base_alone, 2),
                   "bytes_at_bandwidth_ms": round(megabytes / 1e3 / bandwidth * 1e3, 2)}
            rows.append(row)
            print(row, flush=True)
    report = {"machine": machine(), "dtype": dtype, "base_mb": round(base_bytes / 1e6), "read_bandwidth_gbs": round(bandwidth, 1),
              "tuning_source": tuning.source if tuning else "hand rules", "workload": vars(args), "rows": rows}
    path = write_result(args.out, report)
    print(f"\n{report['machine']}\nread bandwidth {bandwidth:.1f} GB/s; {path}")
    print("| kernel | adapters | form | adapters' MB per step | their bytes at the bandwidth, ms | LoRA warm ms | cold ms | between the base's matmuls ms | the base's matmuls ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kernel']} | {r['adapters']} | {r['form']} | {r['adapter_mb_per_step']} | {r['bytes_at_bandwidth_ms']} | {r['warm_ms']} | "
              f"{r['cold_ms']} | {r['between_matmuls_ms']} | {r['base_matmuls_ms']} |")


if __name__ == "__main__":
    main()
