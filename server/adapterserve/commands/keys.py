"""`adapterserve keys add | list | revoke`: tenant API keys in the keys file."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from adapterserve.config import load_settings

from .common import CONFIG_HELP, console

app = typer.Typer(help="Tenant API keys in the keys file: add, list, revoke.", no_args_is_help=True)

KEYS_FILE_HELP = "The keys file (default: the settings' keys_file)."


def _keys_file(path: Optional[Path], config: Optional[Path]) -> Path:
    path = path or load_settings(config).keys_file
    if path is None:
        console.print("[red]no keys file[/red]: pass --keys-file or set keys_file in the settings")
        raise typer.Exit(2)
    return path


@app.command("add")
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

    from adapterserve.tenants.keys import KeyLimits, add

    scopes = ([] if no_inference else ["inference"]) + (["admin"] if admin else []) + (["metrics"] if metrics else [])
    try:
        limits = KeyLimits(requests_per_minute=requests_per_minute, tokens_per_minute=tokens_per_minute, concurrent_requests=concurrent_requests)
        entry, secret = add(_keys_file(keys_file, config), tenant, list(model), base, scopes, limits)
    except (ValidationError, ValueError) as exc:
        console.print(f"[red]not added[/red]: {escape(str(exc))}")
        raise typer.Exit(1) from None
    console.print(f"added {entry.id} for tenant {escape(entry.tenant)}; the secret (shown only now):")
    print(secret)


@app.command("list")
def keys_list(
    keys_file: Optional[Path] = typer.Option(None, "--keys-file", help=KEYS_FILE_HELP),
    config: Optional[Path] = typer.Option(None, "--config", help=CONFIG_HELP),
) -> None:
    """The keys: id, tenant, models, scopes, limits (never a secret)."""
    from adapterserve.tenants.keys import read

    table = Table("id", "tenant", "models", "base", "scopes", "limits")
    for entry in read(_keys_file(keys_file, config)).keys:
        limits = ", ".join(f"{k}={v}" for k, v in entry.limits.model_dump().items() if v is not None) or "-"
        table.add_row(entry.id, escape(entry.tenant), escape(", ".join(entry.models) or "-"), str(entry.base), ", ".join(entry.scopes), limits)
    Console().print(table)


@app.command("revoke")
def keys_revoke(
    key_id: Optional[str] = typer.Argument(None, help="The key's id (see `keys list`)."),
    tenant: Optional[str] = typer.Option(None, help="Revoke every key of this tenant instead."),
    keys_file: Optional[Path] = typer.Option(None, "--keys-file", help=KEYS_FILE_HELP),
    config: Optional[Path] = typer.Option(None, "--config", help=CONFIG_HELP),
) -> None:
    """Revoke a key (or a tenant's keys); a running server refuses it from its next request."""
    from adapterserve.tenants.keys import revoke

    if (key_id is None) == (tenant is None):
        console.print("[red]name one key id, or --tenant[/red]")
        raise typer.Exit(2)
    removed = revoke(_keys_file(keys_file, config), key_id=key_id, tenant=tenant)
    if not removed:
        console.print("[red]no such key[/red]")
        raise typer.Exit(1)
    for entry in removed:
        console.print(f"revoked {entry.id} ({escape(entry.tenant)})")
