"""Validation of an adapter's `adapter_config.json`: read within its size, every field
by type and range (rank, targets, scaling, the PEFT features the engines serve)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .limits import CONFIG_FILE, MAX_CONFIG_BYTES, MAX_LORA_SCALING, MAX_TARGETS, Limits, short
from .records import AdapterInvalid, BaseModelInfo


def read_config(folder: Path, name: str) -> dict:
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterInvalid(name, f"missing {CONFIG_FILE}")
    if config_path.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterInvalid(name, f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(config_path.read_bytes(), parse_constant=no_constant)
    except RecursionError:
        raise AdapterInvalid(name, f"{CONFIG_FILE} is nested too deeply") from None
    except (OSError, ValueError) as exc:
        raise AdapterInvalid(name, f"{CONFIG_FILE} is not valid JSON ({short(exc)})") from None
    if not isinstance(config, dict):
        raise AdapterInvalid(name, f"{CONFIG_FILE} is not a JSON object")
    return config


def no_constant(token: str):
    """JSON has no NaN or Infinity; Python's reader accepts them unless told otherwise."""
    raise ValueError(f"{token} is not a JSON number")


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_rank(config: dict, limits: Limits, name: str) -> int:
    rank = config.get("r")
    if not is_count(rank) or rank <= 0:
        raise AdapterInvalid(name, f"'r' must be a positive integer, got {short(rank)!r}")
    pattern = config.get("rank_pattern") or {}
    if not isinstance(pattern, dict) or not all(isinstance(k, str) and is_count(v) and v > 0 for k, v in pattern.items()):
        raise AdapterInvalid(name, "'rank_pattern' must map module names to positive integers")
    largest = max([rank, *pattern.values()])
    if largest > limits.max_lora_rank:
        from adapterserve.config import fitted_lora_rank

        raise AdapterInvalid(
            name, f"rank {largest} is above the engine's max_lora_rank {limits.max_lora_rank}; serve it with "
            f"--max-lora-rank {fitted_lora_rank(largest)} or more (auto fits the slots to the stores at start-up)",
        )
    return rank


def check_features(config: dict, name: str) -> None:
    if config.get("use_dora"):
        raise AdapterInvalid(name, "DoRA adapters are not supported by vLLM")
    if config.get("bias", "none") not in ("none", None):
        raise AdapterInvalid(name, f"adapter bias is not supported (bias={short(config.get('bias'))!r})")
    if config.get("lora_bias"):
        raise AdapterInvalid(name, "LoRA bias (lora_bias) is not supported by vLLM")
    if not isinstance(config.get("use_rslora", False), bool):
        raise AdapterInvalid(name, "'use_rslora' must be true or false")


def string_list(config: dict, key: str, name: str, required: bool) -> list[str]:
    value = config.get(key)
    if value is None or value == []:
        if required:
            raise AdapterInvalid(name, f"{CONFIG_FILE} names no {key}")
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise AdapterInvalid(name, f"'{key}' must be a list of module names, got {short(value)!r}")
    if len(value) > MAX_TARGETS:
        raise AdapterInvalid(name, f"'{key}' lists more than {MAX_TARGETS} modules")
    return value


def check_targets(config: dict, base: BaseModelInfo, name: str) -> list[str]:
    targets = config.get("target_modules")
    if isinstance(targets, str):  # a regex in peft; the tensors are checked against the base
        if not targets or len(targets) > MAX_CONFIG_BYTES // 4:
            raise AdapterInvalid(name, "'target_modules' is an empty or oversized pattern")
        return [targets]
    targets = string_list(config, "target_modules", name, required=True)
    unknown = [t for t in targets if t not in base.module_leaf_names and t not in base.linear_modules]
    if unknown:
        raise AdapterInvalid(
            name,
            f"target modules the base does not have: {', '.join(sorted(unknown)[:10])} "
            f"(base has {', '.join(sorted(base.module_leaf_names))})",
        )
    return targets


def check_scaling(config: dict, rank: int, name: str) -> float:
    """lora_alpha (and alpha_pattern) finite, and the scaling vLLM derives within range;
    returns the largest |scaling|."""
    rslora = config.get("use_rslora", False)
    alpha = config.get("lora_alpha", 8)  # peft's default
    patterns = config.get("alpha_pattern") or {}
    if not isinstance(patterns, dict):
        raise AdapterInvalid(name, "'alpha_pattern' must map module names to numbers")
    ranks = [rank, *(config.get("rank_pattern") or {}).values()]
    largest = 0.0
    for label, value in [("lora_alpha", alpha), *((f"alpha_pattern[{k!r}]", v) for k, v in patterns.items())]:
        if not is_number(value):
            raise AdapterInvalid(name, f"'{label}' must be a finite number, got {short(value)!r}")
        for r in ranks:
            scaling = value / (math.sqrt(r) if rslora else r)
            if abs(scaling) > MAX_LORA_SCALING:
                raise AdapterInvalid(
                    name, f"LoRA scaling {scaling:g} ({label} {value:g} over rank {r}) is above {MAX_LORA_SCALING:g}"
                )
            largest = max(largest, abs(scaling))
    return largest
