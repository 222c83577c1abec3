"""The fused CPU punica wrapper on the fused slot layout equals vLLM's CPU punica wrapper
with its reference ops, over random cases (tokens 1 to 4096, ranks 8 to 64, 1 to 16
adapters, one to three slices, tokens without adapter, bf16 and fp32, prefill and decode),
in every form the autotuner can choose (`punica.FORMS`; the kernel also as built for
AVX2 CPUs) and by the hand rules it falls back to.

The reference applies the last slot's adapter where the index is -1; vLLM intends no
adapter there (and so does adapterserve). The reference layer therefore gets one extra,
all-zero slot at the end: for it, -1 then means no adapter too.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
import vllm.lora.punica_wrapper.punica_cpu as punica_cpu
from vllm.lora.layers.utils import LoRAMapping
from vllm.lora.ops.torch_ops import lora_ops as vllm_ops

from adapterserve.engine_plugins.cpu_lora import autotune, native, punica
from adapterserve.engine_plugins.cpu_lora.layout import fused_slots, lay_out
from adapterserve.engine_plugins.cpu_lora.native import LoraKernel, load_kernel
from adapterserve.dtypes import cpu_identity

# vLLM's class as shipped, whether or not the plugin replaced the module's name for it
VLLMWrapper = punica.FusedPunicaWrapperCPU.__mro__[1]
CASES = 32
SLICES = [(96,), (64, 32, 32), (80, 80)]


def tolerance(dtype):
    return dict(rtol=3e-2, atol=3e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)


@pytest.fixture
def reference_ops(monkeypatch):
    """vLLM's wrapper calls the ops by their names in its module: make those the reference."""
    for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice", "sgmv_shrink", "sgmv_expand", "sgmv_expand_slice"):
        monkeypatch.setattr(punica_cpu, name, getattr(vllm_ops, name))


@pytest.fixture(autouse=True)
def hand_rules(monkeypatch):
    """The hand rules, unless a test forces a form as a tuning would (the measurement
    itself: test_cpu_lora_autotune.py)."""
    monkeypatch.setattr(autotune, "tuning_for", lambda dtype, kernel: None)


def force_form(monkeypatch, form: str) -> None:
    """A tuning that measured `form` fastest at every size."""
    tuning = autotune.Tuning({(16, 1): {form: 1.0}}, "forced")
    monkeypatch.setattr(autotune, "tuning_for", lambda dtype, kernel: tuning)


@pytest.fixture(scope="module")
def avx2_kernel_path(tmp_path_factory):
    """The kernel as built for AVX2-only CPUs (`-march=haswell`, which this CPU runs too)."""
    if "avx2" not in cpu_identity().split("|")[1].split():
        pytest.skip("this CPU has no AVX2")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(native.ENV_DIR, str(tmp_path_factory.mktemp("kernels")))
        patch.setattr(native, "FLAGS", tuple("-march=haswell" if f == "-march=native" else f for f in native.FLAGS))
        return native.built_kernel_path()


TUNED_FORMS = ["kernel", "dense", "grouped", "kernel_avx2"]


def tune_to(form: str, request, monkeypatch) -> str:
    """Force each form the autotuner can choose (at every size); the form's name in FORMS."""
    if form.startswith("kernel"):
        assert load_kernel() is not None
    if form == "kernel_avx2":
        import ctypes

        kernel = LoraKernel(ctypes.CDLL(str(request.getfixturevalue("avx2_kernel_path"))))
        assert not kernel.bf16_form
        monkeypatch.setattr(punica, "load_kernel", lambda: kernel)
        form = "kernel"
    force_form(monkeypatch, form)
    return form


@pytest.fixture
def matmul_forms(monkeypatch):
    """The PyTorch forms (one adapter, dense, grouped) at every size: the kernel off."""
    monkeypatch.setattr(punica, "KERNEL_MAX_TOKENS", {})
    monkeypatch.setattr(punica, "KERNEL_FROM_SLOTS", {})


@pytest.fixture
def kernel_form(monkeypatch):
    """The kernel of `lora_kernel.cpp` at every size (g++ is part of this machine kind)."""
    assert load_kernel() is not None
    monkeypatch.setattr(punica, "KERNEL_MAX_TOKENS", {torch.float32: 1 << 30, torch.bfloat16: 1 << 30})


def vllm_layer(slots, rank, in_features, slices, dtype):
    return SimpleNamespace(
        lora_a_stacked=tuple(torch.zeros(slots, 1, rank, in_features, dtype=dtype) for _ in slices),
        lora_b_stacked=tuple(torch.zeros(slots, 1, out, rank, dtype=dtype) for out in slices),
    )


def layers(slots, rank, in_features, slices, dtype, generator, slot_dtype=None):
    """The same random adapters in vLLM's layout (plus the zero slot) and in the fused one
    (its slots in `slot_dtype` if given, as the plugin lays them out for bf16 models)."""
    reference = vllm_layer(slots + 1, rank, in_features, slices, dtype)
    fused = vllm_layer(slots, rank, in_features, slices, dtype)
    lay_out(fused, dtype=slot_dtype)
    for i in range(len(slices)):
        a = torch.randn(slots, 1, rank, in_features, generator=generator) / in_features**0.5
        b = torch.randn(slots, 1, slices[i], rank, generator=generator) / rank**0.5
        for layer in (reference, fused):
            layer.lora_a_stacked[i][:slots] = a.to(dtype)
            layer.lora_b_stacked[i][:slots] = b.to(dtype)
    return reference, fused


def wrapper(cls, lora_ids, slots, is_prefill):
    tokens = len(lora_ids)
    w = cls(max_num_batched_tokens=max(tokens, 8), max_batches=max(tokens, 8), device="cpu")
    index_to_id = list(range(1, slots + 1)) + [None]  # slot s holds adapter id s + 1
    w.update_metadata(LoRAMapping(tuple(lora_ids), tuple(lora_ids), is_prefill=is_prefill), index_to_id, slots + 2, 1000)
    return w


def random_case(seed):
    rng = random.Random(seed)
    tokens = rng.choice([1, 2, 7, 16, 31, 64, 100, 257, 1024, 4096])
    slots = rng.randint(1, 16)
    in_features = 64 if tokens >= 1024 else rng.choice([64, 576])
    lora_ids = [rng.randint(0, slots) for _ in range(tokens)]  # 0: no adapter
    if rng.random() < 0.3:  # one adapter (or none) for the whole batch
        lora_ids = [rng.randint(0, slots)] * tokens
    elif rng.random() < 0.3:  # sequences: runs of one adapter, as in a prefill
        lora_ids = sorted(lora_ids)
    elif rng.random() < 0.4:  # a few adapters in slots with gaps between them (the gathered dense form)
        chosen = rng.sample(range(1, slots + 1), min(slots, rng.randint(2, 4)))
        lora_ids = [rng.choice(chosen + [0]) for _ in range(tokens)]
    return dict(
        tokens=tokens, slots=slots, in_features=in_features, lora_ids=lora_ids,
        rank=rng.choice([8, 16, 32, 64]), slices=rng.choice(SLICES),
        dtype=rng.choice([torch.float32, torch.bfloat16]), is_prefill=rng.random() < 0.5,
        scale=rng.choice([1.0, 0.5]), float32_slots=rng.random() < 0.5,
    )


@pytest.mark.parametrize("forms", ["matmul_forms", "kernel_form", *TUNED_FORMS])
@pytest.mark.parametrize("seed", range(CASES))
def test_fused_wrapper_equals_vllms_wrapper_with_reference_ops(seed, forms, reference_ops, request, monkeypatch):
    tuned = tune_to(forms, request, monkeypatch) if forms in TUNED_FORMS else request.getfixturevalue(forms)
    case = random_case(seed)
    generator = torch.Generator().manual_seed(seed)
    dtype, slices = case["dtype"], case["slices"]
    slot_dtype = torch.float32 if case["float32_slots"] else None
    reference_layer, fused_layer = layers(case["slots"], case["rank"], case["in_features"], slices, dtype, generator, slot_dtype)
    x = torch.randn(case["tokens"], case["in_features"], generator=generator).to(dtype)
    start = torch.randn(case["tokens"], sum(slices), generator=generator).to(dtype)
    expected, got = start.clone(), start.clone()

    reference = wrapper(VLLMWrapper, case["lora_ids"], case["slots"] + 1, case["is_prefill"])
    fused = wrapper(punica.FusedPunicaWrapperCPU, case["lora_ids"], case["slots"], case["is_prefill"])
    reference.add_lora_linear(expected, x, reference_layer.lora_a_stacked, reference_layer.lora_b_stacked, case["scale"], slices)
    fused.add_lora_linear(got, x, fused_layer.lora_a_stacked, fused_layer.lora_b_stacked, case["scale"], slices)

    assert fused._plan is not None  # the fused path ran, not vLLM's
    plan = fused._plan
    if forms in TUNED_FORMS and plan.single != -1:  # the forced form ran (one adapter: its matmuls; none: nothing)
        ran = "kernel" if plan.slot_of is not None else "grouped" if plan.groups else "dense"
        assert ran == tuned or (plan.single is not None and tuned != "kernel"), (tuned, ran)
    torch.testing.assert_close(got, expected, **tolerance(dtype))


def test_each_form_is_chosen_by_the_size_of_the_batch(matmul_forms):
    plan = punica.make_step_plan
    assert plan(torch.tensor([2, 2, 2])).single == 2
    assert plan(torch.tensor([-1, -1])).single == -1
    assert plan(torch.tensor([], dtype=torch.long)).single == -1  # an empty batch: nothing to apply
    dense = plan(torch.tensor([3, -1, 4, 3]))
    assert (dense.first, dense.mask.shape, dense.gather) == (3, (4, 2, 1), None)  # slots 3..4, read in place
    assert dense.mask[:, :, 0].tolist() == [[1, 0], [0, 0], [0, 1], [1, 0]]
    gaps = plan(torch.tensor([3, -1, 9, 3]))  # slots 3 and 9: gathered, not the span 3..9
    assert gaps.gather.tolist() == [3, 9] and gaps.mask[:, :, 0].tolist() == [[1, 0], [0, 0], [0, 1], [1, 0]]
    assert plan(torch.tensor([3, 5] * 8)).gather is None  # a small gap in a decode batch: read in place
    assert plan(torch.tensor([3, 5] * punica.GATHER_ANY_GAP_TOKENS)).gather.tolist() == [3, 5]  # in a prefill: gathered
    count = punica.SPAN_DENSE_MAX_SLOTS + 1
    tokens = punica.SPAN_DENSE_MAX_WORK // count + 1  # more slots in use: just above the dense limit
    grouped = plan(torch.tensor(list(range(count)) * (tokens // count + 1) + [-1]))
    assert grouped.mask is None and [slot for slot, _ in grouped.groups] == list(range(count))
    assert sum(rows.numel() for _, rows in grouped.groups) == count * (tokens // count + 1)  # not the -1 token
    narrow = plan(torch.tensor([0, 1] * 2048))  # 2 slots: dense at any size
    assert narrow.mask is not None and narrow.mask.shape == (4096, 2, 1) and narrow.present == (0, 1)


def test_the_kernel_and_the_forms_are_chosen_per_dtype():
    plan = punica.make_step_plan
    for dtype in (torch.float32, torch.bfloat16):
        limit = punica.KERNEL_MAX_TOKENS[dtype]
        assert plan(torch.tensor([1, 2, -1, 3] * (limit // 4)), dtype, kernel=True).slot_of.tolist() == [1, 2, -1, 3] * (limit // 4)
        assert plan(torch.tensor([1, 2] * limit), dtype, kernel=True).slot_of is None  # a prefill of 2 adapters: matmuls
        assert plan(torch.tensor([1, 2] * 8), dtype, kernel=False).slot_of is None  # no kernel: the PyTorch forms
        assert plan(torch.tensor([-1] * 8), dtype, kernel=True).single == -1  # no adapter: nothing at all
        many = punica.KERNEL_FROM_SLOTS[dtype]
        assert plan(torch.tensor(list(range(many)) * 128), dtype, kernel=True).slot_of is not None  # many adapters: any size
        # the kernel's bf16 form (CPUs with AVX512-BF16): every bf16 batch, whatever its size
        with_form = plan(torch.tensor([1, 2] * limit), dtype, kernel=True, bf16_form=True).slot_of is not None
        assert with_form == (dtype == torch.bfloat16)
        assert plan(torch.tensor([1, 2] * 8), dtype, kernel=False, bf16_form=True).slot_of is None  # no kernel, no form
    # the slots counted are those the dense form would read: 4 in use (fewer than float32's 8)
    # over the span 0..7, read in place at this size (252 tokens, above float32's limit)
    spread = torch.tensor([0, 2, 5, 7] * (punica.GATHER_ANY_GAP_TOKENS // 4 - 1))
    assert plan(spread, torch.float32).gather is None and plan(spread, torch.float32, kernel=True).slot_of is not None
    wide = torch.tensor(list(range(8)) * 128)  # 1024 tokens over 8 slots
    assert plan(wide, torch.float32).mask is None  # grouped in float32
    assert plan(wide, torch.bfloat16).mask is not None  # dense in bf16 (grouping never wins there)


def test_a_new_mapping_gets_a_new_plan(reference_ops):
    generator = torch.Generator().manual_seed(3)
    reference_layer, fused_layer = layers(3, 8, 64, (96,), torch.float32, generator)
    fused = wrapper(punica.FusedPunicaWrapperCPU, [1, 2, 3, 1], 3, False)
    x = torch.randn(4, 64, generator=generator)
    for lora_ids in ([1, 2, 3, 1], [3, 3, 0, 2]):  # same length, other adapters
        mapping = LoRAMapping(tuple(lora_ids), tuple(lora_ids))
        fused.update_metadata(mapping, [1, 2, 3, None], 5, 1000)
        reference = wrapper(VLLMWrapper, lora_ids, 4, False)
        expected, got = torch.zeros(4, 96), torch.zeros(4, 96)
        reference.add_lora_linear(expected, x, reference_layer.lora_a_stacked, reference_layer.lora_b_stacked, 1.0, (96,))
        fused.add_lora_linear(got, x, fused_layer.lora_a_stacked, fused_layer.lora_b_stacked, 1.0, (96,))
        torch.testing.assert_close(got, expected)


def test_layout_keeps_vllms_shapes_and_writes_land_in_the_fused_tensors():
    layer = vllm_layer(4, 8, 64, (64, 32, 32), torch.float32)
    shapes = [t.shape for t in layer.lora_a_stacked + layer.lora_b_stacked]
    assert fused_slots(layer.lora_a_stacked, layer.lora_b_stacked) is None  # vLLM's own layout
    lay_out(layer)
    assert [t.shape for t in layer.lora_a_stacked + layer.lora_b_stacked] == shapes
    # writes as vLLM's set_lora does them: slot 2, slice 1
    layer.lora_a_stacked[1][2, 0, :8, :64].copy_(torch.full((8, 64), 7.0))
    layer.lora_b_stacked[1][2, 0, :32, :8].copy_(torch.arange(32 * 8, dtype=torch.float32).view(32, 8))
    slots = fused_slots(layer.lora_a_stacked, layer.lora_b_stacked)
    assert slots.ranks == (8, 8, 8) and slots.a.shape == (4 * 24, 64)
    assert (slots.a[2 * 24 + 8 : 2 * 24 + 16] == 7).all() and slots.a.sum() == 7 * 8 * 64
    torch.testing.assert_close(slots.b[1][2 * 8 : 3 * 8], torch.arange(32 * 8, dtype=torch.float32).view(32, 8).T)


def test_slices_of_different_ranks_are_not_fused():
    """The fused path views each slice's operand at one rank; vLLM never mixes ranks, and a
    layer that did is left to vLLM's wrapper rather than misread."""
    layer = SimpleNamespace(
        lora_a_stacked=(torch.zeros(2, 1, 8, 64), torch.zeros(2, 1, 4, 64)),
        lora_b_stacked=(torch.zeros(2, 1, 32, 8), torch.zeros(2, 1, 32, 4)),
    )
    lay_out(layer)
    assert fused_slots(layer.lora_a_stacked, layer.lora_b_stacked) is None


def test_a_layer_not_laid_out_goes_through_vllms_wrapper(reference_ops):
    generator = torch.Generator().manual_seed(5)
    reference_layer, _ = layers(2, 8, 64, (96,), torch.float32, generator)
    x = torch.randn(3, 64, generator=generator)
    expected, got = torch.zeros(3, 96), torch.zeros(3, 96)
    wrapper(VLLMWrapper, [1, 2, 1], 3, False).add_lora_linear(expected, x, reference_layer.lora_a_stacked, reference_layer.lora_b_stacked, 1.0, (96,))
    fused = wrapper(punica.FusedPunicaWrapperCPU, [1, 2, 1], 3, False)
    fused.add_lora_linear(got, x, reference_layer.lora_a_stacked, reference_layer.lora_b_stacked, 1.0, (96,))
    assert fused._plan is None
    torch.testing.assert_close(got, expected)


def tracked_logits(slots, rank, hidden, vocab):
    """The logits' LoRA slots as vLLM keeps them (one tensor each side), written through
    vLLM's own `set_lora` / `reset_lora` and tracked as the plugin tracks them."""
    from types import MethodType

    from vllm.lora.layers.logits_processor import LogitsProcessorWithLoRA

    from adapterserve.engine_plugins.cpu_lora.layout import track_live_slots

    layer = SimpleNamespace(lora_a_stacked=torch.zeros(slots, 1, rank, hidden), lora_b_stacked=torch.zeros(slots, 1, vocab, rank))
    layer.reset_lora = MethodType(LogitsProcessorWithLoRA.reset_lora, layer)
    layer.set_lora = MethodType(LogitsProcessorWithLoRA.set_lora, layer)
    track_live_slots(layer)
    return layer


@pytest.mark.parametrize("lm_head_trained, lora_ids, tracked", [
    (True, [1, 2, 0, 2], True), (False, [1, 2, 0, 2], True), (True, [1, 3, 0, 1], True), (False, [1, 2, 0, 2], False),
], ids=["trained", "untrained", "trained-slot-not-in-the-step", "untracked"])
def test_logits_equal_vllms_and_skip_the_work_without_lm_head_weights(lm_head_trained, lora_ids, tracked, reference_ops, monkeypatch):
    """The shrink runs only where a slot of the step holds weights (the layer's live record,
    kept as vLLM sets and resets its slots; untracked, it always runs), the expand only
    where the shrink is not all zeros; the logits equal vLLM's either way."""
    generator = torch.Generator().manual_seed(11)
    slots, rank, hidden, vocab = 3, 8, 64, 500
    layer = tracked_logits(slots, rank, hidden, vocab)
    layer.set_lora(2, torch.randn(rank, hidden, generator=generator), torch.randn(vocab, rank, generator=generator))
    layer.reset_lora(2)  # set, then emptied: no longer live
    if lm_head_trained:  # the slot of lora id 2
        layer.set_lora(1, torch.randn(rank, hidden, generator=generator), torch.randn(vocab, rank, generator=generator))
    a, b = layer.lora_a_stacked, layer.lora_b_stacked
    zero_slot = (torch.zeros(1, 1, rank, hidden), torch.zeros(1, 1, vocab, rank))  # the slot the reference maps -1 to
    x = torch.randn(4, hidden, generator=generator)
    start = torch.randn(4, vocab, generator=generator)
    expected, got = start.clone(), start.clone()
    wrapper(VLLMWrapper, lora_ids, slots + 1, False).add_lora_logits(expected, x, torch.cat([a, zero_slot[0]]), torch.cat([b, zero_slot[1]]), 1.0)
    calls = []
    for name in ("bgmv_shrink", "bgmv_expand"):
        monkeypatch.setattr(punica, name, lambda *args, _name=name, **kwargs: calls.append(_name) or getattr(vllm_ops, _name)(*args, **kwargs))
    if not tracked:
        a, b = a.clone(), b.clone()  # tensors without the record
    wrapper(punica.FusedPunicaWrapperCPU, lora_ids, slots, False).add_lora_logits(got, x, a, b, 1.0)
    torch.testing.assert_close(got, expected)
    applies = lm_head_trained and 2 in lora_ids
    assert calls == (["bgmv_shrink", "bgmv_expand"] if applies else [] if tracked else ["bgmv_shrink"])
    assert applies or torch.equal(got, start)


@pytest.mark.parametrize("lora_ids", [[1] * 16, [1, 2, 3, 0] * 4, [1 + i % 8 for i in range(300)]], ids=["one", "dense", "grouped"])
def test_float32_slots_of_a_bf16_model_compute_the_delta_in_float32(lora_ids, kernel_form):
    """Every form with the slots in float32 and the model in bf16: the delta is the float32
    product of the bf16 weights and input, added into the bf16 output (one rounding)."""
    generator = torch.Generator().manual_seed(7)
    slots, rank, in_features, slices = 8, 8, 576, (64, 32, 32)
    _, fused_layer = layers(slots, rank, in_features, slices, torch.bfloat16, generator, torch.float32)
    x = torch.randn(len(lora_ids), in_features, generator=generator).to(torch.bfloat16)
    start = torch.randn(len(lora_ids), sum(slices), generator=generator).to(torch.bfloat16)
    got = start.clone()
    fused = wrapper(punica.FusedPunicaWrapperCPU, lora_ids, slots, len(lora_ids) > 64)
    fused.add_lora_linear(got, x, fused_layer.lora_a_stacked, fused_layer.lora_b_stacked, 0.5, slices)

    delta = torch.zeros(len(lora_ids), sum(slices))
    for row, lora_id in enumerate(lora_ids):
        if lora_id:
            start_col = 0
            for a, b in zip(fused_layer.lora_a_stacked, fused_layer.lora_b_stacked):
                weights_a, weights_b = a[lora_id - 1, 0].float(), b[lora_id - 1, 0].float()
                delta[row, start_col : start_col + weights_b.shape[0]] = 0.5 * (x[row].float() @ weights_a.T) @ weights_b.T
                start_col += weights_b.shape[0]
    expected = start.float().add(delta)
    assert fused_layer.lora_a_stacked[0].dtype == torch.float32 and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=8e-3, atol=1e-5)  # within bf16's last bit


def tracked_layer(slots, rank, in_features, slices, changed=lambda: None):
    """A laid-out layer written through vLLM's own `set_lora` / `reset_lora`: of its merged
    column layer (a list of slices, None for a slice the adapter does not train), or for
    one slice of its base layer (o_proj, down_proj: one tensor each)."""
    from types import MethodType

    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.layers.column_parallel_linear import MergedColumnParallelLinearWithLoRA

    from adapterserve.engine_plugins.cpu_lora.layout import track_live_slots

    layer = vllm_layer(slots, rank, in_features, slices, torch.float32)
    layer.n_slices, layer.tp_size = len(slices), 1
    vllm_class = BaseLinearLayerWithLoRA if len(slices) == 1 else MergedColumnParallelLinearWithLoRA
    layer.set_lora = MethodType(vllm_class.set_lora, layer)
    layer.reset_lora = MethodType(vllm_class.reset_lora, layer)
    lay_out(layer)
    track_live_slots(layer, changed)
    return layer


@pytest.mark.parametrize("lora_ids", [[1] * 16, [1, 2, 3, 0] * 4, [1 + i % 3 for i in range(1200)]], ids=["one", "dense", "grouped"])
def test_slots_empty_in_a_layer_are_skipped_and_the_others_still_apply(lora_ids, reference_ops, monkeypatch, matmul_forms):
    """Slot 0 trains slice 1 only, slot 1 nothing in this layer (set with None slices),
    slot 2 trains it and is then reset: every form equals vLLM's reference, and a batch
    on empty slots computes nothing at all."""
    generator = torch.Generator().manual_seed(13)
    slots, rank, in_features, slices = 3, 8, 64, (64, 32, 32)
    layer = tracked_layer(slots, rank, in_features, slices)
    a = [torch.randn(rank, in_features, generator=generator) for _ in slices]
    b = [torch.randn(out, rank, generator=generator) for out in slices]
    layer.set_lora(0, [None, a[1], None], [None, b[1], None])
    layer.set_lora(1, [None] * 3, [None] * 3)
    layer.set_lora(2, a, b)
    assert fused_slots(layer.lora_a_stacked, layer.lora_b_stacked).live == [0b010, 0, 0b111]  # bit i: slice i
    layer.reset_lora(2)
    slots_now = fused_slots(layer.lora_a_stacked, layer.lora_b_stacked)
    assert slots_now.live == [0b010, 0, 0]

    reference = vllm_layer(slots + 1, rank, in_features, slices, torch.float32)
    for i in range(len(slices)):
        reference.lora_a_stacked[i][:slots] = layer.lora_a_stacked[i]
        reference.lora_b_stacked[i][:slots] = layer.lora_b_stacked[i]
    x = torch.randn(len(lora_ids), in_features, generator=generator)
    start = torch.randn(len(lora_ids), sum(slices), generator=generator)
    expected, got = start.clone(), start.clone()
    wrapper(VLLMWrapper, lora_ids, slots + 1, False).add_lora_linear(expected, x, reference.lora_a_stacked, reference.lora_b_stacked, 1.0, slices)
    fused = wrapper(punica.FusedPunicaWrapperCPU, lora_ids, slots, False)
    assert fused.add_lora_linear(got, x, layer.lora_a_stacked, layer.lora_b_stacked, 1.0, slices) is True
    torch.testing.assert_close(got, expected, **tolerance(torch.float32))
    assert not torch.equal(got, start)  # slot 0's slice 1 applied

    dead_ids = [2 if i % 2 else 3 for i in range(len(lora_ids))]  # only the empty slots 1 and 2
    calls = []
    monkeypatch.setattr(punica, "_apply_span", lambda *args: calls.append(args))
    dead = wrapper(punica.FusedPunicaWrapperCPU, dead_ids, slots, False)
    untouched = start.clone()
    # False: the compiled op may skip this layer until the mapping or a slot changes
    assert dead.add_lora_linear(untouched, x, layer.lora_a_stacked, layer.lora_b_stacked, 1.0, slices) is False
    assert dead._plan is not None and not calls and torch.equal(untouched, start)


def test_every_slot_update_is_reported_to_the_idle_layer_tracker():
    """Setting or resetting a slot may give an idle layer something to add: the callback
    (`compiled.adapters_changed` in the engine) hears of each, after the live list is updated."""
    slots, rank, in_features, slices = 2, 8, 64, (64, 32, 32)
    seen = []
    layer = tracked_layer(slots, rank, in_features, slices,
                          changed=lambda: seen.append(list(fused_slots(layer.lora_a_stacked, layer.lora_b_stacked).live)))
    a = [torch.ones(rank, in_features) for _ in slices]
    b = [torch.ones(out, rank) for out in slices]
    layer.set_lora(1, a, b)  # (vLLM's set_lora resets the slot first: heard too)
    assert seen[-1] == [0, 0b111]
    layer.reset_lora(1)
    assert seen[-1] == [0, 0]


def test_a_layer_of_one_slice_an_adapter_does_not_train_is_skipped(reference_ops, monkeypatch, matmul_forms):
    """o_proj and down_proj are layers of one slice: vLLM resets their slot for an adapter
    that trains q and v only (most adapters, every demo head). The fused path must see that
    slot empty and compute nothing, and still apply the slot that trains the layer."""
    generator = torch.Generator().manual_seed(17)
    layer = tracked_layer(2, 8, 64, (48,))
    layer.set_lora(0, torch.randn(8, 64, generator=generator), torch.randn(48, 8, generator=generator))
    layer.reset_lora(1)  # as vLLM's activate_adapter does for a module the adapter lacks
    assert fused_slots(layer.lora_a_stacked, layer.lora_b_stacked).live == [1, 0]
    x, start = torch.randn(4, 64, generator=generator), torch.randn(4, 48, generator=generator)
    calls = []
    monkeypatch.setattr(punica, "_apply_span", lambda *args: calls.append(args))
    untouched = start.clone()
    wrapper(punica.FusedPunicaWrapperCPU, [2] * 4, 2, False).add_lora_linear(
        untouched, x, layer.lora_a_stacked, layer.lora_b_stacked, 1.0, (48,))
    assert not calls and torch.equal(untouched, start)
    monkeypatch.undo()
    applied, expected = start.clone(), start.clone()
    wrapper(punica.FusedPunicaWrapperCPU, [1, 2, 1, 2], 2, False).add_lora_linear(
        applied, x, layer.lora_a_stacked, layer.lora_b_stacked, 1.0, (48,))
    expected[[0, 2]] += x[[0, 2]] @ layer.lora_a_stacked[0][0, 0].T @ layer.lora_b_stacked[0][0, 0].T
    torch.testing.assert_close(applied, expected, **tolerance(torch.float32))


@pytest.mark.parametrize("lora_ids", [[1] * 16, [1, 2] * 8, [1 + i % 2 for i in range(1200)]], ids=["one", "dense", "grouped"])
def test_a_slice_no_adapter_of_the_batch_trains_is_not_expanded(lora_ids, reference_ops, monkeypatch, matmul_forms):
    """Adapters that train q and v only (peft's default) leave k empty in the q, k, v layer:
    the fused path expands q and v only, in every form, and still equals vLLM's reference."""
    generator = torch.Generator().manual_seed(19)
    slots, rank, in_features, slices = 2, 8, 64, (64, 32, 32)
    layer = tracked_layer(slots, rank, in_features, slices)
    for slot in range(slots):
        a = [torch.randn(rank, in_features, generator=generator) for _ in slices]
        b = [torch.randn(out, rank, generator=generator) for out in slices]
        layer.set_lora(slot, [a[0], None, a[2]], [b[0], None, b[2]])
    reference = vllm_layer(slots + 1, rank, in_features, slices, torch.float32)
    for i in range(len(slices)):
        reference.lora_a_stacked[i][:slots] = layer.lora_a_stacked[i]
        reference.lora_b_stacked[i][:slots] = layer.lora_b_stacked[i]
    x = torch.randn(len(lora_ids), in_features, generator=generator)
    expected, got = torch.zeros(len(lora_ids), sum(slices)), torch.zeros(len(lora_ids), sum(slices))
    wrapper(VLLMWrapper, lora_ids, slots + 1, False).add_lora_linear(expected, x, reference.lora_a_stacked, reference.lora_b_stacked, 1.0, slices)
    spans = []
    apply_span = punica._apply_span
    monkeypatch.setattr(punica, "_apply_span", lambda *args: spans.append(args[7]) or apply_span(*args))
    wrapper(punica.FusedPunicaWrapperCPU, lora_ids, slots, False).add_lora_linear(got, x, layer.lora_a_stacked, layer.lora_b_stacked, 1.0, slices)
    assert spans and all(live == 0b101 for live in spans)
    torch.testing.assert_close(got, expected, **tolerance(torch.float32))
    assert (got[:, 64:96] == 0).all() and (got[:, :64] != 0).all()  # k untouched, q changed


def test_a_non_finite_adapter_leaves_its_slot_empty_and_not_live():
    from adapterserve.engine_plugins.cpu_lora.containment import guard_slots

    layer = tracked_layer(2, 8, 64, (64, 32, 32))
    guard_slots(layer)
    bad = torch.full((8, 64), float("nan"))
    layer.set_lora(1, [bad, None, None], [torch.ones(64, 8), None, None])
    slots = fused_slots(layer.lora_a_stacked, layer.lora_b_stacked)
    assert slots.live == [0, 0] and not slots.a.isnan().any()


@pytest.mark.parametrize("lora_ids", [[1] * 16, [1, 2, 3, 0] * 4, [1 + i % 8 for i in range(300)]], ids=["one", "three", "eight"])
def test_the_kernel_computes_a_bf16_delta_in_float32_and_rounds_once(lora_ids, kernel_form):
    """bf16 model and slots through the kernel: the delta is the float32 product of the
    bf16 weights and input, added into the bf16 output and rounded once (to nearest even),
    closer to the exact result than vLLM's reference, which rounds in between."""
    generator = torch.Generator().manual_seed(23)
    slots, rank, in_features, slices = 8, 8, 576, (64, 32, 32)
    _, fused_layer = layers(slots, rank, in_features, slices, torch.bfloat16, generator)
    x = torch.randn(len(lora_ids), in_features, generator=generator).to(torch.bfloat16)
    start = torch.randn(len(lora_ids), sum(slices), generator=generator).to(torch.bfloat16)
    got = start.clone()
    fused = wrapper(punica.FusedPunicaWrapperCPU, lora_ids, slots, False)
    fused.add_lora_linear(got, x, fused_layer.lora_a_stacked, fused_layer.lora_b_stacked, 0.5, slices)
    assert fused._plan.slot_of is not None  # the kernel ran
    delta = torch.zeros(len(lora_ids), sum(slices), dtype=torch.float64)
    for row, lora_id in enumerate(lora_ids):
        if lora_id:
            a = torch.cat([a[lora_id - 1, 0] for a in fused_layer.lora_a_stacked]).double()
            h = x[row].double() @ a.T
            start_col = 0
            for i, b in enumerate(fused_layer.lora_b_stacked):
                weights_b = b[lora_id - 1, 0].double()
                delta[row, start_col : start_col + weights_b.shape[0]] = 0.5 * h[i * rank : (i + 1) * rank] @ weights_b.T
                start_col += weights_b.shape[0]
    exact = start.double() + delta
    # one rounding of a float32 sum: within half a bf16 step of the exact value (plus the float32 sums' error)
    half_step = exact.abs().clamp_min(1e-30) * 2.0**-8
    assert ((got.double() - exact).abs() <= half_step * 1.01 + 1e-5).all()
    assert torch.equal(got[[i for i, lora_id in enumerate(lora_ids) if not lora_id]], start[[i for i, lora_id in enumerate(lora_ids) if not lora_id]])


def test_the_kernel_expands_only_live_slices_and_skips_empty_slots(reference_ops, monkeypatch, kernel_form):
    """The kernel gets the live slices of the batch's slots (q and v, not k), and a batch on
    empty slots never calls it; it still equals vLLM's reference."""
    generator = torch.Generator().manual_seed(29)
    slots, rank, in_features, slices = 3, 8, 64, (64, 32, 32)
    layer = tracked_layer(slots, rank, in_features, slices)
    for slot in range(2):
        a = [torch.randn(rank, in_features, generator=generator) for _ in slices]
        b = [torch.randn(out, rank, generator=generator) for out in slices]
        layer.set_lora(slot, [a[0], None, a[2]], [b[0], None, b[2]])
    layer.set_lora(2, [None] * 3, [None] * 3)
    reference = vllm_layer(slots + 1, rank, in_features, slices, torch.float32)
    for i in range(len(slices)):
        reference.lora_a_stacked[i][:slots] = layer.lora_a_stacked[i]
        reference.lora_b_stacked[i][:slots] = layer.lora_b_stacked[i]
    lora_ids = [1, 2, 0, 3] * 4
    x = torch.randn(len(lora_ids), in_features, generator=generator)
    expected, got = torch.zeros(len(lora_ids), sum(slices)), torch.zeros(len(lora_ids), sum(slices))
    wrapper(VLLMWrapper, lora_ids, slots + 1, False).add_lora_linear(expected, x, reference.lora_a_stacked, reference.lora_b_stacked, 1.0, slices)
    lives = []
    apply = LoraKernel.apply
    monkeypatch.setattr(LoraKernel, "apply", lambda self, *args: lives.append(args[8]) or apply(self, *args))
    wrapper(punica.FusedPunicaWrapperCPU, lora_ids, slots, False).add_lora_linear(got, x, layer.lora_a_stacked, layer.lora_b_stacked, 1.0, slices)
    assert lives == [0b101]
    torch.testing.assert_close(got, expected, **tolerance(torch.float32))
    assert (got[:, 64:96] == 0).all() and (got[::4, :64] != 0).all()
    untouched = torch.zeros(4, sum(slices))
    wrapper(punica.FusedPunicaWrapperCPU, [3, 0, 3, 3], slots, False).add_lora_linear(untouched, x[:4], layer.lora_a_stacked, layer.lora_b_stacked, 1.0, slices)
    assert lives == [0b101] and not untouched.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_non_finite_slot_changes_only_its_own_tokens_in_the_kernel(dtype, kernel_form):
    """A slot holding NaN and inf (written past the guard) poisons the tokens that use it
    and no other: the other tokens' rows equal those of a batch without it, bit for bit."""
    generator = torch.Generator().manual_seed(31)
    slots, rank, in_features, slices = 3, 8, 576, (64, 32, 32)
    _, layer = layers(slots, rank, in_features, slices, dtype, generator)
    layer.lora_a_stacked[0][1, 0, 0, :5] = float("nan")
    layer.lora_b_stacked[1][1, 0, :3, 0] = float("inf")
    x = torch.randn(8, in_features, generator=generator).to(dtype)
    start = torch.randn(8, sum(slices), generator=generator).to(dtype)
    mixed, clean = start.clone(), start.clone()
    wrapper(punica.FusedPunicaWrapperCPU, [1, 2, 3, 0] * 2, slots, False).add_lora_linear(
        mixed, x, layer.lora_a_stacked, layer.lora_b_stacked, 1.0, slices)
    wrapper(punica.FusedPunicaWrapperCPU, [1, 1, 3, 0] * 2, slots, False).add_lora_linear(
        clean, x, layer.lora_a_stacked, layer.lora_b_stacked, 1.0, slices)
    others = [0, 2, 3, 4, 6, 7]
    assert torch.equal(mixed[others], clean[others])
    assert mixed[[1, 5]].isnan().any()


@pytest.mark.parametrize("lora_ids", [[2], [2, 2, 2], [1, 0, 3, 2, 3], [0, 0], [4, 1]], ids=["one", "one-head", "mixed", "none", "disabled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_classification_heads_equal_vllms(lora_ids, dtype, reference_ops):
    """A head trained in full (`ClassificationHeadWithLoRA`): each row gets its own slot's
    head and bias, rows without adapter or whose slot has no head keep the base's output,
    and a slot holding NaN changes only its own rows."""
    generator = torch.Generator().manual_seed(31)
    slots, labels, in_features = 4, 5, 64
    weight = torch.randn(slots, 1, labels, in_features, generator=generator).to(dtype)
    bias = torch.randn(slots, labels, generator=generator).to(dtype)
    enabled = torch.tensor([True, True, True, False])  # slot 3 (adapter id 4) has no full head
    x = torch.randn(len(lora_ids), in_features, generator=generator).to(dtype)
    base = torch.randn(len(lora_ids), labels, generator=generator).to(dtype)
    expected, got = base.clone(), base.clone()
    wrapper(VLLMWrapper, lora_ids, slots, True).apply_lora_full_linear(expected, x, weight, bias, enabled)
    wrapper(punica.FusedPunicaWrapperCPU, lora_ids, slots, True).apply_lora_full_linear(got, x, weight, bias, enabled)
    torch.testing.assert_close(got, expected, **tolerance(dtype))
    unchanged = [row for row, lora_id in enumerate(lora_ids) if lora_id in (0, 4)]
    assert torch.equal(got[unchanged], base[unchanged])
    weight[0] = float("nan")  # adapter id 1
    wrapper(punica.FusedPunicaWrapperCPU, lora_ids, slots, True).apply_lora_full_linear(got := base.clone(), x, weight, bias, enabled)
    assert got[[row for row, lora_id in enumerate(lora_ids) if lora_id == 1]].isnan().all()
    assert not got[[row for row, lora_id in enumerate(lora_ids) if lora_id != 1]].isnan().any()
