"""Validation of an adapter folder before it is ever served.

Every check reads only the folder's JSON and the safetensors headers, so a whole store is
validated in milliseconds and a bad adapter never reaches the engine. Each failure is an
`AdapterInvalid` naming the adapter and the reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .records import SAFE_NAME, AdapterInvalid, AdapterRecord, BaseModelInfo

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")
LABELS_FILE = "labels.json"  # head adapters: {"labels": [name by index]}
PEFT_PREFIX = "base_model.model."


@dataclass
class Limits:
    """What the engines accept."""

    max_lora_rank: int = 64
    max_cls_labels: int = 32
    refuse_other_base: bool = False


def validate_name(name: str, base_name: str) -> None:
    if not SAFE_NAME.match(name):
        raise AdapterInvalid(
            name, "folder name is not a safe model name (letters, digits, '.', '_', '-'; max 64)"
        )
    if name == base_name:
        raise AdapterInvalid(name, "name clashes with the served base model")


def check_inside_store(folder: Path, store: Path, name: str) -> None:
    """Refuse a folder, or a file in it, that resolves outside the store (symlinks, '..')."""
    root = store.resolve()
    entries = [folder, *folder.iterdir()] if folder.is_dir() else [folder]
    for entry in entries:
        resolved = entry.resolve()
        if not resolved.is_relative_to(root):
            raise AdapterInvalid(name, f"'{entry.name}' resolves outside the adapter store")


def _read_config(folder: Path, name: str) -> dict:
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterInvalid(name, f"missing {CONFIG_FILE}")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterInvalid(name, f"{CONFIG_FILE} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise AdapterInvalid(name, f"{CONFIG_FILE} is not a JSON object")
    return config


def _read_weight_shapes(folder: Path, name: str) -> dict[str, tuple[int, ...]]:
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        pickles = [p for p in PICKLE_WEIGHTS if (folder / p).exists()]
        if pickles:
            raise AdapterInvalid(
                name, f"weights only in a pickle format ({pickles[0]}): refused, safetensors only"
            )
        raise AdapterInvalid(name, f"missing {WEIGHTS_FILE}")
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        _check_complete(weights)
    except AdapterInvalid:
        raise
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise AdapterInvalid(name, f"{WEIGHTS_FILE} is truncated or corrupt ({exc})") from None
    if not shapes:
        raise AdapterInvalid(name, f"{WEIGHTS_FILE} holds no tensors")
    return shapes


def _check_complete(weights: Path) -> None:
    """The header's last data offset must equal the data actually on disk."""
    with weights.open("rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_len))
    end = max((meta["data_offsets"][1] for key, meta in header.items() if key != "__metadata__"), default=0)
    if weights.stat().st_size < 8 + header_len + end:
        raise AdapterInvalid(weights.parent.name, f"{WEIGHTS_FILE} is truncated")


def _module_of(key: str) -> str:
    """'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' -> 'model.layers.0.self_attn.q_proj'."""
    key = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    for marker in (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B"):
        if marker in key:
            return key.split(marker)[0]
    return key.rsplit(".", 1)[0]


def _check_targets(config: dict, base: BaseModelInfo, name: str) -> list[str]:
    targets = config.get("target_modules")
    if isinstance(targets, str):  # a regex in peft; the tensors are checked below
        return [targets]
    targets = list(targets or [])
    if not targets:
        raise AdapterInvalid(name, "adapter_config.json names no target_modules")
    unknown = [t for t in targets if t not in base.module_leaf_names and t not in base.linear_modules]
    if unknown:
        raise AdapterInvalid(
            name,
            f"target modules the base does not have: {', '.join(sorted(unknown))} "
            f"(base has {', '.join(sorted(base.module_leaf_names))})",
        )
    return targets


def _check_lora_shapes(shapes: dict[str, tuple[int, ...]], base: BaseModelInfo, rank: int, name: str) -> None:
    for key, shape in shapes.items():
        if ".lora_A." not in key and ".lora_B." not in key:
            continue
        module = _module_of(key)
        if module not in base.linear_modules:
            raise AdapterInvalid(name, f"tensor {key} targets {module}, which the base does not have")
        out_features, in_features = base.linear_modules[module]
        expected = (rank, in_features) if ".lora_A." in key else (out_features, rank)
        if tuple(shape) != expected:
            raise AdapterInvalid(
                name, f"tensor {key} has shape {list(shape)}, the base expects {list(expected)}"
            )


def _check_base(config: dict, base: BaseModelInfo, limits: Limits, name: str) -> list[str]:
    trained_for = config.get("base_model_name_or_path")
    if not trained_for:
        return []
    if Path(str(trained_for)).name.lower() == base.name.lower() or Path(str(trained_for)).name.lower() == base.path.name.lower():
        return []
    message = f"trained for base '{trained_for}', served base is '{base.name}'"
    if limits.refuse_other_base:
        raise AdapterInvalid(name, message)
    return [message]


def _labels(folder: Path, config: dict, num_labels: int, name: str) -> list[str]:
    labels_path = folder / LABELS_FILE
    if labels_path.is_file():
        try:
            labels = list(json.loads(labels_path.read_text())["labels"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise AdapterInvalid(name, f"{LABELS_FILE} is not valid ({exc})") from None
    else:
        labels = [f"LABEL_{i}" for i in range(num_labels)]
    if len(labels) != num_labels:
        raise AdapterInvalid(name, f"{LABELS_FILE} names {len(labels)} labels, the head has {num_labels}")
    return [str(label) for label in labels]


def validate_adapter(folder: Path, store: Path, base: BaseModelInfo, limits: Limits) -> AdapterRecord:
    """Check one adapter folder against the served base; return its record or raise."""
    folder = Path(folder)
    name = folder.name
    validate_name(name, base.name)
    check_inside_store(folder, store, name)
    if not folder.is_dir():
        raise AdapterInvalid(name, "not a folder")
    config = _read_config(folder, name)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterInvalid(name, f"not a PEFT LoRA adapter (peft_type={config.get('peft_type')!r})")
    shapes = _read_weight_shapes(folder, name)
    rank = int(config.get("r") or 0)
    if rank <= 0:
        raise AdapterInvalid(name, "adapter_config.json has no positive rank 'r'")
    if rank > limits.max_lora_rank:
        raise AdapterInvalid(name, f"rank {rank} is above the engine's max_lora_rank {limits.max_lora_rank}")
    if config.get("use_dora"):
        raise AdapterInvalid(name, "DoRA adapters are not supported by vLLM")
    targets = _check_targets(config, base, name)
    _check_lora_shapes(shapes, base, rank, name)

    kind, labels = "lora", []
    saved = [m for m in (config.get("modules_to_save") or []) if m]
    if config.get("task_type") == "SEQ_CLS" or saved:
        kind, labels = "head", _head_labels(folder, config, shapes, base, limits, name)

    warnings = _check_base(config, base, limits, name)
    trainable = 0
    for shape in shapes.values():
        count = 1
        for dim in shape:
            count *= dim
        trainable += count
    size = sum(path.stat().st_size for path in folder.iterdir() if path.is_file())
    return AdapterRecord(
        name=name,
        kind=kind,
        path=folder.resolve(),
        rank=rank,
        target_modules=targets,
        trainable_params=trainable,
        size_bytes=size,
        base_model=config.get("base_model_name_or_path"),
        labels=labels,
        warnings=warnings,
    )


def _head_labels(folder, config, shapes, base: BaseModelInfo, limits: Limits, name: str) -> list[str]:
    """A head adapter: SEQ_CLS with the trained `score` layer in modules_to_save."""
    if config.get("task_type") != "SEQ_CLS":
        raise AdapterInvalid(name, "modules_to_save is only served for SEQ_CLS head adapters")
    if "score" not in (config.get("modules_to_save") or []):
        raise AdapterInvalid(name, "a head adapter must list 'score' in modules_to_save")
    score = [key for key in shapes if ".score." in f".{key}" and key.endswith(".weight")]
    if not score:
        raise AdapterInvalid(name, "no trained score weight in the adapter")
    num_labels, hidden = shapes[score[0]][0], shapes[score[0]][-1]
    if hidden != base.hidden_size:
        raise AdapterInvalid(
            name, f"score head has input size {hidden}, the base's hidden size is {base.hidden_size}"
        )
    if num_labels > limits.max_cls_labels:
        raise AdapterInvalid(
            name, f"{num_labels} labels is above the engine's max_lora_cls_labels {limits.max_cls_labels}"
        )
    return _labels(folder, config, num_labels, name)
