"""The dense form over slots with gaps between them: the span read in place, the slots in
use gathered, or the tokens grouped by adapter (`punica.GATHER_SPAN_OVER`,
`GATHER_ANY_GAP_TOKENS`).

Slots are taken and freed as adapters come and go, so a batch's adapters can sit in slots
far apart (0, 7, 15). The LoRA work of 30 SmolLM2-135M decoder layers (q/k/v, o, gate/up,
down; rank 8, 16 slots, float32: as the engine runs the embedded model) is timed per
batch, one form after the other in alternating order, the median of 9; the weights of 30
layers do not fit in the caches, as in a real step.

Reproduce with:

    .venv/bin/python -m bench.lora_slot_gaps [--threads 2]

Writes bench/results/lora_slot_gaps.json (with the CPU) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch


from bench.common import machine  # noqa: E402

from adapterserve.engine_plugins.cpu_lora import punica  # noqa: E402
from adapterserve.engine_plugins.cpu_lora.layout import fused_slots, lay_out  # noqa: E402

# (in features, output slices) of the four LoRA linear layers of one SmolLM2-135M decoder layer
LAYERS = [(576, (576, 192, 192)), (576, (576,)), (576, (1536, 1536)), (1536, (576,))]
DECODER_LAYERS, SLOTS, RANK = 30, 16, 8
CASES = [  # (tokens, slots in use); the first: what each more adapter in a decode batch costs
    (16, (0,)), (16, (0, 1, 2)), (16, tuple(range(8))), (16, tuple(range(16))),
    (16, (0, 2)), (16, (0, 1, 3)), (16, (0, 7, 15)), (16, (0, 15)),
    (16, tuple(range(0, 16, 2))), (64, (0, 7, 15)), (256, (0, 7, 15)),
    (64, (0, 2)), (128, (0, 2)), (256, (0, 2)), (1024, (0, 2)), (1024, (0, 1, 3)),
]


def make_model(generator: torch.Generator) -> list[list]:
    def layer(in_features: int, outs: tuple[int, ...]):
        fake = SimpleNamespace(
            lora_a_stacked=tuple(torch.zeros(SLOTS, 1, RANK, in_features) for _ in outs),
            lora_b_stacked=tuple(torch.zeros(SLOTS, 1, out, RANK) for out in outs),
        )
        lay_out(fake)
        for weights in fake.lora_a_stacked + fake.lora_b_stacked:
            weights.copy_(torch.randn(weights.shape, generator=generator) * 0.05)
        return fused_slots(fake.lora_a_stacked, fake.lora_b_stacked), outs, in_features

    return [[layer(i, o) for i, o in LAYERS] for _ in range(DECODER_LAYERS)]


def forms(indices: torch.Tensor) -> dict[str, punica.StepPlan]:
    """The plan of each form for one mapping."""
    chosen = punica.make_step_plan(indices)
    used = indices[indices >= 0].unique()
    span = torch.arange(int(used[0]), int(used[-1]) + 1)
    in_place = punica.StepPlan(
        indices.shape[0], first=int(used[0]), mask=(indices.unsqueeze(1) == span.unsqueeze(0)).unsqueeze(2), present=chosen.present
    )
    gathered = punica.StepPlan(
        indices.shape[0], first=int(used[0]), mask=(indices.unsqueeze(1) == used.unsqueeze(0)).unsqueeze(2), gather=used,
        present=chosen.present,
    )
    limits = punica.SPAN_DENSE_MAX_SLOTS, punica.SPAN_DENSE_MAX_WORK
    punica.SPAN_DENSE_MAX_SLOTS = punica.SPAN_DENSE_MAX_WORK = 0  # grouped at any size
    grouped = punica.make_step_plan(indices)
    punica.SPAN_DENSE_MAX_SLOTS, punica.SPAN_DENSE_MAX_WORK = limits
    return {"in place": in_place, "gathered": gathered, "grouped": grouped, "chosen": chosen}


def step_ms(model, plan: punica.StepPlan, tokens: int) -> float:
    inputs = {i: torch.randn(tokens, i) for i in (576, 1536)}
    outputs = {o: torch.zeros(tokens, sum(o)) for _, o in LAYERS}
    began = time.perf_counter()
    for decoder_layer in model:
        for slots, outs, in_features in decoder_layer:
            punica.apply_layer(plan, outputs[outs], inputs[in_features], slots, 1.0, outs)
    return (time.perf_counter() - began) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2, help="torch threads (vLLM's CPU worker uses the cores it is bound to)")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = make_model(torch.Generator().manual_seed(0))
    rows = []
    for tokens, used in CASES:
        indices = torch.tensor([used[i % len(used)] for i in range(tokens)])
        plans = forms(indices)
        chosen = plans.pop("chosen")
        times: dict[str, list[float]] = {name: [] for name in plans}
        for repeat in range(args.repeats):
            for name in plans if repeat % 2 else reversed(list(plans)):
                times[name].append(step_ms(model, plans[name], tokens))
        row = {"tokens": tokens, "slots": list(used), **{f"{name}_ms": round(statistics.median(t), 2) for name, t in times.items()},
               "chosen": "one adapter" if chosen.single is not None else "grouped" if chosen.mask is None
               else "gathered" if chosen.gather is not None else "in place"}
        rows.append(row)
        print(row, flush=True)
    report = {"machine": machine(), "threads": args.threads, "decoder_layers": DECODER_LAYERS, "rows": rows}
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "lora_slot_gaps.json").write_text(json.dumps(report, indent=2))
    print(f"\n{report['machine']}, {args.threads} threads")
    print("| tokens | slots in use | in place ms | gathered ms | grouped ms | the plan picks |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['tokens']} | {', '.join(map(str, row['slots']))} | {row['in place_ms']} | {row['gathered_ms']} | {row['grouped_ms']} | {row['chosen']} |")


if __name__ == "__main__":
    main()
