"""LoRA weight slots laid out so that a whole layer is one matmul per side.

vLLM allocates, per LoRA linear layer and per slice (q, k, v; gate, up), A as
[slots, 1, rank, in] and B as [slots, 1, out, rank], each its own tensor. Laid out that
way, applying a layer takes a shrink and an expand per slice, and B of one slot has to be
transposed (copied) before it can be a matmul's right operand.

`lay_out` re-allocates a layer's slots, same shapes and bytes, as views of:
- one A tensor for all slices, [slots, 1, sum of ranks, in]: every slice's A of a slot
  one after the other, so one matmul shrinks the input for every slice (and, viewed as
  [slots * sum of ranks, in], for every slot);
- per slice, B stored transposed, [slots, 1, rank, out]: the [slots, 1, out, rank] view
  vLLM writes through is its transpose, and [slots * rank, out] is a free view, so the
  expand of every slot is one `addmm_` into the output.

vLLM keeps reading and writing the slots through the views it expects (set_lora,
reset_lora, the reference ops). `fused_slots` recovers the fused tensors from the views.

`track_live_slots` keeps, per layer and slot, which slices the adapter in the slot changes:
vLLM fills the slots of the modules an adapter does not train with zeros (peft's default
for Llama-like models trains q and v only, as do the demo heads), and the fused path skips
a layer whose slots in the batch are all empty, and within a layer (q, k, v) the slices
they all leave empty, instead of adding zeros. The same record is kept for the layers vLLM
lays out itself, the logits and a classifier's score layer (`punica.add_lora_logits`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


LIVE_ATTRIBUTE = "adapterserve_live_slots"


@dataclass(frozen=True)
class FusedSlots:
    """Flat views: slot s of A is rows s * sum(ranks) .. (s + 1) * sum(ranks) of `a`, slot
    s of slice i's B is rows s * ranks[i] .. (s + 1) * ranks[i] of `b[i]`."""

    a: torch.Tensor  # [slots * sum of ranks, in]
    b: tuple[torch.Tensor, ...]  # per slice [slots * rank, out]
    ranks: tuple[int, ...]
    rank_sum: int
    # per slot, bit i set where slice i may change the output (0: the slot changes nothing
    # in this layer; None: not tracked, every slice may)
    live: list[int] | None = None

    def live_of_slot(self) -> list[int]:
        """Per slot, the slices its adapter may change, as bits (`live`, or every slice)."""
        if self.live is not None:
            return self.live
        return [(1 << len(self.ranks)) - 1] * (self.a.shape[0] // self.rank_sum)

    def live_slices(self, slots) -> int:
        """The slices any of `slots` may change, as bits (bit i: slice i)."""
        if self.live is None:
            return (1 << len(self.ranks)) - 1
        bits = 0
        for s in slots:
            bits |= self.live[s]
        return bits


def lay_out(layer, dtype: torch.dtype | None = None) -> None:
    """Replace `layer.lora_a_stacked` / `lora_b_stacked` by views of the fused layout
    (zeros, as vLLM allocates them; called right after `create_lora_weights`), in `dtype`
    if given (the fused path then computes in it; vLLM converts as it copies adapters in)."""
    a_slices, b_slices = layer.lora_a_stacked, layer.lora_b_stacked
    slots, _, _, in_features = a_slices[0].shape
    ranks = [a.shape[2] for a in a_slices]
    like = dict(dtype=dtype or a_slices[0].dtype, device=a_slices[0].device)
    a_all = torch.zeros(slots, 1, sum(ranks), in_features, **like)
    a_views, start = [], 0
    for rank in ranks:
        a_views.append(a_all[:, :, start : start + rank])
        start += rank
    layer.lora_a_stacked = tuple(a_views)
    layer.lora_b_stacked = tuple(
        torch.zeros(slots, 1, b.shape[3], b.shape[2], **like).transpose(2, 3) for b in b_slices
    )


def fused_slots(a_slices: tuple[torch.Tensor, ...], b_slices: tuple[torch.Tensor, ...]) -> FusedSlots | None:
    """The fused tensors behind a layer's slot views, or None when they are not laid out
    by `lay_out` (then the layer is applied slice by slice)."""
    a_all = _fused_a(a_slices)
    if a_all is None or a_all.dim() != 4 or not a_all.is_contiguous():
        return None
    ranks = tuple(a.shape[2] for a in a_slices)
    if len(set(ranks)) != 1:  # vLLM gives every slice the same rank; the fused path relies on it
        return None
    if a_all.shape[2] != sum(ranks) or any(a._base is not a_all for a in a_slices[1:]):
        return None
    b_fused = tuple(b.transpose(2, 3) for b in b_slices)
    live = getattr(a_all, LIVE_ATTRIBUTE, None)
    if not all(b.is_contiguous() and b.shape[2] == rank for b, rank in zip(b_fused, ranks)):
        return None
    flat_b = tuple(b.reshape(-1, b.shape[3]) for b in b_fused)
    return FusedSlots(a_all.reshape(-1, a_all.shape[3]), flat_b, ranks, sum(ranks), live)


def as_slices(stacked) -> tuple[torch.Tensor, ...]:
    """A layer's slots per slice: vLLM keeps a tuple of slices for linear layers (one for
    the score layer) and one tensor for the logits."""
    return (stacked,) if isinstance(stacked, torch.Tensor) else tuple(stacked)


def live_slots(a_stacked: torch.Tensor) -> list[int] | None:
    """The live record `track_live_slots` keeps on a layer's A tensor (per slot, the slices
    its adapter changes, as bits), or None where the layer is not tracked."""
    return getattr(a_stacked, LIVE_ATTRIBUTE, None)


def _fused_a(a_slices: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    """The one A tensor the slices are views of (`lay_out`), where the live list is kept;
    a layer of one slice that vLLM laid out itself has no such base: its slice is it."""
    base = a_slices[0]._base
    return a_slices[0] if base is None and len(a_slices) == 1 else base


def track_live_slots(layer, changed=lambda: None) -> None:
    """Wrap the layer's `set_lora` / `reset_lora` (laid out by `lay_out`) to keep, per slot,
    the slices its adapter changes: those with both A and B not all zero (a conservative
    test: a slice the adapter changes always passes it). The list lives on the fused A
    tensor, where `fused_slots` finds it (for a layer of one slice that vLLM laid out,
    the logits or the score layer: on its A tensor, `live_slots`). `changed()` is called
    after every update (the compiled op then looks at every layer again:
    `compiled.IdleLayers`)."""
    a_all = _fused_a(as_slices(layer.lora_a_stacked))
    if a_all is None:  # several slices not laid out by `lay_out`
        return
    live = [0] * a_all.shape[0]  # vLLM allocates the slots empty
    setattr(a_all, LIVE_ATTRIBUTE, live)
    set_lora, reset_lora = layer.set_lora, layer.reset_lora

    def tracked_reset_lora(index: int):
        reset_lora(index)
        live[index] = 0
        changed()

    def tracked_set_lora(index: int, *args, **kwargs):
        set_lora(index, *args, **kwargs)
        live[index] = sum(
            1 << i
            for i, (a, b) in enumerate(zip(as_slices(layer.lora_a_stacked), as_slices(layer.lora_b_stacked)))
            if bool(a[index].any()) and bool(b[index].any())
        )
        changed()

    layer.set_lora, layer.reset_lora = tracked_set_lora, tracked_reset_lora
