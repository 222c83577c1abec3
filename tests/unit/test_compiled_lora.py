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
