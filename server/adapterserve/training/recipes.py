"""A demo adapter's recipe (recipe.yaml) and its dataset (data.jsonl), as kept in adapters/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field

RECIPE_FILE = "recipe.yaml"
DATA_FILE = "data.jsonl"


class Recipe(BaseModel):
    """How one demo adapter is trained."""

    name: str = ""
    kind: Literal["lora", "head"] = "lora"
    description: str = ""
    rank: int = Field(8, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    steps: int = Field(100, gt=0)
    batch_size: int = Field(8, gt=0)
    learning_rate: float = Field(2e-3, gt=0)
    seed: int = 0
    labels: list[str] = Field(default_factory=list)  # heads only: label names by index
    folder: Path | None = None

    @property
    def data_path(self) -> Path:
        assert self.folder is not None
        return self.folder / DATA_FILE

    def examples(self) -> list[dict]:
        with self.data_path.open() as handle:
            return [json.loads(line) for line in handle if line.strip()]

    def fingerprint(self) -> str:
        """Changes when the recipe or its data change: a built adapter with another
        fingerprint is stale and is built again."""
        import hashlib

        digest = hashlib.sha256(self.model_dump_json(exclude={"folder"}).encode())
        digest.update(self.data_path.read_bytes())
        return digest.hexdigest()[:16]


def load_recipe(folder: Path) -> Recipe:
    data = yaml.safe_load((folder / RECIPE_FILE).read_text()) or {}
    return Recipe(**data, name=folder.name, folder=folder)


def demo_recipes(recipes_dir: Path) -> list[Recipe]:
    return [load_recipe(f) for f in sorted(Path(recipes_dir).iterdir()) if (f / RECIPE_FILE).is_file()]
