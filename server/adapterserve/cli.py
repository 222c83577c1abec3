"""The `adapterserve` command: serve | compare | models prepare | adapters list/validate/build/merge
| keys add/list/revoke.

`serve` takes one flag per Settings field, made from the field's type and description,
so the flags, the YAML keys and the ADAPTERSERVE_* variables always agree.
"""

from __future__ import annotations

import errno
import inspect
import logging
import os
import socket
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Any, List, Optional

import typer
from pydantic import SecretStr
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .config import Settings, load_settings
from .process import PORT_IN_USE_EXIT

app = typer.Typer(help="Serve one base LLM with many adapters, or each fine-tuned model on its own.", no_args_is_help=True)
models_app = typer.Typer(help="Base model preparation.", no_args_is_help=True)
adapters_app = typer.Typer(help="Adapter stores: list, validate, build.", no_args_is_help=True)
keys_app = typer.Typer(help="Tenant API keys in the keys file: add, list, revoke.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(keys_app, name="keys")
app.add_typer(adapters_app, name="adapters")
console = Console(stderr=True)

CONFIG_HELP = "YAML file of settings (lowest precedence: env ADAPTERSERVE_* and flags override it)."


# --- serve: flags from Settings -----------------------------------------------------
def _flag_type(annotation: Any) -> tuple[Any, bool]:
    """A typer-friendly type for a Settings annotation, and whether it is a bool switch."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        origin = typing.get_origin(annotation)
    if annotation is SecretStr:
        return str, False
    if origin is list:
        return List[typing.get_args(annotation)[0]], False
    return annotation, annotation is bool


def with_settings_flags(command):
    """Give `command` one optional keyword flag per Settings field plus --config."""
    params = [
        inspect.Parameter(
            "config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
            default=typer.Option(None, "--config", help=CONFIG_HELP),
        )
    ]
    for name, field in Settings.model_fields.items():
        flag_type, is_switch = _flag_type(field.annotation)
        flag = "--" + name.replace("_", "-")
        decl = f"{flag}/--no-{flag[2:]}" if is_switch else flag
        params.append(
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[flag_type],
                default=typer.Option(None, decl, help=field.description, show_default=False),
            )
        )
    command.__signature__ = inspect.Signature(params)
    return command


def settings_from_flags(flags: dict[str, Any]) -> Settings:
    config = flags.pop("config", None)
    values = {k: (v.value if isinstance(v, Enum) else v) for k, v in flags.items() if v is not None}
    if "adapter_dirs" in values and not values["adapter_dirs"]:
        values.pop("adapter_dirs")
    return load_settings(config, **values)


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command(context_settings={"max_content_width": 120})
@with_settings_flags
def serve(**flags: Any) -> None:
    """Start the OpenAI-compatible server (prepares the base and demo adapters when missing)."""
    import uvicorn

    from .app import create_app

    settings = settings_from_flags(flags)
    setup_logging(settings.log_level)
    if settings.ray:
        _serve_on_ray(settings)
        return
    listening = claim_port(settings.host, settings.port)
    StoppableServer = _stoppable_server_class()
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=30,  # in-flight requests get this long after SIGTERM
        limit_concurrency=settings.max_connections,
        timeout_keep_alive=settings.keep_alive_timeout_s,
    )
    StoppableServer(config).run(sockets=[listening])


def _stoppable_server_class():
    import uvicorn

    from .app import request_stop

    class StoppableServer(uvicorn.Server):
        """uvicorn's server; a SIGTERM or SIGINT during the app's start-up also stops the
        start-up (uvicorn alone waits for it to finish: minutes during a first compile)."""

        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            request_stop(self.config.app)

    return StoppableServer


def claim_port(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the engines start. uvicorn binds only after the
    app's start-up (~30-60 s of engine start on 2 cores): a port in use failed only then,
    and in that minute another process could take a free port (vLLM's engines pick free
    ports of their own). Connections are accepted once the server is ready (uvicorn
    listens on this socket after the start-up)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listening = socket.socket(family, socket.SOCK_STREAM)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listening.bind((host, port))
    except OSError as exc:
        listening.close()
        console.print(f"[red]cannot listen on {escape(host)}:{port}:[/red] {escape(exc.strerror or str(exc))}")
        raise typer.Exit(PORT_IN_USE_EXIT if exc.errno == errno.EADDRINUSE else 1) from None
    return listening


def _serve_on_ray(settings: Settings) -> None:
    """`serve --ray`: the Ray Serve application on a local (or given) Ray cluster."""
    try:
        import ray  # noqa: F401
    except ImportError:
        console.print('[red]--ray needs Ray Serve:[/red] pip install "adapterserve[ray]"')
        raise typer.Exit(1) from None
    if settings.mode.value != "shared":
        console.print("[red]--ray serves the shared mode[/red] (one base, many adapters per replica).")
        raise typer.Exit(2)
    from .rayserve.app import run_local

    run_local(settings)


# --- compare --------------------------------------------------------------------------
@app.command()
def compare(
    tasks: Optional[int] = typer.Option(None, "--tasks", min=1, help="Number of tasks (default: every adapter; more than there are repeats them under new names)."),
    kind: str = typer.Option("all", help="Tasks of this kind only: all, lora (chat) or head (classification)."),
    budget: Optional[str] = typer.Option(None, help="Memory budget, e.g. 16GiB or bytes (default: this machine's memory)."),
    adapter_dir: List[Path] = typer.Option([], "--adapter-dir", help="Adapter store (repeatable); default: the demo adapters."),
    requests: int = typer.Option(48, min=1, help="Streamed chat requests in the workload."),
    concurrency: int = typer.Option(16, min=1, help="Requests in flight at once."),
    max_tokens: int = typer.Option(64, min=1, help="Output tokens per chat request."),
    classify_requests: int = typer.Option(64, min=1, help="Classification requests in the workload (head tasks)."),
    out: Path = typer.Option(Path("compare-results"), help="Folder for compare.json, compare.md and compare-memory.png."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML serving settings for both modes (dtype, KV cache, ...)."),
) -> None:
    """Measure the same tasks in shared mode and in dedicated mode, one after the other:
    storage, memory per process, start-up, adding a task, throughput and TTFT."""
    import psutil

    from .compare.measure import Workload
    from .compare.report import terminal_tables, write
    from .compare.run import CompareOptions, ProgressSteps, compare as run_compare, parse_bytes
    from .compare.tasks import KINDS

    if kind not in KINDS:
        raise typer.BadParameter(f"one of {', '.join(KINDS)}", param_hint="--kind")
    try:
        budget_bytes = parse_bytes(budget) if budget else psutil.virtual_memory().total
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--budget") from None
    settings = load_settings(config)
    setup_logging("warning")
    options = CompareOptions(
        tasks=tasks, kind=kind, budget_bytes=budget_bytes, adapter_dirs=list(adapter_dir), config=config,
        workload=Workload(requests, concurrency, max_tokens, classify_requests),
    )
    steps = ProgressSteps(console)
    try:
        report = run_compare(settings, options, steps)
    except (ValueError, RuntimeError, TimeoutError) as exc:
        steps.close()
        console.print(f"[red]compare failed:[/red] {exc}")
        raise typer.Exit(1) from None
    steps.close()
    for table in terminal_tables(report):
        Console().print(table)
    for note in report["notes"]:
        console.print(f"- {note}", style="dim")
    for what, path in write(report, out).items():
        console.print(f"{what}: {path}")


# --- models ---------------------------------------------------------------------------
@models_app.command("prepare")
def models_prepare(
    cache_dir: Optional[Path] = typer.Option(None, help="Cache directory (default: ADAPTERSERVE_CACHE_DIR or ~/.cache/adapterserve)."),
    force: bool = typer.Option(False, help="Convert again even if prepared."),
) -> None:
    """Convert the embedded SmolLM2-135M-Instruct GGUF into a bf16 HF folder in the cache."""
    from .models import prepare_default_model

    settings = load_settings(cache_dir=cache_dir)
    typer.echo(prepare_default_model(settings.models_dir, force=force))


# --- adapters -------------------------------------------------------------------------
def _base(settings: Settings):
    from .registry.store import base_info

    return base_info(settings)


def _registry(settings: Settings, stores: list[Path]):
    from .registry.store import open_registry

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


@adapters_app.command("list")
def adapters_list(
    adapter_dir: List[Path] = typer.Option([], "--adapter-dir", help="Store directory (repeatable). Default: the demo store."),
    base_model: Optional[Path] = typer.Option(None, help="Base model folder (default: the embedded model)."),
    config: Optional[Path] = typer.Option(None, "--config", help=CONFIG_HELP),
) -> None:
    """The table of adapters in the stores, with refused folders and their reasons."""
    from .training.demo import demo_store

    settings = load_settings(config, base_model=base_model)
    stores = list(adapter_dir) or list(settings.adapter_dirs)
    if not stores:
        base = _base(settings)
        stores = [demo_store(settings.cache_dir, base.path)]
    registry = _registry(settings, stores)
    Console().print(_table(registry))
    _print_problems(registry)


@adapters_app.command("validate")
def adapters_validate(
    path: Path = typer.Argument(..., help="An adapter folder, or a store directory of them."),
    base_model: Optional[Path] = typer.Option(None, help="Base model folder (default: the embedded model)."),
    config: Optional[Path] = typer.Option(None, "--config", help=CONFIG_HELP),
) -> None:
    """Validate adapters against the base; exit 1 when any is refused."""
    from .registry.validation import CONFIG_FILE

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


@adapters_app.command("build")
def adapters_build(
    names: List[str] = typer.Argument(None, help="Demo adapters to build (default: all)."),
    force: bool = typer.Option(False, help="Build again even if up to date."),
    base_model: Optional[Path] = typer.Option(None, help="Base model folder (default: the embedded model)."),
    config: Optional[Path] = typer.Option(None, "--config", help=CONFIG_HELP),
) -> None:
    """Train the demo adapters from adapters/ with peft into the cache (seeded)."""
    from .models import resolve_base_model
    from .training.demo import build_demo_adapters, demo_store

    settings = load_settings(config, base_model=base_model)
    base_path = resolve_base_model(settings.base_model, settings.models_dir)
    built = build_demo_adapters(settings.demo_recipes_dir, settings.cache_dir, base_path, names or None, force)
    for name, stats in built.items():
        console.print(
            f"built {name}: {stats['trainable_params']:,} trainable parameters "
            f"({100 * stats['trainable_share']:.2f}% of the model), final loss {stats['final_loss']:.3f}"
        )
    typer.echo(demo_store(settings.cache_dir, base_path))


@adapters_app.command("merge")
def adapters_merge(
    names: List[str] = typer.Argument(None, help="Adapters to merge (default: every adapter in the stores)."),
    adapter_dir: List[Path] = typer.Option([], "--adapter-dir", help="Store directory (repeatable). Default: the demo store."),
    force: bool = typer.Option(False, help="Merge again even if up to date."),
    base_model: Optional[Path] = typer.Option(None, help="Base model folder (default: the embedded model)."),
    config: Optional[Path] = typer.Option(None, "--config", help=CONFIG_HELP),
) -> None:
    """Merge adapters into full fine-tuned models (bf16) for the dedicated mode; prints their folder."""
    from .training.demo import demo_store
    from .training.merge import merge_adapters, merged_store

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


def main() -> None:
    app()


if __name__ == "__main__":
    main()


# --- keys -----------------------------------------------------------------------------
KEYS_FILE_HELP = "The keys file (default: the settings' keys_file)."


def _keys_file(path: Optional[Path], config: Optional[Path]) -> Path:
    path = path or load_settings(config).keys_file
    if path is None:
        console.print("[red]no keys file[/red]: pass --keys-file or set keys_file in the settings")
        raise typer.Exit(2)
    return path


@keys_app.command("add")
def keys_add(
    tenant: str = typer.Option(..., help="Tenant name (letters, digits, . _ -)."),
    model: List[str] = typer.Option([], "--model", help="A model the key may use: a name or a glob pattern (repeatable)."),
    base: bool = typer.Option(True, "--base/--no-base", help="May the key use the base model itself."),
    admin: bool = typer.Option(False, "--admin", help="Give the key the admin scope too."),
    metrics: bool = typer.Option(False, "--metrics", help="Give the key the metrics scope (/metrics, /health's details: every tenant's series; for Prometheus)."),
    no_inference: bool = typer.Option(False, "--no-inference", help="Admin only: no inference scope."),
    requests_per_minute: Optional[int] = typer.Option(None, min=1),
    tokens_per_minute: Optional[int] = typer.Option(None, min=1),
    concurrent_requests: Optional[int] = typer.Option(None, min=1),
    keys_file: Optional[Path] = typer.Option(None, "--keys-file", help=KEYS_FILE_HELP),
    config: Optional[Path] = typer.Option(None, "--config", help=CONFIG_HELP),
) -> None:
    """Add a key; its secret is printed once (the file keeps only its hash)."""
    from pydantic import ValidationError

    from .tenants.keys import KeyLimits, add

    scopes = ([] if no_inference else ["inference"]) + (["admin"] if admin else []) + (["metrics"] if metrics else [])
    try:
        limits = KeyLimits(requests_per_minute=requests_per_minute, tokens_per_minute=tokens_per_minute, concurrent_requests=concurrent_requests)
        entry, secret = add(_keys_file(keys_file, config), tenant, list(model), base, scopes, limits)
    except (ValidationError, ValueError) as exc:
        console.print(f"[red]not added[/red]: {escape(str(exc))}")
        raise typer.Exit(1) from None
    console.print(f"added {entry.id} for tenant {escape(entry.tenant)}; the secret (shown only now):")
    print(secret)


@keys_app.command("list")
def keys_list(
    keys_file: Optional[Path] = typer.Option(None, "--keys-file", help=KEYS_FILE_HELP),
    config: Optional[Path] = typer.Option(None, "--config", help=CONFIG_HELP),
) -> None:
    """The keys: id, tenant, models, scopes, limits (never a secret)."""
    from .tenants.keys import read

    table = Table("id", "tenant", "models", "base", "scopes", "limits")
    for entry in read(_keys_file(keys_file, config)).keys:
        limits = ", ".join(f"{k}={v}" for k, v in entry.limits.model_dump().items() if v is not None) or "-"
        table.add_row(entry.id, escape(entry.tenant), escape(", ".join(entry.models) or "-"), str(entry.base), ", ".join(entry.scopes), limits)
    Console().print(table)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Optional[str] = typer.Argument(None, help="The key's id (see `keys list`)."),
    tenant: Optional[str] = typer.Option(None, help="Revoke every key of this tenant instead."),
    keys_file: Optional[Path] = typer.Option(None, "--keys-file", help=KEYS_FILE_HELP),
    config: Optional[Path] = typer.Option(None, "--config", help=CONFIG_HELP),
) -> None:
    """Revoke a key (or a tenant's keys); a running server refuses it from its next request."""
    from .tenants.keys import revoke

    if (key_id is None) == (tenant is None):
        console.print("[red]name one key id, or --tenant[/red]")
        raise typer.Exit(2)
    removed = revoke(_keys_file(keys_file, config), key_id=key_id, tenant=tenant)
    if not removed:
        console.print("[red]no such key[/red]")
        raise typer.Exit(1)
    for entry in removed:
        console.print(f"revoked {entry.id} ({escape(entry.tenant)})")

