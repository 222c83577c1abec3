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
    monkeypatch.setattr(punica, "adapters_changed", lambda: changes.append(mapping["indices"]))
    monkeypatch.setattr(punica.PunicaWrapperCPU, "update_metadata", lambda self, *args, **kwargs: None)
    monkeypatch.setattr(punica.PunicaWrapperCPU, "token_lora_indices", property(lambda self: torch.tensor(mapping["indices"])))
    wrapper = punica.FusedPunicaWrapperCPU.__new__(punica.FusedPunicaWrapperCPU)
    wrapper._present = None
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
