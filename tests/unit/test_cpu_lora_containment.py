"""No adapter changes another request's output inside the engine's LoRA path: a slot
holding NaN does not leak into other tokens in any form of the fused path; vLLM's
reference path (the fused path off) gets no delta for tokens without adapter; a slot
written with non-finite values is cleared."""

from __future__ import annotations

import pytest
import torch
import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

from adapterserve.engine_plugins.cpu_lora import punica
from adapterserve.engine_plugins.cpu_lora.containment import fix_reference_ops, guard_slots
from tests.unit.test_cpu_lora_fused import VLLMWrapper, layers, reference_ops, wrapper  # noqa: F401 (fixture)

SLICES = (64, 32, 32)
SLOTS, RANK, IN = 3, 8, 64


def poisoned_copy(layer, slot: int, value=float("nan")):
    for tensor in (*layer.lora_a_stacked, *layer.lora_b_stacked):
        tensor[slot].fill_(value)


def overflowing(layer, slot: int):
    """Finite values whose products overflow: every token's shrink through this slot is inf."""
    for tensor in layer.lora_a_stacked:
        tensor[slot].fill_(1e38)


@pytest.mark.parametrize("tokens", [4, 300, 3000])  # dense, dense/grouped, grouped forms
def test_an_overflowing_slot_does_not_reach_other_tokens(tokens):
    """The dense form computes every token through every slot of the span: the overflow
    (inf) of the other slot must be dropped by a select, not multiplied by 0 (NaN)."""
    generator = torch.Generator().manual_seed(tokens)
    _, clean = layers(SLOTS, RANK, IN, SLICES, torch.float32, generator)
    generator = torch.Generator().manual_seed(tokens)
    _, poisoned = layers(SLOTS, RANK, IN, SLICES, torch.float32, generator)
    overflowing(poisoned, SLOTS - 1)
    lora_ids = [i % (SLOTS + 1) for i in range(tokens)]  # 0 (no adapter), 1, 2, 3 (poisoned)
    x = torch.randn(tokens, IN, generator=generator)
    outputs = []
    for layer in (clean, poisoned):
        y = torch.zeros(tokens, sum(SLICES))
        w = wrapper(punica.FusedPunicaWrapperCPU, lora_ids, SLOTS, is_prefill=tokens > 4)
        w.add_lora_linear(y, x, layer.lora_a_stacked, layer.lora_b_stacked, 1.0, SLICES)
        outputs.append(y)
    others = torch.tensor([i != SLOTS for i in lora_ids])
    assert bool(torch.isfinite(outputs[1][others]).all())
    torch.testing.assert_close(outputs[1][others], outputs[0][others])
    assert not bool(torch.isfinite(outputs[1][~others]).all())  # the poisoned tokens do see it


@pytest.fixture
def fixed_reference_ops(reference_ops, monkeypatch):  # noqa: F811
    for name in ("bgmv_shrink", "sgmv_shrink", "bgmv_expand", "sgmv_expand", "bgmv_expand_slice", "sgmv_expand_slice"):
        monkeypatch.setattr(punica_cpu, name, getattr(punica_cpu, name))
    fix_reference_ops()


@pytest.mark.parametrize("is_prefill", [False, True])
def test_the_reference_path_gives_no_delta_to_tokens_without_adapter(fixed_reference_ops, is_prefill):
    generator = torch.Generator().manual_seed(3)
    layer, _ = layers(SLOTS, RANK, IN, SLICES, torch.float32, generator)  # every slot holds an adapter
    poisoned_copy(layer, SLOTS)  # the extra last slot, which vLLM's ops apply at index -1
    lora_ids = [0, 1, 2, 0, 3, 0] if not is_prefill else [0, 0, 1, 1, 2, 2]
    x = torch.randn(len(lora_ids), IN, generator=generator)
    start = torch.randn(len(lora_ids), sum(SLICES), generator=generator)
    y = start.clone()
    w = wrapper(VLLMWrapper, lora_ids, SLOTS + 1, is_prefill)
    w.add_lora_linear(y, x, layer.lora_a_stacked, layer.lora_b_stacked, 1.0, SLICES)
    base = torch.tensor([i == 0 for i in lora_ids])
    torch.testing.assert_close(y[base], start[base])  # untouched, NaN in the last slot or not
    assert bool(torch.isfinite(y).all()) and not torch.equal(y[~base], start[~base])


def test_non_finite_weights_written_to_a_slot_never_reach_other_tokens():
    """NaN in B would cross slots in the dense expand (0 * NaN); the slot guard keeps it
    from ever being in a slot."""
    generator = torch.Generator().manual_seed(5)
    _, layer = layers(SLOTS, RANK, IN, SLICES, torch.float32, generator)
    layer.set_lora = lambda index, *_: poisoned_copy(layer, index)  # what a NaN adapter would write
    layer.reset_lora = lambda index: poisoned_copy(layer, index, 0.0)
    expected_x = torch.randn(4, IN, generator=generator)
    guard_slots(layer)
    layer.set_lora(SLOTS - 1)
    y = torch.zeros(4, sum(SLICES))
    w = wrapper(punica.FusedPunicaWrapperCPU, [1, 2, 3, 0], SLOTS, is_prefill=False)
    w.add_lora_linear(y, expected_x, layer.lora_a_stacked, layer.lora_b_stacked, 1.0, SLICES)
    assert bool(torch.isfinite(y).all()) and not bool(y[2:].any())  # the cleared slot adds nothing


class SlotLayer:
    def __init__(self):
        self.lora_a_stacked = (torch.zeros(2, 1, 4, 8),)
        self.lora_b_stacked = (torch.zeros(2, 1, 8, 4),)

    def set_lora(self, index, a, b):
        self.lora_a_stacked[0][index, 0] = a
        self.lora_b_stacked[0][index, 0] = b

    def reset_lora(self, index):
        self.lora_a_stacked[0][index] = 0
        self.lora_b_stacked[0][index] = 0


def test_a_slot_written_with_non_finite_values_is_cleared():
    layer = SlotLayer()
    guard_slots(layer)
    layer.set_lora(0, torch.ones(4, 8), torch.ones(8, 4))
    bad = torch.ones(8, 4)
    bad[0, 0] = float("inf")
    layer.set_lora(1, torch.ones(4, 8), bad)
    assert bool((layer.lora_a_stacked[0][0] == 1).all())
    assert not bool(layer.lora_a_stacked[0][1].any()) and not bool(layer.lora_b_stacked[0][1].any())
