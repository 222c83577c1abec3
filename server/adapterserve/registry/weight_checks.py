"""Validation of an adapter's weights: the safetensors header within its size, every
tensor's dtype and shape against the base, and every value finite (still finite in the
dtype the engine serves, once scaled)."""

from __future__ import annotations

from pathlib import Path

from .limits import FLOAT_DTYPES, PEFT_PREFIX, PICKLE_WEIGHTS, WEIGHTS_FILE, Limits, short
from .records import AdapterInvalid, BaseModelInfo
from .safetensors_header import HeaderError, read_header


def check_weights_present(folder: Path, name: str) -> Path:
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        pickles = [p for p in PICKLE_WEIGHTS if (folder / p).exists()]
        if pickles:
            raise AdapterInvalid(
                name, f"weights only in a pickle format ({pickles[0]}): refused, safetensors only"
            )
        raise AdapterInvalid(name, f"missing {WEIGHTS_FILE}")
    return weights


def read_weights(folder: Path, limits: Limits, name: str) -> dict[str, dict]:
    """The safetensors header (name -> dtype, shape, offsets), checked against the file."""
    weights = check_weights_present(folder, name)
    if weights.stat().st_size > limits.max_adapter_bytes:
        raise AdapterInvalid(name, f"{WEIGHTS_FILE} is larger than {limits.max_adapter_bytes} bytes")
    try:
        header = read_header(weights)
    except HeaderError as exc:
        reason = str(exc)
        if "truncated" not in reason:
            reason = f"is corrupt: {reason}"
        raise AdapterInvalid(name, f"{WEIGHTS_FILE} {reason}") from None
    if not header:
        raise AdapterInvalid(name, f"{WEIGHTS_FILE} holds no tensors")
    for key, meta in header.items():
        if meta["dtype"] not in FLOAT_DTYPES:
            raise AdapterInvalid(
                name, f"tensor {short(key)} is {meta['dtype']}; LoRA weights must be F32, F16 or BF16"
            )
    return header


def check_values(weights: Path, header: dict[str, dict], limits: Limits, scaling: float, name: str) -> None:
    """Every value finite, and finite as the engine will hold it: cast to the served dtype
    (fp16 overflows at 65504), B with the scaling folded in (vLLM multiplies it into B)."""
    import torch
    from safetensors import safe_open

    served = getattr(torch, limits.served_dtype, torch.float32)
    with safe_open(str(weights), framework="pt") as handle:
        for key in header:
            tensor = handle.get_tensor(key)
            if not bool(torch.isfinite(tensor).all()):
                raise AdapterInvalid(name, f"tensor {short(key)} holds NaN or infinite values")
            held = tensor.float() * scaling if ".lora_B." in key else tensor
            if not bool(torch.isfinite(held.to(served)).all()):
                raise AdapterInvalid(name, f"tensor {short(key)} overflows {limits.served_dtype}, the served dtype")


def module_of(key: str) -> str:
    """'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' -> 'model.layers.0.self_attn.q_proj'."""
    key = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    for marker in (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B"):
        if marker in key:
            return key.split(marker)[0]
    return key.rsplit(".", 1)[0]


def lora_module_names(header: dict[str, dict]) -> list[str]:
    """The leaf names of the modules the adapter's LoRA weights change ('q_proj', 'v_proj'):
    what an engine's LoRA slots must hold for it (read from the tensors, whatever the
    config's target_modules say, a list or a pattern)."""
    markers = (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B")
    return sorted({module_of(key).rsplit(".", 1)[-1] for key in header if any(m in key for m in markers)})


def check_lora_modules(header: dict[str, dict], limits: Limits, name: str) -> list[str]:
    """The adapter's `lora_module_names`, refused where the engines' slots lack one of them
    (`lora_target_modules` fitted at start to the adapters then in the stores)."""
    modules = lora_module_names(header)
    missing = sorted(set(modules) - limits.lora_modules) if limits.lora_modules is not None else []
    if missing:
        raise AdapterInvalid(
            name, f"it trains {', '.join(missing)}, which the engines' LoRA slots do not hold (they hold "
            f"{', '.join(sorted(limits.lora_modules))}, fitted at start to the adapters in the stores); serve it "
            "with --lora-target-modules all, or restart with it in a store",
        )
    return modules


def rank_of(module: str, config: dict, rank: int) -> int:
    """The module's rank, from rank_pattern as peft (and vLLM) match it: a suffix at a '.'."""
    for key, value in (config.get("rank_pattern") or {}).items():
        if module == key or module.endswith("." + key):
            return value
    return rank


def check_lora_shapes(header: dict[str, dict], base: BaseModelInfo, config: dict, rank: int, name: str) -> None:
    lora_keys = 0
    for key, meta in header.items():
        if ".lora_A." not in key and ".lora_B." not in key:
            continue
        lora_keys += 1
        module = module_of(key)
        if module not in base.linear_modules:
            raise AdapterInvalid(name, f"tensor {short(key)} targets {short(module)}, which the base does not have")
        out_features, in_features = base.linear_modules[module]
        module_rank = rank_of(module, config, rank)
        expected = (module_rank, in_features) if ".lora_A." in key else (out_features, module_rank)
        if tuple(meta["shape"]) != expected:
            raise AdapterInvalid(
                name, f"tensor {short(key)} has shape {list(meta['shape'])}, the base expects {list(expected)}"
            )
    if not lora_keys and not any(".score." in f".{key}" for key in header):
        raise AdapterInvalid(name, f"{WEIGHTS_FILE} holds no LoRA A/B tensors")
