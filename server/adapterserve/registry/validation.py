"""Validation of an adapter folder before it is ever served.

Every folder may be hostile or broken, so the checks read values, not only shapes: the
config's fields by type and range, every tensor's dtype, shape and values (finite, and
still finite in the dtype the engine serves), and the sizes of the files. Validation
never raises anything but `AdapterInvalid`: any other exception while reading a folder
(a symlink loop, a config nested too deeply, a damaged header) becomes a refusal with a
reason, for that folder only.

With a `SnapshotStore`, the files are first copied into a server-owned staging folder and
it is the copy that is validated and then served (see `snapshots.py`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .safetensors_header import HeaderError, element_count, read_header
from .records import AdapterInvalid, AdapterRecord, BaseModelInfo, is_safe_name
from .snapshots import SnapshotError, SnapshotStore

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")
LABELS_FILE = "labels.json"  # head adapters: {"labels": [name by index]}
PEFT_PREFIX = "base_model.model."

KiB, MiB, GiB = 1024, 1024**2, 1024**3
# A PEFT adapter_config.json is ~1 KB and a labels file a few hundred bytes; these limits
# leave room for long target lists and many labels while keeping hostile files out.
MAX_CONFIG_BYTES = 256 * KiB
MAX_LABELS_BYTES = 256 * KiB
MAX_LABEL_CHARS = 256
MAX_TARGETS = 1024
# |scaling| = |lora_alpha| / r (or / sqrt(r) with rsLoRA): trained adapters sit at 0.5-16;
# far above, the delta swamps the base and overflows bf16 sooner than it adds anything.
MAX_LORA_SCALING = 256.0
# safetensors dtype names the engines serve LoRA weights in (int8, bool, fp8... are not)
FLOAT_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


@dataclass
class Limits:
    """What the engines accept."""

    max_lora_rank: int = 64
    max_cls_labels: int = 32
    refuse_other_base: bool = False
    served_dtype: str = "float32"  # values must stay finite once cast to it
    max_adapter_bytes: int = 4 * GiB  # the weights file


def validate_adapter(
    folder: Path, store: Path, base: BaseModelInfo, limits: Limits, snapshots: SnapshotStore | None = None
) -> AdapterRecord:
    """Check one adapter folder against the served base; return its record (whose `path`
    is the snapshot when `snapshots` is given) or raise AdapterInvalid, never anything else."""
    folder = Path(folder)
    name = folder.name
    try:
        validate_name(name, base.name)
        check_inside_store(folder, store, name)
        if not folder.is_dir():
            raise AdapterInvalid(name, "not a folder")
        if snapshots is None:
            return _validate_contents(folder, folder, base, limits, name)
        staging = _stage(snapshots, folder, store, limits, name)
        try:
            record = _validate_contents(staging, folder, base, limits, name)
        except BaseException:
            snapshots.discard(staging)
            raise
        record.path = snapshots.commit(staging)
        return record
    except AdapterInvalid:
        raise
    except RecursionError:
        raise AdapterInvalid(name, "a file in it is nested too deeply to be read") from None
    except Exception as exc:  # anything else a broken folder can make a reader raise
        raise AdapterInvalid(name, f"could not be read ({type(exc).__name__}: {_short(str(exc))})") from None


def validate_name(name: str, base_name: str) -> None:
    if not is_safe_name(name):
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


def _stage(snapshots: SnapshotStore, folder: Path, store: Path, limits: Limits, name: str) -> Path:
    _check_weights_present(folder, name)
    try:
        return snapshots.stage(
            folder,
            {CONFIG_FILE: MAX_CONFIG_BYTES, WEIGHTS_FILE: limits.max_adapter_bytes, LABELS_FILE: MAX_LABELS_BYTES},
            inside=store,
        )
    except SnapshotError as exc:
        raise AdapterInvalid(name, str(exc)) from None


def _validate_contents(files: Path, source: Path, base: BaseModelInfo, limits: Limits, name: str) -> AdapterRecord:
    """The checks of the files in `files` (the store's folder, or its staged copy)."""
    config = _read_config(files, name)
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise AdapterInvalid(name, f"not a PEFT LoRA adapter (peft_type={_short(peft_type)!r})")
    rank = _check_rank(config, limits, name)
    _check_features(config, name)
    targets = _check_targets(config, base, name)
    modules_to_save = _string_list(config, "modules_to_save", name, required=False)
    header = _read_weights(files, limits, name)
    _check_lora_shapes(header, base, config, rank, name)
    scaling = _check_scaling(config, rank, name)
    _check_values(files / WEIGHTS_FILE, header, limits, scaling, name)

    kind, labels = "lora", []
    if config.get("task_type") == "SEQ_CLS" or modules_to_save:
        kind, labels = "head", _head_labels(files, config, modules_to_save, header, base, limits, name)

    warnings = _check_base(config, base, limits, name)
    trainable = element_count(header)
    size = sum(path.stat().st_size for path in files.iterdir() if path.is_file())
    return AdapterRecord(
        name=name,
        kind=kind,
        path=source.resolve(),
        rank=max([rank, *(config.get("rank_pattern") or {}).values()]),  # what an engine slot must hold
        target_modules=targets,
        trainable_params=trainable,
        size_bytes=size,
        base_model=config.get("base_model_name_or_path") if isinstance(config.get("base_model_name_or_path"), str) else None,
        labels=labels,
        warnings=warnings,
        source=source.resolve(),
    )


# --- config -------------------------------------------------------------------------
def _read_config(folder: Path, name: str) -> dict:
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterInvalid(name, f"missing {CONFIG_FILE}")
    if config_path.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterInvalid(name, f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(config_path.read_bytes(), parse_constant=_no_constant)
    except RecursionError:
        raise AdapterInvalid(name, f"{CONFIG_FILE} is nested too deeply") from None
    except (OSError, ValueError) as exc:
        raise AdapterInvalid(name, f"{CONFIG_FILE} is not valid JSON ({_short(exc)})") from None
    if not isinstance(config, dict):
        raise AdapterInvalid(name, f"{CONFIG_FILE} is not a JSON object")
    return config


def _no_constant(token: str):
    """JSON has no NaN or Infinity; Python's reader accepts them unless told otherwise."""
    raise ValueError(f"{token} is not a JSON number")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_rank(config: dict, limits: Limits, name: str) -> int:
    rank = config.get("r")
    if not _is_count(rank) or rank <= 0:
        raise AdapterInvalid(name, f"'r' must be a positive integer, got {_short(rank)!r}")
    pattern = config.get("rank_pattern") or {}
    if not isinstance(pattern, dict) or not all(isinstance(k, str) and _is_count(v) and v > 0 for k, v in pattern.items()):
        raise AdapterInvalid(name, "'rank_pattern' must map module names to positive integers")
    largest = max([rank, *pattern.values()])
    if largest > limits.max_lora_rank:
        from adapterserve.config import fitted_lora_rank

        raise AdapterInvalid(
            name, f"rank {largest} is above the engine's max_lora_rank {limits.max_lora_rank}; serve it with "
            f"--max-lora-rank {fitted_lora_rank(largest)} or more (auto fits the slots to the stores at start-up)",
        )
    return rank


def _check_features(config: dict, name: str) -> None:
    if config.get("use_dora"):
        raise AdapterInvalid(name, "DoRA adapters are not supported by vLLM")
    if config.get("bias", "none") not in ("none", None):
        raise AdapterInvalid(name, f"adapter bias is not supported (bias={_short(config.get('bias'))!r})")
    if config.get("lora_bias"):
        raise AdapterInvalid(name, "LoRA bias (lora_bias) is not supported by vLLM")
    if not isinstance(config.get("use_rslora", False), bool):
        raise AdapterInvalid(name, "'use_rslora' must be true or false")


def _string_list(config: dict, key: str, name: str, required: bool) -> list[str]:
    value = config.get(key)
    if value is None or value == []:
        if required:
            raise AdapterInvalid(name, f"{CONFIG_FILE} names no {key}")
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise AdapterInvalid(name, f"'{key}' must be a list of module names, got {_short(value)!r}")
    if len(value) > MAX_TARGETS:
        raise AdapterInvalid(name, f"'{key}' lists more than {MAX_TARGETS} modules")
    return value


def _check_targets(config: dict, base: BaseModelInfo, name: str) -> list[str]:
    targets = config.get("target_modules")
    if isinstance(targets, str):  # a regex in peft; the tensors are checked against the base
        if not targets or len(targets) > MAX_CONFIG_BYTES // 4:
            raise AdapterInvalid(name, "'target_modules' is an empty or oversized pattern")
        return [targets]
    targets = _string_list(config, "target_modules", name, required=True)
    unknown = [t for t in targets if t not in base.module_leaf_names and t not in base.linear_modules]
    if unknown:
        raise AdapterInvalid(
            name,
            f"target modules the base does not have: {', '.join(sorted(unknown)[:10])} "
            f"(base has {', '.join(sorted(base.module_leaf_names))})",
        )
    return targets


def _check_scaling(config: dict, rank: int, name: str) -> float:
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
        if not _is_number(value):
            raise AdapterInvalid(name, f"'{label}' must be a finite number, got {_short(value)!r}")
        for r in ranks:
            scaling = value / (math.sqrt(r) if rslora else r)
            if abs(scaling) > MAX_LORA_SCALING:
                raise AdapterInvalid(
                    name, f"LoRA scaling {scaling:g} ({label} {value:g} over rank {r}) is above {MAX_LORA_SCALING:g}"
                )
            largest = max(largest, abs(scaling))
    return largest


# --- weights --------------------------------------------------------------------------
def _check_weights_present(folder: Path, name: str) -> Path:
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        pickles = [p for p in PICKLE_WEIGHTS if (folder / p).exists()]
        if pickles:
            raise AdapterInvalid(
                name, f"weights only in a pickle format ({pickles[0]}): refused, safetensors only"
            )
        raise AdapterInvalid(name, f"missing {WEIGHTS_FILE}")
    return weights


def _read_weights(folder: Path, limits: Limits, name: str) -> dict[str, dict]:
    """The safetensors header (name -> dtype, shape, offsets), checked against the file."""
    weights = _check_weights_present(folder, name)
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
                name, f"tensor {_short(key)} is {meta['dtype']}; LoRA weights must be F32, F16 or BF16"
            )
    return header


def _check_values(weights: Path, header: dict[str, dict], limits: Limits, scaling: float, name: str) -> None:
    """Every value finite, and finite as the engine will hold it: cast to the served dtype
    (fp16 overflows at 65504), B with the scaling folded in (vLLM multiplies it into B)."""
    import torch
    from safetensors import safe_open

    served = getattr(torch, limits.served_dtype, torch.float32)
    with safe_open(str(weights), framework="pt") as handle:
        for key in header:
            tensor = handle.get_tensor(key)
            if not bool(torch.isfinite(tensor).all()):
                raise AdapterInvalid(name, f"tensor {_short(key)} holds NaN or infinite values")
            held = tensor.float() * scaling if ".lora_B." in key else tensor
            if not bool(torch.isfinite(held.to(served)).all()):
                raise AdapterInvalid(name, f"tensor {_short(key)} overflows {limits.served_dtype}, the served dtype")


def _module_of(key: str) -> str:
    """'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' -> 'model.layers.0.self_attn.q_proj'."""
    key = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    for marker in (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B"):
        if marker in key:
            return key.split(marker)[0]
    return key.rsplit(".", 1)[0]


def _rank_of(module: str, config: dict, rank: int) -> int:
    """The module's rank, from rank_pattern as peft (and vLLM) match it: a suffix at a '.'."""
    for key, value in (config.get("rank_pattern") or {}).items():
        if module == key or module.endswith("." + key):
            return value
    return rank


def _check_lora_shapes(header: dict[str, dict], base: BaseModelInfo, config: dict, rank: int, name: str) -> None:
    lora_keys = 0
    for key, meta in header.items():
        if ".lora_A." not in key and ".lora_B." not in key:
            continue
        lora_keys += 1
        module = _module_of(key)
        if module not in base.linear_modules:
            raise AdapterInvalid(name, f"tensor {_short(key)} targets {_short(module)}, which the base does not have")
        out_features, in_features = base.linear_modules[module]
        module_rank = _rank_of(module, config, rank)
        expected = (module_rank, in_features) if ".lora_A." in key else (out_features, module_rank)
        if tuple(meta["shape"]) != expected:
            raise AdapterInvalid(
                name, f"tensor {_short(key)} has shape {list(meta['shape'])}, the base expects {list(expected)}"
            )
    if not lora_keys and not any(".score." in f".{key}" for key in header):
        raise AdapterInvalid(name, f"{WEIGHTS_FILE} holds no LoRA A/B tensors")


# --- base and heads ---------------------------------------------------------------
def _check_base(config: dict, base: BaseModelInfo, limits: Limits, name: str) -> list[str]:
    trained_for = config.get("base_model_name_or_path")
    if not trained_for:
        return []
    if not isinstance(trained_for, str):
        raise AdapterInvalid(name, "'base_model_name_or_path' must be a string")
    last = trained_for.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].lower()
    if last in (base.name.lower(), base.path.name.lower()):
        return []
    message = f"trained for base '{_short(trained_for)}', served base is '{base.name}'"
    if limits.refuse_other_base:
        raise AdapterInvalid(name, message)
    return [message]


def _labels(folder: Path, num_labels: int, name: str) -> list[str]:
    labels_path = folder / LABELS_FILE
    if not labels_path.is_file():
        return [f"LABEL_{i}" for i in range(num_labels)]
    if labels_path.stat().st_size > MAX_LABELS_BYTES:
        raise AdapterInvalid(name, f"{LABELS_FILE} is larger than {MAX_LABELS_BYTES} bytes")
    try:
        labels = json.loads(labels_path.read_bytes(), parse_constant=_no_constant)["labels"]
    except RecursionError:
        raise AdapterInvalid(name, f"{LABELS_FILE} is nested too deeply") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AdapterInvalid(name, f"{LABELS_FILE} is not valid ({_short(exc)})") from None
    if not isinstance(labels, list) or not all(isinstance(x, str) and 0 < len(x) <= MAX_LABEL_CHARS for x in labels):
        raise AdapterInvalid(name, f"{LABELS_FILE} must hold 'labels': a list of non-empty strings")
    if len(labels) != num_labels:
        raise AdapterInvalid(name, f"{LABELS_FILE} names {len(labels)} labels, the head has {num_labels}")
    return labels


def _head_labels(folder, config, modules_to_save, header, base: BaseModelInfo, limits: Limits, name: str) -> list[str]:
    """A head adapter: SEQ_CLS with the trained `score` layer in modules_to_save."""
    if config.get("task_type") != "SEQ_CLS":
        raise AdapterInvalid(name, "modules_to_save is only served for SEQ_CLS head adapters")
    if "score" not in modules_to_save:
        raise AdapterInvalid(name, "a head adapter must list 'score' in modules_to_save")
    score = [key for key in header if ".score." in f".{key}" and key.endswith(".weight")]
    if not score:
        raise AdapterInvalid(name, "no trained score weight in the adapter")
    shape = header[score[0]]["shape"]
    if len(shape) != 2:
        raise AdapterInvalid(name, f"score weight has shape {list(shape)}, expected [labels, hidden size]")
    num_labels, hidden = shape
    if hidden != base.hidden_size:
        raise AdapterInvalid(
            name, f"score head has input size {hidden}, the base's hidden size is {base.hidden_size}"
        )
    if not 1 <= num_labels <= limits.max_cls_labels:
        raise AdapterInvalid(
            name, f"{num_labels} labels is outside 1..{limits.max_cls_labels} (the engine's max_lora_cls_labels)"
        )
    return _labels(folder, num_labels, name)


def _short(value: object, most: int = 120) -> str:
    """A value for a reason: hostile configs can hold megabytes in one field."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= most else text[:most] + "..."
