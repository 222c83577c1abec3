"""What the `adapterserve` subcommands share: the error console and the --config help."""

from __future__ import annotations

from rich.console import Console

console = Console(stderr=True)

CONFIG_HELP = "YAML file of settings (lowest precedence: env ADAPTERSERVE_* and flags override it)."
