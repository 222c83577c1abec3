"""Builds adapter folders for tests: valid LoRA adapters for a given base, and one broken
adapter for each validation failure the server must refuse."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from server.registry.records import BaseModelInfo

PREFIX = "base_model.model."


def lora_tensors(base: BaseModelInfo, rank: int, targets: list[str], seed: int = 0, scale: float = 0.05) -> dict:
    """Random LoRA A/B pairs of the right shapes for every targeted linear of the base."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (out_features, in_features) in sorted(base.linear_modules.items()):
        if module.rsplit(".", 1)[-1] not in targets:
            continue
        tensors[f"{PREFIX}{module}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * scale
        tensors[f"{PREFIX}{module}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * scale
    return tensors


def write_lora(folder: Path, base: BaseModelInfo, rank: int = 8, targets=("q_proj", "v_proj"), seed: int = 0, config_overrides: dict | None = None, tensors: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": list(targets),
        "base_model_name_or_path": base.name,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
    }
    config.update(config_overrides or {})
    (folder / "adapter_config.json").write_text(json.dumps(config))
    tensors = tensors if tensors is not None else lora_tensors(base, rank, list(targets), seed)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    return folder


def build_broken_corpus(store: Path, base: BaseModelInfo, outside: Path, max_rank: int) -> dict[str, str]:
    """One broken adapter per validation failure; returns name -> expected reason fragment."""
    expected = {}

    folder = write_lora(store / "not-lora", base, config_overrides={"peft_type": "PREFIX_TUNING"})
    expected[folder.name] = "not a PEFT LoRA adapter"

    folder = write_lora(store / "bad-targets", base, config_overrides={"target_modules": ["q_proj", "no_such_proj"]})
    expected[folder.name] = "target modules the base does not have"

    tensors = lora_tensors(base, 8, ["q_proj"])
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = torch.zeros(8, tensors[key].shape[1] + 3)
    folder = write_lora(store / "bad-shapes", base, targets=("q_proj",), tensors=tensors)
    expected[folder.name] = "has shape"

    folder = write_lora(store / "rank-too-high", base, rank=max_rank * 2, targets=("q_proj",))
    expected[folder.name] = "above the engine's max_lora_rank"

    folder = write_lora(store / "pickled", base, targets=("q_proj",))
    tensors = {k: v for k, v in lora_tensors(base, 8, ["q_proj"]).items()}
    torch.save(tensors, folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    expected[folder.name] = "pickle"

    folder = store / "no-config"
    folder.mkdir(parents=True)
    save_file(lora_tensors(base, 8, ["q_proj"]), str(folder / "adapter_model.safetensors"))
    expected[folder.name] = "missing adapter_config.json"

    folder = write_lora(store / "truncated", base, targets=("q_proj",))
    weights = folder / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    expected[folder.name] = "truncated"

    folder = write_lora(store / "other-base", base, targets=("q_proj",), config_overrides={"base_model_name_or_path": "meta-llama/Llama-3-8B"})
    expected[folder.name] = "trained for base"

    folder = write_lora(store / "bad name!", base, targets=("q_proj",))
    expected[folder.name] = "not a safe model name"

    write_lora(outside / "escapee", base, targets=("q_proj",))
    os.symlink(outside / "escapee", store / "escapee")
    expected["escapee"] = "outside the adapter store"
    return expected
