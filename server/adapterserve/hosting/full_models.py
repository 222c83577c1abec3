"""Fully fine-tuned model folders, as the dedicated mode hosts them: what each one is (a
generation model or a classifier, with its label names), how big it is, and what adapter
it was merged from (for the metrics' comparison)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from adapterserve.registry import kinds


@dataclass
class FullModel:
    """One fully fine-tuned model folder."""

    name: str
    path: Path
    kind: str  # "full" (generation) or "head" (classification)
    labels: list[str] = field(default_factory=list)

    @property
    def weights_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.glob("*.safetensors"))

    @classmethod
    def read(cls, folder: Path) -> "FullModel":
        config = json.loads((folder / "config.json").read_text())
        architectures = config.get("architectures") or []
        if any(a.endswith("ForSequenceClassification") for a in architectures):
            id2label = config.get("id2label") or {}
            labels = [id2label.get(str(i), f"LABEL_{i}") for i in range(len(id2label))]
            return cls(folder.name, folder.resolve(), kinds.HEAD.name, labels)  # served as a head is
        return cls(folder.name, folder.resolve(), kinds.FULL.name)


def discover_models(paths: list[Path]) -> list[FullModel]:
    """Each path is a model folder, or a directory of model folders."""
    models: list[FullModel] = []
    for path in paths:
        path = Path(path).expanduser()
        folders = [path] if (path / "config.json").is_file() else sorted(p for p in path.iterdir() if (p / "config.json").is_file())
        models += [FullModel.read(folder) for folder in folders]
    names = [m.name for m in models]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"two model folders share a name: {', '.join(duplicates)}")
    return models


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def merged_adapter_elements(model_path: Path) -> int:
    """A merged full model records the adapter it came from: its weights' elements (0 if unknown)."""
    from adapterserve.registry.safetensors_header import safetensors_elements
    from adapterserve.training.merge import MERGE_INFO

    try:
        source = json.loads((Path(model_path) / MERGE_INFO).read_text()).get("source", "")
    except (OSError, ValueError, AttributeError):
        return 0
    adapter = Path(str(source).rsplit(":", 2)[0])
    return safetensors_elements(adapter) if adapter.is_dir() else 0
