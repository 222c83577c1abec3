"""Grouped versions of vLLM's CPU LoRA ops (`vllm/lora/ops/torch_ops/lora_ops.py`).

vLLM's reference ops gather a copy of the adapter weights for every token
(`lora_weights[lora_indices]`, [tokens, out, in]) and contract over it: in a prefill of
thousands of tokens that is thousands of weight copies, and even in a decode batch of
16 tokens the copies cost more than the arithmetic. Three forms, by batch size:

- small batches (decode steps; up to `DENSE_MAX_TOKENS` tokens and `DENSE_MAX_WORK`
  tokens x adapters): every token is multiplied by the weights of every adapter present
  in one batched matmul over the slots, and a 0/1 mask keeps each token's own adapter.
  No weight is copied (the slots are used in place when all are present); the extra
  arithmetic is small at these sizes.
- large batches (prefill): tokens are grouped by adapter and each adapter present does
  one matmul over its rows (the idea behind Punica's SGMV and S-LoRA).
- small batches over many adapters (more than `DENSE_MAX_WORK` tokens x adapters, up
  to `GATHER_MAX_TOKENS` tokens): the reference's per-token gather, which measured best.

Every op of one forward pass sees the same token-to-adapter mapping, so the plan made
from it (adapters present, mask, rows per adapter) is made once and reused.

Semantics are the reference's, with one deliberate difference: an index of -1 means "no
adapter" (as vLLM documents it and its GPU kernels do). The reference indexes the weights
with -1 and so applies the *last slot's* adapter to those tokens; here they get no LoRA
delta (shrink writes zeros, expand adds nothing or writes zeros).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The dense form's work grows with tokens x adapters present. Measured on 2 AVX2 cores,
# fp32, one thread, rank 8, shrink + expand through 576 <-> 1536 (bench/cpu_lora_ops.py):
# 16 tokens over 4 adapters 0.21 ms dense vs 0.48 gathered (the reference); 128 over 4:
# 0.71 vs 2.9. Over 16 adapters in every decode step the served workload ran slower
# dense than gathered (37 vs 47 tok/s), so the dense form stops at 8 adapters x 16 tokens.
DENSE_MAX_TOKENS = 128
DENSE_MAX_WORK = 128  # tokens x adapters present
# With more adapters present than that, small batches keep the reference's per-token
# gather (with -1 rows masked), which measured best there; larger ones are grouped.
GATHER_MAX_TOKENS = 32


@dataclass
class Plan:
    """How one token-to-adapter mapping is computed."""

    indices: torch.Tensor  # the mapping it was made for (a copy)
    slots: int
    single: int | None  # the one slot every token uses, if so (-1: no adapter at all)
    present: torch.Tensor | None  # dense form: slots present; None when all of them are
    mask: torch.Tensor | None  # dense form: [tokens, present] 1.0 where the token uses that slot
    groups: list[tuple[int, torch.Tensor]] | None  # grouped form: (slot, rows) per slot present
    gather: bool = False  # small batch over many adapters: the per-token gather


class _LastPlan:
    """The plan of the last mapping seen (one forward pass at a time per worker process)."""

    plan: Plan | None = None

    def get(self, indices: torch.Tensor, slots: int) -> Plan:
        plan = self.plan
        if plan is None or plan.slots != slots or plan.indices.shape != indices.shape or not torch.equal(plan.indices, indices):
            plan = self.plan = make_plan(indices, slots)
        return plan


_last_plan = _LastPlan()


def make_plan(indices: torch.Tensor, slots: int) -> Plan:
    first = int(indices[0])
    if bool((indices == first).all()):
        return Plan(indices.clone(), slots, first if first >= 0 else -1, None, None, None)
    if indices.shape[0] <= DENSE_MAX_TOKENS:
        present = torch.unique(indices[indices >= 0])
        if present.numel() * indices.shape[0] <= DENSE_MAX_WORK:
            mask = (indices.unsqueeze(1) == present.unsqueeze(0)).to(torch.float32)
            all_present = present.numel() == slots
            return Plan(indices.clone(), slots, None, None if all_present else present, mask, None)
        if indices.shape[0] <= GATHER_MAX_TOKENS:
            return Plan(indices.clone(), slots, None, None, None, None, gather=True)
    order = torch.argsort(indices, stable=True)
    present, counts = torch.unique_consecutive(indices[order], return_counts=True)
    groups, start = [], 0
    for slot, count in zip(present.tolist(), counts.tolist()):
        if slot >= 0:
            groups.append((slot, order[start : start + count]))
        start += count
    return Plan(indices.clone(), slots, None, None, None, groups)


def _slot_weights(weights: torch.Tensor) -> torch.Tensor:
    """[slots, 1, out, in] -> [slots, out, in] (the reference squeezes the same way)."""
    return weights.squeeze(1) if weights.dim() == 4 else weights


def _dense_matmul(x: torch.Tensor, weights: torch.Tensor, plan: Plan, dtype) -> torch.Tensor:
    """sum over the slots present of mask[t, k] * x[t] @ weights[k].T, as one matmul.

    Computed in float32 whatever `dtype`: batched half-precision matmuls are many times
    slower on CPUs without native bf16 (12x measured here), and these operands are small."""
    if plan.present is not None:
        weights = weights.index_select(0, plan.present)
    weights, x = weights.float(), x.float()
    present, out_features, in_features = weights.shape
    # Each token keeps its own slot's result by a select, never by multiplying with a 0/1
    # mask: 0 * NaN is NaN, so a multiply would carry one slot's values into every token.
    keep = plan.mask.bool().unsqueeze(2)  # [tokens, present, 1]
    if in_features >= out_features:  # shrink: every slot's output, then keep each token's own
        every = (x @ weights.reshape(present * out_features, in_features).T).view(-1, present, out_features)
    else:  # expand: every token through every slot present, one batched matmul
        every = torch.bmm(x.unsqueeze(0).expand(present, -1, -1), weights.transpose(1, 2)).transpose(0, 1)
    y = torch.where(keep, every, 0.0).sum(1)
    return y.to(dtype)


def plan_matmul(plan: Plan, x: torch.Tensor, weights: torch.Tensor, out_features: int, dtype) -> torch.Tensor:
    """y[t] = x[t] @ weights[indices[t]][:out_features].T in `dtype`, zero where indices[t] == -1,
    for the mapping `plan` was made for."""
    weights = _slot_weights(weights)[:, :out_features]
    x = x.to(dtype)
    if plan.single is not None:
        if plan.single < 0:
            return torch.zeros(x.shape[0], out_features, dtype=dtype, device=x.device)
        return x @ weights[plan.single].to(dtype).T
    if plan.mask is not None:
        return _dense_matmul(x, weights, plan, dtype)
    if plan.gather:
        indices = plan.indices
        selected = weights[indices.clamp(min=0)].to(dtype)
        return torch.einsum("bi, boi -> bo", x, selected).masked_fill_((indices < 0).unsqueeze(1), 0)
    y = torch.zeros(x.shape[0], out_features, dtype=dtype, device=x.device)
    for slot, rows in plan.groups:
        y.index_copy_(0, rows, x.index_select(0, rows) @ weights[slot].to(dtype).T)
    return y


def _lora_matmul(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, out_features: int, dtype) -> torch.Tensor:
    return plan_matmul(_last_plan.get(indices, _slot_weights(weights).shape[0]), x, weights, out_features, dtype)


def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    rank = _slot_weights(lora_b_weights).shape[1]
    y = _lora_matmul(inputs, lora_b_weights, lora_indices_tensor, rank, output_tensor.dtype)
    output_tensor[:, :rank] = scaling * y


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    weights = _slot_weights(lora_b_weights)
    common = min(weights.shape[1], output_tensor.shape[1])
    limit = output_tensor.shape[0]
    if inputs.shape[0] == 1 and limit != 1:
        limit = 1  # the reference broadcasts a single row over the output
    y = _lora_matmul(inputs[:limit], weights, lora_indices_tensor[:limit], common, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, :common] += y
    else:
        output_tensor[:, :common] = y


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int, slice_size: int, add_inputs: bool = True):
    weights = _slot_weights(lora_b_weights)
    y = _lora_matmul(inputs, weights, lora_indices_tensor, weights.shape[1], output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += y
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = y


def _per_token(lora_indices_tensor, seq_len_tensor):
    return torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)


def sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, scaling: float):
    bgmv_shrink(inputs, lora_a_weights, output_tensor, _per_token(lora_indices_tensor, seq_len_tensor), scaling)


def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, add_inputs: bool = False):
    bgmv_expand(inputs, lora_b_weights, output_tensor, _per_token(lora_indices_tensor, seq_len_tensor), add_inputs)


def sgmv_expand_slice(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                      batches, max_seq_length, token_nums, slice_offset: int, slice_size: int, add_inputs: bool = False):
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor, _per_token(lora_indices_tensor, seq_len_tensor),
                      slice_offset, slice_size, add_inputs)


OPS = {
    "bgmv_shrink": bgmv_shrink,
    "bgmv_expand": bgmv_expand,
    "bgmv_expand_slice": bgmv_expand_slice,
    "sgmv_shrink": sgmv_shrink,
    "sgmv_expand": sgmv_expand,
    "sgmv_expand_slice": sgmv_expand_slice,
}
