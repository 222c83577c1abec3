"""The `adapterserve` command: serve | compare | models prepare | adapters list/validate/build/merge
| keys add/list/revoke.

`serve` and `compare` are here; the `models`, `adapters` and `keys` groups are in
commands/. `serve` takes one flag per Settings field, made from the field's type and description,
so the flags, the YAML keys and the ADAPTERSERVE_* variables always agree.
"""

from __future__ import annotations

import errno
import inspect
import logging
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

from .commands import adapters, keys, models
from .commands.common import CONFIG_HELP, console
from .config import Settings, load_settings
from .server_process import PORT_IN_USE_EXIT

app = typer.Typer(help="Serve one base LLM with many adapters, or each fine-tuned model on its own.", no_args_is_help=True)
app.add_typer(models.app, name="models")
app.add_typer(keys.app, name="keys")
app.add_typer(adapters.app, name="adapters")


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
    for name in [k for k, v in values.items() if isinstance(v, (list, tuple)) and not v]:
        values.pop(name)  # a repeatable flag not given: the environment's or the file's value
    return load_settings(config, **values)


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.command(context_settings={"max_content_width": 120})
@with_settings_flags
def serve(**flags: Any) -> None:
    """Start the OpenAI-compatible server (prepares the base and demo adapters when missing)."""
    import uvicorn

    from .api.connections import server_protocol
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
        http=server_protocol(settings.header_timeout_s),
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
    train_examples: int = typer.Option(64, min=0, help="Chat examples trained both ways (LoRA, every weight) for the training rows; 0: none."),
    train_data: Optional[Path] = typer.Option(None, help="Chat JSONL for the training rows (default: the pirate demo recipe's data)."),
) -> None:
    """Measure the same tasks in shared mode and in dedicated mode, one after the other:
    storage, memory per process, start-up, adding a task, throughput and TTFT; then the
    same data trained both ways (trainable parameters, time, peak memory, bytes, loss)."""
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
        train_examples=train_examples, train_data=train_data,
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
