"""What validation holds an adapter folder to: the file names, the limits on sizes and
values, and `Limits` (what the engines accept). Shared by the checks' modules."""

from __future__ import annotations

from dataclasses import dataclass

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")
LABELS_FILE = "labels.json"  # head adapters: {"labels": [name by index]}
SIGNATURE_FILE = "model.sig"  # an OpenSSF Model Signing bundle over the files above (registry/signing.py)
SERVED_FILES = (CONFIG_FILE, WEIGHTS_FILE, LABELS_FILE, SIGNATURE_FILE)  # all a source is ever read for
PEFT_PREFIX = "base_model.model."

KiB, MiB, GiB = 1024, 1024**2, 1024**3
# A PEFT adapter_config.json is ~1 KB and a labels file a few hundred bytes; these limits
# leave room for long target lists and many labels while keeping hostile files out.
MAX_CONFIG_BYTES = 256 * KiB
MAX_LABELS_BYTES = 256 * KiB
MAX_SIGNATURE_BYTES = 1 * MiB  # a key-signed bundle is ~2 KB (a manifest of four files)
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
    # the modules (leaf names) the engines' LoRA slots hold; None: every module vLLM supports
    lora_modules: frozenset[str] | None = None
    max_cls_labels: int = 32
    refuse_other_base: bool = False
    served_dtype: str = "float32"  # values must stay finite once cast to it
    max_adapter_bytes: int = 4 * GiB  # the weights file
    trusted_keys: tuple[str, ...] = ()  # PEM public keys; with require_signed, only their signatures serve
    require_signed: bool = False


def short(value: object, most: int = 120) -> str:
    """A value for a reason: hostile configs can hold megabytes in one field."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= most else text[:most] + "..."
