"""vLLM's CPU punica wrapper with each LoRA linear layer applied in a few matmuls.

vLLM's `PunicaWrapperCPU` reaches the ops through five Python frames per slice (add_shrink,
_apply_shrink, _shrink_prefill, sgmv_shrink, bgmv_shrink, and the same for expand), the
sgmv forms rebuild the per-token mapping (`repeat_interleave`) in every call, and every
op gathers or selects weights again: ~420 op calls and a few thousand small tensor
operations per decode step of a 30-layer model, which cost far more than the LoRA
arithmetic (rank 8: ~2 ms of matmuls in a ~90 ms step). This wrapper

- makes the plan for the step's token-to-adapter mapping once, when vLLM updates the
  mapping (one adapter for the batch, dense for small batches, grouped for large ones);
- applies a whole layer (every slice) from one call on the fused slot layout of
  `layout.py`: one shrink matmul for every slice (and, in the dense form, every slot),
  then one `addmm_` per slice straight into the layer's output.

Semantics are those of vLLM's wrapper with index -1 meaning no adapter (see `ops.py`).
Layers whose slots are not laid out fused and the embedding go to vLLM's implementation
(which calls the copy-free ops of `ops.py`); the logits (and a classifier's score layer)
use those ops too, skip the shrink where no slot of the step holds weights, and the expand
over the vocabulary when it would add nothing.

Kept as one module: one cohesive algorithm (the plan made per mapping and the layer
application that reads it share their data layout; apart, each would be read with the
other open).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from . import autotune
from .compiled import mapping_changed, op_state
from .layout import FusedSlots, fused_slots, live_slots
from .native import LoraKernel, int64_array, load_kernel, pointer_array
from .ops import bgmv_expand, bgmv_shrink

log = logging.getLogger("vllm.plugins.adapterserve_grouped_lora")  # configured by vLLM in its processes

# Dense form: every token times every slot in use (the span of them, or those gathered,
# below), in one matmul per side, a 0/1 mask keeping each token's own slot. Its work grows
# with tokens x slots; above this the tokens are grouped by adapter instead (one matmul per
# adapter present). Measured per decoder layer, rank 8, fp32 (bench/cpu_lora_layers.py) on an AVX2
# EPYC and an AVX512 Xeon: grouping wins only from 8 slots in the span and 256 tokens.
SPAN_DENSE_MAX_WORK = 1024  # tokens x slots in use (ops.py's DENSE_MAX_WORK counts them too)
# ...and up to 4 slots in use dense is as fast or faster at every size measured (1024
# tokens over 4 slots: 9.6 against 13.1 ms on the Xeon, 15.5 against 15.3 on the EPYC;
# over 2 slots 7.5 against 10.8, 9.0 against 13.6): prefills of a few adapters stay dense.
SPAN_DENSE_MAX_SLOTS = 4
# Slots are taken and freed as adapters come and go, so the slots a batch uses can lie far
# apart (3, 9, 15). The dense form reads its span in place while it is at most this many
# times the slots in use, and gathers (copies) the slots in use beyond: the span's unused
# slots would cost their reading and arithmetic in every layer. Measured over 30 SmolLM2 layers, 16 tokens, on the AVX512
# Xeon (bench/lora_slot_gaps.py): slots 0, 7, 15 in place 29.5 ms, gathered 19.4; slots 0
# and 2 in place 14.2, gathered 19.7; every other slot of 16 (span 15 for 8) even.
GATHER_SPAN_OVER = 2
# From this many tokens any gap is gathered: the arithmetic over the unused slots of the
# span then outweighs the copy (slots 0 and 2: 128 tokens even, 256 tokens 48 vs 34 ms).
GATHER_ANY_GAP_TOKENS = 256
# In bf16 the grouped form never won (2 to 16 adapters, 16 to 1024 tokens, on an
# AVX512-bf16 EPYC, bench/results/cpu_lora_layers-epyc-bfloat16-2threads.json): each of its
# per-adapter matmuls costs ~20 us in bf16 whatever its size. Batches in other dtypes than
# these stay dense at any size.
GROUPED_DTYPES = (torch.float32,)
# A layer goes token by token through the kernel of `lora_kernel.cpp` (one call, float32
# sums, the tokens split over PyTorch's threads; `native.py`) up to this many tokens, per
# dtype: there each PyTorch op costs more than its arithmetic (a bf16 matmul of 16 x 576
# by 576 x 24 ~20 us against ~3 in float32). Beyond, the matmuls' blocking wins, except
# over many slots (next). Measured per decoder layer, 2 threads, on the EPYC
# (bench/cpu_lora_layers.py --threads 2): float32 (kernel on one thread,
# results/cpu_lora_layers-epyc-float32-2threads.json) 1 adapter 64 tokens 0.42 against
# 0.45 ms, 256 tokens 2.24 against 1.85; bf16 (kernel threaded,
# results/cpu_lora_layers-epyc-bf16-2threads-omp.json) 256 tokens over 1, 2, 3 adapters
# 0.67 / 0.65 / 0.80 against 0.64 / 0.80 / 1.29 ms, 1024 tokens over 2 adapters 2.68
# against 1.75.
KERNEL_MAX_TOKENS = {torch.float32: 64, torch.bfloat16: 256}
# ...and at any size from this many slots the dense form would compute every token
# through (the span of the slots in use, or those gathered), where its work grows past
# the kernel's: float32 8 adapters 256 tokens 1.9 against 4.4 ms (dense; grouped 7.5),
# 1024 tokens 8.3 against 14.6 (grouped); bf16 (threaded) 4 adapters 1024 tokens 3.44
# against 3.67, 8 adapters 3.13 against 5.13.
KERNEL_FROM_SLOTS = {torch.float32: 8, torch.bfloat16: 4}
# With its bf16 form (CPUs with AVX512-BF16, `LoraKernel.bf16_form`: `vdpbf16ps`, units of 4
# tokens) the kernel wins in bf16 at every size measured, and the two rules above apply
# only to its generic form. bench/cpu_lora_layers.py --dtype bfloat16 --threads 2 on the
# EPYC (results/cpu_lora_layers-epyc-bf16-2threads-bf16form.json), kernel against the
# plan's matmul form: 1024 tokens over 1, 2, 3 adapters 2.40 / 1.83 / 1.61 against
# 2.72 / 2.24 / 3.46 ms; 256 tokens over 3 adapters 0.34 against 1.08.
KERNEL_EVERY_SIZE_WITH_BF16_FORM = (torch.bfloat16,)


@dataclass(frozen=True)
class StepPlan:
    """How the layers of one forward pass apply their adapters."""

    tokens: int
    single: int | None = None  # the slot every token uses (-1: no token has an adapter)
    first: int = 0  # dense: the span of slots is first .. first + mask.shape[1] - 1
    mask: torch.Tensor | None = None  # dense: [tokens, span, 1], True where the token uses the slot
    gather: torch.Tensor | None = None  # dense over slots with gaps between them: those slots (mask: [tokens, count, 1])
    present: tuple[int, ...] = ()  # the slots the tokens use (every form)
    slot_of: torch.Tensor | None = None  # token by token (the kernel): each token's slot, int64
    groups: tuple[tuple[int, torch.Tensor], ...] = ()  # grouped: (slot, rows) per adapter present

    @property
    def form(self) -> str:
        """The plan's form by name (for reports)."""
        if self.slot_of is not None:
            return "kernel"
        return "single" if self.single is not None else "dense" if self.mask is not None else "grouped"


def slots_in_use(indices: torch.Tensor) -> tuple[int, ...]:
    """The distinct slots of a token-to-slot mapping, sorted (-1, no adapter, first).
    In Python: ~1-4 us up to 256 tokens, against ~7 for `torch.unique` and its `tolist`."""
    return tuple(sorted(set(indices.tolist())))


def make_step_plan(indices: torch.Tensor, dtype: torch.dtype = torch.float32, kernel: bool = False,
                   present: tuple[int, ...] | None = None, bf16_form: bool = False, tuning=None) -> StepPlan:
    """The plan for a token-to-slot mapping (-1: no adapter), for layers in `dtype`;
    `kernel`: the kernel may apply them; `present`: the mapping's `slots_in_use`, where the
    caller has them already. The form is the fastest `tuning` measured for the batch's size
    (`autotune.Tuning`), or without one the hand rules (`hand_rule_form`; `bf16_form`: the
    kernel has its bf16 form)."""
    tokens = indices.shape[0]
    present = slots_in_use(indices) if present is None else present
    if not present:
        return StepPlan(0, single=-1)
    if present == (-1,):
        return StepPlan(tokens, single=-1)
    used = present[1:] if present[0] < 0 else present
    gaps, dense_slots = dense_reading(used, tokens)
    if tuning is not None:
        form = tuning.form(tokens, dense_slots, kernel)
    else:
        form = hand_rule_form(tokens, len(used), dense_slots, dtype, kernel, bf16_form)
    return plan_in_form(form, indices, present, gaps)


def dense_reading(used: tuple[int, ...], tokens: int) -> tuple[bool, int]:
    """Whether the dense form gathers the slots in use (they lie far apart) rather than
    reading their span in place, and how many slots it then reads."""
    span = used[-1] - used[0] + 1
    gaps = span > len(used) and (span > GATHER_SPAN_OVER * len(used) or tokens >= GATHER_ANY_GAP_TOKENS)
    return gaps, len(used) if gaps else span


def hand_rule_form(tokens: int, count: int, dense_slots: int, dtype: torch.dtype, kernel: bool, bf16_form: bool) -> str:
    """The form the rules measured by hand choose (`KERNEL_MAX_TOKENS`, `KERNEL_FROM_SLOTS`,
    `KERNEL_EVERY_SIZE_WITH_BF16_FORM`, `SPAN_DENSE_MAX_*`, `GROUPED_DTYPES`): where the
    autotuner is off or could not measure."""
    if kernel and (tokens <= KERNEL_MAX_TOKENS.get(dtype, 0) or dense_slots >= KERNEL_FROM_SLOTS.get(dtype, 1 << 62)
                   or (bf16_form and dtype in KERNEL_EVERY_SIZE_WITH_BF16_FORM)):
        return "kernel"
    if dtype not in GROUPED_DTYPES or count <= SPAN_DENSE_MAX_SLOTS or tokens * count <= SPAN_DENSE_MAX_WORK:
        return "dense"
    return "grouped"


FORMS = ("kernel", "dense", "grouped")  # what `plan_in_form` makes (one adapter: "dense" is its matmuls)


def plan_in_form(form: str, indices: torch.Tensor, present: tuple[int, ...], gaps: bool | None = None) -> StepPlan:
    """The plan of `form` for a mapping whose `slots_in_use` are `present` (some slot other
    than -1): token by token through the kernel; one adapter's matmuls when every token
    uses one slot; the dense span (or the slots gathered, `gaps`); or grouped by adapter."""
    tokens = indices.shape[0]
    used = present[1:] if present[0] < 0 else present
    if gaps is None:
        gaps = dense_reading(used, tokens)[0]
    if form == "kernel":
        return StepPlan(tokens, present=used, slot_of=indices.to(torch.int64).contiguous())
    if len(present) == 1:
        return StepPlan(tokens, single=used[0], present=used)
    if form == "dense":
        gather = torch.tensor(used, dtype=indices.dtype) if gaps else None
        slots = gather if gaps else torch.arange(used[0], used[-1] + 1, dtype=indices.dtype)
        mask = (indices.unsqueeze(1) == slots.unsqueeze(0)).unsqueeze(2)
        return StepPlan(tokens, first=used[0], mask=mask, gather=gather, present=used)
    order = torch.argsort(indices, stable=True)
    counts = torch.bincount(indices[order] + 1)  # +1: -1 counts at 0
    groups, start = [], int(counts[0])  # the -1 tokens come first in the order
    for slot, count in enumerate(counts[1:].tolist()):
        if count:
            groups.append((slot, order[start : start + count]))
            start += count
    return StepPlan(tokens, groups=tuple(groups), present=tuple(slot for slot, _ in groups))


KernelArgs = tuple[LoraKernel, Any, Any]  # the kernel, the slices' sizes and B pointers (C arrays)


def kernel_args(kernel: LoraKernel | None, slots: FusedSlots) -> KernelArgs | None:
    """What the kernel needs of a layer's slots, made once per layer; None where it cannot
    apply them (no kernel, or a dtype it does not have)."""
    if kernel is None or not kernel.supports(slots.a.dtype) or any(b.dtype != slots.a.dtype for b in slots.b):
        return None
    return kernel, int64_array([b.shape[1] for b in slots.b]), pointer_array(slots.b)


def apply_layer(plan: StepPlan, y: torch.Tensor, x: torch.Tensor, slots: FusedSlots,
                scale: float, output_slices: tuple[int, ...], kernel: KernelArgs | None = None) -> bool:
    """y[:, slice i] += scale * x @ A_i[slot].T @ B_i[slot].T per token, for every slice.

    Computed in the slots' dtype (see `layout.lay_out`): the model's, or float32 where the
    slots are laid out in it for a bf16 model; then added into y in y's dtype. Nothing is
    computed where the batch's slots are all empty in this layer, and no slice is expanded
    that they all leave empty (`layout.track_live_slots`).
    Token by token (`plan.slot_of`) the kernel applies the layer, in one call: x, y and
    the slots then share a dtype and have rows of unit stride (`kernel_fits`).
    Written for few tensor operations per call: this runs ~120 times per forward pass.
    Returns False where nothing applies (no slot of the plan changes this layer)."""
    live = 0 if plan.single == -1 else slots.live_slices(plan.present)
    if not live:
        return False
    if plan.slot_of is not None:
        kernel, sizes, b_pointers = kernel
        kernel.apply(y, x, slots.a, slots.rank_sum, plan.slot_of, sizes, b_pointers, slots.ranks[0], live, scale)
        return True
    compute = slots.a.dtype
    if x.dtype != compute:
        x = x.to(compute)
    out = y if y.dtype == compute else torch.zeros(y.shape, dtype=compute, device=y.device)
    if plan.single is not None:
        _apply_span(out, x, slots, plan.single, None, scale, output_slices, live)
    elif plan.mask is None:
        for slot, rows in plan.groups:
            slot_live = slots.live_slices((slot,))
            if not slot_live:
                continue
            part = torch.zeros(rows.shape[0], y.shape[1], dtype=compute, device=y.device)
            _apply_span(part, x.index_select(0, rows), slots, slot, None, scale, output_slices, slot_live)
            out.index_add_(0, rows, part)
    else:
        _apply_span(out, x, slots, plan.first, plan.mask, scale, output_slices, live, plan.gather)
    if out is not y:
        y.add_(out)
    return True


def kernel_fits(y: torch.Tensor, x: torch.Tensor, slots: FusedSlots) -> bool:
    """Whether the kernel can take this call's tensors as they are (no copy)."""
    return x.dtype == y.dtype == slots.a.dtype and x.stride(1) == 1 and y.stride(1) == 1


def _apply_span(y: torch.Tensor, x: torch.Tensor, slots: FusedSlots, first: int, mask: torch.Tensor | None,
                scale: float, output_slices: tuple[int, ...], live: int,
                gather: torch.Tensor | None = None) -> None:
    """Every row of x through the A of every slot of the span (from `first`, `mask.shape[1]`
    slots; one slot without a mask; or the slots in `gather`), `mask` keeping each row's own
    slot; then one `addmm_` per slice over those slots' B, for the slices set in `live`
    (bit i: slice i; the others are zero in every slot of the span): the routed input is
    zero outside each row's slot, so each row gets only its own adapter.

    Written for few tensor operations, each of which costs about as much as the arithmetic
    at decode sizes: each slice's [rows, span * rank] operand is a view, never a copy (one
    slot: a strided view of the shrink's output; several: the masked select writes its
    result slice-major)."""
    rows, span, rank = x.shape[0], 1 if mask is None else mask.shape[1], slots.ranks[0]
    slices = len(slots.ranks)  # all of the same rank (`fused_slots`)
    if gather is None:
        a = slots.a[first * slots.rank_sum : (first + span) * slots.rank_sum]
        bs = [b[first * rank : (first + span) * rank] for b in slots.b]
    else:  # the slots in `gather` (a copy), one after the other as in a span
        a = slots.a.view(-1, slots.rank_sum, slots.a.shape[1]).index_select(0, gather).view(-1, slots.a.shape[1])
        bs = [b.view(-1, rank, b.shape[1]).index_select(0, gather).view(-1, b.shape[1]) for b in slots.b]
    every = F.linear(x, a)  # [rows, span * slices * rank]
    if mask is None:
        routed = every.view(rows, slices, rank).transpose(0, 1)  # [slices, rows, rank]
    else:
        # select, not multiply: 0 * NaN is NaN, so a multiply would carry one slot's
        # non-finite values into every other token of the batch
        routed = torch.empty(slices, rows, span, rank, dtype=every.dtype, device=every.device)
        zero = torch.zeros((), dtype=every.dtype, device=every.device)
        torch.where(mask, every.view(rows, span, slices, rank).permute(2, 0, 1, 3), zero, out=routed)
        routed = routed.view(slices, rows, span * rank)
    if scale != 1.0:
        routed = routed * scale
    out_start = 0
    for i, (b, size) in enumerate(zip(bs, output_slices)):
        if live >> i & 1:
            y[:, out_start : out_start + size].addmm_(routed[i], b)
        out_start += size


class FusedPunicaWrapperCPU(PunicaWrapperCPU):
    """`PunicaWrapperCPU` whose linear layers take one plan per mapping and the fused layout."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._plan: StepPlan | None = None
        self._matmul_plan: StepPlan | None = None  # for a layer the kernel cannot take, in a kernel step
        self._present: tuple[int, ...] | None = None  # the slots of the step's mapping (-1: none)
        self._kernel = load_kernel()
        self._tunings: dict[torch.dtype, autotune.Tuning | None] = {}  # by the slots' dtype
        # the compiled graph's C++ op (or None): it reads this wrapper's step as published here
        self._op_state = op_state()
        self._op_index = -1 if self._op_state is None else self._op_state.new_wrapper()
        # the last laid-out layer applied, and its kernel arguments where the kernel applied it
        self._last_layer: tuple[FusedSlots, KernelArgs | None] | None = None
        # the fused tensors of each layer (and what the kernel needs of them), by the
        # identity of its (persistent) tuple of A slots; the tuple is kept so that its
        # identity cannot be reused
        self._fused: dict[int, tuple[tuple, FusedSlots | None, KernelArgs | None]] = {}

    def update_metadata(self, *args: Any, **kwargs: Any) -> None:
        super().update_metadata(*args, **kwargs)
        self._publish_step(self.token_lora_indices)  # its plan not made yet
        # the mapping changed: the next layer makes the new plan (dropped only now, as the
        # C++ op held the old plan's array until the line above)
        self._plan = self._matmul_plan = None
        # Which layers have nothing to add depends only on the slots the tokens use (and on
        # the slots' contents, `layout.track_live_slots`): while they stay the same from step
        # to step, the op in Python keeps skipping those layers (`compiled.IdleLayers`).
        present = slots_in_use(self.token_lora_indices)
        if present != self._present:
            self._present = present
            mapping_changed()

    def _fused_slots(self, lora_a_stacked: tuple, lora_b_stacked: tuple) -> tuple[FusedSlots | None, KernelArgs | None]:
        known = self._fused.get(id(lora_a_stacked))
        if known is None or known[0] is not lora_a_stacked:
            slots = fused_slots(lora_a_stacked, lora_b_stacked)
            if not self._fused:
                log.info("fused CPU LoRA layers: %s in pid %d", "active" if slots else "NOT laid out, vLLM's wrapper applies them", os.getpid())
            elif slots is None:
                log.debug("fused CPU LoRA layers: a layer is not laid out (A %s)", tuple(lora_a_stacked[0].shape))
            args = None if slots is None else kernel_args(self._kernel, slots)
            known = self._fused[id(lora_a_stacked)] = (lora_a_stacked, slots, args)
        return known[1], known[2]

    def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None, **kwargs):
        # 2-D already (as the compiled op passes them): a view costs ~1.4 us, ~120 calls a step
        x2 = x if x.dim() == 2 else x.view(-1, x.shape[-1])
        y2 = y if y.dim() == 2 else y.view(-1, y.shape[-1])
        tokens = self.indices_len[0]  # of the mapping (a plain int: cheaper than the indices' view)
        slots, kernel = self._fused_slots(lora_a_stacked, lora_b_stacked)
        if slots is None or tokens != x2.shape[0]:
            self._last_layer = None  # vLLM's path: nothing for the C++ op to remember
            return super().add_lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs)
        if self._plan is None or self._plan.tokens != tokens:
            self._plan = make_step_plan(self.token_lora_indices, slots.a.dtype, self._kernel is not None, self._present,
                                        self._kernel is not None and self._kernel.bf16_form, self._tuning(slots.a.dtype))
            # the plan's array (the mapping's, as int64) and its form, for the C++ op
            self._publish_step(self.token_lora_indices if self._plan.slot_of is None else self._plan.slot_of,
                               kernel=self._plan.slot_of is not None)
        plan = self._plan
        if plan.slot_of is not None and (kernel is None or not kernel_fits(y2, x2, slots)):
            if self._matmul_plan is None or self._matmul_plan.tokens != tokens:
                self._matmul_plan = make_step_plan(self.token_lora_indices, slots.a.dtype, present=self._present,
                                                   tuning=self._tuning(slots.a.dtype))
            plan = self._matmul_plan
        self._last_layer = (slots, kernel if plan.slot_of is not None else None)
        # False (nothing of this layer applies to the step's mapping) lets the compiled op
        # skip the layer until the mapping or a slot changes (`compiled.IdleLayers`)
        return apply_layer(plan, y2, x2, slots, scale, output_slices, kernel)

    def _tuning(self, dtype: torch.dtype) -> autotune.Tuning | None:
        """The forms measured on this CPU for layers in `dtype` (at the first LoRA step: the
        engine's warm-up); None: the hand rules. Never measured while a graph is traced."""
        if dtype not in self._tunings:
            if torch.compiler.is_compiling():
                return None
            self._tunings[dtype] = autotune.tuning_for(dtype, self._kernel)
        return self._tunings[dtype]

    def _publish_step(self, slot_of: torch.Tensor | None, kernel: bool = False) -> None:
        """Tell the C++ op the step's token-to-slot array (None: not known) and whether the
        step's plan is the kernel's."""
        if self._op_state is not None:
            usable = slot_of is not None and slot_of.dtype == torch.int64 and slot_of.is_contiguous()
            self._op_state.set_step(self._op_index, slot_of if usable else None, kernel)

    def op_memo(self) -> tuple[int, list[int], tuple[FusedSlots, KernelArgs] | None] | None:
        """What the C++ op may remember of the last laid-out layer `add_lora_linear`
        applied (or found idle): this wrapper's index, the slices each slot changes, and the
        layer's slots and kernel arguments where the kernel applied it; None: nothing."""
        if self._last_layer is None or self._op_state is None:
            return None
        slots, kernel = self._last_layer
        return self._op_index, slots.live_of_slot(), None if kernel is None else (slots, kernel)

    def apply_lora_full_linear(self, y, x, weight_stacked, bias_stacked, module_enabled) -> None:
        """A classification head trained in full (vLLM's `ClassificationHeadWithLoRA`):
        y[row] = x[row] @ W[slot].T + b[slot] for each row whose slot has a head, as vLLM's
        wrapper computes it (the product in float32, then y's dtype, plus the bias in y's
        dtype); other rows keep y. vLLM's takes ~15 small tensor operations per step whatever
        the batch; here one product per head in the batch, the rows grouped in Python (a
        classification step has a row per request)."""
        slots = self.sampler_indices.tolist()
        if len(slots) != y.shape[0]:  # vLLM's asserts the same, with its own message
            return super().apply_lora_full_linear(y, x, weight_stacked, bias_stacked, module_enabled)
        enabled = module_enabled.tolist()
        present = sorted(set(slots))
        for slot in present:
            if slot < 0 or not enabled[slot]:
                continue
            rows = None if len(present) == 1 else [i for i, s in enumerate(slots) if s == slot]
            head = (x if rows is None else x[rows]).float() @ weight_stacked[slot, 0].float().T
            head = head.to(y.dtype) + bias_stacked[slot].to(y.dtype)
            if rows is None:
                y.copy_(head)
            else:
                y[rows] = head

    def add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None, **kwargs):
        """y += scale * x @ A[slot].T @ B[slot].T per sequence, as vLLM's wrapper does, except
        that nothing is computed when no slot of the step holds weights for the layer (its
        live record, `layout.track_live_slots`), and the expand over the vocabulary (the
        costly half: [sequences, vocab] per slot) is skipped when the shrink is all zeros.
        vLLM wraps the logits (and a classifier's score layer) whether or not any adapter
        trains them: head adapters train the score layer in full (`apply_lora_full_linear`),
        so its LoRA slots stay zero, and the shrink cost ~50-100 us of a ~17 ms
        classification step (bench/RESULTS.md)."""
        y2, x2 = y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1])
        indices = self.sampler_indices
        live = live_slots(lora_a_stacked)
        if live is not None and not any(live[slot] for slot in set(indices.tolist()) if slot >= 0):
            return None
        shrunk = torch.zeros((x2.size(0), lora_b_stacked.size(-1)), dtype=torch.float32, device=x.device)
        bgmv_shrink(x2, lora_a_stacked, shrunk, indices, scale)
        if shrunk.any():
            bgmv_expand(shrunk, lora_b_stacked, y2, indices, add_inputs=True)
        return None
