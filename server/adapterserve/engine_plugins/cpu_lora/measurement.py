"""How the CPU LoRA path's forms are timed on this CPU (the autotuner's measurement,
`autotune.py` decides and keeps): every form applied to synthetic slots of the engine's
own layer shapes, at the sizes of a decode step and of prefill chunks; sizes whose times
contradict larger sizes are measured again.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .autotune import Shape

Timings = dict[tuple[int, int], dict[str, float]]  # (tokens, adapters) -> form -> ms

# Batch sizes measured: a decode step at the server's concurrency (16 sequences), a
# larger decode batch, and prefill chunks; a step takes the nearest (in log scale).
TOKENS = (16, 64, 256, 1024)
ADAPTERS = (1, 2, 4, 8, 16)  # adapters in the batch (up to the engine's slots)
# Each form's time at a size is the median of repeats of applying every layer shape once;
# at least MIN_REPEATS, and more while within REPEAT_BUDGET_S (small sizes take ~0.1 ms).
MIN_REPEATS = 5
REPEAT_BUDGET_S = 0.03
# A form whose second pass (the first warms it) takes this many times the best median at its size is not
# repeated: it loses by far (the grouped form over 16 adapters took 30x the kernel's time
# on the EPYC), and its repeats would take most of the measurement.
LOSING_FACTOR = 3.0
# A form's time at a size over this many times its time at a larger size (more tokens or
# more adapters: the same work and more) is not believed: something else held the cores
# (an engine starting beside this one: a thread of the pool preempted stalls every
# parallel region by a time slice). Such a size is measured again, up to RETRIES times,
# keeping each form's best; a measurement left contradictory serves this start (each form
# capped at its time at a larger size) and is not kept (the next start measures again).
# One such size (the kernel at 16 tokens over 1 adapter measured 29.9 ms against 0.10 at
# 64 tokens) put the dense form at every one-adapter decode step of a server: 0.6 of
# base-only instead of ~0.93.
IMPLAUSIBLE_FACTOR = 2.0
RETRIES = 3
RANK = 8  # the demo adapters' rank: what the slots hold is measured, not the slots' maximum


def synthetic_slots(shape: Shape, generator: torch.Generator):
    """The shape's slots in the fused layout (`layout.FusedSlots`), every slot holding
    random weights of rank `RANK` (the rest of the slots' rank zero, as vLLM pads an
    adapter). Made directly, not through `lay_out`'s views: the warm-up runs inside the
    compiled graph's op, where views keep no base to be recognised by."""
    from .layout import FusedSlots

    dtype = getattr(torch, shape.dtype)
    rank, slices = min(RANK, shape.rank), len(shape.slices)
    a = torch.zeros(shape.slots, slices, shape.rank, shape.in_features)
    a[:, :, :rank] = torch.randn(shape.slots, slices, rank, shape.in_features, generator=generator) / shape.in_features**0.5
    bs = []
    for out in shape.slices:
        b = torch.zeros(shape.slots, shape.rank, out)
        b[:, :rank] = torch.randn(shape.slots, rank, out, generator=generator) / rank**0.5
        bs.append(b.view(-1, out).to(dtype))
    return FusedSlots(a.view(-1, shape.in_features).to(dtype), tuple(bs), (shape.rank,) * slices, shape.rank * slices)


def measure_timings(shapes: tuple[Shape, ...], kernel) -> tuple[Timings, tuple[str, ...]]:
    """Milliseconds of one pass over every shape in each form, at each size of `TOKENS` x
    `ADAPTERS` (adapters up to the slots), the tokens spread over the adapters in turn;
    and the sizes whose times stayed implausible ('tokens x adapters')."""
    from .punica import FORMS, apply_layer, kernel_args, kernel_fits, plan_in_form, slots_in_use

    generator = torch.Generator().manual_seed(0)
    layers = []
    for shape in shapes:
        slots = synthetic_slots(shape, generator)
        layers.append((shape, slots, kernel_args(kernel, slots)))
    max_adapters = min(s.slots for s in shapes)
    timings: Timings = {}
    again = {}  # size -> its measurement, to repeat where it is implausible
    for tokens in TOKENS:
        inputs = [(torch.randn(tokens, s.in_features, generator=generator).to(slots.a.dtype),
                   torch.zeros(tokens, sum(s.slices), dtype=slots.a.dtype)) for s, slots, _ in layers]
        for adapters in (a for a in ADAPTERS if a <= max_adapters):
            indices = torch.arange(tokens) % adapters
            present = slots_in_use(indices)
            forms = [f for f in FORMS if f != "kernel" or all(
                args is not None and kernel_fits(y, x, slots) for (_, slots, args), (x, y) in zip(layers, inputs))]
            if adapters == 1:
                forms = [f for f in forms if f != "grouped"]  # one adapter: the same matmuls as dense
            if not timings:  # the first calls of each form set up threads and primitives: not measured
                for form in forms:
                    _time_ms(plan_in_form(form, indices, present), layers, inputs, apply_layer, 0.0)

            def at_this_size(layers=layers, inputs=inputs, forms=forms, indices=indices, present=present):
                measured: dict[str, float] = {}
                for form in forms:
                    best = min(measured.values(), default=math.inf)
                    measured[form] = _time_ms(plan_in_form(form, indices, present), layers, inputs, apply_layer, best)
                return measured

            timings[(tokens, adapters)] = at_this_size()
            again[(tokens, adapters)] = at_this_size
    for _ in range(RETRIES):
        for size in implausible_sizes(timings):
            for form, ms in again[size]().items():
                timings[size][form] = min(timings[size][form], ms)
    left = implausible_sizes(timings)
    for size in left:  # this start's choice there: each form at most its time at a larger size
        for form in timings[size]:
            timings[size][form] = min(timings[size][form], _bound(timings, size, form))
    return timings, tuple(f"{t}x{a}" for t, a in sorted(left))


def implausible_sizes(timings: Timings) -> set[tuple[int, int]]:
    """Sizes where a form took over `IMPLAUSIBLE_FACTOR` times its time at a larger size (at
    least as many tokens and adapters) and its time there is below the best at this size:
    measured as it should have been, it might have won. (A form that loses either way is
    left alone: losers are timed once, and their noise changes no choice.)"""
    found = set()
    for size, measured in timings.items():
        winner = min(measured.values())
        for form, ms in measured.items():
            bound = _bound(timings, size, form)
            if ms > IMPLAUSIBLE_FACTOR * bound and bound < winner:
                found.add(size)
    return found


def _bound(timings: Timings, size: tuple[int, int], form: str) -> float:
    """The form's least time at a larger size (the same work and more)."""
    larger = [t[form] for s, t in timings.items() if s != size and s[0] >= size[0] and s[1] >= size[1] and form in t]
    return min(larger, default=math.inf)


def _time_ms(plan, layers, inputs, apply_layer, best: float) -> float:
    """The median milliseconds of one pass over the layers; only the warm pass where that
    takes over `LOSING_FACTOR` x `best`."""
    def one_pass() -> None:
        for (shape, slots, args), (x, y) in zip(layers, inputs):
            apply_layer(plan, y, x, slots, 1.0, shape.slices, args)

    one_pass()  # warm: first calls allocate, and oneDNN makes a primitive per new shape
    began = time.perf_counter()
    one_pass()
    warm = 1000 * (time.perf_counter() - began)
    if warm > LOSING_FACTOR * best:
        return round(warm, 4)
    times: list[float] = []
    deadline = time.perf_counter() + REPEAT_BUDGET_S
    while len(times) < MIN_REPEATS or time.perf_counter() < deadline:
        began = time.perf_counter()
        one_pass()
        times.append(time.perf_counter() - began)
    return round(1000 * statistics.median(times), 4)
