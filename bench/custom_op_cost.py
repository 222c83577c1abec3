"""What a Python custom op costs per call, eager and inside a compiled graph.

Why compiled execution with LoRA lost on the CPU (bench/RESULTS.md, "Compiled execution
with LoRA"): the experiment of commit d8d0b51 made each LoRA linear layer's adapter step
an opaque Python custom op (mutating the layer's output) so that vLLM's trace-once
compilation could keep LoRA enabled. This measures that op's fixed cost at decode sizes
(16 tokens x 576, bf16; the op's body does nothing): the dispatcher and Python in eager,
and in a compiled graph the functionalization of the mutated output and the graph split
around the op. Then the same op registered the low-level way (a schema and a CPU kernel on a
`torch.library.Library`), as `engine_plugins/cpu_lora/compiled.py` registers it since the
fifteenth session: without `custom_op`'s Python wrapper around every call.

Reproduce with:

    .venv/bin/python -m bench.custom_op_cost
"""

from __future__ import annotations

import time

import torch


from bench.common import machine  # noqa: E402


def per_call_us(fn, *args, warmup: int = 200, calls: int = 5000) -> float:
    for _ in range(warmup):
        fn(*args)
    start = time.perf_counter()
    for _ in range(calls):
        fn(*args)
    return round((time.perf_counter() - start) / calls * 1e6, 1)


def main() -> None:
    @torch.library.custom_op("bench::mutate_output", mutates_args=("y",))
    def op(y: torch.Tensor, x: torch.Tensor, key: int) -> None:
        return None

    @op.register_fake
    def _(y, x, key):
        return None

    def direct(y, x, key):
        return None

    def with_op(y, x):
        y = y * 2
        op(y, x, 1)
        return y + 1

    def without_op(y, x):
        y = y * 2
        return y + 1

    library = torch.library.Library("bench", "FRAGMENT")
    library.define("mutate_output_lowlevel(Tensor(a!) y, Tensor x, int key) -> ()")
    library.impl("mutate_output_lowlevel", lambda y, x, key: None, "CPU")
    torch.library.register_fake("bench::mutate_output_lowlevel", lambda y, x, key: None, lib=library)
    lowlevel = torch.ops.bench.mutate_output_lowlevel.default

    def with_lowlevel_op(y, x):
        y = y * 2
        lowlevel(y, x, 1)
        return y + 1

    y = torch.zeros(16, 576, dtype=torch.bfloat16)
    x = torch.zeros(16, 576, dtype=torch.bfloat16)
    print(machine())
    print("| call | us per call |\n|---|---|")
    print(f"| Python function | {per_call_us(direct, y, x, 1)} |")
    print(f"| custom op, eager | {per_call_us(op, y, x, 1)} |")
    print(f"| compiled graph without the op | {per_call_us(torch.compile(without_op, dynamic=True), y, x, calls=2000)} |")
    print(f"| compiled graph with the op | {per_call_us(torch.compile(with_op, dynamic=True), y, x, calls=2000)} |")
    print(f"| Library op, eager | {per_call_us(lowlevel, y, x, 1)} |")
    print(f"| compiled graph with the Library op | {per_call_us(torch.compile(with_lowlevel_op, dynamic=True), y, x, calls=2000)} |")


if __name__ == "__main__":
    main()
