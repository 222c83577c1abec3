"""Validation of what is particular to a head adapter (registry/kinds.py: the `head`
kind): its label names and its saved classification layer; and the check of the base an
adapter says it was trained for."""

from __future__ import annotations

import json
from pathlib import Path

from .config_checks import no_constant
from .limits import LABELS_FILE, MAX_LABELS_BYTES, MAX_LABEL_CHARS, Limits, short
from .records import AdapterInvalid, BaseModelInfo


def check_base(config: dict, base: BaseModelInfo, limits: Limits, name: str) -> list[str]:
    trained_for = config.get("base_model_name_or_path")
    if not trained_for:
        return []
    if not isinstance(trained_for, str):
        raise AdapterInvalid(name, "'base_model_name_or_path' must be a string")
    last = trained_for.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].lower()
    if last in (base.name.lower(), base.path.name.lower()):
        return []
    message = f"trained for base '{short(trained_for)}', served base is '{base.name}'"
    if limits.refuse_other_base:
        raise AdapterInvalid(name, message)
    return [message]


def labels(folder: Path, num_labels: int, name: str) -> list[str]:
    labels_path = folder / LABELS_FILE
    if not labels_path.is_file():
        return [f"LABEL_{i}" for i in range(num_labels)]
    if labels_path.stat().st_size > MAX_LABELS_BYTES:
        raise AdapterInvalid(name, f"{LABELS_FILE} is larger than {MAX_LABELS_BYTES} bytes")
    try:
        labels = json.loads(labels_path.read_bytes(), parse_constant=no_constant)["labels"]
    except RecursionError:
        raise AdapterInvalid(name, f"{LABELS_FILE} is nested too deeply") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AdapterInvalid(name, f"{LABELS_FILE} is not valid ({short(exc)})") from None
    if not isinstance(labels, list) or not all(isinstance(x, str) and 0 < len(x) <= MAX_LABEL_CHARS for x in labels):
        raise AdapterInvalid(name, f"{LABELS_FILE} must hold 'labels': a list of non-empty strings")
    if len(labels) != num_labels:
        raise AdapterInvalid(name, f"{LABELS_FILE} names {len(labels)} labels, the head has {num_labels}")
    return labels


def head_labels(folder, config, modules_to_save, header, base: BaseModelInfo, limits: Limits, name: str) -> list[str]:
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
    return labels(folder, num_labels, name)
