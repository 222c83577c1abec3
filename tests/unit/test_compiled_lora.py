"""Compiled execution with LoRA (`engine_plugins/cpu_lora/compiled.py`), without an engine:
the adapter step stays an op of the compiled graph that reads the step's state when it
runs, and vLLM's saved trace-once function can be loaded back."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
from vllm.platforms.cpu import CpuPlatform

from adapterserve.engine_plugins.cpu_lora import compiled


@pytest.fixture
def installed(monkeypatch):
    """The op installed on vLLM's LoRA linear layer class, put back after the test."""
    monkeypatch.setattr(BaseLinearLayerWithLoRA, "_apply_lora_to_output", BaseLinearLayerWithLoRA._apply_lora_to_output)
    monkeypatch.setattr(CpuPlatform, "check_and_update_config", CpuPlatform.check_and_update_config)
    compiled.install()
    compiled.install()  # twice is harmless
    return BaseLinearLayerWithLoRA._apply_lora_to_output


class StepWrapper:
    """A punica wrapper whose adapter step adds `factor * x`: `factor` stands for the
    step's mapping, which changes between steps without a new trace."""

    factor = 1.0

    def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices):
        y.add_(x, alpha=self.factor)


class Layer:
    """What the op reads of a LoRA linear layer."""

    def __init__(self) -> None:
        self.punica_wrapper, self.lora_a_stacked, self.lora_b_stacked, self.output_slices = StepWrapper(), (), (), (4,)


def a_layer() -> Layer:
    layer = Layer()
    compiled.register_layer(layer)
    return layer


def test_the_compiled_graph_keeps_the_op_and_the_op_reads_each_steps_state(installed):
    layer, graphs = a_layer(), []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    def forward(x):
        output = x * 2  # the base layer's output
        return installed(layer, x, output) + 1

    run = torch.compile(forward, backend=backend, fullgraph=True, dynamic=True)
    x = torch.arange(8.0).view(2, 4)
    torch.testing.assert_close(run(x), x * 3 + 1)
    layer.punica_wrapper.factor = -5.0  # the next step's mapping
    torch.testing.assert_close(run(x), x * -3 + 1)
    assert len(graphs) == 1, "traced again: the step's state was in the graph"
    torch.testing.assert_close(run(torch.ones(5, 4)), torch.full((5, 4), -2.0))  # another batch size
    targets = [node.target for node in graphs[0].graph.nodes]
    assert torch.ops.adapterserve.apply_lora_linear.default in targets


class IdleWrapper:
    """A punica wrapper counting its calls, which reports `result` (False: nothing of the
    layer applies to the step's mapping, as the fused wrapper does; None: vLLM's)."""

    def __init__(self, result) -> None:
        self.calls, self.result = 0, result

    def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices):
        self.calls += 1
        return self.result


def test_the_op_skips_an_idle_layer_until_the_mapping_or_a_slot_changes(installed):
    op = compiled.registered_op()[0]
    idle, active, vllms = a_layer(), a_layer(), a_layer()
    idle.punica_wrapper, active.punica_wrapper, vllms.punica_wrapper = IdleWrapper(False), IdleWrapper(True), IdleWrapper(None)
    compiled.adapters_changed()
    x, output = torch.ones(2, 4), torch.zeros(2, 4)
    for _ in range(3):
        for layer in (idle, active, vllms):
            op(output, x, getattr(layer, compiled.KEY_ATTRIBUTE))
    assert (idle.punica_wrapper.calls, active.punica_wrapper.calls, vllms.punica_wrapper.calls) == (1, 3, 3)
    compiled.adapters_changed()  # a new step mapping, or a slot set or reset
    op(output, x, getattr(idle, compiled.KEY_ATTRIBUTE))
    op(output, x, getattr(idle, compiled.KEY_ATTRIBUTE))
    assert idle.punica_wrapper.calls == 2
    idle.punica_wrapper.result = True  # now it applies: never skipped again
    compiled.adapters_changed()
    for _ in range(2):
        op(output, x, getattr(idle, compiled.KEY_ATTRIBUTE))
    assert idle.punica_wrapper.calls == 4


def test_a_step_mapping_over_other_slots_makes_the_fused_wrapper_report_a_change(monkeypatch):
    from adapterserve.engine_plugins.cpu_lora import punica

    changes, mapping = [], {}
    monkeypatch.setattr(punica, "mapping_changed", lambda: changes.append(mapping["indices"]))
    monkeypatch.setattr(punica.PunicaWrapperCPU, "update_metadata", lambda self, *args, **kwargs: None)
    monkeypatch.setattr(punica.PunicaWrapperCPU, "token_lora_indices", property(lambda self: torch.tensor(mapping["indices"])))
    wrapper = punica.FusedPunicaWrapperCPU.__new__(punica.FusedPunicaWrapperCPU)
    wrapper._present, wrapper._op_state = None, None
    for indices in ([2, 2, 2], [2, 2], [2, -1], [-1, 2, 2], [3], [-1], [-1, -1]):
        mapping["indices"] = indices
        wrapper.update_metadata(None)
        assert wrapper._plan is None
    # the slots used (-1: none) changed 4 times; the same slots in another batch are no change
    assert changes == [[2, 2, 2], [2, -1], [3], [-1]]


def test_eager_calls_do_not_go_through_the_op(installed):
    layer = a_layer()
    layer.punica_wrapper.factor = 2.0
    x = torch.ones(3, 4)
    output = torch.zeros(3, 4)
    # not compiling: vLLM's own step, which calls the wrapper directly
    calls = []
    layer.punica_wrapper.add_lora_linear = lambda *args: calls.append(args)
    installed(layer, x, output)
    assert len(calls) == 1 and calls[0][0] is output


def test_a_loaded_trace_once_function_gets_a_finalize_step(monkeypatch):
    def inductor_function(*args):
        return args

    class VllmBackendFunction:
        finalized = False

        def finalize_loading(self, vllm_config):
            self.finalized = True

    loaded = {}

    def load_compiled_function(file, f_globals=None):
        return SimpleNamespace(_artifacts=SimpleNamespace(compiled_fn=loaded["fn"]))

    monkeypatch.setattr(torch.compiler, "load_compiled_function", load_compiled_function)
    compiled.load_trace_once_artifacts()
    compiled.load_trace_once_artifacts()  # wraps once
    assert torch.compiler.load_compiled_function.adapterserve_wrapped_load is load_compiled_function
    loaded["fn"] = inductor_function
    torch.compiler.load_compiled_function(None)._artifacts.compiled_fn.finalize_loading(object())  # no AttributeError
    loaded["fn"] = own = VllmBackendFunction()
    torch.compiler.load_compiled_function(None)._artifacts.compiled_fn.finalize_loading(object())
    assert own.finalized, "vLLM's own backend function keeps its finalize step"


# The op's steady state in C++ (`lora_op.cpp`; g++ is part of this machine kind).

class KernelLayer:
    """A laid-out layer (random adapters in 3 slots) with the fused wrapper of a step,
    whose Python calls are counted: those are the op's misses."""

    def __init__(self, lora_ids, dtype, seed=3) -> None:
        from adapterserve.engine_plugins.cpu_lora import punica
        from tests.unit.test_cpu_lora_fused import layers, wrapper

        self.output_slices = (64, 32, 32)
        _, fused = layers(3, 8, 576, self.output_slices, dtype, torch.Generator().manual_seed(seed))
        self.lora_a_stacked, self.lora_b_stacked = fused.lora_a_stacked, fused.lora_b_stacked
        self.punica_wrapper = wrapper(punica.FusedPunicaWrapperCPU, lora_ids, 3, False)
        self.python_calls = 0
        python_path = self.punica_wrapper.add_lora_linear

        def counted(*args, **kwargs):
            self.python_calls += 1
            return python_path(*args, **kwargs)

        self.punica_wrapper.add_lora_linear = counted
        self.python_path = python_path
        compiled.register_layer(self)

    def expected(self, x):
        """The Python path's output for `x` over zeros (the wrapper's current step)."""
        y = torch.zeros(x.shape[0], sum(self.output_slices), dtype=x.dtype)
        self.python_path(y, x, self.lora_a_stacked, self.lora_b_stacked, 1.0, self.output_slices)
        return y

    def op(self, x):
        y = torch.zeros(x.shape[0], sum(self.output_slices), dtype=x.dtype)
        compiled.registered_op()[0](y, x, getattr(self, compiled.KEY_ATTRIBUTE))
        return y

    def new_step(self, lora_ids):
        from vllm.lora.layers.utils import LoRAMapping

        self.punica_wrapper.update_metadata(LoRAMapping(tuple(lora_ids), tuple(lora_ids), is_prefill=False), [1, 2, 3, None], 5, 1000)


def test_the_cpp_op_is_built_and_used():
    assert compiled.op_state() is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cpp_op_repeats_the_kernels_step_without_python_and_to_the_bit(dtype):
    layer = KernelLayer([1, 2, 3, 0] * 4, dtype)
    x = torch.randn(16, 576, generator=torch.Generator().manual_seed(4)).to(dtype)
    expected = layer.expected(x)
    assert expected[3].abs().sum() == 0 and expected[0].abs().sum() > 0  # a token without adapter, one with
    compiled.adapters_changed()
    outputs = [layer.op(x) for _ in range(3)]
    assert layer.python_calls == 1, "the op went to Python after the kernel's first step"
    assert all(torch.equal(output, expected) for output in outputs)
    # the next step over the same slots: the same generation, the new step's array
    layer.new_step([3, 3, 1, 2] * 4)
    assert layer.op(x).equal(layer.expected(x))
    assert layer.python_calls == 2  # the step's first call made its plan
    assert layer.op(x).equal(layer.expected(x)) and layer.python_calls == 2
    # a step over other slots (requests came and went): still one Python call, for its plan
    layer.new_step([2, -1, 2, 2] * 4)
    assert layer.op(x).equal(layer.expected(x)) and layer.python_calls == 3
    assert layer.op(x).equal(layer.expected(x)) and layer.python_calls == 3
    # another generation (a slot set or reset): Python again
    compiled.adapters_changed()
    assert layer.op(x).equal(layer.expected(x)) and layer.python_calls == 4


def test_the_cpp_op_finds_a_layer_idle_for_the_slots_in_use_without_python():
    """A layer some slots leave empty: skipped in C++ in any step over only those slots,
    whichever the step's tokens and their order; applied again when a slot it uses comes."""
    from adapterserve.engine_plugins.cpu_lora.layout import LIVE_ATTRIBUTE

    layer = KernelLayer([1, 2, 3, 0] * 4, torch.bfloat16)
    a_all = layer.lora_a_stacked[0]._base
    a_all[1].zero_()  # slot 1 (lora id 2) leaves the layer as it is
    setattr(a_all, LIVE_ATTRIBUTE, [0b111, 0, 0b111])  # as `layout.track_live_slots` records it
    x = torch.randn(16, 576, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    compiled.adapters_changed()
    layer.op(x)  # the first step: Python, which remembers the slots' slices
    calls = layer.python_calls
    for ids in ([2] * 16, [0, 2] * 8, [2, 0, 0, 2] * 4):  # only slot 1, or no adapter
        layer.new_step(ids)
        assert layer.op(x).abs().sum() == 0
    assert layer.python_calls == calls, "an idle step went to Python"
    layer.new_step([2, 3] * 8)  # slot 2 (lora id 3) changes it
    assert layer.op(x).equal(layer.expected(x)) and layer.op(x).abs().sum() > 0
    assert layer.python_calls == calls + 1  # the step's plan, then C++


@pytest.mark.parametrize(
    "case", ["another token count", "a strided input", "another dtype", "a wider input"],
)
def test_the_cpp_op_leaves_what_it_did_not_see_to_python(case):
    layer = KernelLayer([1, 2, 3, 0] * 4, torch.float32)
    x = torch.randn(16, 576, generator=torch.Generator().manual_seed(4))
    compiled.adapters_changed()
    layer.op(x)
    assert layer.python_calls == 1
    if case == "another token count":
        x = x[:8]  # the mapping has 16: the wrapper hands it to vLLM's own path
    elif case == "a strided input":
        x = torch.randn(576, 16).t()
    elif case == "another dtype":
        x = x.to(torch.bfloat16)
    else:
        x = torch.randn(16, 600)
    try:
        layer.op(x)
    except Exception:  # vLLM's path may refuse what the layer cannot take: the C++ op did not apply it
        pass
    assert layer.python_calls == 2


def test_the_cpp_op_applies_each_layer_with_its_own_engines_step():
    """Two engines in one process (as bench/classify_step_profile.py runs them): each
    layer reads the step of its own wrapper, whatever the other's is."""
    first, second = KernelLayer([1] * 16, torch.float32, seed=5), KernelLayer([3, 2] * 8, torch.float32, seed=6)
    x = torch.randn(16, 576, generator=torch.Generator().manual_seed(7))
    compiled.adapters_changed()
    expected = (first.expected(x), second.expected(x))
    for _ in range(3):
        assert first.op(x).equal(expected[0]) and second.op(x).equal(expected[1])
    assert (first.python_calls, second.python_calls) == (1, 1)
    assert not expected[0].equal(expected[1])
