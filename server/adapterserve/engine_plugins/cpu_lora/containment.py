"""Defence in depth inside the engine: no adapter can change another request's output.

Validation keeps non-finite adapters out of the engine; these guards hold even if one
got in, and on vLLM's own CPU path too:

- `guard_slots(layer)`: after vLLM writes an adapter into a layer's slot (`set_lora`),
  a slot holding NaN or infinite values is cleared and the event logged. Every CPU form
  computes with all the slots of a span at once (a token's own slot is kept by a select,
  but a zero times NaN in the expand is still NaN): finite slots are what keep one
  adapter's values out of the other tokens.
- `zero_new_kv_blocks()`: the KV cache blocks a request is given are zeroed first. A
  request driven to NaN leaves NaN in its blocks; the next request that gets one of them
  and has not yet written all of it reads the stale NaN through the attention kernel's
  masked positions (a 0 weight times NaN is NaN), and its output is NaN too. vLLM has the
  mechanism (for Mamba and mixed-precision caches); this turns it on.
- `fix_reference_ops()`: vLLM 0.32's CPU reference ops (used with the fused path off)
  apply the last slot's adapter to tokens with no adapter (index -1), so one adapter
  changes base requests batched with it. The fix zeroes the shrink output of those tokens
  and leaves their rows untouched by the expand.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

log = logging.getLogger("vllm.plugins.adapterserve_grouped_lora")  # configured by vLLM in its processes


def _finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def guard_slots(layer) -> None:
    """Wrap the layer's `set_lora` so that a non-finite adapter leaves its slot empty."""
    set_lora = layer.set_lora

    @functools.wraps(set_lora)
    def checked_set_lora(index: int, *args, **kwargs):
        set_lora(index, *args, **kwargs)
        slots = [s[index] for s in (*layer.lora_a_stacked, *layer.lora_b_stacked)]
        if not _finite(slots):
            layer.reset_lora(index)
            log.error("LoRA slot %d of a %s held non-finite values: cleared (pid %d)", index, type(layer).__name__, os.getpid())

    layer.set_lora = checked_set_lora


def _no_adapter_rows(indices: torch.Tensor) -> torch.Tensor:
    return indices < 0


def fix_reference_ops() -> None:
    """Give vLLM's CPU reference ops the intended meaning of index -1: no adapter."""
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    shrink_b, shrink_s = punica_cpu.bgmv_shrink, punica_cpu.sgmv_shrink
    expand_b, expand_s = punica_cpu.bgmv_expand, punica_cpu.sgmv_expand
    slice_b, slice_s = punica_cpu.bgmv_expand_slice, punica_cpu.sgmv_expand_slice

    def bgmv_shrink(inputs, weights, output, indices, scaling=1.0):
        shrink_b(inputs, weights, output, indices, scaling)
        output[: indices.shape[0]][_no_adapter_rows(indices)] = 0

    def sgmv_shrink(inputs, weights, output, starts, lengths, indices, *rest):
        shrink_s(inputs, weights, output, starts, lengths, indices, *rest)
        exploded = torch.repeat_interleave(indices, lengths)
        output[: exploded.shape[0]][_no_adapter_rows(exploded)] = 0

    def keep_rows(expand, index_of):
        """Run an expand, then put back the rows of tokens without adapter."""

        @functools.wraps(expand)
        def wrapped(*args, **kwargs):
            output, rows = args[2], _no_adapter_rows(index_of(args))
            if not bool(rows.any()):
                return expand(*args, **kwargs)
            kept = output[: rows.shape[0]][rows].clone()
            result = expand(*args, **kwargs)
            output[: rows.shape[0]][rows] = kept
            return result

        return wrapped

    punica_cpu.bgmv_shrink = bgmv_shrink
    punica_cpu.sgmv_shrink = sgmv_shrink
    punica_cpu.bgmv_expand = keep_rows(expand_b, lambda a: a[3])
    punica_cpu.bgmv_expand_slice = keep_rows(slice_b, lambda a: a[3])
    punica_cpu.sgmv_expand = keep_rows(expand_s, lambda a: torch.repeat_interleave(a[5], a[4]))
    punica_cpu.sgmv_expand_slice = keep_rows(slice_s, lambda a: torch.repeat_interleave(a[5], a[4]))


def zero_new_kv_blocks() -> None:
    """Make vLLM treat every KV cache as one whose new blocks must be zeroed: the
    scheduler then records each newly allocated block and the worker zeroes it."""
    from vllm.v1.kv_cache_interface import KVCacheConfig

    KVCacheConfig.needs_kv_cache_zeroing = property(lambda self: True)
