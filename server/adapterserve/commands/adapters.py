"""`adapterserve adapters list | validate | build | merge`: the adapter stores from the shell."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from adapterserve.config import Settings, load_settings

from .common import CONFIG_HELP, console

app = typer.Typer(help="Adapter stores: list, validate, build.", no_args_is_help=True)


def _base(settings: Settings):
    from adapterserve.registry.store import base_info

    return base_info(settings)


def _registry(settings: Settings, stores: list[Path | str]):
    from adapterserve.registry.store import open_registry

    return open_registry(settings, stores)


def _table(registry) -> Table:
    table = Table(title=f"adapters over {registry.base.name}")
    for column in ("name", "kind", "rank", "target modules", "trainable % of base", "size", "base it was trained for"):
        table.add_column(column)
    for record in sorted(registry.adapters.values(), key=lambda r: r.name):
        table.add_row(  # cells from adapter configs are text, never markup
            escape(record.name), record.kind, str(record.rank), escape(",".join(record.target_modules)),
            f"{100 * record.share_of_base(registry.base.parameter_count):.3f}",
            f"{record.size_bytes / 1e6:.2f} MB", escape(str(record.base_model or "?")),
        )
    return table


def _print_problems(registry) -> None:
    for problem in registry.problems:
        # names, paths and reasons come from the folders: never read them as markup
        console.print(f"[red]refused[/red] {escape(repr(problem.name))} ({escape(str(problem.path))}): {escape(problem.reason)}")


@app.command("list")
def adapters_list(
    adapter_dir: List[Path] = typer.Option([], "--adapter-dir", help="Store directory (repeatable). Default: the demo store."),
    base_model: Optional[Path] = typer.Option(None, help="Base model folder (default: the embedded model)."),
    config: Optional[Path] = typer.Option(None, "--config", help=CONFIG_HELP),
) -> None:
    """The table of adapters in the stores, with refused folders and their reasons."""
    from adapterserve.training.demo import demo_store

    settings = load_settings(config, base_model=base_model)
    stores = list(adapter_dir) or [*settings.adapter_dirs, *settings.adapter_sources]
    if not stores:
        base = _base(settings)
        stores = [demo_store(settings.cache_dir, base.path)]
    registry = _registry(settings, stores)
    Console().print(_table(registry))
    _print_problems(registry)


@app.command("validate")
def adapters_validate(
    path: Path = typer.Argument(..., help="An adapter folder, or a store directory of them."),
    base_model: Optional[Path] = typer.Option(None, help="Base model folder (default: the embedded model)."),
    config: Optional[Path] = typer.Option(None, "--config", help=CONFIG_HELP),
) -> None:
    """Validate adapters against the base; exit 1 when any is refused."""
    from adapterserve.registry.validation import CONFIG_FILE

    settings = load_settings(config, base_model=base_model)
    path = Path(os.path.abspath(path))  # not resolve(): a symlinked folder is judged as a store entry
    if not path.is_dir():
        console.print(f"[red]refused[/red] {path.name} ({path}): not a folder")
        raise typer.Exit(1)
    try:
        is_single = (path / CONFIG_FILE).exists() or not any(p.is_dir() for p in path.iterdir())
    except OSError as exc:
        console.print(f"[red]refused[/red] {path.name} ({path}): cannot be listed ({exc})")
        raise typer.Exit(1) from None
    registry = _registry(settings, [path.parent] if is_single else [path])
    if is_single:
        registry.adapters = {k: v for k, v in registry.adapters.items() if k == path.name}
        registry.problems = [p for p in registry.problems if p.name == path.name]
    Console().print(_table(registry))
    for record in registry.adapters.values():
        for warning in record.warnings:
            console.print(f"[yellow]warning[/yellow] {record.name}: {escape(warning)}")
    _print_problems(registry)
    if registry.problems:
        raise typer.Exit(1)
    console.print(f"[green]ok[/green]: {len(registry.adapters)} adapter(s) valid")


@app.command("build")
def adapters_build(
    names: List[str] = typer.Argument(None, help="Demo adapters to build (default: all)."),
    force: bool = typer.Option(False, help="Build again even if up to date."),
    base_model: Optional[Path] = typer.Option(None, help="Base model folder (default: the embedded model)."),
    config: Optional[Path] = typer.Option(None, "--config", help=CONFIG_HELP),
) -> None:
    """Train the demo adapters from adapters/ with peft into the cache (seeded)."""
    from adapterserve.base_model import resolve_base_model
    from adapterserve.training.demo import build_demo_adapters, demo_store

    settings = load_settings(config, base_model=base_model)
    base_path = resolve_base_model(settings.base_model, settings.models_dir)
    built = build_demo_adapters(settings.demo_recipes_dir, settings.cache_dir, base_path, names or None, force)
    for name, stats in built.items():
        console.print(
            f"built {name}: {stats['trainable_params']:,} trainable parameters "
            f"({100 * stats['trainable_share']:.2f}% of the model), final loss {stats['final_loss']:.3f}"
        )
    typer.echo(demo_store(settings.cache_dir, base_path))


@app.command("merge")
def adapters_merge(
    names: List[str] = typer.Argument(None, help="Adapters to merge (default: every adapter in the stores)."),
    adapter_dir: List[Path] = typer.Option([], "--adapter-dir", help="Store directory (repeatable). Default: the demo store."),
    force: bool = typer.Option(False, help="Merge again even if up to date."),
    base_model: Optional[Path] = typer.Option(None, help="Base model folder (default: the embedded model)."),
    config: Optional[Path] = typer.Option(None, "--config", help=CONFIG_HELP),
) -> None:
    """Merge adapters into full fine-tuned models (bf16) for the dedicated mode; prints their folder."""
    from adapterserve.training.demo import demo_store
    from adapterserve.training.merge import merge_adapters, merged_store

    settings = load_settings(config, base_model=base_model)
    base = _base(settings)
    stores = list(adapter_dir) or [demo_store(settings.cache_dir, base.path)]
    registry = _registry(settings, stores)
    unknown = sorted(set(names or []) - set(registry.adapters))
    if unknown:
        _print_problems(registry)
        console.print(f"[red]no valid adapter named {', '.join(unknown)}[/red]")
        raise typer.Exit(1)
    records = [r for r in registry.adapters.values() if not names or r.name in names]
    merged = merge_adapters(base.path, records, merged_store(settings.cache_dir, base.path), force=force)
    for name, folder in merged.items():
        console.print(f"{name}: {folder}")
    typer.echo(merged_store(settings.cache_dir, base.path))


@app.command("sign")
def adapters_sign(
    folder: Path = typer.Argument(..., help="The adapter folder to sign (its config, weights and labels)."),
    key: Path = typer.Option(..., "--key", help="Elliptic-curve private key, PEM (openssl ecparam -name prime256v1 -genkey -noout)."),
) -> None:
    """Sign an adapter folder (OpenSSF Model Signing): writes model.sig beside its files, which a
    server with --require-signed-adapters verifies against its --trusted-adapter-keys."""
    from adapterserve.registry.signing import sign_folder

    if not (folder / "adapter_config.json").is_file():
        console.print(f"[red]{escape(str(folder))} holds no adapter_config.json[/red]")
        raise typer.Exit(1)
    signature = sign_folder(folder, key)
    console.print(f"signed: {escape(str(signature))}")
