"""What the server knows about one adapter and about the base it serves them over."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Literal

AdapterKind = Literal["lora", "head"]

# A model name clients can type and that is safe as a folder, a URL path segment and a
# Prometheus label value: letters, digits, '.', '_', '-'; no ':' (it separates base:adapter).
# Match with `is_safe_name` (fullmatch): `$` would let a trailing newline through.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def printable(text: object, limit: int = 500) -> str:
    """Text an adapter folder supplied (names of tensors, modules, files), fit for one log
    line: control characters escaped (a newline cannot forge another line), length capped."""
    text = str(text)
    shown = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text[:limit])
    return shown + (f"... ({len(text)} characters)" if len(text) > limit else "")


def is_safe_name(name: object) -> bool:
    return isinstance(name, str) and SAFE_NAME.fullmatch(name) is not None


class AdapterInvalid(ValueError):
    """An adapter that must not be served; the message names the adapter and the reason."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"adapter '{name}': {reason}")
        self.name = name
        self.reason = reason


@dataclass
class AdapterRecord:
    """A validated adapter folder, ready to be served."""

    name: str
    kind: AdapterKind
    path: Path  # what the engine loads: the server-owned snapshot (or the folder itself)
    rank: int
    target_modules: list[str]
    trainable_params: int
    size_bytes: int
    base_model: str | None  # as the adapter's config records it
    labels: list[str] = field(default_factory=list)  # heads: label names by index
    warnings: list[str] = field(default_factory=list)
    source: Path | str | None = None  # where it was validated from: a store folder, or a source's URL
    lora_modules: list[str] = field(default_factory=list)  # leaf names of the modules its LoRA weights change

    def share_of_base(self, base_params: int) -> float:
        return self.trainable_params / base_params if base_params else 0.0


@dataclass
class BaseModelInfo:
    """The served base, as read from its safetensors headers (no weights loaded)."""

    name: str
    path: Path
    shapes: dict[str, tuple[int, ...]]  # weight name -> shape
    hidden_size: int

    @classmethod
    def read(cls, name: str, path: Path) -> "BaseModelInfo":
        import json

        from .safetensors_header import read_header

        shapes: dict[str, tuple[int, ...]] = {}
        for file in sorted(Path(path).glob("*.safetensors")):
            shapes.update({key: tuple(meta["shape"]) for key, meta in read_header(file).items()})
        config = json.loads((Path(path) / "config.json").read_text())
        hidden = config.get("hidden_size") or config.get("text_config", {}).get("hidden_size", 0)
        return cls(name=name, path=Path(path), shapes=shapes, hidden_size=int(hidden))

    @cached_property
    def parameter_count(self) -> int:
        import math

        return sum(math.prod(shape) for shape in self.shapes.values())

    @cached_property
    def linear_modules(self) -> dict[str, tuple[int, int]]:
        """Module path -> (out_features, in_features) for every 2-D '.weight'."""
        return {
            key[: -len(".weight")]: (shape[0], shape[1])
            for key, shape in self.shapes.items()
            if key.endswith(".weight") and len(shape) == 2
        }

    @cached_property
    def module_leaf_names(self) -> set[str]:
        return {module.rsplit(".", 1)[-1] for module in self.linear_modules}
