"""Grouped versions of vLLM's CPU LoRA ops (`vllm/lora/ops/torch_ops/lora_ops.py`).

vLLM's reference ops gather a copy of the adapter weights for every token
(`lora_weights[lora_indices]`, [tokens, out, in]) and contract over it: in a prefill of
thousands of tokens that is thousands of weight copies. Here tokens are grouped by
adapter and each adapter present does one matmul over its rows (the idea behind Punica's
SGMV and S-LoRA). For decode-sized batches the gather is as cheap, so up to
`GATHER_MAX_TOKENS` tokens the gather is kept.

Semantics are the reference's, with one deliberate difference: an index of -1 means "no
adapter" (as vLLM documents it and its GPU kernels do). The reference indexes the weights
with -1 and so applies the *last slot's* adapter to those tokens; here they get no LoRA
delta (shrink writes zeros, expand adds nothing or writes zeros).
"""

from __future__ import annotations

import torch

# Up to this many tokens the per-token gather is as fast as grouping. Measured on 2 AVX2
# cores, fp32, 4 adapters, rank 16, hidden 576 (bench/cpu_lora_ops.py): shrink+expand at
# 16 tokens 0.67 ms gathered vs 0.75 ms grouped; at 32 tokens 0.81 vs 0.65; at 1024
# tokens 83 ms vs 2.5 ms.
GATHER_MAX_TOKENS = 16


def _slot_weights(weights: torch.Tensor) -> torch.Tensor:
    """[slots, 1, out, in] -> [slots, out, in] (the reference squeezes the same way)."""
    return weights.squeeze(1) if weights.dim() == 4 else weights


def _groups(indices: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
    """(slot, rows) per adapter present; rows is None when one slot covers every token."""
    first = int(indices[0])
    if bool((indices == first).all()):
        return [] if first < 0 else [(first, None)]
    order = torch.argsort(indices, stable=True)
    slots, counts = torch.unique_consecutive(indices[order], return_counts=True)
    groups, start = [], 0
    for slot, count in zip(slots.tolist(), counts.tolist()):
        if slot >= 0:
            groups.append((slot, order[start : start + count]))
        start += count
    return groups


def _gather_matmul(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype) -> torch.Tensor:
    """The reference computation for small batches, with -1 rows zeroed."""
    selected = weights[indices.clamp(min=0)].to(dtype)
    out = torch.einsum("bi, boi -> bo", x.to(dtype), selected)
    return out.masked_fill_((indices < 0).unsqueeze(1), 0)


def _lora_matmul(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, out_features: int, dtype) -> torch.Tensor:
    """y[t] = x[t] @ weights[indices[t]][:out_features].T, zero where indices[t] == -1."""
    weights = _slot_weights(weights)
    if x.shape[0] <= GATHER_MAX_TOKENS:
        return _gather_matmul(x, weights[:, :out_features], indices, dtype)
    x = x.to(dtype)
    groups = _groups(indices)
    if len(groups) == 1 and groups[0][1] is None:
        return x @ weights[groups[0][0], :out_features].to(dtype).T
    y = torch.zeros(x.shape[0], out_features, dtype=dtype, device=x.device)
    for slot, rows in groups:
        y.index_copy_(0, rows, x.index_select(0, rows) @ weights[slot, :out_features].to(dtype).T)
    return y


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
