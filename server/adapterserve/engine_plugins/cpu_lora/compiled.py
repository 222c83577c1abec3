"""Compiled execution with LoRA enabled on the CPU.

vLLM's CPU platform turns compilation off whenever LoRA is enabled
(`vllm/platforms/cpu.py`), because its trace-once mode runs Dynamo over the model's forward
pass once and keeps what it saw: the CPU punica wrapper's Python choices (prefill or
decode, the fused path's plan for the step, the kernel's call) would be frozen into the
graph. adapterserve's engines always have LoRA enabled (adapters come and go at any time),
so without this they lose compiled execution (~25% of decode throughput in bf16 on an
AVX512-bf16 EPYC, bench/RESULTS.md).

`install()` makes each LoRA linear layer's adapter step one opaque op,
`adapterserve::apply_lora_linear(output, x, layer_key)`: the compiler keeps the op whole
and calls it in every step, and the op runs the eager fused wrapper (`punica.py`), which
reads the step's mapping as it does without compilation; where the C++ op builds
(`lora_op.cpp`), it repeats without Python what the wrapper found for a layer until the
slots' contents change (idle for the step's slots, or the kernel's call). The op takes the layer by a key
(an int baked into the graph) rather than its slot tensors, so the fused layout's views
reach the wrapper as they are. Then the platform's override is lifted: where vLLM would
compile without LoRA (`enforce_eager` off, adapterserve's default), it compiles with LoRA too.

Only the linear layers go through the op: the logits (outside the compiled forward pass)
and an embedding layer (wrapped only for adapters that train new tokens, which the
registry refuses) stay as vLLM has them.

`load_trace_once_artifacts()` lets vLLM load back the compiled forward pass it saved, so
only the first start of an engine configuration compiles (~1-2 min on 2 cores; ~5 s after).
"""

from __future__ import annotations

import functools
import logging
import weakref
from typing import Any

import torch

log = logging.getLogger("vllm.plugins.adapterserve_grouped_lora")  # configured by vLLM in its processes

OP_NAME = "adapterserve::apply_lora_linear"
KEY_ATTRIBUTE = "adapterserve_layer_key"


class IdleLayers:
    """The layers whose adapter step added nothing for the slots the step's tokens use and
    what those slots hold: the op in Python returns at once for them until either changes.

    A head adapter trained on q and v leaves 3 of every 4 LoRA linear layers of a llama
    idle; each op call still ran the wrapper's Python checks (~5-10 us) to find that, 90
    times in a ~17 ms classification step (bench/RESULTS.md). Whatever can make a layer
    add something again says so: a step mapping over other slots (the fused wrapper's
    `update_metadata`: `changed(slots=False)`), and a slot's adapter set or reset
    (`layout.track_live_slots`). The C++ op (`native.load_op_state`) decides idle layers
    itself over each step's mapping: its memos change only with the slots' generation."""

    def __init__(self, op_state=None) -> None:
        self.generation = 0  # of the slots in use and their contents
        self.slots_generation = 0  # of the slots' contents only
        self.idle_since: dict[int, int] = {}  # layer key -> the generation it was found idle in
        self.op_state = op_state

    def changed(self, slots: bool = True) -> None:
        self.generation += 1
        if slots:
            self.slots_generation += 1
            if self.op_state is not None:
                self.op_state.set_generation(self.slots_generation)


@functools.cache
def registered_op() -> tuple[Any, dict[int, weakref.ref], IdleLayers]:
    """The op, registered once per process, the layers it applies, by key, and those that
    have nothing to add for now.

    In C++ where it builds (`lora_op.cpp`): the op then applies, without Python, a layer
    that is idle for the step's slots or that the kernel applied before while the slots'
    contents stayed the same (the step's plan again the kernel's), and calls
    the Python function below (registered as `apply_lora_linear_miss`) for anything else.
    In Python otherwise, registered the low-level way: `torch.library.custom_op` wraps its
    function in ~20 us of Python per call (~70 us inside a compiled graph,
    bench/custom_op_cost.py); a schema and a CPU kernel registered on a `Library` cost ~2 us
    eager and ~7 in a compiled graph."""
    from .native import load_op_state

    layers: dict[int, weakref.ref] = {}
    op_state = load_op_state()  # loading the C++ op defines `apply_lora_linear`
    idle = IdleLayers(op_state)
    library = torch.library.Library("adapterserve", "FRAGMENT")  # kept by the cache: collected, it unregisters
    python_name = "apply_lora_linear" if op_state is None else "apply_lora_linear_miss"
    library.define(f"{python_name}(Tensor(a!) output, Tensor x, int layer_key) -> ()")

    def apply_lora_linear(output: torch.Tensor, x: torch.Tensor, layer_key: int) -> None:
        generation, slots_generation = idle.generation, idle.slots_generation
        if idle.idle_since.get(layer_key) == generation:
            return
        layer = layers[layer_key]()
        wrapper = layer.punica_wrapper
        added = wrapper.add_lora_linear(output, x, layer.lora_a_stacked, layer.lora_b_stacked, 1.0, layer.output_slices)
        if added is False:  # the fused wrapper's word that nothing applies (vLLM's returns None)
            idle.idle_since[layer_key] = generation
        if added is not None and op_state is not None:
            memo = getattr(wrapper, "op_memo", lambda: None)()
            if memo is not None:  # the C++ op can decide the layer's next steps itself
                index, live_of_slot, kernel = memo
                if kernel is None:
                    op_state.remember_idle(layer_key, slots_generation, index, live_of_slot)
                else:
                    op_state.remember_kernel(layer_key, slots_generation, index, live_of_slot, *kernel)

    library.impl(python_name, apply_lora_linear, "CPU")
    torch.library.register_fake(OP_NAME, lambda output, x, layer_key: None, lib=library)
    registered_op.library = library
    return torch.ops.adapterserve.apply_lora_linear.default, layers, idle


def adapters_changed() -> None:
    """A slot's adapter was set or reset: every layer may have something to add."""
    registered_op()[2].changed()


def mapping_changed() -> None:
    """A step's mapping uses other slots: every layer may have something to add."""
    registered_op()[2].changed(slots=False)


def op_state():
    """The C++ op's state (`native.LoraOpState`), or None where the op is in Python."""
    return registered_op()[2].op_state


def register_layer(layer) -> None:
    """Give a LoRA linear layer its key for the op (`plugin._wrap_from_layer` calls it for
    every one vLLM creates)."""
    layers = registered_op()[1]
    key = len(layers)
    layers[key] = weakref.ref(layer)
    setattr(layer, KEY_ATTRIBUTE, key)


def install() -> None:
    """Route the linear layers' adapter step through the op while Dynamo traces, and keep
    compilation on with LoRA. Installing twice is harmless."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    eager_apply = BaseLinearLayerWithLoRA._apply_lora_to_output
    if getattr(eager_apply, "adapterserve_compiled", False):
        return
    op = registered_op()[0]

    def _apply_lora_to_output(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        key = getattr(self, KEY_ATTRIBUTE, None)
        if key is None or not torch.compiler.is_compiling():
            return eager_apply(self, x, output)
        if x.ndim == 3 and output.ndim == 3:  # as vLLM's step: the punica wrapper takes 2-D views
            op(output.flatten(0, 1), x.flatten(0, 1), key)
        else:
            op(output, x, key)
        return output

    _apply_lora_to_output.adapterserve_compiled = True
    BaseLinearLayerWithLoRA._apply_lora_to_output = _apply_lora_to_output
    keep_compilation_with_lora()


def keep_compilation_with_lora() -> None:
    """Undo the CPU platform's `mode = NONE` for LoRA: the trace-once mode it chose for
    the same config without LoRA is kept (with its inductor settings)."""
    from vllm.config import CompilationMode
    from vllm.platforms.cpu import CpuPlatform

    platform_update = CpuPlatform.check_and_update_config.__func__
    if getattr(platform_update, "adapterserve_compiled", False):
        return

    def check_and_update_config(cls, vllm_config) -> None:
        wanted = vllm_config.compilation_config.mode
        platform_update(cls, vllm_config)
        compiling = wanted in (CompilationMode.VLLM_COMPILE, CompilationMode.DYNAMO_TRACE_ONCE)
        if vllm_config.lora_config is not None and compiling:
            vllm_config.compilation_config.mode = CompilationMode.DYNAMO_TRACE_ONCE
            log.info("compiled execution kept with LoRA enabled (adapter steps as the opaque op %s)", OP_NAME)

    check_and_update_config.adapterserve_compiled = True
    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)


def load_trace_once_artifacts() -> None:
    """Let vLLM load back the trace-once artifact it saved at the first start.

    vLLM 0.32 saves the compiled forward pass of the CPU's trace-once mode and, at the next
    start, calls `finalize_loading` on what it loads, which only its own backend's compiled
    function has (the CPU compiles with inductor): the load fails and every start compiles
    again (~60-100 s per engine on 2 cores). Inductor's function needs no finalizing, so
    the loaded function gets a step that does nothing."""
    load = torch.compiler.load_compiled_function
    if hasattr(load, "adapterserve_wrapped_load"):
        return

    def load_compiled_function(*args, **kwargs):
        loaded = load(*args, **kwargs)
        compiled_fn = getattr(getattr(loaded, "_artifacts", None), "compiled_fn", None)
        if compiled_fn is not None and not hasattr(compiled_fn, "finalize_loading"):
            try:
                compiled_fn.finalize_loading = lambda vllm_config: None
            except AttributeError:  # not a plain function: vLLM compiles again, as without this
                pass
        return loaded

    load_compiled_function.adapterserve_wrapped_load = load
    torch.compiler.load_compiled_function = load_compiled_function
