"""The vLLM plugin that puts the grouped LoRA ops in place of vLLM's CPU reference ops, and
the fused punica wrapper (`punica.py`) in place of vLLM's CPU punica wrapper.

Registered as an entry point in the `vllm.general_plugins` group, so vLLM loads it in
every one of its processes (the API process, the engine core and each worker). It applies
only on the CPU platform and only to the vLLM versions it was checked against; it says so
in the log either way. Off with ADAPTERSERVE_GROUPED_LORA=0 (the server sets it from its
`grouped_lora_ops` setting before starting engines).
"""

from __future__ import annotations

import functools
import logging
import os

# Under the "vllm" namespace: vLLM configures that logger in each of its processes, so
# every engine process says whether the ops are active.
log = logging.getLogger("vllm.plugins.adapterserve_grouped_lora")

CHECKED_VLLM_VERSIONS = ("0.32.0",)
ENV_SWITCH = "ADAPTERSERVE_GROUPED_LORA"
# The dtype the fused path keeps its slots and computes in ("float32"; unset: the model's).
# Set by hand only, for experiments (bench/cpu_lora_layers.py measured it: no default uses it).
ENV_SLOT_DTYPE = "ADAPTERSERVE_LORA_SLOT_DTYPE"
_installed = False


def enabled_by_env() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def register() -> None:
    """vLLM calls this in each process; installing twice is harmless."""
    global _installed
    if _installed:
        return
    import vllm
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        log.debug("grouped CPU LoRA ops: not applied (platform is not CPU)")
        return
    version = getattr(vllm, "__version__", "unknown")
    if version not in CHECKED_VLLM_VERSIONS:
        log.warning(
            "grouped CPU LoRA ops: NOT applied, vLLM %s is not a checked version (%s); "
            "vLLM's reference ops are used", version, ", ".join(CHECKED_VLLM_VERSIONS),
        )
        return
    from .compiled import load_trace_once_artifacts

    load_trace_once_artifacts()  # with LoRA or without (dedicated engines): only a first start compiles
    if not enabled_by_env():
        install_containment_only()
        log.info("grouped CPU LoRA ops: off (%s=0); vLLM's reference ops, without delta for tokens with no adapter", ENV_SWITCH)
        return
    install()
    log.info("grouped CPU LoRA ops: active in pid %d (vLLM %s)", os.getpid(), version)


def _wrap_from_layer(*steps) -> None:
    """Run `steps` on every LoRA linear layer vLLM creates, right after it creates it."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    _wrap_factory("from_layer", *steps, only=BaseLinearLayerWithLoRA)


def _wrap_factory(name: str, *steps, only: type | None = None) -> None:
    """Run `steps` on every layer vLLM's model manager makes with its factory `name` (of
    the class `only`, where given: `from_layer` also returns layers it does not wrap)."""
    import vllm.lora.model_manager as model_manager

    vllm_factory = getattr(model_manager, name)

    def factory(*args, **kwargs):
        layer = vllm_factory(*args, **kwargs)
        if only is None or isinstance(layer, only):
            for step in steps:
                step(layer)
        return layer

    setattr(model_manager, name, factory)


def install_containment_only() -> None:
    """vLLM's own CPU path, with its -1 index meaning no adapter and finite slots."""
    global _installed
    from .containment import fix_reference_ops, guard_slots, zero_new_kv_blocks

    fix_reference_ops()
    zero_new_kv_blocks()
    _wrap_from_layer(guard_slots)
    _installed = True


def install() -> None:
    """Replace the reference ops where vLLM's CPU punica wrapper looks them up, the wrapper
    class where vLLM resolves it (by the qualified name the CPU platform gives), and lay
    out the LoRA slots of every linear layer vLLM wraps for the fused wrapper."""
    global _installed
    import torch
    import vllm.lora.ops.torch_ops as torch_ops
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    from . import autotune, compiled
    from .containment import guard_slots, zero_new_kv_blocks
    from .layout import lay_out, track_live_slots
    from .ops import OPS
    from .punica import FusedPunicaWrapperCPU

    for name, function in OPS.items():
        setattr(torch_ops, name, function)
        if hasattr(punica_cpu, name):
            setattr(punica_cpu, name, function)
    punica_cpu.PunicaWrapperCPU = FusedPunicaWrapperCPU
    zero_new_kv_blocks()
    slot_dtype = getattr(torch, os.environ.get(ENV_SLOT_DTYPE, "") or "none", None)
    if isinstance(slot_dtype, torch.dtype):
        log.info("fused CPU LoRA slots kept and computed in %s", slot_dtype)
    else:
        slot_dtype = None
    compiled.install()
    _wrap_from_layer(
        functools.partial(lay_out, dtype=slot_dtype),
        autotune.note_layer,  # the shapes the forms are measured on (`autotune.tuning_for`)
        functools.partial(track_live_slots, changed=compiled.adapters_changed),
        guard_slots,
        compiled.register_layer,
    )
    # the logits and a classifier's score layer: only which slots hold weights (`add_lora_logits`)
    _wrap_factory("from_layer_logits_processor", track_live_slots)
    _wrap_factory("from_layer_classification", track_live_slots)
    _installed = True
