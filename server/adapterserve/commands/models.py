"""`adapterserve models prepare`: the embedded base model, converted once into the cache."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from adapterserve.config import load_settings

app = typer.Typer(help="Base model preparation.", no_args_is_help=True)


@app.command("prepare")
def models_prepare(
    cache_dir: Optional[Path] = typer.Option(None, help="Cache directory (default: ADAPTERSERVE_CACHE_DIR or ~/.cache/adapterserve)."),
    force: bool = typer.Option(False, help="Convert again even if prepared."),
) -> None:
    """Convert the embedded SmolLM2-135M-Instruct GGUF into a bf16 HF folder in the cache."""
    from adapterserve.base_model import prepare_default_model

    settings = load_settings(cache_dir=cache_dir)
    typer.echo(prepare_default_model(settings.models_dir, force=force))
