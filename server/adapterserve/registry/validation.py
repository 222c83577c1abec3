"""Validation of an adapter folder before it is ever served.

Every folder may be hostile or broken, so the checks read values, not only shapes: the
config's fields by type and range, every tensor's dtype, shape and values (finite, and
still finite in the dtype the engine serves), and the sizes of the files. Validation
never raises anything but `AdapterInvalid`: any other exception while reading a folder
(a symlink loop, a config nested too deeply, a damaged header) becomes a refusal with a
reason, for that folder only.

The checks live by what they read: `config_checks.py` (adapter_config.json),
`weight_checks.py` (the safetensors header and values), `head_checks.py` (what a head
adapter adds, and the base it names); `limits.py` holds the limits they share. The adapter's
kind (registry/kinds.py) is detected from its config.

With a `SnapshotStore`, the files are first copied into a server-owned staging folder and
it is the copy that is validated and then served (see `snapshots.py`).
"""

from __future__ import annotations

from pathlib import Path

from . import kinds
from .config_checks import check_features, check_rank, check_scaling, check_targets, read_config, string_list
from .head_checks import check_base, head_labels
from .limits import (  # noqa: F401 (the file names and Limits: validation's public names)
    CONFIG_FILE, LABELS_FILE, MAX_CONFIG_BYTES, MAX_LABELS_BYTES, MAX_SIGNATURE_BYTES, SIGNATURE_FILE, WEIGHTS_FILE,
    Limits, short,
)
from .records import AdapterInvalid, AdapterRecord, BaseModelInfo, is_safe_name
from .safetensors_header import element_count
from .snapshots import SnapshotStore
from .signing import verify_folder
from .sources import AdapterSource
from .weight_checks import check_lora_modules, check_lora_shapes, check_values, read_weights


def validate_adapter(
    folder: Path, store: Path, base: BaseModelInfo, limits: Limits, snapshots: SnapshotStore | None = None
) -> AdapterRecord:
    """Check one folder of a local store (see `validate_from`)."""
    from .sources.local import LocalFolderSource

    return validate_from(LocalFolderSource(Path(store)), Path(folder).name, base, limits, snapshots)


def validate_from(
    source: AdapterSource, name: str, base: BaseModelInfo, limits: Limits, snapshots: SnapshotStore | None = None
) -> AdapterRecord:
    """Fetch adapter `name` from its source and check it against the served base; return its
    record (whose `path` is the snapshot when `snapshots` is given) or raise AdapterInvalid,
    never anything else."""
    try:
        validate_name(name, base.name)
        files = source.fetch(name, snapshots, file_limits(limits))
        if snapshots is None:
            return _checked(files, source.location(name), base, limits, name)
        try:
            record = _checked(files, source.location(name), base, limits, name)
        except BaseException:
            snapshots.discard(files)
            raise
        record.path = snapshots.commit(files)
        return record
    except AdapterInvalid:
        raise
    except RecursionError:
        raise AdapterInvalid(name, "a file in it is nested too deeply to be read") from None
    except Exception as exc:  # anything else a broken folder can make a reader raise
        raise AdapterInvalid(name, f"could not be read ({type(exc).__name__}: {short(str(exc))})") from None


def file_limits(limits: Limits) -> dict[str, int]:
    """The files an adapter is made of, each with the most bytes it may have."""
    return {
        CONFIG_FILE: MAX_CONFIG_BYTES, WEIGHTS_FILE: limits.max_adapter_bytes, LABELS_FILE: MAX_LABELS_BYTES,
        SIGNATURE_FILE: MAX_SIGNATURE_BYTES,
    }


def validate_name(name: str, base_name: str) -> None:
    if not is_safe_name(name):
        raise AdapterInvalid(
            name, "folder name is not a safe model name (letters, digits, '.', '_', '-'; max 64)"
        )
    if name == base_name:
        raise AdapterInvalid(name, "name clashes with the served base model")


def _checked(files: Path, origin: str | Path, base: BaseModelInfo, limits: Limits, name: str) -> AdapterRecord:
    """The signature (when required), then the contents."""
    if limits.require_signed:
        verify_folder(files, limits.trusted_keys, name)
    return _validate_contents(files, origin, base, limits, name)


def _validate_contents(files: Path, origin: str | Path, base: BaseModelInfo, limits: Limits, name: str) -> AdapterRecord:
    """The checks of the files in `files` (the staged copy, or a local folder read in place);
    `origin` is where they came from (the record's `source`: a folder, or a source's URL)."""
    config = read_config(files, name)
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise AdapterInvalid(name, f"not a PEFT LoRA adapter (peft_type={short(peft_type)!r})")
    rank = check_rank(config, limits, name)
    check_features(config, name)
    targets = check_targets(config, base, name)
    modules_to_save = string_list(config, "modules_to_save", name, required=False)
    header = read_weights(files, limits, name)
    check_lora_shapes(header, base, config, rank, name)
    modules = check_lora_modules(header, limits, name)
    scaling = check_scaling(config, rank, name)
    check_values(files / WEIGHTS_FILE, header, limits, scaling, name)

    kind, labels = kinds.detect(config, modules_to_save), []
    if kind is kinds.HEAD:
        labels = head_labels(files, config, modules_to_save, header, base, limits, name)

    warnings = check_base(config, base, limits, name)
    trainable = element_count(header)
    size = sum(path.stat().st_size for path in files.iterdir() if path.is_file())
    origin = origin.resolve() if isinstance(origin, Path) else origin
    return AdapterRecord(
        name=name,
        kind=kind.name,
        path=origin if isinstance(origin, Path) else files,  # a remote source's files: where they were read
        rank=max([rank, *(config.get("rank_pattern") or {}).values()]),  # what an engine slot must hold
        target_modules=targets,
        trainable_params=trainable,
        size_bytes=size,
        base_model=config.get("base_model_name_or_path") if isinstance(config.get("base_model_name_or_path"), str) else None,
        labels=labels,
        warnings=warnings,
        source=origin,
        lora_modules=modules,
    )
