"""The grouped CPU LoRA ops equal vLLM's reference ops over random cases.

The reference applies the last slot's adapter where the index is -1 (it indexes the
weights with -1); the grouped ops apply none, as vLLM intends. So the reference is run
with an extra all-zero slot that -1 is mapped to: that is the intended semantics.
"""

from __future__ import annotations

import random

import pytest
import torch
from vllm.lora.ops.torch_ops import lora_ops as reference

from adapterserve.engine_plugins.cpu_lora import ops as grouped

CASES = 24


def tolerance(dtype):
    return dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)


def with_zero_slot(weights, indices):
    zero = torch.zeros_like(weights[:1])
    slots = weights.shape[0]
    return torch.cat([weights, zero]), torch.where(indices < 0, torch.full_like(indices, slots), indices)


def random_case(seed):
    rng = random.Random(seed)
    tokens = rng.choice([1, 2, 7, 16, 31, 33, 64, 257, 1024, 4096])
    hidden = 128 if tokens >= 1024 else rng.choice([64, 576])
    rank = rng.choice([8, 16, 32, 64])
    slots = rng.randint(1, 16)
    dtype = rng.choice([torch.float32, torch.bfloat16])
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randint(-1, slots, (tokens,), generator=generator)
    if rng.random() < 0.3:  # a single adapter (or none) for the whole batch
        indices = torch.full((tokens,), rng.randint(-1, slots - 1))
    return tokens, hidden, rank, slots, dtype, generator, indices


@pytest.mark.parametrize("seed", range(CASES))
def test_shrink(seed):
    tokens, hidden, rank, slots, dtype, generator, indices = random_case(seed)
    x = torch.randn(tokens, hidden, generator=generator).to(dtype)
    a = torch.randn(slots, 1, rank, hidden, generator=generator).to(dtype)
    expected, got = torch.zeros(tokens, rank, dtype=dtype), torch.zeros(tokens, rank, dtype=dtype)
    reference.bgmv_shrink(x, *with_zero_slot(a, indices)[:1], expected, with_zero_slot(a, indices)[1], 0.5)
    grouped.bgmv_shrink(x, a, got, indices, 0.5)
    torch.testing.assert_close(got, expected, **tolerance(dtype))


@pytest.mark.parametrize("seed", range(CASES))
@pytest.mark.parametrize("add_inputs", [True, False])
def test_expand(seed, add_inputs):
    tokens, hidden, rank, slots, dtype, generator, indices = random_case(seed + 100)
    x = torch.randn(tokens, rank, generator=generator).to(dtype)
    b = torch.randn(slots, 1, hidden, rank, generator=generator).to(dtype)
    start = torch.randn(tokens, hidden + 8, generator=generator).to(dtype)  # output padded wider
    expected, got = start.clone(), start.clone()
    weights, mapped = with_zero_slot(b, indices)
    reference.bgmv_expand(x, weights, expected, mapped, add_inputs)
    grouped.bgmv_expand(x, b, got, indices, add_inputs)
    torch.testing.assert_close(got, expected, **tolerance(dtype))


@pytest.mark.parametrize("seed", range(CASES))
def test_expand_slice_and_sgmv(seed):
    tokens, hidden, rank, slots, dtype, generator, _ = random_case(seed + 200)
    # sequences of random lengths summing to `tokens`, one adapter index each
    lengths, left = [], tokens
    while left:
        lengths.append(min(left, random.Random(seed + len(lengths)).randint(1, max(1, tokens // 3))))
        left -= lengths[-1]
    seq_len = torch.tensor(lengths)
    seq_idx = torch.randint(-1, slots, (len(lengths),), generator=generator)
    starts = torch.cumsum(seq_len, 0) - seq_len
    x = torch.randn(tokens, rank, generator=generator).to(dtype)
    b = torch.randn(slots, 1, 48, rank, generator=generator).to(dtype)
    start = torch.randn(tokens, 3 * 48, generator=generator).to(dtype)
    expected, got = start.clone(), start.clone()
    weights, _ = with_zero_slot(b, seq_idx)
    mapped = torch.where(seq_idx < 0, torch.full_like(seq_idx, slots), seq_idx)
    meta = (starts, seq_len)
    reference.sgmv_expand_slice(x, weights, expected, *meta, mapped, len(lengths), int(seq_len.max()), tokens, 48, 48, True)
    grouped.sgmv_expand_slice(x, b, got, *meta, seq_idx, len(lengths), int(seq_len.max()), tokens, 48, 48, True)
    torch.testing.assert_close(got, expected, **tolerance(dtype))

    xs = torch.randn(tokens, 64, generator=generator).to(dtype)
    a = torch.randn(slots, 1, rank, 64, generator=generator).to(dtype)
    expected, got = torch.zeros(tokens, rank, dtype=dtype), torch.zeros(tokens, rank, dtype=dtype)
    reference.sgmv_shrink(xs, with_zero_slot(a, seq_idx)[0], expected, *meta, mapped, len(lengths), int(seq_len.max()), tokens, 2.0)
    grouped.sgmv_shrink(xs, a, got, *meta, seq_idx, len(lengths), int(seq_len.max()), tokens, 2.0)
    torch.testing.assert_close(got, expected, **tolerance(dtype))


def test_single_row_broadcast_like_the_reference():
    x = torch.randn(1, 8)
    b = torch.randn(2, 1, 16, 8)
    expected, got = torch.zeros(4, 16), torch.zeros(4, 16)
    reference.bgmv_expand(x, b, expected, torch.tensor([1]), True)
    grouped.bgmv_expand(x, b, got, torch.tensor([1]), True)
    torch.testing.assert_close(got, expected)


def test_reference_applies_the_last_slot_where_the_index_is_minus_one():
    """Why the grouped ops differ there: this is the reference's behaviour."""
    x, w = torch.ones(1, 4), torch.ones(2, 1, 3, 4)
    out = torch.zeros(1, 3)
    reference.bgmv_shrink(x, w, out, torch.tensor([-1]), 1.0)
    assert out.sum() == 12  # slot 1's adapter applied to a token that has none
    grouped.bgmv_shrink(x, w, out, torch.tensor([-1]), 1.0)
    assert out.sum() == 0


def test_plugin_installs_into_the_cpu_wrapper(monkeypatch):
    import vllm.lora.model_manager as model_manager
    import vllm.lora.ops.torch_ops as torch_ops
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    from adapterserve.engine_plugins.cpu_lora import plugin
    from adapterserve.engine_plugins.cpu_lora.punica import FusedPunicaWrapperCPU

    for name in grouped.OPS:  # monkeypatch puts back whatever install replaces
        monkeypatch.setattr(punica_cpu, name, getattr(punica_cpu, name))
        monkeypatch.setattr(torch_ops, name, getattr(torch_ops, name))
    monkeypatch.setattr(punica_cpu, "PunicaWrapperCPU", punica_cpu.PunicaWrapperCPU)
    factories = ("from_layer", "from_layer_logits_processor", "from_layer_classification")
    vllm_factories = {name: getattr(model_manager, name) for name in factories}
    for name in factories:
        monkeypatch.setattr(model_manager, name, vllm_factories[name])
    vllm_from_layer = model_manager.from_layer
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.platforms.cpu import CpuPlatform

    vllm_apply = BaseLinearLayerWithLoRA._apply_lora_to_output
    monkeypatch.setattr(BaseLinearLayerWithLoRA, "_apply_lora_to_output", vllm_apply)
    monkeypatch.setattr(CpuPlatform, "check_and_update_config", CpuPlatform.check_and_update_config)
    monkeypatch.setattr(torch.compiler, "load_compiled_function", torch.compiler.load_compiled_function)
    monkeypatch.setattr(plugin, "_installed", False)
    for name in ("sgmv_expand_slice", "bgmv_expand_slice"):
        monkeypatch.setattr(punica_cpu, name, getattr(punica_cpu, name))
    vllm_shrink = punica_cpu.bgmv_shrink
    monkeypatch.setenv(plugin.ENV_SWITCH, "0")
    plugin.register()
    # off: vLLM's reference ops, wrapped so that index -1 gets no delta
    assert punica_cpu.bgmv_shrink is not grouped.OPS["bgmv_shrink"] and punica_cpu.bgmv_shrink is not vllm_shrink
    assert punica_cpu.PunicaWrapperCPU is not FusedPunicaWrapperCPU
    assert model_manager.from_layer is not vllm_from_layer  # the slot guard
    assert model_manager.from_layer_logits_processor is vllm_factories["from_layer_logits_processor"]
    assert BaseLinearLayerWithLoRA._apply_lora_to_output is vllm_apply  # no compiled LoRA on vLLM's own path
    assert hasattr(torch.compiler.load_compiled_function, "adapterserve_wrapped_load")  # either way
    monkeypatch.setattr(plugin, "_installed", False)
    monkeypatch.setenv(plugin.ENV_SWITCH, "1")
    plugin.register()
    assert all(getattr(punica_cpu, name) is grouped.OPS[name] for name in grouped.OPS)
    assert punica_cpu.PunicaWrapperCPU is FusedPunicaWrapperCPU
    assert model_manager.from_layer is not vllm_from_layer
    # the logits and score layers keep a live record for `add_lora_logits`
    assert all(getattr(model_manager, name) is not vllm_factories[name] for name in factories)
    assert getattr(BaseLinearLayerWithLoRA._apply_lora_to_output, "adapterserve_compiled", False)


def test_a_new_mapping_of_the_same_shape_gets_a_new_plan():
    """The plan of the last mapping is reused only for an equal mapping."""
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(8, 64, generator=generator)
    a = torch.randn(3, 1, 8, 64, generator=generator)
    for indices in (torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), torch.tensor([2, 2, 1, 1, -1, 0, 0, 2])):
        expected, got = torch.zeros(8, 8), torch.zeros(8, 8)
        reference.bgmv_shrink(x, *with_zero_slot(a, indices)[:1], expected, with_zero_slot(a, indices)[1], 1.0)
        grouped.bgmv_shrink(x, a, got, indices, 1.0)
        torch.testing.assert_close(got, expected)
